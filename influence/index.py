"""FAISS indexes over a feature store: one inner-product index per layer, for top-k fast paths.

Every estimator is "transform the query, then inner product" (docs/architecture.md), so one index per layer
serves them all. Kinds: "flat" (exact, IndexFlatIP), "ivf" (IndexIVFFlat, approximate) and "hnsw"
(IndexHNSWFlat, approximate); `is_exact` says which answers must be reported as approximate. A new kind is
one LayerIndex subclass decorated with @register_index_kind.

On-disk layout under a store directory::

    faiss/indexes.json                    {"fingerprint": the store manifest's fingerprint, "layers": {name:
                                          {"file", "sha256", "kind", "ntotal", "params", "segments": [sha256
                                          of each store segment's features file the index covers]}}}
    faiss/<stem>.<kind>.<sha16>.faiss     one index per layer, content-addressed (faiss.write_index format)
    faiss/indexes.lock, faiss/tmp/        writers' lock and temporary files

Token-row layers (the exact embedding, influence.tokens) have no index: they are scored exactly by a join
on token id. Positions returned by search are row positions in the store (FeatureStore.row_ids() maps them
to dataset ids).
Rows deleted from the store (tombstones) stay in its indexes until a compaction; searches leave them out with
`exclude=store.deleted_positions()`. A compaction rewrites the segments, so indexes built before it no longer
match the store (ManifestMismatchError on load): rebuild them with build_store_indexes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

from influence.errors import (
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
)
from influence.store import FeatureStore, _sha256_file, layer_file_stem

INDEX_KINDS: dict[str, type[LayerIndex]] = {}

_INDEX_DIR = "faiss"
_INDEX_FILE = "indexes.json"
_LOCK_FILE = "indexes.lock"
_TMP_DIR = "tmp"
# A build's temporary folder left this long ago belongs to a build that crashed.
_STALE_PENDING_S = 24 * 3600
# Rows converted to float32 and handed to faiss at a time: bounds the extra memory over a float16 memmap.
_ADD_BLOCK_ROWS = 16384


def register_index_kind(cls: type[LayerIndex]) -> type[LayerIndex]:
    """Class decorator: make `cls` available as LayerIndex.build(kind=cls.kind)."""
    INDEX_KINDS[cls.kind] = cls
    return cls


@contextlib.contextmanager
def faiss_threads(num_threads: int | None) -> Iterator[None]:
    """Run a block with faiss' OpenMP thread count set to `num_threads` (None: leave it as it is)."""
    if num_threads is None:
        yield
        return
    if not isinstance(num_threads, int) or num_threads < 1:
        raise InvalidInputError(f"num_threads must be a positive integer, got {num_threads!r}")
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _as_matrix(features: Any, what: str) -> np.ndarray:
    """A 2-D floating array (any float dtype, memmaps kept lazy); InvalidInputError otherwise."""
    if hasattr(features, "detach") and hasattr(features, "cpu"):
        features = features.detach().cpu().float().numpy()
    array = np.asarray(features)
    if array.ndim != 2 or array.dtype.kind != "f":
        raise InvalidInputError(f"{what} must be a 2-D float array, got {array.dtype} {array.shape}")
    return array


def _float32_block(block: np.ndarray, what: str) -> np.ndarray:
    out = np.ascontiguousarray(block, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidInputError(f"{what} holds NaN or infinite values")
    return out


class LayerIndex(ABC):
    """A maximum-inner-product index over one layer's features; positions are store row positions.

    Build with `LayerIndex.build(features, kind, **params)`, persist with save/load.
    """

    kind: ClassVar[str]
    is_exact: ClassVar[bool] = False
    # faiss classes this kind wraps (exact types, checked after downcasting; metric checked in __init__).
    faiss_classes: ClassVar[tuple[type, ...]]
    # Parameters accepted by build(); search-time ones may also be changed with set_search_params().
    build_params: ClassVar[tuple[str, ...]] = ()
    search_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, index: Any) -> None:
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InvalidInputError(f"{type(self).__name__} needs an inner-product faiss index")
        self._index = index

    # -- construction

    @staticmethod
    def build(features: Any, kind: str = "flat", **params: Any) -> LayerIndex:
        """Build an index of `kind` over features (n, dim) of any float dtype (fed as float32 blocks)."""
        cls = INDEX_KINDS.get(kind)
        if cls is None:
            raise InvalidInputError(f"unknown index kind {kind!r}; known: {sorted(INDEX_KINDS)}")
        unknown = sorted(set(params) - set(cls.build_params))
        if unknown:
            raise InvalidInputError(f"index kind {kind!r} takes {list(cls.build_params)}, not {unknown}")
        matrix = _as_matrix(features, "features")
        index = cls._create(matrix, **params)
        layer_index = cls(index)
        layer_index.add(matrix)
        return layer_index

    @classmethod
    @abstractmethod
    def _create(cls, features: np.ndarray, **params: Any) -> Any:
        """An empty (trained, if the kind needs it) faiss index for features (n, dim)."""

    @staticmethod
    def from_faiss(index: Any) -> LayerIndex:
        """Wrap a faiss index of a registered kind (after downcasting it)."""
        if not any(type(index) in cls.faiss_classes for cls in INDEX_KINDS.values()):
            specific = faiss.downcast_index(index)
            if specific is not index and index.thisown:
                # The downcast wrapper shares the C++ object: hand it the ownership, or it dangles once the
                # generic wrapper is collected.
                index.this.disown()
                specific.this.acquire()
            index = specific
        for cls in INDEX_KINDS.values():
            if type(index) in cls.faiss_classes:
                return cls(index)
        raise InvalidInputError(f"faiss index type {type(index).__name__} is not a registered index kind")

    # -- properties

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss index (for benchmarks and advanced use)."""
        return self._index

    @property
    def ntotal(self) -> int:
        """Number of indexed rows."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self._index.d)

    @property
    def params(self) -> dict[str, Any]:
        """The kind's build and search parameters, as the index holds them now."""
        return {}

    def set_search_params(self, **params: Any) -> None:
        """Change search-time parameters (e.g. nprobe for ivf, efSearch for hnsw)."""
        unknown = sorted(set(params) - set(self.search_params))
        if unknown:
            raise InvalidInputError(f"index kind {self.kind!r} has search params {list(self.search_params)}")
        self._set_search_params(**params)

    def _set_search_params(self, **params: Any) -> None:
        return None

    def _search_parameters(self, selector: Any) -> Any:
        """faiss search parameters carrying an ID selector (kinds with search-time knobs keep theirs)."""
        return faiss.SearchParameters(sel=selector)

    # -- use

    def add(self, features: Any) -> None:
        """Append rows (r, dim) at positions ntotal .. ntotal + r - 1 (e.g. rows appended to the store)."""
        matrix = _as_matrix(features, "features")
        if matrix.shape[1] != self.dim:
            raise InvalidInputError(f"features have dim {matrix.shape[1]}, the index has {self.dim}")
        for start in range(0, len(matrix), _ADD_BLOCK_ROWS):
            self._index.add(_float32_block(matrix[start : start + _ADD_BLOCK_ROWS], "features"))

    def search(self, queries: Any, top_k: int, exclude: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product for each query, never one of the `exclude` positions.

        queries: (m, dim). exclude: positions to leave out (e.g. the store's deleted rows), filtered inside
        the search, so a flat index still returns the exact top-k of the other rows. Returns scores (m, top_k)
        float32, descending, and positions (m, top_k) int64; where fewer than top_k rows are found (top_k >
        ntotal, or an approximate search came up short) positions are -1 and scores -inf.
        """
        if not isinstance(top_k, int | np.integer) or isinstance(top_k, bool) or top_k < 1:
            raise InvalidInputError(f"top_k must be a positive integer, got {top_k!r}")
        matrix = _as_matrix(queries, "queries")
        if matrix.shape[1] != self.dim:
            raise InvalidInputError(f"queries have dim {matrix.shape[1]}, the index has {self.dim}")
        excluded = np.unique(np.asarray(exclude if exclude is not None else [], dtype=np.int64))
        if excluded.size:
            # Both selectors must outlive the search: the parameters hold raw pointers to them.
            batch = faiss.IDSelectorBatch(excluded)
            selector = faiss.IDSelectorNot(batch)
            parameters = self._search_parameters(selector)
            scores, positions = self._index.search(
                _float32_block(matrix, "queries"), int(top_k), params=parameters
            )
            del parameters, selector, batch
        else:
            scores, positions = self._index.search(_float32_block(matrix, "queries"), int(top_k))
        positions = positions.astype(np.int64, copy=False)
        # faiss pads with -FLT_MAX; -inf cannot be mistaken for a real score.
        scores[positions < 0] = -np.inf
        return scores, positions

    # -- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to `path` atomically (temp file in the same directory, then os.replace)."""
        target = Path(path)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.partial"
        try:
            faiss.write_index(self._index, str(tmp))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @staticmethod
    def load(path: str | os.PathLike[str]) -> LayerIndex:
        """Read an index written by save(); StoreCorruptedError if faiss cannot parse it."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise StoreCorruptedError(f"FAISS index {path} is unreadable: {exc}") from None
        return LayerIndex.from_faiss(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ntotal={self.ntotal}, dim={self.dim}, params={self.params})"


@register_index_kind
class FlatLayerIndex(LayerIndex):
    """Exact search: brute-force inner products over all rows."""

    kind = "flat"
    is_exact = True
    faiss_classes = (faiss.IndexFlatIP, faiss.IndexFlat)

    @classmethod
    def _create(cls, features: np.ndarray, **params: Any) -> Any:
        return faiss.IndexFlatIP(features.shape[1])


def default_nlist(n: int) -> int:
    """IVF list count for n rows: ~4 sqrt(n), capped so each list trains on >= 39 rows (faiss' minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39, 65536))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: ~sqrt(nlist), at least 8 (recall@10 >= 0.99 measured on clustered data)."""
    return min(nlist, max(8, round(math.sqrt(nlist))))


@register_index_kind
class IVFLayerIndex(LayerIndex):
    """Approximate: inverted lists over an inner-product k-means, probing `nprobe` lists per query.

    Build params: nlist (default default_nlist(n)), nprobe (default default_nprobe(nlist)), seed (k-means).
    """

    kind = "ivf"
    faiss_classes = (faiss.IndexIVFFlat,)
    build_params = ("nlist", "nprobe", "seed")
    search_params = ("nprobe",)
    # faiss trains on at most this many rows per list; sampling them ourselves avoids a float32 copy of all.
    _TRAIN_ROWS_PER_LIST = 256

    @classmethod
    def _create(cls, features: np.ndarray, **params: Any) -> Any:
        n, dim = features.shape
        nlist = params.get("nlist") or default_nlist(n)
        if not isinstance(nlist, int) or nlist < 1:
            raise InvalidInputError(f"nlist must be a positive integer, got {nlist!r}")
        if n < nlist:
            raise InvalidInputError(f"an ivf index with nlist={nlist} needs at least {nlist} rows, got {n}")
        seed = int(params.get("seed", 1234))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        limit = nlist * cls._TRAIN_ROWS_PER_LIST
        if n > limit:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
            sample = features[rows]
        else:
            sample = features
        # faiss' python constructor keeps a reference to the quantizer, so it lives as long as the index.
        index.train(_float32_block(sample, "features"))
        index.nprobe = cls._check_nprobe(params.get("nprobe") or default_nprobe(nlist), nlist)
        return index

    @staticmethod
    def _check_nprobe(nprobe: Any, nlist: int) -> int:
        if not isinstance(nprobe, int) or nprobe < 1:
            raise InvalidInputError(f"nprobe must be a positive integer, got {nprobe!r}")
        return min(nprobe, nlist)

    def _set_search_params(self, **params: Any) -> None:
        if "nprobe" in params:
            self._index.nprobe = self._check_nprobe(params["nprobe"], self._index.nlist)

    def _search_parameters(self, selector: Any) -> Any:
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(self._index.nprobe))

    @property
    def params(self) -> dict[str, Any]:
        return {"nlist": int(self._index.nlist), "nprobe": int(self._index.nprobe)}


@register_index_kind
class HNSWLayerIndex(LayerIndex):
    """Approximate: a hierarchical navigable small-world graph under inner product.

    Build params: M (graph degree, default 32), efConstruction (default 80), efSearch (default 64).
    """

    kind = "hnsw"
    faiss_classes = (faiss.IndexHNSWFlat,)
    build_params = ("M", "efConstruction", "efSearch")
    search_params = ("efSearch",)

    @classmethod
    def _create(cls, features: np.ndarray, **params: Any) -> Any:
        values = {"M": 32, "efConstruction": 80, "efSearch": 64, **params}
        for name, value in values.items():
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        index = faiss.IndexHNSWFlat(features.shape[1], values["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = values["efConstruction"]
        index.hnsw.efSearch = values["efSearch"]
        return index

    def _set_search_params(self, **params: Any) -> None:
        if "efSearch" in params:
            value = params["efSearch"]
            if not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"efSearch must be a positive integer, got {value!r}")
            self._index.hnsw.efSearch = value

    def _search_parameters(self, selector: Any) -> Any:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(self._index.hnsw.efSearch))

    @property
    def params(self) -> dict[str, Any]:
        hnsw = self._index.hnsw
        # M is the upper layers' degree; level 0 holds 2M neighbours.
        return {
            "M": int(hnsw.nb_neighbors(1)),
            "efConstruction": int(hnsw.efConstruction),
            "efSearch": int(hnsw.efSearch),
        }


# ------------------------------------------------------------------------------------- store integration


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / _LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_records(store: FeatureStore) -> dict[str, dict[str, Any]]:
    """Index records of `store` (empty when none were built); ManifestMismatchError if built for another."""
    path = store.path / _INDEX_DIR / _INDEX_FILE
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        fingerprint, records = document["fingerprint"], document["layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreCorruptedError(f"{path} is unreadable: {exc}") from None
    if fingerprint != store.manifest.fingerprint():
        raise ManifestMismatchError(
            f"the FAISS indexes in {path.parent} were built for another manifest than the store's: rebuild"
        )
    return dict(records)


@dataclass(frozen=True)
class _SavedIndex:
    """A layer's index written to the temporary folder, not yet in place: what its record will say."""

    tmp: Path
    sha256: str
    kind: str
    ntotal: int
    params: dict[str, Any]
    segments: list[str]


def _save_pending(
    store: FeatureStore, layer_index: LayerIndex, segments: list[str], folder: Path
) -> _SavedIndex:
    """Write a built index into this build's own temporary folder (a concurrent commit never touches it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{uuid.uuid4().hex}.faiss"
    layer_index.save(tmp)
    return _SavedIndex(
        tmp, _sha256_file(tmp), layer_index.kind, layer_index.ntotal, layer_index.params, segments
    )


def _commit(store: FeatureStore, built: dict[str, _SavedIndex]) -> None:
    """Move saved indexes into place and switch indexes.json to them (one os.replace)."""
    directory = store.path / _INDEX_DIR
    with _locked(directory):
        records = _read_records(store)
        for name, saved in built.items():
            file_name = f"{layer_file_stem(name)}.{saved.kind}.{saved.sha256[:16]}.faiss"
            os.replace(saved.tmp, directory / file_name)
            records[name] = {
                "file": file_name,
                "sha256": saved.sha256,
                "kind": saved.kind,
                "ntotal": saved.ntotal,
                "params": saved.params,
                "segments": saved.segments,
            }
        document = {"fingerprint": store.manifest.fingerprint(), "layers": records}
        tmp_json = directory / _TMP_DIR / f"{_INDEX_FILE}.{uuid.uuid4().hex}.partial"
        with open(tmp_json, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_json, directory / _INDEX_FILE)
        # Files no record names any more (replaced indexes, crashed builds) go only after the switch.
        referenced = {record["file"] for record in records.values()}
        for entry in directory.iterdir():
            if entry.suffix == ".faiss" and entry.name not in referenced:
                entry.unlink()
        for entry in (directory / _TMP_DIR).iterdir():
            if entry.is_file():
                entry.unlink()


def _pending_folder(store: FeatureStore) -> Path:
    return store.path / _INDEX_DIR / _TMP_DIR / f"build-{uuid.uuid4().hex}"


def _remove_stale_pending(store: FeatureStore) -> None:
    """Temporary folders of builds that crashed (older than a day: no build runs that long per layer)."""
    cutoff = time.time() - _STALE_PENDING_S
    for entry in (store.path / _INDEX_DIR / _TMP_DIR).glob("build-*"):
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)


def _prepare_directory(store: FeatureStore) -> None:
    (store.path / _INDEX_DIR / _TMP_DIR).mkdir(parents=True, exist_ok=True)
    _remove_stale_pending(store)


def indexable_layers(store: FeatureStore) -> list[str]:
    """The store's layers that have FAISS indexes: all but token-row layers (the exact embedding), which
    are scored exactly by a join on token id (influence.tokens) and need no candidate search."""
    return [name for name in store.layers if store.layer_spec(name).layout == "dense"]


def _select_layers(store: FeatureStore, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return indexable_layers(store)
    if isinstance(layers, str):
        raise InvalidInputError("layers must be a sequence of layer names, not one string")
    for name in layers:
        if store.layer_spec(name).layout != "dense":  # UnknownLayerError for names the store lacks
            raise InvalidInputError(
                f"layer {name!r} holds token rows (exact, joined on token id): it has no FAISS index"
            )
    return list(layers)


def build_store_indexes(
    store: FeatureStore,
    kind: str = "flat",
    layers: Sequence[str] | None = None,
    num_threads: int | None = None,
    keep: bool = True,
    **params: Any,
) -> dict[str, LayerIndex]:
    """Build and save one index of `kind` per layer (default: all) over a complete store.

    Indexes of layers not named are kept. num_threads sets faiss' OpenMP threads for the build only.
    Returns layer name -> LayerIndex over store positions 0 .. num_rows - 1; with keep=False it returns {}
    and holds one layer's index in memory at a time (each is written out as soon as it is built: a flat index
    of 1M x 12 x 256 would otherwise hold 12 GB until the end).
    """
    selected = _select_layers(store, layers)
    store.refresh()
    _prepare_directory(store)
    saved: dict[str, _SavedIndex] = {}
    kept: dict[str, LayerIndex] = {}
    folder = _pending_folder(store)
    try:
        with faiss_threads(num_threads):
            for name in selected:
                segments = store.layer_checksums(name)
                layer_index = LayerIndex.build(store.layer(name), kind=kind, **params)
                saved[name] = _save_pending(store, layer_index, segments, folder)
                if keep:
                    kept[name] = layer_index
                del layer_index
        _commit(store, saved)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return kept


def load_store_indexes(
    store: FeatureStore, layers: Sequence[str] | None = None, verify: bool = True
) -> dict[str, LayerIndex]:
    """Load the saved index of each layer (default: every indexed layer), checking it still fits the store.

    StoreIncompleteError when a layer has no index or its index misses appended rows (see
    sync_store_indexes); ManifestMismatchError when it was built over other data; StoreCorruptedError on a
    checksum failure (verify) or an unreadable file.
    """
    records = _read_records(store)
    if layers is None:
        selected = [name for name in store.layers if name in records]
        if not selected:
            raise StoreIncompleteError(f"no FAISS indexes were built for the store at {store.path}")
    else:
        selected = _select_layers(store, layers)
    loaded = {}
    for name in selected:
        record = records.get(name)
        if record is None:
            raise StoreIncompleteError(f"no FAISS index was built for layer {name!r}")
        if not _covers_all(store, name, record):
            raise StoreIncompleteError(
                f"the FAISS index of layer {name!r} covers {record['ntotal']} of {store.num_rows} rows; "
                "run sync_store_indexes after an append"
            )
        loaded[name] = _load_record(store, name, record, verify)
    return loaded


def _load_record(store: FeatureStore, name: str, record: dict[str, Any], verify: bool) -> LayerIndex:
    path = store.path / _INDEX_DIR / record["file"]
    if verify and (not path.is_file() or _sha256_file(path) != record["sha256"]):
        raise StoreCorruptedError(f"FAISS index of layer {name!r} ({path}) failed its sha256 check")
    layer_index = LayerIndex.load(path)
    if layer_index.ntotal != record["ntotal"] or layer_index.dim != store.layer_spec(name).dim:
        raise StoreCorruptedError(f"FAISS index of layer {name!r} ({path}) does not match its record")
    return layer_index


def _covers_all(store: FeatureStore, name: str, record: dict[str, Any]) -> bool:
    """Whether an index covers every store row; ManifestMismatchError if its rows are not a store prefix."""
    current = store.layer_checksums(name)
    covered = list(record["segments"])
    if current[: len(covered)] != covered:
        raise ManifestMismatchError(
            f"the FAISS index of layer {name!r} was built over other data than the store holds; rebuild it"
        )
    if len(covered) == len(current) and record["ntotal"] != store.num_rows:
        raise StoreCorruptedError(
            f"the FAISS index of layer {name!r} holds {record['ntotal']} rows, the store {store.num_rows}"
        )
    return len(covered) == len(current)


def stale_store_indexes(store: FeatureStore) -> list[str]:
    """Layers of the store whose FAISS index is missing or does not cover exactly its current segments (after a
    compaction, or appends not yet synced): the ones build_store_indexes must (re)build."""
    store.refresh()
    records = _read_records(store)
    return [
        name
        for name in indexable_layers(store)
        if name not in records or list(records[name]["segments"]) != store.layer_checksums(name)
    ]


def sync_store_indexes(store: FeatureStore, layers: Sequence[str] | None = None) -> dict[str, LayerIndex]:
    """Add rows appended to the store since each index was built, then save; returns the updated indexes.

    IVF lists keep their trained centroids: after large appends of shifted data, rebuilding gives better
    recall.
    """
    store.refresh()
    records = _read_records(store)
    selected = [n for n in store.layers if n in records] if layers is None else _select_layers(store, layers)
    _prepare_directory(store)
    updated: dict[str, LayerIndex] = {}
    saved: dict[str, _SavedIndex] = {}
    folder = _pending_folder(store)
    for name in selected:
        record = records.get(name)
        if record is None:
            raise StoreIncompleteError(f"no FAISS index was built for layer {name!r}")
        if _covers_all(store, name, record):
            continue
        layer_index = _load_record(store, name, record, verify=True)
        start = layer_index.ntotal
        for offset, block in store.iter_layer_chunks(name, _ADD_BLOCK_ROWS):
            if offset + len(block) > start:
                layer_index.add(block[max(0, start - offset) :])
        updated[name] = layer_index
        saved[name] = _save_pending(store, layer_index, store.layer_checksums(name), folder)
    try:
        if saved:
            _commit(store, saved)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return updated
