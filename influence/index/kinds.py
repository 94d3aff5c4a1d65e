"""The index kinds: LayerIndex, a maximum-inner-product faiss index over one layer's features, and its
registered kinds flat (exact), ivf and hnsw (approximate). An index is searched on a GPU where one is usable
(influence.index.devices: LayerIndex.to_device, build and load take the process' device)."""

from __future__ import annotations

import contextlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import faiss
import numpy as np

from influence.errors import InvalidInputError, StoreCorruptedError
from influence.files import atomic_output
from influence.index.devices import GPU_MAX_K, gpu_lock, search_gpu, to_cpu, to_search_device

INDEX_KINDS: dict[str, type[LayerIndex]] = {}

# Rows converted to float32 and handed to faiss at a time: bounds the extra memory over a float16 memmap.
ADD_BLOCK_ROWS = 16384


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

    Build with `LayerIndex.build(features, kind, **params)`, persist with save/load. An index on a GPU
    (`device` says where) answers as the same index on the CPU would, and is saved as a CPU index.
    """

    kind: ClassVar[str]
    is_exact: ClassVar[bool] = False
    # faiss classes this kind wraps (exact types, checked after downcasting; metric checked in __init__).
    faiss_classes: ClassVar[tuple[type, ...]]
    # Parameters accepted by build(); search-time ones may also be changed with set_search_params().
    build_params: ClassVar[tuple[str, ...]] = ()
    search_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, index: Any, gpu: int | None = None) -> None:
        """index: a faiss index of this kind; gpu: the GPU it lies on (a copy to_search_device made), or None."""
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise InvalidInputError(f"{type(self).__name__} needs an inner-product faiss index")
        self._index = index
        self._gpu = gpu

    # -- construction

    @staticmethod
    def build(features: Any, kind: str = "flat", device: Any = None, **params: Any) -> LayerIndex:
        """Build an index of `kind` over features (n, dim) of any float dtype (fed as float32 blocks).

        device: the process' device ("cpu", "cuda", ...; None: the CPU). Where the index will be searched on a
        GPU, it is moved there empty, then trained and filled there."""
        cls = INDEX_KINDS.get(kind)
        if cls is None:
            raise InvalidInputError(f"unknown index kind {kind!r}; known: {sorted(INDEX_KINDS)}")
        unknown = sorted(set(params) - set(cls.build_params))
        if unknown:
            raise InvalidInputError(f"index kind {kind!r} takes {list(cls.build_params)}, not {unknown}")
        matrix = _as_matrix(features, "features")
        layer_index = cls(cls._create(matrix, **params)).to_device(device)
        layer_index._train(matrix, **params)
        layer_index.add(matrix)
        return layer_index

    @classmethod
    @abstractmethod
    def _create(cls, features: np.ndarray, **params: Any) -> Any:
        """An empty, untrained faiss index for features (n, dim); the build parameters are checked here."""

    def _train(self, features: np.ndarray, **params: Any) -> None:
        """Train the empty index on features (n, dim) where it lies (kinds that need training)."""
        return None

    def to_device(self, device: Any) -> LayerIndex:
        """This index where a process with `device` searches it (influence.index.devices.to_search_device):
        a new LayerIndex over a GPU copy, or self when it stays where it is (an index on a GPU stays there)."""
        if self._gpu is not None:
            return self
        moved = to_search_device(self._index, device)
        if moved is self._index:
            return self
        return type(self)(moved, gpu=search_gpu(device))

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
    def device(self) -> str:
        """Where the index lies: "cpu" or "cuda:<gpu>"."""
        return "cpu" if self._gpu is None else f"cuda:{self._gpu}"

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
        for start in range(0, len(matrix), ADD_BLOCK_ROWS):
            block = _float32_block(matrix[start : start + ADD_BLOCK_ROWS], "features")
            if self._gpu is None:
                self._index.add(block)
            else:
                with gpu_lock(self._gpu):
                    self._index.add(block)

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
        block = _float32_block(matrix, "queries")
        # A GPU index ignores ID selectors: it returns top_k + len(excluded) rows and the excluded ones are
        # dropped after, which leaves the same top_k. Past the GPU's largest k, a CPU copy answers (rare: it
        # takes thousands of deleted rows, which a compaction removes).
        fetch = int(top_k) + int(excluded.size)
        if self._gpu is not None and fetch <= GPU_MAX_K:
            with gpu_lock(self._gpu):
                scores, positions = self._index.search(block, min(fetch, max(self.ntotal, 1)))
            scores, positions = _drop_excluded(scores, positions, excluded, int(top_k))
        else:
            index = to_cpu(self._index, self._gpu)
            scores, positions = self._search_cpu(index, block, int(top_k), excluded)
        positions = positions.astype(np.int64, copy=False)
        # faiss pads with -FLT_MAX; -inf cannot be mistaken for a real score.
        scores[positions < 0] = -np.inf
        return scores, positions

    def _search_cpu(
        self, index: Any, queries: np.ndarray, top_k: int, excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if not excluded.size:
            return index.search(queries, top_k)
        # Both selectors must outlive the search: the parameters hold raw pointers to them.
        batch = faiss.IDSelectorBatch(excluded)
        selector = faiss.IDSelectorNot(batch)
        parameters = self._search_parameters(selector)
        scores, positions = index.search(queries, top_k, params=parameters)
        del parameters, selector, batch
        return scores, positions

    # -- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to `path` atomically (temp file in the same directory, then os.replace)."""
        index = to_cpu(self._index, self._gpu)  # files hold CPU indexes, whatever the machine
        with atomic_output(path) as tmp:
            faiss.write_index(index, str(tmp))

    @staticmethod
    def load(path: str | os.PathLike[str], device: Any = None) -> LayerIndex:
        """Read an index written by save(), placed for `device` (to_device); StoreCorruptedError if faiss
        cannot parse it."""
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise StoreCorruptedError(f"FAISS index {path} is unreadable: {exc}") from None
        return LayerIndex.from_faiss(index).to_device(device)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ntotal={self.ntotal}, dim={self.dim}, params={self.params}, "
            f"device={self.device!r})"
        )


def _drop_excluded(
    scores: np.ndarray, positions: np.ndarray, excluded: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first top_k results of each query that are found (>= 0) and not excluded, in the order given; padded
    with position -1 and score -inf."""
    keep = positions >= 0
    if excluded.size:
        keep &= ~np.isin(positions, excluded)
    out_scores = np.full((len(positions), top_k), -np.inf, dtype=np.float32)
    out_positions = np.full((len(positions), top_k), -1, dtype=np.int64)
    for j in range(len(positions)):
        found = positions[j][keep[j]][:top_k]
        out_positions[j, : len(found)] = found
        out_scores[j, : len(found)] = scores[j][keep[j]][:top_k]
    return out_scores, out_positions


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
        cls._check_nprobe(params.get("nprobe") or default_nprobe(nlist), nlist)
        quantizer = faiss.IndexFlatIP(dim)
        # faiss' python constructor keeps a reference to the quantizer, so it lives as long as the index.
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = cls._seed(params)
        return index

    @staticmethod
    def _seed(params: dict[str, Any]) -> int:
        return int(params.get("seed", 1234))

    def _train(self, features: np.ndarray, **params: Any) -> None:
        n = len(features)
        nlist = int(self._index.nlist)
        seed = self._seed(params)
        limit = nlist * self._TRAIN_ROWS_PER_LIST
        if n > limit:
            rows = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
            sample = features[rows]
        else:
            sample = features
        block = _float32_block(sample, "features")
        # A GPU copy starts from faiss' default k-means seed: set ours again where the index lies now.
        self._index.cp.seed = seed
        if self._gpu is None:
            self._index.train(block)
        else:
            with gpu_lock(self._gpu):
                self._index.train(block)
        self._index.nprobe = self._check_nprobe(params.get("nprobe") or default_nprobe(nlist), nlist)

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
