"""FeatureStore: one object over a store directory, composed of one mixin per stage of the data's trip."""

from __future__ import annotations

from influence.store.build import BuildMixin
from influence.store.deletion import DeletionMixin
from influence.store.read import ReadableStore
from influence.store.statistics import StatisticsMixin


class FeatureStore(DeletionMixin, BuildMixin, StatisticsMixin, ReadableStore):
    """A feature store directory: build by chunks, finalize, append segments, read per-layer matrices.

    Create or resume with `FeatureStore.create(path, manifest)`, open with `FeatureStore.open(path)`. One
    object reflects the segments list it last read; `refresh()` picks up appends made by other processes.
    """

    def __repr__(self) -> str:
        state = (
            f"{self.num_rows} rows" if self.is_complete else f"{len(self.pending_chunks())} chunks pending"
        )
        return f"FeatureStore({str(self._path)!r}, layers={len(self.layers)}, {state})"
