"""Reading a store: opening it, following its segments list, and serving per-layer features, norms and row
ids as read-only memmaps; verifying every listed file against its sha256."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Self

import numpy as np

from influence.errors import (
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
    UnknownLayerError,
)
from influence.files import locked, sha256_file
from influence.store.layout import (
    CHUNKS_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    ROW_IDS_FILE,
    SEGMENTS_DIR,
    SEGMENTS_FILE,
    STATISTICS_DIR,
    STATISTICS_FILE,
    TOMBSTONES_DIR,
    read_json,
)
from influence.store.manifest import STORE_FORMAT, STORE_FORMAT_VERSION, LayerSpec, StoreManifest, is_int
from influence.tokens import TokenRows


class ReadableStore:
    """The state of a store directory as one object last read it, and everything that reads it.

    FeatureStore adds building, statistics and deletion (influence.store.build, .statistics, .deletion).
    """

    def __init__(self, path: Path, manifest: StoreManifest, manifest_sha256: str) -> None:
        # Use create() or open(); the constructor trusts its arguments.
        self._path = path
        self._manifest = manifest
        self._manifest_sha256 = manifest_sha256
        self._specs = {layer.name: layer for layer in manifest.layers}
        self._dtype = np.dtype(manifest.dtype)
        self._segments: list[dict[str, Any]] | None = None
        self._tombstones: list[dict[str, Any]] = []
        self._signature: tuple[int, int, int] | None = None
        self._deleted: np.ndarray | None = None
        self._live: np.ndarray | None = None
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        # Token-row layers as TokenRows, per (segment names, layer): one object per state of the store, so
        # what a join derives from its files (token order, entry rows) is derived once, not per query.
        self._token_rows: dict[tuple[tuple[str, ...], str], TokenRows] = {}
        self.refresh()

    # -- opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> Self:
        """Open an existing store; verify checks every artifact's sha256 (reads all bytes: O(store size))."""
        root = Path(path)
        manifest_path = root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise InvalidInputError(f"{root} is not a feature store (no {MANIFEST_FILE})")
        document = read_json(manifest_path)
        if not isinstance(document, dict) or document.get("format") != STORE_FORMAT:
            raise StoreCorruptedError(f"{manifest_path} is not a feature store manifest")
        if document.get("format_version") != STORE_FORMAT_VERSION:
            raise ManifestMismatchError(
                f"store format version {document.get('format_version')} is not supported "
                f"(this library reads {STORE_FORMAT_VERSION}); rebuild the store"
            )
        try:
            manifest = StoreManifest.from_dict(document["manifest"])
        except (InvalidInputError, KeyError, TypeError) as exc:
            raise StoreCorruptedError(f"{manifest_path} holds an invalid manifest: {exc}") from None
        store = cls(root, manifest, sha256_file(manifest_path))
        if verify:
            store.verify()
        return store

    def refresh(self) -> None:
        """Re-read the segments list (picks up finalize/append/delete_rows/compact done by other processes)."""
        segments_path = self._path / SEGMENTS_FILE
        self._arrays.clear()
        self._token_rows.clear()
        self._deleted = None
        self._live = None
        signature = _signature(segments_path)
        if signature is None:
            self._segments = None
            self._tombstones = []
            self._signature = None
            return
        document = read_json(segments_path)
        try:
            fingerprint = document["fingerprint"]
            segments = document["segments"]
            manifest_sha = document["manifest_sha256"]
            tombstones = document.get("tombstones", [])
            if not all(isinstance(t, dict) and {"file", "sha256", "num_rows"} <= set(t) for t in tombstones):
                raise TypeError("bad tombstone record")
        except (KeyError, TypeError):
            raise StoreCorruptedError(f"{segments_path} is malformed") from None
        if fingerprint != self._manifest.fingerprint() or manifest_sha != self._manifest_sha256:
            raise StoreCorruptedError(
                f"{segments_path} was written for another manifest than {MANIFEST_FILE}"
            )
        self._segments = segments
        self._tombstones = list(tombstones)
        # Taken before the read: a replacement racing the read only makes changed() say True once too often.
        self._signature = signature

    def changed(self) -> bool:
        """Whether the readable state changed on disk (finalize, append, delete_rows, compact, by any process)
        since this object last read it; `refresh()` (or a new `open()`) picks the change up."""
        return _signature(self._path / SEGMENTS_FILE) != self._signature

    # -- properties

    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def manifest(self) -> StoreManifest:
        """The manifest the store was created with."""
        return self._manifest

    @property
    def layers(self) -> list[str]:
        """Layer names in manifest order."""
        return [layer.name for layer in self._manifest.layers]

    def layer_spec(self, name: str) -> LayerSpec:
        """The LayerSpec of one layer; UnknownLayerError if the store does not hold it."""
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownLayerError(
                f"layer {name!r} is not in this feature store (has {self.layers})"
            ) from None

    @property
    def is_complete(self) -> bool:
        """True once finalize() has consolidated the build: the store is readable."""
        return self._segments is not None or (self._path / SEGMENTS_FILE).exists()

    # -- the build plan (a store that is not complete reports its pending chunks)

    @property
    def num_chunks(self) -> int:
        """Number of build chunks: ceil(manifest.num_rows / chunk_size)."""
        return -(-self._manifest.num_rows // self._manifest.chunk_size)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of every build chunk, in order."""
        size, total = self._manifest.chunk_size, self._manifest.num_rows
        return [(start, min(start + size, total)) for start in range(0, total, size)]

    def _chunk_path(self, index: int) -> Path:
        return self._path / CHUNKS_DIR / f"chunk-{index:06d}.npz"

    def pending_chunks(self) -> list[int]:
        """Indices of chunks not yet written (empty once the store is complete)."""
        if self.is_complete:
            return []
        return [i for i in range(self.num_chunks) if not self._chunk_path(i).exists()]

    def _locked(self) -> AbstractContextManager[None]:
        """The writers' lock (finalize, append, deletions, statistics); readers never take it."""
        return locked(self._path / LOCK_FILE)

    # -- reading

    def _require_complete(self) -> list[dict[str, Any]]:
        if self._segments is None:
            self.refresh()
        if self._segments is None:
            pending = self.pending_chunks()
            raise StoreIncompleteError(
                f"feature store {self._path} is not complete: {len(pending)} of {self.num_chunks} chunks "
                "pending" + ("" if pending else "; finalize() has not run")
            )
        return self._segments

    def _segment_array(
        self, segment: dict[str, Any], file_name: str, shape: tuple[int, ...], dtype: np.dtype
    ) -> np.ndarray:
        key = (segment["name"], file_name)
        if key not in self._arrays:
            path = self._path / SEGMENTS_DIR / segment["name"] / file_name
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise StoreCorruptedError(f"{path} is unreadable: {exc}") from None
            if array.shape != shape or array.dtype != dtype:
                raise StoreCorruptedError(
                    f"{path} holds {array.dtype} {array.shape}, expected {dtype} {shape}"
                )
            self._arrays[key] = array
        return self._arrays[key]

    def map_all(self) -> None:
        """Memory-map every segment file now: this object then reads the state it holds even if a compaction
        removes those files afterwards (a mapped file lives on until unmapped), as a snapshot for readers."""
        for segment in self._require_complete():
            self._segment_array(segment, ROW_IDS_FILE, (segment["num_rows"],), np.dtype(np.int64))
            for name in self.layers:
                spec = self._specs[name]
                self._segment_layer(segment, spec)
                self._segment_array(
                    segment, segment["layers"][name]["norms"], (segment["num_rows"],), np.dtype(np.float32)
                )

    @property
    def num_rows(self) -> int:
        """Rows in the store (build plus appends), deleted ones included until a compaction."""
        return sum(int(s["num_rows"]) for s in self._require_complete())

    @property
    def num_segments(self) -> int:
        """Number of segments (1 after finalize, +1 per append)."""
        return len(self._require_complete())

    def _gather(self, parts: list[np.ndarray]) -> np.ndarray:
        if len(parts) == 1:
            return parts[0]
        # Several segments: a fresh in-memory copy of all of them (O(rows x dim) memory and time per call).
        joined = np.concatenate(parts, axis=0)
        joined.flags.writeable = False
        return joined

    def row_ids(self) -> np.ndarray:
        """Dataset row id of every store position: (n,) int64."""
        segments = self._require_complete()
        return self._gather(
            [self._segment_array(s, ROW_IDS_FILE, (s["num_rows"],), np.dtype(np.int64)) for s in segments]
        )

    def layer(self, name: str) -> np.ndarray:
        """Features of one layer: (n, dim) in the store dtype, row i = store position i.

        A read-only memmap when the store has one segment; after appends, a read-only in-memory concatenation
        of all segments (costs O(n x dim) memory per call: prefer iter_layer_chunks for scoring).
        """
        spec = self.layer_spec(name)
        segments = self._require_complete()
        if spec.layout == "tokens":
            key = (tuple(s["name"] for s in segments), name)
            if key not in self._token_rows:
                parts = [self._segment_layer(s, spec) for s in segments]
                self._token_rows = {k: v for k, v in self._token_rows.items() if k[0] == key[0]}
                self._token_rows[key] = parts[0] if len(parts) == 1 else TokenRows.concat(parts)
            return self._token_rows[key]
        return self._gather([self._segment_layer(s, spec) for s in segments])

    def _segment_layer(self, segment: dict[str, Any], spec: LayerSpec) -> Any:
        files = segment["layers"][spec.name]
        rows = segment["num_rows"]
        if spec.layout != "tokens":
            return self._segment_array(segment, files["features"], (rows, spec.dim), self._dtype)
        offsets = self._segment_array(segment, files["offsets"], (rows + 1,), np.dtype(np.int64))
        entries = int(offsets[-1])
        return TokenRows(
            offsets,
            self._segment_array(segment, files["tokens"], (entries,), np.dtype(np.int32)),
            self._segment_array(segment, files["features"], (entries, spec.dim), self._dtype),
            self._segment_array(segment, files["order"], (entries,), np.dtype(np.int64)),
            check=False,
        )

    def layer_checksums(self, name: str) -> list[str]:
        """sha256 of each segment's features file of one layer, in segment order (identifies the content)."""
        spec = self.layer_spec(name)
        return [s["files"][s["layers"][spec.name]["features"]] for s in self._require_complete()]

    def norms(self, name: str) -> np.ndarray:
        """L2 norm of every row's float32 features of one layer: (n,) float32."""
        spec = self.layer_spec(name)
        segments = self._require_complete()
        return self._gather(
            [
                self._segment_array(
                    s, s["layers"][spec.name]["norms"], (s["num_rows"],), np.dtype(np.float32)
                )
                for s in segments
            ]
        )

    def iter_layer_chunks(self, name: str, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, features[start:start+r]) over one layer, r <= rows; read-only memmap views, no copy.

        Chunks never straddle a segment boundary, so one may be shorter than `rows` before a boundary.
        """
        if not is_int(rows) or rows <= 0:
            raise InvalidInputError(f"rows must be a positive integer, got {rows!r}")
        spec = self.layer_spec(name)
        segments = self._require_complete()
        offset = 0
        for segment in segments:
            array = self._segment_layer(segment, spec)  # a TokenRows slice is a copy of its rows' entries
            for start in range(0, len(array), rows):
                yield offset + start, array[start : start + rows]
            offset += len(array)

    # -- integrity

    def verify(self, known: set[tuple[str, str]] | None = None) -> set[tuple[str, str]]:
        """Check the sha256 of the manifest and of every segment, tombstone and statistics file
        (StoreCorruptedError on the first that fails).

        Those files are immutable once listed (changes add new files and switch the lists), so a caller that
        keeps the returned set of verified (relative path, sha256) pairs can pass it back as `known` after a
        refresh and only newly listed files are read again. The manifest is always checked.
        """
        manifest_path = self._path / MANIFEST_FILE
        if sha256_file(manifest_path) != self._manifest_sha256:
            raise StoreCorruptedError(f"{manifest_path} changed while the store was open")
        self.refresh()
        known = set(known or ())
        verified: set[tuple[str, str]] = set()

        def check(relative: str, expected: str, what: str | None = None) -> None:
            if (relative, expected) not in known:
                _check_file(self._path / relative, expected, what)
            verified.add((relative, expected))

        for segment in self._segments or []:
            for file_name, expected in segment["files"].items():
                check(f"{SEGMENTS_DIR}/{segment['name']}/{file_name}", expected)
        for entry in self._tombstones:
            check(f"{TOMBSTONES_DIR}/{entry['file']}", entry["sha256"], "tombstones")
        for name, entry in self._statistics_index().items():
            check(f"{STATISTICS_DIR}/{entry['file']}", entry["sha256"], f"statistics of {name!r}")
        return verified

    def _statistics_index(self) -> dict[str, dict[str, Any]]:
        path = self._path / STATISTICS_FILE
        if not path.exists():
            return {}
        document = read_json(path)
        if not isinstance(document, dict) or not isinstance(document.get("layers"), dict):
            raise StoreCorruptedError(f"{path} is malformed")
        return document["layers"]


def _signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of a file, None when it does not exist: every os.replace changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _check_file(path: Path, expected: str, what: str | None = None) -> None:
    label = what or str(path)
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise StoreCorruptedError(f"{label}: {path} is unreadable: {exc}") from None
    if actual != expected:
        raise StoreCorruptedError(
            f"{label}: {path} failed its sha256 check (a byte changed); rebuild the store"
        )
