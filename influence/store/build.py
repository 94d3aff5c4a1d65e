"""Building a store: create it, write build chunks (any order, any process), finalize them into the first
segment, and append later rows as new segments; a tokens layer's segment files are written by
_TokenRowsWriter."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
import zipfile
from collections.abc import Iterator, Mapping
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
from influence.files import fsync_path, remove_tree, sha256_file, write_json_atomic
from influence.store.layout import (
    CHUNKS_DIR,
    LOCK_FILE,
    MANIFEST_FILE,
    ROW_IDS_FILE,
    SEGMENTS_DIR,
    SEGMENTS_FILE,
    STATISTICS_DIR,
    STORE_ENTRIES,
    TMP_DIR,
)
from influence.store.manifest import (
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    StoreManifest,
    as_numpy,
    is_int,
    layer_file_stem,
)
from influence.store.read import ReadableStore
from influence.tokens import TokenRows

# One batch of rows on its way into a segment: row ids, then features and norms per layer.
Part = tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]


class BuildMixin(ReadableStore):
    """Creating a store and writing its rows: build chunks, finalize, append."""

    @classmethod
    def create(cls, path: str | os.PathLike[str], manifest: StoreManifest) -> Self:
        """Create an empty store at `path`, or reopen it when it already holds the same manifest (resume).

        An existing non-empty directory is refused with ManifestMismatchError when its manifest differs in a
        fingerprinted field or in num_rows (resuming with another row count would shift every chunk).
        """
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise InvalidInputError(f"{root} exists and is not a directory")
        manifest_path = root / MANIFEST_FILE
        if root.is_dir() and not manifest_path.exists():
            foreign = sorted(e.name for e in root.iterdir() if e.name not in STORE_ENTRIES)
            if foreign:
                raise InvalidInputError(
                    f"{root} is not empty and is not a feature store (holds {foreign[:5]})"
                )
        root.mkdir(parents=True, exist_ok=True)
        tmp_dir = root / TMP_DIR
        tmp_dir.mkdir(exist_ok=True)
        if not manifest_path.exists():
            document = {
                "format": STORE_FORMAT,
                "format_version": STORE_FORMAT_VERSION,
                "manifest": manifest.to_dict(),
            }
            tmp = tmp_dir / f"{MANIFEST_FILE}.{uuid.uuid4().hex}.partial"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            # link() fails when the name exists: two workers creating the same store race safely, and the
            # loser compares its manifest with the winner's below instead of overwriting it.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, manifest_path)
                fsync_path(root)
            tmp.unlink()
        for sub in (SEGMENTS_DIR, STATISTICS_DIR):
            (root / sub).mkdir(exist_ok=True)
        if not (root / SEGMENTS_FILE).exists():  # a finalized store has no chunks/ any more
            (root / CHUNKS_DIR).mkdir(exist_ok=True)
        (root / LOCK_FILE).touch(exist_ok=True)
        store = cls.open(root, verify=False)
        store.manifest.check_compatible(manifest)
        if store.manifest.num_rows != manifest.num_rows:
            raise ManifestMismatchError(
                f"manifest mismatch in field(s) num_rows (store has {store.manifest.num_rows}, "
                f"got {manifest.num_rows})"
            )
        return store

    # -- build phase

    def write_chunk(self, index: int, row_ids: Any, features: Mapping[str, Any]) -> bool:
        """Write build chunk `index` atomically; returns False (and writes nothing) if the store is complete.

        row_ids: (c,) integers, c = the chunk's length. features: layer name -> (c, dim) floating array for
        every layer of the manifest. Rewriting a chunk replaces it atomically; chunks may be written in any
        order and by several processes at once (each chunk is one file; no shared file is touched).
        """
        if not is_int(index) or not 0 <= index < self.num_chunks:
            raise InvalidInputError(f"chunk index {index!r} is out of range [0, {self.num_chunks})")
        if self.is_complete:
            return False
        start, stop = self.chunk_ranges()[index]
        ids, feats, norms = self._prepare(row_ids, features, expected_rows=stop - start)
        arrays = {"row_ids": ids}
        for name in self.layers:
            stem = layer_file_stem(name)
            feature = feats[name]
            if isinstance(feature, TokenRows):
                arrays[f"tokens__{stem}"] = feature.tokens
                arrays[f"offsets__{stem}"] = feature.offsets
                feature = feature.values
            arrays[f"features__{stem}"] = feature
            arrays[f"norms__{stem}"] = norms[name]
        final = self._chunk_path(index)
        tmp = self._path / TMP_DIR / f"{final.stem}.{os.getpid()}.{uuid.uuid4().hex}.partial"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except FileNotFoundError:
            # finalize() ran meanwhile and removed tmp/ or chunks/: the chunk is already consolidated.
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if self.is_complete:
                return False
            raise
        fsync_path(final.parent)
        return True

    def _prepare(
        self, row_ids: Any, features: Mapping[str, Any], expected_rows: int | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Validate one batch; return row_ids (c,) int64, features in storage dtype, norms (c,) float32."""
        ids = as_numpy(row_ids, "row_ids")
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise InvalidInputError(f"row_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if expected_rows is not None and len(ids) != expected_rows:
            raise InvalidInputError(f"row_ids has {len(ids)} rows, this chunk holds {expected_rows}")
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int64).max):
            raise InvalidInputError("row_ids must be non-negative int64 values")
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise InvalidInputError("row_ids contains duplicates")
        if not isinstance(features, Mapping):
            raise InvalidInputError("features must be a mapping of layer name -> array")
        unknown = sorted(set(features) - set(self._specs))
        if unknown:
            raise UnknownLayerError(f"layers {unknown} are not in this feature store (has {self.layers})")
        missing = [name for name in self.layers if name not in features]
        if missing:
            raise InvalidInputError(f"features lack layers {missing}")
        out_features: dict[str, np.ndarray] = {}
        out_norms: dict[str, np.ndarray] = {}
        for name in self.layers:
            if self._specs[name].layout == "tokens":
                out_features[name], out_norms[name] = self._prepare_tokens(name, features[name], len(ids))
                continue
            values = as_numpy(features[name], f"features[{name!r}]")
            dim = self._specs[name].dim
            if values.shape != (len(ids), dim):
                raise InvalidInputError(
                    f"features[{name!r}] has shape {values.shape}, expected ({len(ids)}, {dim})"
                )
            if values.dtype.kind != "f" or values.dtype.itemsize > 8:
                raise InvalidInputError(f"features[{name!r}] must be float16/32/64, got {values.dtype}")
            values32 = np.ascontiguousarray(values, dtype=np.float32)
            # Norms come from the float32 values (float64 accumulation), never from the float16 copy.
            norms = np.sqrt(np.einsum("ij,ij->i", values32, values32, dtype=np.float64)).astype(np.float32)
            out_features[name] = self._stored(name, values32)
            out_norms[name] = norms
        return ids, out_features, out_norms

    def _stored(self, name: str, values32: np.ndarray) -> np.ndarray:
        """float32 values in the store's dtype; InvalidInputError for non-finite values or an overflow."""
        if not np.isfinite(values32).all():
            raise InvalidInputError(f"features[{name!r}] holds NaN or infinite values")
        with np.errstate(over="ignore"):  # overflow is detected and reported just below
            stored = values32.astype(self._dtype, copy=False)
        if self._dtype != np.float32 and not np.isfinite(stored).all():
            raise InvalidInputError(
                f"features[{name!r}] overflow {self._dtype.name} (|x| > {np.finfo(self._dtype).max}); "
                "use a float32 store or rescale the projection"
            )
        return stored

    def _prepare_tokens(self, name: str, value: Any, rows: int) -> tuple[TokenRows, np.ndarray]:
        """A tokens layer's TokenRows of `rows` rows: (token rows in storage form, norms (rows,) float32)."""
        dim = self._specs[name].dim
        if not isinstance(value, TokenRows):
            raise InvalidInputError(f"features[{name!r}] must be TokenRows (layer layout `tokens`)")
        if value.shape != (rows, dim):
            raise InvalidInputError(f"features[{name!r}] has shape {value.shape}, expected ({rows}, {dim})")
        value._check()
        values32 = np.ascontiguousarray(as_numpy(value.values, f"features[{name!r}]"), dtype=np.float32)
        tokens = np.asarray(as_numpy(value.tokens, f"tokens of {name!r}"), dtype=np.int64)
        if tokens.size and tokens.max() > np.iinfo(np.int32).max:
            raise InvalidInputError(f"features[{name!r}]: token ids beyond int32")
        norms = value.norms().numpy().astype(np.float32)
        stored = TokenRows(
            np.asarray(value.offsets, dtype=np.int64),
            tokens.astype(np.int32),
            self._stored(name, values32),
            check=False,
        )
        return stored, norms

    # -- consolidation

    def finalize(self) -> None:
        """Consolidate all chunks into segment 0 (one matrix per layer); a no-op if already complete.

        StoreIncompleteError if a chunk is missing. The segments list is switched by one os.replace, then the
        chunks are removed; a crash before the switch leaves the build state, after it the complete state.
        """
        with self._locked():
            if (self._path / SEGMENTS_FILE).exists():
                self.refresh()
                self._remove_build_leftovers()
                return
            pending = self.pending_chunks()
            if pending:
                raise StoreIncompleteError(
                    f"cannot finalize: {len(pending)} of {self.num_chunks} chunks are missing: {pending[:20]}"
                )
            self._remove_orphans(referenced=set())
            record = self._write_segment(0, self.manifest.num_rows, self._iter_chunk_parts())
            seen = np.load(
                self._path / SEGMENTS_DIR / record["name"] / ROW_IDS_FILE, mmap_mode="r", allow_pickle=False
            )
            if len(np.unique(seen)) != len(seen):
                remove_tree(self._path / SEGMENTS_DIR / record["name"])
                raise InvalidInputError("row_ids repeat across chunks; rewrite the offending chunks")
            self._commit_segments([record], [])
            self._remove_build_leftovers()

    def _iter_chunk_parts(self) -> Iterator[Part]:
        for index, (start, stop) in enumerate(self.chunk_ranges()):
            path = self._chunk_path(index)
            rows = stop - start
            try:
                with np.load(path, allow_pickle=False) as archive:
                    ids = archive["row_ids"]
                    feats, norms = {}, {}
                    for name in self.layers:
                        stem = layer_file_stem(name)
                        feats[name] = archive[f"features__{stem}"]
                        norms[name] = archive[f"norms__{stem}"]
                        if self._specs[name].layout == "tokens":
                            feats[name] = TokenRows(
                                archive[f"offsets__{stem}"], archive[f"tokens__{stem}"], feats[name]
                            )
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, InvalidInputError) as exc:
                # BadZipFile is how a flipped byte shows: the zip CRC-32 of the member no longer matches.
                raise StoreCorruptedError(
                    f"chunk file {path} is unreadable ({exc}); rewrite chunk {index}"
                ) from None
            if ids.shape != (rows,) or ids.dtype != np.int64:
                raise StoreCorruptedError(
                    f"chunk file {path} has row_ids {ids.dtype} {ids.shape}, expected ({rows},)"
                )
            for name in self.layers:
                dim = self._specs[name].dim
                values = feats[name].values if isinstance(feats[name], TokenRows) else feats[name]
                if feats[name].shape != (rows, dim) or values.dtype != self._dtype:
                    raise StoreCorruptedError(
                        f"chunk file {path}: layer {name!r} has the wrong shape or dtype"
                    )
                if norms[name].shape != (rows,) or norms[name].dtype != np.float32:
                    raise StoreCorruptedError(
                        f"chunk file {path}: norms of {name!r} have the wrong shape or dtype"
                    )
            yield ids, feats, norms

    def _write_segment(
        self,
        number: int,
        total: int,
        parts: Iterator[Part],
    ) -> dict[str, Any]:
        """Write segment `number` from `parts` in tmp/, fsync, rename it into segments/; return its record."""
        work, record = self._write_segment_files(f"seg-{number:06d}", total, parts)
        return self._place_segment(work, record, number)

    def _write_segment_files(
        self,
        name: str,
        total: int,
        parts: Iterator[Part],
    ) -> tuple[Path, dict[str, Any]]:
        """Write a segment's files from `parts` into a fresh tmp/ folder and fsync them; (folder, record)."""
        work = self._path / TMP_DIR / f"{name}.{uuid.uuid4().hex}.partial"
        work.mkdir()
        layer_files = {layer: self._layer_files(layer) for layer in self.layers}
        try:
            row_out = _open_output(work / ROW_IDS_FILE, np.dtype(np.int64), (total,))
            feat_out: dict[str, Any] = {
                layer: (
                    _TokenRowsWriter(work, files, total, self._specs[layer].dim, self._dtype)
                    if self._specs[layer].layout == "tokens"
                    else _open_output(work / files["features"], self._dtype, (total, self._specs[layer].dim))
                )
                for layer, files in layer_files.items()
            }
            norm_out = {
                layer: _open_output(work / files["norms"], np.dtype(np.float32), (total,))
                for layer, files in layer_files.items()
            }
            position = 0
            for ids, feats, norms in parts:
                stop = position + len(ids)
                if stop > total:
                    raise StoreCorruptedError(f"segment {name} receives more than its {total} rows")
                row_out[position:stop] = ids
                for layer in self.layers:
                    if isinstance(feat_out[layer], _TokenRowsWriter):
                        feat_out[layer].add(feats[layer])
                    else:
                        feat_out[layer][position:stop] = feats[layer]
                    norm_out[layer][position:stop] = norms[layer]
                position = stop
            if position != total:
                raise StoreCorruptedError(f"segment {name} received {position} of its {total} rows")
            for array in (row_out, *feat_out.values(), *norm_out.values()):
                if isinstance(array, _TokenRowsWriter):
                    array.finish()
                elif isinstance(array, np.memmap):
                    array.flush()
            del row_out, feat_out, norm_out
            checksums = {}
            for entry in sorted(work.iterdir()):
                fsync_path(entry)
                checksums[entry.name] = sha256_file(entry)
            fsync_path(work)
        except BaseException:
            remove_tree(work)
            raise
        return work, {"num_rows": total, "files": checksums, "layers": layer_files}

    def _layer_files(self, layer: str) -> dict[str, str]:
        stem = layer_file_stem(layer)
        files = {"features": f"{stem}.npy", "norms": f"{stem}.norms.npy"}
        if self._specs[layer].layout == "tokens":
            files.update(
                tokens=f"{stem}.tokens.npy", offsets=f"{stem}.offsets.npy", order=f"{stem}.order.npy"
            )
        return files

    def _place_segment(self, work: Path, record: dict[str, Any], number: int) -> dict[str, Any]:
        """Rename a written segment folder into segments/ as seg-<number>; its full record."""
        name = f"seg-{number:06d}"
        try:
            final = self._path / SEGMENTS_DIR / name
            os.replace(work, final)
            fsync_path(final.parent)
        except BaseException:
            remove_tree(work)
            raise
        return {"name": name, **record}

    def _commit_segments(self, segments: list[dict[str, Any]], tombstones: list[dict[str, Any]]) -> None:
        document = {
            "format_version": STORE_FORMAT_VERSION,
            "fingerprint": self._manifest.fingerprint(),
            "manifest_sha256": self._manifest_sha256,
            "segments": segments,
            "tombstones": tombstones,
        }
        write_json_atomic(self._path / SEGMENTS_FILE, document, self._path / TMP_DIR)
        self.refresh()

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Delete segment directories no segments list refers to (left by a crash before the list switch)."""
        for entry in (self._path / SEGMENTS_DIR).iterdir():
            if entry.name not in referenced:
                remove_tree(entry)

    def _remove_build_leftovers(self) -> None:
        # Only after segments.json exists: chunks are consolidated, and any temp file in tmp/ belongs to a
        # crashed writer or to a chunk rewrite that is now a no-op.
        remove_tree(self._path / CHUNKS_DIR)
        tmp_dir = self._path / TMP_DIR
        for entry in tmp_dir.iterdir():
            remove_tree(entry)

    # -- incremental append

    def append(self, row_ids: Any, features: Mapping[str, Any]) -> int:
        """Add rows as a new segment (complete stores only); returns the number of rows appended.

        row_ids: (r,) integers not yet in the store. features: layer -> (r, dim). Appenders serialise on an
        fcntl lock; readers see the new rows after `refresh()` (this object refreshes itself).
        """
        ids, feats, norms = self._prepare(row_ids, features, expected_rows=None)
        if len(ids) == 0:
            return 0
        with self._locked():
            self.refresh()
            if self._segments is None:
                raise StoreIncompleteError("append needs a finalized store; finalize() the build first")
            clash = np.intersect1d(self.row_ids(), ids)
            if clash.size:
                raise InvalidInputError(
                    f"{clash.size} row_ids are already in the store, e.g. {clash[:5].tolist()}"
                )
            segments = list(self._segments)
            self._remove_orphans(referenced={s["name"] for s in segments})
            record = self._write_segment(next_segment_number(segments), len(ids), iter([(ids, feats, norms)]))
            self._commit_segments([*segments, record], self._tombstones)
        return len(ids)


def next_segment_number(segments: list[dict[str, Any]]) -> int:
    """One more than the highest segment number: names are never reused, even after a compaction."""
    return max((int(s["name"].rsplit("-", 1)[1]) for s in segments), default=-1) + 1


class _TokenRowsWriter:
    """Writes a tokens layer's segment files from TokenRows parts streamed in row order: entries go to raw
    files as they come (their count is known only at the end), then into .npy files with the offsets and
    the token order. Memory: the segment's token ids (4 bytes per entry) for the argsort."""

    def __init__(self, folder: Path, files: dict[str, str], rows: int, dim: int, dtype: np.dtype):
        self.folder, self.files, self.rows, self.dim, self.dtype = folder, files, rows, dim, dtype
        self.raw_values = open(folder / (files["features"] + ".raw"), "wb")  # noqa: SIM115 (closed in finish)
        self.tokens: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def add(self, part: TokenRows) -> None:
        self.raw_values.write(np.ascontiguousarray(part.values, dtype=self.dtype).tobytes())
        self.tokens.append(np.asarray(part.tokens, dtype=np.int32))
        self.counts.append(np.diff(np.asarray(part.offsets, dtype=np.int64)))

    def finish(self) -> None:
        self.raw_values.close()
        tokens = np.concatenate(self.tokens) if self.tokens else np.zeros(0, dtype=np.int32)
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, dtype=np.int64)
        if len(counts) != self.rows:
            raise StoreCorruptedError(f"token rows: {len(counts)} rows written, {self.rows} expected")
        offsets = np.zeros(self.rows + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        raw = self.folder / (self.files["features"] + ".raw")
        values = _open_output(self.folder / self.files["features"], self.dtype, (len(tokens), self.dim))
        if len(tokens):
            source = np.memmap(raw, dtype=self.dtype, mode="r", shape=(len(tokens), self.dim))
            for start in range(0, len(tokens), 1 << 16):
                values[start : start + (1 << 16)] = source[start : start + (1 << 16)]
            del source
            values.flush()
        del values
        raw.unlink()
        np.save(self.folder / self.files["tokens"], tokens, allow_pickle=False)
        np.save(self.folder / self.files["offsets"], offsets, allow_pickle=False)
        order = np.argsort(tokens, kind="stable").astype(np.int64)
        np.save(self.folder / self.files["order"], order, allow_pickle=False)


def _open_output(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable .npy output: a memmap, or an in-memory array saved at once when it is empty."""
    if int(np.prod(shape)) == 0:
        np.save(path, np.zeros(shape, dtype=dtype), allow_pickle=False)
        return np.zeros(shape, dtype=dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
