"""The feature store: append-only, chunked, memory-mapped per-layer features of training rows.

A store holds, for every training row and every layer of its manifest, one feature vector (a projected
per-sample gradient), its L2 norm, and the row's id in the dataset. It is built in chunks that independent
workers may write concurrently and in any order, then consolidated by `finalize()` into one matrix per layer;
later rows are added as new immutable segments by `append()`. Nothing is ever modified in place: every
artifact is written under a temporary name and renamed into place, so a crash leaves either the old state or
the new one, and readers never see a half-written file.

On-disk layout of a store directory::

    manifest.json                 {"format", "format_version", "manifest": StoreManifest}; written once
    store.lock                    fcntl lock taken by finalize / append / statistics writers (not readers)
    tmp/                          temporary files and directories; never read
    chunks/chunk-000007.npz       build phase: one uncompressed .npz per finished chunk (row_ids,
                                  features__<stem>, norms__<stem>; tokens__<stem>, offsets__<stem> for a
                                  tokens layer); zip CRC-32 guards each member; removed
                                  by finalize
    segments/seg-000000/          after finalize (seg-000000) and each append (seg-000001, ...):
        row_ids.npy               (r,) int64 dataset row ids
        <stem>.npy                (r, dim) float16/float32 features of one layer
        <stem>.norms.npy          (r,) float32 L2 norms, taken from the float32 values before any float16 cast
                                  a `tokens` layer (token rows, influence.tokens) instead of (r, dim):
        <stem>.npy                (e, dim) one vector per (row, token) entry, rows in order
        <stem>.tokens.npy         (e,) int32 token ids, ascending within a row
        <stem>.offsets.npy        (r + 1,) int64: row i's entries are offsets[i]:offsets[i + 1]
        <stem>.order.npy          (e,) int64 the entries in token order (the join's inverted index)
    segments.json                 the list of segments with the sha256 of every file and of manifest.json,
                                  and the list of tombstone files; its presence is what makes the store
                                  complete (readable). Every change of the readable state (finalize, append,
                                  delete_rows, compact) is one os.replace of this file
    tombstones/tomb-<sha16>.npy   deleted rows: (d,) int64 sorted dataset row ids, listed with their sha256 in
                                  segments.json. Readers exclude them (live_positions); compact() rewrites
                                  the segments without them and drops the tombstones
    statistics/<stem>.<sha>.safetensors   per-layer estimator statistics (e.g. DataInf's matrix)
    statistics.json               layer -> statistics file + sha256 + the segments it was fitted over (a
                                  compaction makes it stale: has_layer_statistics is then False)
    faiss/                        FAISS indexes (see influence.index)

`<stem>` is `layer_file_stem(layer name)`: the name with unsafe characters (dots included) replaced, plus a
hash of the full name, so distinct layer names never share a file. Only .npy, .npz and safetensors are
written; every load uses allow_pickle=False.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from influence.errors import (
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
    UnknownLayerError,
)
from influence.tokens import TokenRows

STORE_FORMAT = "influence-feature-store"
STORE_FORMAT_VERSION = 1
DTYPES: tuple[str, ...] = ("float16", "float32")

_MANIFEST_FILE = "manifest.json"
_SEGMENTS_FILE = "segments.json"
_STATISTICS_FILE = "statistics.json"
_LOCK_FILE = "store.lock"
_TMP_DIR = "tmp"
_CHUNKS_DIR = "chunks"
_SEGMENTS_DIR = "segments"
_STATISTICS_DIR = "statistics"
_TOMBSTONES_DIR = "tombstones"
_COMPACT_LOCK_FILE = "compact.lock"
_ROW_IDS_FILE = "row_ids.npy"
# Entries a crashed create() may leave before manifest.json exists; such a directory counts as empty.
_STORE_ENTRIES = {_TMP_DIR, _CHUNKS_DIR, _SEGMENTS_DIR, _STATISTICS_DIR, _LOCK_FILE}
_HASH_BLOCK = 1 << 20
LAYOUTS = ("dense", "tokens")


def layer_file_stem(name: str) -> str:
    """A file-name-safe, collision-free stem for a layer name (e.g. `block.3.attn.v.lora_B`)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:80] or "layer"
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]
    return f"{readable}-{digest}"


def _library_version() -> str:
    from influence.version import __version__

    return __version__


# --------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class LayerSpec:
    """One layer unit in the store: its name, feature dimension (after projection), parameter count, and
    layout: "dense" (one (dim,) vector per row) or "tokens" (token rows, influence.tokens: per row, its
    distinct tokens with a (dim,) vector each; the exact embedding)."""

    name: str
    dim: int
    num_params: int
    layout: str = "dense"

    def to_dict(self) -> dict[str, Any]:
        # "dense" is left out: manifests written before layouts existed keep their fingerprint.
        out = asdict(self)
        if self.layout == "dense":
            del out["layout"]
        return out


@dataclass(frozen=True)
class CheckpointSpec:
    """One training checkpoint the features were taken at, with its learning rate (TracIn-CP weight)."""

    name: str
    learning_rate: float


def _layer_spec(value: Any) -> LayerSpec:
    if isinstance(value, LayerSpec):
        spec = value
    elif isinstance(value, Mapping):
        try:
            spec = LayerSpec(
                name=value["name"],
                dim=value["dim"],
                num_params=value["num_params"],
                layout=value.get("layout", "dense"),
            )
        except KeyError as exc:
            raise InvalidInputError(f"layer spec {dict(value)!r} lacks {exc}") from None
    else:
        raise InvalidInputError(f"a layer must be a LayerSpec or a mapping, got {type(value).__name__}")
    if not isinstance(spec.name, str) or not spec.name:
        raise InvalidInputError(f"layer name must be a non-empty string, got {spec.name!r}")
    if not _is_int(spec.dim) or spec.dim <= 0:
        raise InvalidInputError(f"layer {spec.name!r}: dim must be a positive integer, got {spec.dim!r}")
    if not _is_int(spec.num_params) or spec.num_params < 0:
        raise InvalidInputError(f"layer {spec.name!r}: num_params must be >= 0, got {spec.num_params!r}")
    if spec.layout not in LAYOUTS:
        raise InvalidInputError(f"layer {spec.name!r}: layout must be one of {LAYOUTS}, got {spec.layout!r}")
    return LayerSpec(name=spec.name, dim=int(spec.dim), num_params=int(spec.num_params), layout=spec.layout)


def _checkpoint_spec(value: Any) -> CheckpointSpec:
    if isinstance(value, CheckpointSpec):
        spec = value
    elif isinstance(value, Mapping):
        try:
            spec = CheckpointSpec(name=value["name"], learning_rate=value["learning_rate"])
        except KeyError as exc:
            raise InvalidInputError(f"checkpoint spec {dict(value)!r} lacks {exc}") from None
    else:
        raise InvalidInputError(
            f"a checkpoint must be a CheckpointSpec or a mapping, got {type(value).__name__}"
        )
    if not isinstance(spec.name, str) or not spec.name:
        raise InvalidInputError(f"checkpoint name must be a non-empty string, got {spec.name!r}")
    try:
        rate = float(spec.learning_rate)
    except (TypeError, ValueError):
        raise InvalidInputError(f"checkpoint {spec.name!r}: learning_rate must be a number") from None
    if not math.isfinite(rate):
        raise InvalidInputError(f"checkpoint {spec.name!r}: learning_rate must be finite")
    return CheckpointSpec(name=spec.name, learning_rate=rate)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the stable form hashed by fingerprints."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def _json_value(value: Any, what: str) -> Any:
    """`value` as plain JSON types (tuples become lists), refusing what JSON cannot hold."""
    try:
        return json.loads(_canonical_json(value))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be JSON-serialisable: {exc}") from None


@dataclass(kw_only=True)
class StoreManifest:
    """Everything that determines the features in a store; a query must match all of it but num_rows/extra.

    layers: the stored layer units in order. projection: {"kind", "dim", "seed", ...}. dtype: storage dtype of
    features ("float16" | "float32"; norms are always float32). num_rows: rows planned for the build (appends
    add more later). checkpoints: [(name, learning_rate)], empty when features come from one model state.
    """

    model_id: str
    revision: str
    weights_hash: str
    tokenizer: str
    dataset_hash: str
    layers: list[LayerSpec]
    projection: dict[str, Any]
    dtype: str = "float16"
    library_version: str = field(default_factory=_library_version)
    num_rows: int
    chunk_size: int = 1024
    task: str = "classification"
    max_length: int = 128
    checkpoints: list[CheckpointSpec] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    # Fields excluded from the fingerprint: the planned row count grows with appends, extra is free-form, and
    # the library version is informative only (what changes features is the projection spec, which carries
    # its own format version).
    UNFINGERPRINTED = ("num_rows", "extra", "library_version")

    def __post_init__(self) -> None:
        for name in (
            "model_id",
            "revision",
            "weights_hash",
            "tokenizer",
            "dataset_hash",
            "task",
            "library_version",
        ):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"manifest field {name} must be a string")
        self.layers = [_layer_spec(layer) for layer in self.layers]
        if not self.layers:
            raise InvalidInputError("a feature store needs at least one layer")
        names = [layer.name for layer in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInputError(f"duplicate layer names: {duplicates}")
        if not isinstance(self.projection, Mapping) or "kind" not in self.projection:
            raise InvalidInputError("projection must be a mapping with at least a 'kind' (and dim, seed)")
        self.projection = _json_value(dict(self.projection), "projection")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name, minimum in (("num_rows", 0), ("chunk_size", 1), ("max_length", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise InvalidInputError(
                    f"manifest field {name} must be an integer >= {minimum}, got {value!r}"
                )
            setattr(self, name, int(value))
        self.checkpoints = [_checkpoint_spec(c) for c in self.checkpoints]
        if not isinstance(self.extra, Mapping):
            raise InvalidInputError("manifest field extra must be a mapping")
        self.extra = _json_value(dict(self.extra), "extra")

    # -- JSON round trip

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON types."""
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        return _json_value(data, "manifest")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreManifest:
        """Rebuild a manifest from `to_dict()` output; unknown or missing fields are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown manifest fields: {unknown}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise InvalidInputError(f"invalid manifest: {exc}") from None

    def to_json(self) -> str:
        """The manifest as an indented JSON document."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> StoreManifest:
        """Parse `to_json()` output."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidInputError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInputError("manifest JSON must be an object")
        return cls.from_dict(data)

    # -- matching

    @classmethod
    def fingerprint_fields(cls) -> tuple[str, ...]:
        """Names of the fields a query must match (all but num_rows and extra)."""
        return tuple(f.name for f in fields(cls) if f.name not in cls.UNFINGERPRINTED)

    def _fingerprint_payload(self) -> dict[str, Any]:
        data = self.to_dict()
        return {name: data[name] for name in self.fingerprint_fields()}

    def fingerprint(self) -> str:
        """A stable sha256 (hex) over the fingerprinted fields and the store format version."""
        payload = {"store_format_version": STORE_FORMAT_VERSION, **self._fingerprint_payload()}
        return hashlib.sha256(_canonical_json(payload).encode("ascii")).hexdigest()

    def check_compatible(self, other: StoreManifest | Mapping[str, Any]) -> None:
        """Raise ManifestMismatchError naming every fingerprinted field where `other` differs.

        `other` is a whole manifest (all fingerprinted fields compared) or a mapping of some fingerprinted
        fields (only those compared; layers/checkpoints may be given as specs or dicts).
        """
        mine = self._fingerprint_payload()
        if isinstance(other, StoreManifest):
            theirs = other._fingerprint_payload()
        elif isinstance(other, Mapping):
            unknown = sorted(set(other) - set(mine))
            if unknown:
                raise InvalidInputError(
                    f"not fields a query must match: {unknown}; expected some of {sorted(mine)}"
                )
            theirs = {}
            for name, value in other.items():
                if name == "layers":
                    value = [_layer_spec(v).to_dict() for v in value]
                elif name == "checkpoints":
                    value = [asdict(_checkpoint_spec(v)) for v in value]
                theirs[name] = _json_value(value, f"field {name}")
        else:
            raise InvalidInputError(f"cannot compare a manifest with {type(other).__name__}")
        differing = [name for name in theirs if _canonical_json(mine[name]) != _canonical_json(theirs[name])]
        if differing:
            details = "; ".join(
                f"{name}: store has {_short(mine[name])}, got {_short(theirs[name])}" for name in differing
            )
            raise ManifestMismatchError(f"manifest mismatch in field(s) {', '.join(differing)} ({details})")


def _short(value: Any, limit: int = 160) -> str:
    text = _canonical_json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------------------ file helpers


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    """Flush a file or directory to disk, so a following rename cannot expose stale bytes after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}.partial"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _write_json_atomic(path: Path, obj: Any, tmp_dir: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _write_bytes_atomic(path, text.encode("utf-8"), tmp_dir)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreCorruptedError(f"{path} is unreadable: {exc}") from None


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _as_numpy(value: Any, what: str) -> np.ndarray:
    """A numpy view of an array-like; torch tensors are detached and moved to CPU (bfloat16 widened)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not an array: {exc}") from None


# ------------------------------------------------------------------------------------------------ store


class FeatureStore:
    """A feature store directory: build by chunks, finalize, append segments, read per-layer matrices.

    Create or resume with `FeatureStore.create(path, manifest)`, open with `FeatureStore.open(path)`. One
    object reflects the segments list it last read; `refresh()` picks up appends made by other processes.
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
    def create(cls, path: str | os.PathLike[str], manifest: StoreManifest) -> FeatureStore:
        """Create an empty store at `path`, or reopen it when it already holds the same manifest (resume).

        An existing non-empty directory is refused with ManifestMismatchError when its manifest differs in a
        fingerprinted field or in num_rows (resuming with another row count would shift every chunk).
        """
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise InvalidInputError(f"{root} exists and is not a directory")
        manifest_path = root / _MANIFEST_FILE
        if root.is_dir() and not manifest_path.exists():
            foreign = sorted(e.name for e in root.iterdir() if e.name not in _STORE_ENTRIES)
            if foreign:
                raise InvalidInputError(
                    f"{root} is not empty and is not a feature store (holds {foreign[:5]})"
                )
        root.mkdir(parents=True, exist_ok=True)
        tmp_dir = root / _TMP_DIR
        tmp_dir.mkdir(exist_ok=True)
        if not manifest_path.exists():
            document = {
                "format": STORE_FORMAT,
                "format_version": STORE_FORMAT_VERSION,
                "manifest": manifest.to_dict(),
            }
            tmp = tmp_dir / f"{_MANIFEST_FILE}.{uuid.uuid4().hex}.partial"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            # link() fails when the name exists: two workers creating the same store race safely, and the
            # loser compares its manifest with the winner's below instead of overwriting it.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, manifest_path)
                _fsync_path(root)
            tmp.unlink()
        for sub in (_SEGMENTS_DIR, _STATISTICS_DIR):
            (root / sub).mkdir(exist_ok=True)
        if not (root / _SEGMENTS_FILE).exists():  # a finalized store has no chunks/ any more
            (root / _CHUNKS_DIR).mkdir(exist_ok=True)
        (root / _LOCK_FILE).touch(exist_ok=True)
        store = cls.open(root, verify=False)
        store.manifest.check_compatible(manifest)
        if store.manifest.num_rows != manifest.num_rows:
            raise ManifestMismatchError(
                f"manifest mismatch in field(s) num_rows (store has {store.manifest.num_rows}, "
                f"got {manifest.num_rows})"
            )
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> FeatureStore:
        """Open an existing store; verify checks every artifact's sha256 (reads all bytes: O(store size))."""
        root = Path(path)
        manifest_path = root / _MANIFEST_FILE
        if not manifest_path.is_file():
            raise InvalidInputError(f"{root} is not a feature store (no {_MANIFEST_FILE})")
        document = _read_json(manifest_path)
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
        store = cls(root, manifest, _sha256_file(manifest_path))
        if verify:
            store.verify()
        return store

    def refresh(self) -> None:
        """Re-read the segments list (picks up finalize/append/delete_rows/compact done by other processes)."""
        segments_path = self._path / _SEGMENTS_FILE
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
        document = _read_json(segments_path)
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
                f"{segments_path} was written for another manifest than {_MANIFEST_FILE}"
            )
        self._segments = segments
        self._tombstones = list(tombstones)
        # Taken before the read: a replacement racing the read only makes changed() say True once too often.
        self._signature = signature

    def changed(self) -> bool:
        """Whether the readable state changed on disk (finalize, append, delete_rows, compact, by any process)
        since this object last read it; `refresh()` (or a new `open()`) picks the change up."""
        return _signature(self._path / _SEGMENTS_FILE) != self._signature

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
        return self._segments is not None or (self._path / _SEGMENTS_FILE).exists()

    # -- build phase

    @property
    def num_chunks(self) -> int:
        """Number of build chunks: ceil(manifest.num_rows / chunk_size)."""
        return -(-self._manifest.num_rows // self._manifest.chunk_size)

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) of every build chunk, in order."""
        size, total = self._manifest.chunk_size, self._manifest.num_rows
        return [(start, min(start + size, total)) for start in range(0, total, size)]

    def _chunk_path(self, index: int) -> Path:
        return self._path / _CHUNKS_DIR / f"chunk-{index:06d}.npz"

    def pending_chunks(self) -> list[int]:
        """Indices of chunks not yet written (empty once the store is complete)."""
        if self.is_complete:
            return []
        return [i for i in range(self.num_chunks) if not self._chunk_path(i).exists()]

    def write_chunk(self, index: int, row_ids: Any, features: Mapping[str, Any]) -> bool:
        """Write build chunk `index` atomically; returns False (and writes nothing) if the store is complete.

        row_ids: (c,) integers, c = the chunk's length. features: layer name -> (c, dim) floating array for
        every layer of the manifest. Rewriting a chunk replaces it atomically; chunks may be written in any
        order and by several processes at once (each chunk is one file; no shared file is touched).
        """
        if not _is_int(index) or not 0 <= index < self.num_chunks:
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
        tmp = self._path / _TMP_DIR / f"{final.stem}.{os.getpid()}.{uuid.uuid4().hex}.partial"
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
        _fsync_path(final.parent)
        return True

    def _prepare(
        self, row_ids: Any, features: Mapping[str, Any], expected_rows: int | None
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Validate one batch; return row_ids (c,) int64, features in storage dtype, norms (c,) float32."""
        ids = _as_numpy(row_ids, "row_ids")
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
            values = _as_numpy(features[name], f"features[{name!r}]")
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
        values32 = np.ascontiguousarray(_as_numpy(value.values, f"features[{name!r}]"), dtype=np.float32)
        tokens = np.asarray(_as_numpy(value.tokens, f"tokens of {name!r}"), dtype=np.int64)
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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock is per open file description: every caller opens its own fd, so threads and processes both
        # serialise, and a crashed holder releases the lock with its process.
        with open(self._path / _LOCK_FILE, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def finalize(self) -> None:
        """Consolidate all chunks into segment 0 (one matrix per layer); a no-op if already complete.

        StoreIncompleteError if a chunk is missing. The segments list is switched by one os.replace, then the
        chunks are removed; a crash before the switch leaves the build state, after it the complete state.
        """
        with self._locked():
            if (self._path / _SEGMENTS_FILE).exists():
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
                self._path / _SEGMENTS_DIR / record["name"] / _ROW_IDS_FILE, mmap_mode="r", allow_pickle=False
            )
            if len(np.unique(seen)) != len(seen):
                _remove_tree(self._path / _SEGMENTS_DIR / record["name"])
                raise InvalidInputError("row_ids repeat across chunks; rewrite the offending chunks")
            self._commit_segments([record], [])
            self._remove_build_leftovers()

    def _iter_chunk_parts(self) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
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
        parts: Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]],
    ) -> dict[str, Any]:
        """Write segment `number` from `parts` in tmp/, fsync, rename it into segments/; return its record."""
        work, record = self._write_segment_files(f"seg-{number:06d}", total, parts)
        return self._place_segment(work, record, number)

    def _write_segment_files(
        self,
        name: str,
        total: int,
        parts: Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]],
    ) -> tuple[Path, dict[str, Any]]:
        """Write a segment's files from `parts` into a fresh tmp/ folder and fsync them; (folder, record)."""
        work = self._path / _TMP_DIR / f"{name}.{uuid.uuid4().hex}.partial"
        work.mkdir()
        layer_files = {layer: self._layer_files(layer) for layer in self.layers}
        try:
            row_out = _open_output(work / _ROW_IDS_FILE, np.dtype(np.int64), (total,))
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
                _fsync_path(entry)
                checksums[entry.name] = _sha256_file(entry)
            _fsync_path(work)
        except BaseException:
            _remove_tree(work)
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
            final = self._path / _SEGMENTS_DIR / name
            os.replace(work, final)
            _fsync_path(final.parent)
        except BaseException:
            _remove_tree(work)
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
        _write_json_atomic(self._path / _SEGMENTS_FILE, document, self._path / _TMP_DIR)
        self.refresh()

    def _remove_orphans(self, referenced: set[str]) -> None:
        """Delete segment directories no segments list refers to (left by a crash before the list switch)."""
        for entry in (self._path / _SEGMENTS_DIR).iterdir():
            if entry.name not in referenced:
                _remove_tree(entry)

    def _remove_build_leftovers(self) -> None:
        # Only after segments.json exists: chunks are consolidated, and any temp file in tmp/ belongs to a
        # crashed writer or to a chunk rewrite that is now a no-op.
        _remove_tree(self._path / _CHUNKS_DIR)
        tmp_dir = self._path / _TMP_DIR
        for entry in tmp_dir.iterdir():
            _remove_tree(entry)

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
            record = self._write_segment(
                _next_segment_number(segments), len(ids), iter([(ids, feats, norms)])
            )
            self._commit_segments([*segments, record], self._tombstones)
        return len(ids)

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
            path = self._path / _SEGMENTS_DIR / segment["name"] / file_name
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
            self._segment_array(segment, _ROW_IDS_FILE, (segment["num_rows"],), np.dtype(np.int64))
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
            [self._segment_array(s, _ROW_IDS_FILE, (s["num_rows"],), np.dtype(np.int64)) for s in segments]
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
        if not _is_int(rows) or rows <= 0:
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
        manifest_path = self._path / _MANIFEST_FILE
        if _sha256_file(manifest_path) != self._manifest_sha256:
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
                check(f"{_SEGMENTS_DIR}/{segment['name']}/{file_name}", expected)
        for entry in self._tombstones:
            check(f"{_TOMBSTONES_DIR}/{entry['file']}", entry["sha256"], "tombstones")
        for name, entry in self._statistics_index().items():
            check(f"{_STATISTICS_DIR}/{entry['file']}", entry["sha256"], f"statistics of {name!r}")
        return verified

    # -- deletion: tombstones and compaction

    def _load_tombstone(self, entry: dict[str, Any]) -> np.ndarray:
        path = self._path / _TOMBSTONES_DIR / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreCorruptedError(f"tombstones {path} are unreadable: {exc}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreCorruptedError(f"tombstones {path} failed their sha256 check; rebuild the store")
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
        ids = _as_numpy(row_ids, "row_ids")
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
            (self._path / _TOMBSTONES_DIR).mkdir(exist_ok=True)
            _write_bytes_atomic(self._path / _TOMBSTONES_DIR / file_name, data, self._path / _TMP_DIR)
            entry = {"file": file_name, "sha256": digest, "num_rows": int(fresh.size)}
            self._commit_segments(list(segments), [*self._tombstones, entry])
        return int(fresh.size)

    @contextlib.contextmanager
    def _compacting(self) -> Iterator[None]:
        with open(self._path / _COMPACT_LOCK_FILE, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def compact(self) -> int:
        """Remove the deleted rows for good: write the live rows as one new segment, switch segments.json to
        it without tombstones, then delete the old segments, the tombstone files and the statistics (fitted
        over the old rows: refit them). Returns the number of rows removed (0: nothing was deleted).

        Crash-safe and idempotent: before the switch the old state (rows still tombstoned) is intact, after it
        the new one is; leftovers of either kind are removed by the next compact() (run it again after a
        crash). Rows deleted while compacting keep their tombstones. FAISS indexes built over the old
        segments no longer match the store (influence.index reports it): rebuild them.
        """
        with self._compacting():
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
                    _remove_tree(work)
                    raise
                record = self._place_segment(work, files, _next_segment_number(segments))
                compacted = {t["file"] for t in tombstones}
                kept = [t for t in self._tombstones if t["file"] not in compacted]
                self._commit_segments([record], kept)
                self._remove_orphans(referenced={record["name"]})
                self._remove_orphan_tombstones(referenced={t["file"] for t in kept})
                self._drop_stale_statistics(current=[record["name"]])
        return removed

    def _iter_live_parts(
        self, segments: list[dict[str, Any]], deleted: np.ndarray
    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """(row_ids, features, norms) of the rows not deleted, segment by segment, in blocks."""
        block = 16384
        for segment in segments:
            ids = self._segment_array(segment, _ROW_IDS_FILE, (segment["num_rows"],), np.dtype(np.int64))
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
        folder = self._path / _TOMBSTONES_DIR
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name not in referenced:
                    _remove_tree(entry)

    def _stamp_statistics(self, segment_names: list[str]) -> None:
        """Record the segments that statistics saved without that record were fitted over (older stores), so
        a compaction that dies after its switch still leaves them recognisably stale."""
        index = self._statistics_index()
        if any("segments" not in entry for entry in index.values()):
            for entry in index.values():
                entry.setdefault("segments", segment_names)
            _write_json_atomic(self._path / _STATISTICS_FILE, {"layers": index}, self._path / _TMP_DIR)

    def _drop_stale_statistics(self, current: list[str]) -> None:
        index = self._statistics_index()
        stale = {name for name, entry in index.items() if entry.get("segments", current) != current}
        if not stale:
            return
        kept = {name: entry for name, entry in index.items() if name not in stale}
        _write_json_atomic(self._path / _STATISTICS_FILE, {"layers": kept}, self._path / _TMP_DIR)
        referenced = {entry["file"] for entry in kept.values()}
        for path in (self._path / _STATISTICS_DIR).iterdir():
            if path.name not in referenced:
                _remove_tree(path)

    # -- statistics

    def _statistics_index(self) -> dict[str, dict[str, Any]]:
        path = self._path / _STATISTICS_FILE
        if not path.exists():
            return {}
        document = _read_json(path)
        if not isinstance(document, dict) or not isinstance(document.get("layers"), dict):
            raise StoreCorruptedError(f"{path} is malformed")
        return document["layers"]

    def save_layer_statistics(self, name: str, tensors: Mapping[str, Any]) -> None:
        """Store named arrays for one layer (e.g. DataInf's (dim, dim) matrix), atomically replacing old ones.

        Stored as safetensors (no pickle), content-addressed, and listed with its sha256 in statistics.json.
        """
        from safetensors.numpy import save as save_safetensors

        self.layer_spec(name)
        if not isinstance(tensors, Mapping) or not tensors:
            raise InvalidInputError("statistics must be a non-empty mapping of name -> array")
        arrays = {}
        for key, value in tensors.items():
            if not isinstance(key, str) or not key:
                raise InvalidInputError(f"statistics keys must be non-empty strings, got {key!r}")
            array = _as_numpy(value, f"statistics[{key!r}]")
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
        (self._path / _STATISTICS_DIR).mkdir(exist_ok=True)
        with self._locked():
            _write_bytes_atomic(self._path / _STATISTICS_DIR / file_name, data, self._path / _TMP_DIR)
            index = self._statistics_index()
            previous = index.get(name, {}).get("file")
            self.refresh()
            index[name] = {"file": file_name, "sha256": digest, "keys": sorted(arrays)}
            if self._segments is not None:
                index[name]["segments"] = [s["name"] for s in self._segments]
            _write_json_atomic(self._path / _STATISTICS_FILE, {"layers": index}, self._path / _TMP_DIR)
            # The old file goes only after the index stops naming it; a crash in between leaves an orphan.
            if previous and previous != file_name:
                with contextlib.suppress(FileNotFoundError):
                    (self._path / _STATISTICS_DIR / previous).unlink()

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

    def load_layer_statistics(self, name: str) -> dict[str, np.ndarray]:
        """The arrays saved for one layer, checksum-verified; StoreIncompleteError if none were saved."""
        from safetensors.numpy import load as load_safetensors

        entry = self._current_statistics(name)
        if entry is None:
            raise StoreIncompleteError(
                f"no current statistics were saved for layer {name!r} (none yet, or fitted before a compaction)"
            )
        path = self._path / _STATISTICS_DIR / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise StoreCorruptedError(f"statistics of {name!r} ({path}) are unreadable: {exc}") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreCorruptedError(f"statistics of {name!r} ({path}) failed their sha256 check")
        return dict(load_safetensors(data))

    def __repr__(self) -> str:
        state = (
            f"{self.num_rows} rows" if self.is_complete else f"{len(self.pending_chunks())} chunks pending"
        )
        return f"FeatureStore({str(self._path)!r}, layers={len(self.layers)}, {state})"


def _signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of a file, None when it does not exist: every os.replace changes it."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _next_segment_number(segments: list[dict[str, Any]]) -> int:
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


def _check_file(path: Path, expected: str, what: str | None = None) -> None:
    label = what or str(path)
    try:
        actual = _sha256_file(path)
    except OSError as exc:
        raise StoreCorruptedError(f"{label}: {path} is unreadable: {exc}") from None
    if actual != expected:
        raise StoreCorruptedError(
            f"{label}: {path} failed its sha256 check (a byte changed); rebuild the store"
        )
