"""Deleting rows: tombstone files that readers exclude (live_positions), and compaction, which rewrites the
live rows as one new segment and drops the tombstones and the statistics fitted over the old rows."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from influence.errors import InvalidInputError, StoreCorruptedError, StoreIncompleteError
from influence.files import locked, remove_tree, write_bytes_atomic
from influence.store.build import BuildMixin, Part, next_segment_number
from influence.store.layout import COMPACT_LOCK_FILE, ROW_IDS_FILE, TMP_DIR, TOMBSTONES_DIR, read_verified
from influence.store.manifest import as_numpy
from influence.store.statistics import StatisticsMixin
from influence.tokens import TokenRows


class DeletionMixin(BuildMixin, StatisticsMixin):
    """Tombstones (delete_rows, and what readers must leave out) and compaction."""

    def _load_tombstone(self, entry: dict[str, Any]) -> np.ndarray:
        path = self._path / TOMBSTONES_DIR / entry["file"]
        data = read_verified(path, entry["sha256"], f"tombstones {path}", "; rebuild the store")
        try:
            ids = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise StoreCorruptedError(f"tombstones {path} are unreadable: {exc}") from None
        if ids.dtype != np.int64 or ids.shape != (int(entry["num_rows"]),):
            raise StoreCorruptedError(f"tombstones {path} hold {ids.dtype} {ids.shape}, not their record")
        return ids

    def deleted_row_ids(self) -> np.ndarray:
        """Dataset row ids deleted by `delete_rows` and not yet compacted away: (d,) int64, sorted, unique.

        Tombstone files are checked against their sha256 when read (StoreCorruptedError)."""
        self._require_complete()
        if self._deleted is None:
            parts = [self._load_tombstone(entry) for entry in self._tombstones]
            deleted = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
            deleted.flags.writeable = False
            self._deleted = deleted
        return self._deleted

    def live_positions(self) -> np.ndarray:
        """Store positions of the rows not deleted, ascending: (n_live,) int64 (arange(n) without deletions).

        Every reader that answers questions about rows (scoring, search, reports) ranges over these only."""
        if self._live is None:
            deleted = self.deleted_row_ids()
            if deleted.size == 0:
                live = np.arange(self.num_rows, dtype=np.int64)
            else:
                live = np.flatnonzero(~np.isin(self.row_ids(), deleted, assume_unique=True)).astype(np.int64)
            live.flags.writeable = False
            self._live = live
        return self._live

    def deleted_positions(self) -> np.ndarray:
        """Store positions of the deleted rows, ascending: (d,) int64."""
        if self.deleted_row_ids().size == 0:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.isin(self.row_ids(), self.deleted_row_ids(), assume_unique=True)).astype(
            np.int64
        )

    @property
    def num_live_rows(self) -> int:
        """Rows not deleted (num_rows counts the deleted ones until a compaction removes them)."""
        return len(self.live_positions())

    def delete_rows(self, row_ids: Any) -> int:
        """Delete rows by dataset row id: record them in a new tombstone file (atomic, checksummed) and return
        how many were newly deleted (ids deleted before are ignored).

        InvalidInputError for ids the store does not hold. Readers see the deletion after `refresh()` (this
        object refreshes itself); the features stay on disk until `compact()`.
        """
        ids = as_numpy(row_ids, "row_ids")
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise InvalidInputError(f"row_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        ids = np.unique(ids.astype(np.int64))
        if ids.size == 0:
            return 0
        with self._locked():
            self.refresh()
            segments = self._require_complete()
            unknown = ids[~np.isin(ids, self.row_ids())]
            if unknown.size:
                raise InvalidInputError(
                    f"{unknown.size} row_ids are not in the store, e.g. {unknown[:5].tolist()}"
                )
            fresh = np.setdiff1d(ids, self.deleted_row_ids(), assume_unique=True)
            if fresh.size == 0:
                return 0
            buffer = io.BytesIO()
            np.save(buffer, fresh.astype(np.int64), allow_pickle=False)
            data = buffer.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            file_name = f"tomb-{digest[:16]}.npy"
            (self._path / TOMBSTONES_DIR).mkdir(exist_ok=True)
            write_bytes_atomic(self._path / TOMBSTONES_DIR / file_name, data, self._path / TMP_DIR)
            entry = {"file": file_name, "sha256": digest, "num_rows": int(fresh.size)}
            self._commit_segments(list(segments), [*self._tombstones, entry])
        return int(fresh.size)

    # -- compaction

    def compact(self) -> int:
        """Remove the deleted rows for good: write the live rows as one new segment, switch segments.json to
        it without tombstones, then delete the old segments, the tombstone files and the statistics (fitted
        over the old rows: refit them). Returns the number of rows removed (0: nothing was deleted).

        Crash-safe and idempotent: before the switch the old state (rows still tombstoned) is intact, after it
        the new one is; leftovers of either kind are removed by the next compact() (run it again after a
        crash). Rows deleted while compacting keep their tombstones. FAISS indexes built over the old
        segments no longer match the store (influence.index reports it): rebuild them.
        """
        with locked(self._path / COMPACT_LOCK_FILE):
            with self._locked():
                self.refresh()
                segments = list(self._require_complete())
                tombstones = list(self._tombstones)
                self._remove_orphans(referenced={s["name"] for s in segments})
                self._remove_orphan_tombstones(referenced={t["file"] for t in tombstones})
                if not tombstones:
                    self._drop_stale_statistics(current=[s["name"] for s in segments])
                    return 0
                self._stamp_statistics([s["name"] for s in segments])
            deleted = self.deleted_row_ids()
            live = self.live_positions()
            removed = self.num_rows - len(live)
            # Written in tmp/ without the lock (deletions go on meanwhile); named and placed under it.
            work, files = self._write_segment_files(
                "compacted", len(live), self._iter_live_parts(segments, deleted)
            )
            with self._locked():
                try:
                    self.refresh()
                    if [s["name"] for s in self._require_complete()] != [s["name"] for s in segments]:
                        raise StoreIncompleteError(
                            "the store changed while it was being compacted (rows were appended); compact again"
                        )
                except BaseException:
                    remove_tree(work)
                    raise
                record = self._place_segment(work, files, next_segment_number(segments))
                compacted = {t["file"] for t in tombstones}
                kept = [t for t in self._tombstones if t["file"] not in compacted]
                self._commit_segments([record], kept)
                self._remove_orphans(referenced={record["name"]})
                self._remove_orphan_tombstones(referenced={t["file"] for t in kept})
                self._drop_stale_statistics(current=[record["name"]])
        return removed

    def _iter_live_parts(self, segments: list[dict[str, Any]], deleted: np.ndarray) -> Iterator[Part]:
        """(row_ids, features, norms) of the rows not deleted, segment by segment, in blocks."""
        block = 16384
        for segment in segments:
            ids = self._segment_array(segment, ROW_IDS_FILE, (segment["num_rows"],), np.dtype(np.int64))
            for start in range(0, len(ids), block):
                stop = min(start + block, len(ids))
                keep = np.flatnonzero(~np.isin(ids[start:stop], deleted)) + start
                feats, norms = {}, {}
                for name in self.layers:
                    spec = self._specs[name]
                    layer = self._segment_layer(segment, spec)
                    feats[name] = (
                        layer.select(keep) if isinstance(layer, TokenRows) else np.asarray(layer[keep])
                    )
                    norms[name] = np.asarray(
                        self._segment_array(
                            segment,
                            segment["layers"][name]["norms"],
                            (segment["num_rows"],),
                            np.dtype(np.float32),
                        )[keep]
                    )
                yield np.asarray(ids[keep]), feats, norms

    def _remove_orphan_tombstones(self, referenced: set[str]) -> None:
        folder = self._path / TOMBSTONES_DIR
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name not in referenced:
                    remove_tree(entry)
