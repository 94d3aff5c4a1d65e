"""StoreReader: what scoring, reports and FAISS indexes read from a feature store.

FeatureStore provides it. A consumer typed with StoreReader depends on reading only, not on how a store is
built, appended to or compacted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from influence.store.manifest import LayerSpec, StoreManifest


class StoreReader(Protocol):
    """The read side of a feature store (see FeatureStore for what each member returns)."""

    # -- what the store holds
    @property
    def path(self) -> Path: ...

    @property
    def manifest(self) -> StoreManifest: ...

    @property
    def layers(self) -> list[str]: ...

    def layer_spec(self, name: str) -> LayerSpec: ...

    def refresh(self) -> None: ...

    # -- rows and their features, by store position
    @property
    def num_rows(self) -> int: ...

    def row_ids(self) -> np.ndarray: ...

    def layer(self, name: str) -> Any: ...  # (n, dim) matrix, or TokenRows for a tokens layer

    def norms(self, name: str) -> np.ndarray: ...

    def iter_layer_chunks(self, name: str, rows: int) -> Iterator[tuple[int, Any]]: ...

    def layer_checksums(self, name: str) -> list[str]: ...

    # -- deleted rows, which every answer leaves out
    @property
    def num_live_rows(self) -> int: ...

    def live_positions(self) -> np.ndarray: ...

    def deleted_positions(self) -> np.ndarray: ...

    def deleted_row_ids(self) -> np.ndarray: ...

    # -- estimator statistics fitted over the rows
    def has_layer_statistics(self, name: str) -> bool: ...

    def load_layer_statistics(self, name: str) -> dict[str, np.ndarray]: ...
