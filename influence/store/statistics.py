"""Per-layer estimator statistics kept beside a store (e.g. DataInf's matrix): safetensors files listed with
their sha256 and the segments they were fitted over in statistics.json, so a compaction makes them stale."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from influence.errors import InvalidInputError, StoreIncompleteError
from influence.files import remove_tree, write_bytes_atomic, write_json_atomic
from influence.store.layout import STATISTICS_DIR, STATISTICS_FILE, TMP_DIR, read_verified
from influence.store.manifest import as_numpy, layer_file_stem
from influence.store.read import ReadableStore


class StatisticsMixin(ReadableStore):
    """Saving, finding and loading per-layer statistics; recognising the stale ones after a compaction."""

    def save_layer_statistics(self, name: str, tensors: Mapping[str, Any]) -> None:
        """Store named arrays for one layer (e.g. DataInf's (dim, dim) matrix), atomically replacing old ones.

        Stored as safetensors (no pickle), content-addressed, and listed with its sha256 in statistics.json.
        """
        self.layer_spec(name)
        if not isinstance(tensors, Mapping) or not tensors:
            raise InvalidInputError("statistics must be a non-empty mapping of name -> array")
        arrays = {}
        for key, value in tensors.items():
            if not isinstance(key, str) or not key:
                raise InvalidInputError(f"statistics keys must be non-empty strings, got {key!r}")
            array = as_numpy(value, f"statistics[{key!r}]")
            if array.dtype.kind not in "biuf":
                raise InvalidInputError(f"statistics[{key!r}] has unsupported dtype {array.dtype}")
            # ascontiguousarray alone would turn a 0-d scalar (e.g. a damping) into shape (1,).
            arrays[key] = np.ascontiguousarray(array).reshape(array.shape)
        try:
            data = save_safetensors(arrays)
        except Exception as exc:  # safetensors raises its own error types for unsupported dtypes
            raise InvalidInputError(f"cannot store statistics of {name!r}: {exc}") from None
        digest = hashlib.sha256(data).hexdigest()
        file_name = f"{layer_file_stem(name)}.{digest[:16]}.safetensors"
        (self._path / STATISTICS_DIR).mkdir(exist_ok=True)
        with self._locked():
            write_bytes_atomic(self._path / STATISTICS_DIR / file_name, data, self._path / TMP_DIR)
            index = self._statistics_index()
            previous = index.get(name, {}).get("file")
            self.refresh()
            index[name] = {"file": file_name, "sha256": digest, "keys": sorted(arrays)}
            if self._segments is not None:
                index[name]["segments"] = [s["name"] for s in self._segments]
            write_json_atomic(self._path / STATISTICS_FILE, {"layers": index}, self._path / TMP_DIR)
            # The old file goes only after the index stops naming it; a crash in between leaves an orphan.
            if previous and previous != file_name:
                with contextlib.suppress(FileNotFoundError):
                    (self._path / STATISTICS_DIR / previous).unlink()

    def _current_statistics(self, name: str) -> dict[str, Any] | None:
        """The statistics record of a layer, None when there is none or it was fitted over rows a compaction
        has since rewritten (stale)."""
        self.layer_spec(name)
        entry = self._statistics_index().get(name)
        if entry is None or "segments" not in entry:
            return entry
        if self._segments is None:
            self.refresh()
        # The segments this object reads (refresh() picks up newer ones): statistics must describe those rows.
        current = [s["name"] for s in self._segments or []]
        return entry if entry["segments"] == current else None

    def has_layer_statistics(self, name: str) -> bool:
        """Whether current statistics were saved for this layer (not stale after a compaction)."""
        return self._current_statistics(name) is not None

    def layer_statistics_keys(self, name: str) -> list[str]:
        """The names of a layer's current statistics, without reading them; [] when there are none."""
        entry = self._current_statistics(name)
        return [] if entry is None else list(entry["keys"])

    def load_layer_statistics(self, name: str) -> dict[str, np.ndarray]:
        """The arrays saved for one layer, checksum-verified; StoreIncompleteError if none were saved."""
        entry = self._current_statistics(name)
        if entry is None:
            raise StoreIncompleteError(
                f"no current statistics were saved for layer {name!r} (none yet, or fitted before a compaction)"
            )
        path = self._path / STATISTICS_DIR / entry["file"]
        data = read_verified(path, entry["sha256"], f"statistics of {name!r} ({path})")
        return dict(load_safetensors(data))

    # -- compaction: the segments statistics describe

    def _stamp_statistics(self, segment_names: list[str]) -> None:
        """Record the segments that statistics saved without that record were fitted over (older stores), so
        a compaction that dies after its switch still leaves them recognisably stale."""
        index = self._statistics_index()
        if any("segments" not in entry for entry in index.values()):
            for entry in index.values():
                entry.setdefault("segments", segment_names)
            write_json_atomic(self._path / STATISTICS_FILE, {"layers": index}, self._path / TMP_DIR)

    def _drop_stale_statistics(self, current: list[str]) -> None:
        index = self._statistics_index()
        stale = {name for name, entry in index.items() if entry.get("segments", current) != current}
        if not stale:
            return
        kept = {name: entry for name, entry in index.items() if name not in stale}
        write_json_atomic(self._path / STATISTICS_FILE, {"layers": kept}, self._path / TMP_DIR)
        referenced = {entry["file"] for entry in kept.values()}
        for path in (self._path / STATISTICS_DIR).iterdir():
            if path.name not in referenced:
                remove_tree(path)
