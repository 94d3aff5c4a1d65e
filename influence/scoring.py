"""Exact influence scores over per-layer feature matrices: chunked matrix products, materialised or lazy.

Features are the stored per-layer train features (n, k), typically float16/float32 memmaps; queries are the
test features (m, k) of the same layer. Scores are float32 (n, m) per layer, positive = helpful.

On CPU, float16 rows against at most a few queries (an interactive query) go through the fused kernel of
influence.kernels when it is enabled; everything else through the blocked BLAS path below.

On another device (queries on a GPU), score_layer_streamed scores: rows already there are scored in place; rows
in host memory (a store's memory-mapped files) are copied there a chunk at a time, in their own dtype, through
two pinned staging buffers, so that the next chunk is read from the files while the device scores this one, and
converted to float32 on the device. The compiled kernel is CPU-only (influence.kernels says why).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch

from influence.errors import InvalidInputError
from influence.estimators import Estimator
from influence.kernels import COMPILED_DOTS
from influence.tokens import TokenRows

DEFAULT_CHUNK_ROWS = 65536
# On CPU, rows are converted to float32 and scored in blocks of about this many features (4 MiB of float32),
# into one reused buffer: the converted block is still in cache when the product reads it, and no chunk-sized
# temporaries are allocated (and page-faulted) per chunk. Measured by bench/scoring.py (docs/benchmarks.md).
CPU_BLOCK_ELEMENTS = 1 << 20
# Rows from host memory are sent to another device in chunks of about this many features (8 MiB of float16 per
# pinned staging buffer): large enough that a chunk's fixed costs (a few kernel launches, an event) are small
# next to its copy across the bus, small enough that reading the next chunk overlaps the device's work early.
# Rows already on the device are scored in chunks of chunk_rows: there, launches would dominate smaller ones.
DEVICE_BLOCK_ELEMENTS = 1 << 22
# Row dtypes sent to a device as they are stored; others are converted to float32 on the host first.
_SENT_AS_STORED = (np.float16, np.float32)


def _readonly_view(block: np.ndarray) -> torch.Tensor:
    """A tensor over a numpy block without copying it, read-only memory included (only ever read here)."""
    if block.flags.writeable:
        return torch.from_numpy(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(block)


def _score_rows_cpu(
    train: Any,
    i0: int,
    i1: int,
    transformed: torch.Tensor,
    estimator: Estimator,
    norm_tensor: torch.Tensor | None,
    out: torch.Tensor,
    buffer: torch.Tensor,
    kernel: Any = None,
) -> None:
    """Scores of rows i0:i1 into out[i0:i1], in blocks of buffer's rows. With `kernel` (influence.kernels),
    float16 blocks are dotted by it. Otherwise a float16 (or read-only, or other) block is converted into
    `buffer` (block_rows, k) float32 in one pass, straight from the source (no intermediate copy), then scored
    while in cache; float32 blocks in writable memory are scored in place."""
    step = buffer.shape[0]
    for b0 in range(i0, i1, step):
        b1 = min(i1, b0 + step)
        source = train[b0:b1]
        block_norms = None if norm_tensor is None else norm_tensor[b0:b1]
        half = _float16_rows(source) if kernel is not None else None
        if half is not None:
            if block_norms is None and estimator.needs_norms:
                block_norms = torch.linalg.vector_norm(
                    half.float(), dim=1
                )  # as score_transformed computes them
            out[b0:b1] = estimator.scale_rows(kernel(half, transformed), block_norms)
            continue
        if isinstance(source, torch.Tensor):
            if source.dtype == torch.float32 and source.device.type == "cpu":
                rows = source  # already float32 in memory: scored in place, as before
            else:
                rows = buffer[: b1 - b0]
                rows.copy_(source)
        else:
            source = np.asarray(source)
            if source.dtype == np.float32 and source.flags.writeable:
                rows = torch.from_numpy(source)  # a writable float32 array: scored in place, as before
            else:
                if source.dtype.kind != "f" or source.dtype.itemsize > 4 or not source.flags.c_contiguous:
                    source = np.ascontiguousarray(source, dtype=np.float32)
                rows = buffer[: b1 - b0]
                rows.copy_(_readonly_view(source))
        out[b0:b1] = estimator.score_transformed(rows, transformed, block_norms)


def _float16_rows(rows: Any, copy: bool = True) -> torch.Tensor | None:
    """A CPU float16 (r, k) block as a C-contiguous tensor, over the same memory when it is laid out so, else
    a copy (a block's worth), or None with copy=False; None for any other block."""
    if isinstance(rows, torch.Tensor):
        if rows.dtype != torch.float16 or rows.device.type != "cpu":
            return None
        return rows if rows.is_contiguous() else (rows.contiguous() if copy else None)
    array = np.asarray(rows)
    if array.dtype != np.float16:  # also a non-native byte order: BLAS's path converts it
        return None
    if not array.flags.c_contiguous:
        if not copy:
            return None
        array = np.ascontiguousarray(array)
    return _readonly_view(array)


def _element_dtype(features: Any) -> torch.dtype | None:
    """The torch dtype of an array-like's elements (None when it does not say, or torch has none for it)."""
    if isinstance(features, torch.Tensor):
        return features.dtype if features.device.type == "cpu" else None
    try:
        dtype = np.dtype(features.dtype)
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype if dtype.isnative else None
    except (AttributeError, TypeError, ValueError):
        return None


def _as_queries(queries: Any) -> Any:
    if isinstance(queries, TokenRows):
        return queries
    tensor = queries if isinstance(queries, torch.Tensor) else torch.as_tensor(np.asarray(queries))
    return tensor.detach()


def _norms_as_tensor(norms: Any, n: int) -> torch.Tensor | None:
    """(n,) float32 norms as a tensor; a read-only memmap (a store's norms) is wrapped, not copied."""
    if norms is None:
        return None
    tensor = norms if isinstance(norms, torch.Tensor) else _readonly_view(np.asarray(norms))
    if tuple(tensor.shape) != (n,):
        raise InvalidInputError(f"norms must have shape ({n},), got {tuple(tensor.shape)}")
    return tensor.to(torch.float32)


def _feature_shape(features: Any, name: str = "features") -> tuple[int, int]:
    shape = tuple(getattr(features, "shape", ()))
    if len(shape) != 2:
        raise InvalidInputError(f"{name} must be an (n, k) matrix, got shape {shape}")
    return int(shape[0]), int(shape[1])


def score_layer(
    train: Any,
    queries: Any,
    estimator: Estimator,
    norms: Any = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Exact scores of one layer: train features (n, k) (array, memmap, tensor; float16/32/64) against
    queries (m, k). norms: optional (n,) train feature norms, used when the estimator needs them (computed per
    chunk when none are given), e.g. a store's read-only memmap. Returns (n, m) float32 on the queries' device:
    queries on a GPU are scored there (score_layer_streamed).
    """
    if isinstance(train, TokenRows) or isinstance(queries, TokenRows):
        return score_token_rows(train, queries, estimator, norms)
    n, k, transformed, norm_tensor = _prepare(train, queries, estimator, norms, chunk_rows, None)
    device = transformed.device
    if device.type != "cpu":
        return _score_streamed(train, n, k, transformed, estimator, norm_tensor, chunk_rows)
    kernel = None
    if n > 0 and COMPILED_DOTS.serves(_element_dtype(train), transformed.shape[0]):
        kernel = COMPILED_DOTS
        # One pass over all rows when they lie contiguous in memory; otherwise (a view, a lazy source) block by block.
        whole = _float16_rows(train, copy=False) if isinstance(train, np.ndarray | torch.Tensor) else None
        if whole is not None and (norm_tensor is not None or not estimator.needs_norms):
            return estimator.scale_rows(kernel(whole, transformed), norm_tensor)
    out = torch.empty((n, transformed.shape[0]), dtype=torch.float32, device=device)
    if n > 0:
        block_rows = max(1, min(int(chunk_rows), n, CPU_BLOCK_ELEMENTS // max(1, k)))
        buffer = torch.empty((block_rows, k), dtype=torch.float32)
        _score_rows_cpu(train, 0, n, transformed, estimator, norm_tensor, out, buffer, kernel)
    return out


def score_layer_streamed(
    train: Any,
    queries: Any,
    estimator: Estimator,
    norms: Any = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    device: Any = None,
) -> torch.Tensor:
    """score_layer's path for queries on a GPU, on any `device` (default: the queries'): exact scores (n, m)
    float32 on `device`, the train rows scored there a chunk (at most chunk_rows rows) at a time.

    Rows on `device` already are scored in place. Rows in host memory (a store's read-only memmap, an array, a
    CPU tensor) are copied into one of two staging buffers (pinned for a GPU) in their stored dtype, float16 or
    float32 (others as float32), sent without blocking, and converted to float32 on the device: the host reads
    the next chunk from the files while the device scores this one. The scores are those of score_layer up to
    float32 summation order."""
    if isinstance(train, TokenRows) or isinstance(queries, TokenRows):
        raise InvalidInputError(
            "token-row units are scored by score_layer (a join on token id), not streamed"
        )
    n, k, transformed, norm_tensor = _prepare(train, queries, estimator, norms, chunk_rows, device)
    return _score_streamed(train, n, k, transformed, estimator, norm_tensor, chunk_rows)


def _prepare(
    train: Any, queries: Any, estimator: Estimator, norms: Any, chunk_rows: int, device: Any
) -> tuple[int, int, torch.Tensor, torch.Tensor | None]:
    """Checked shapes (n, k), the queries transformed once on `device` (default: theirs) as float32, and the
    norms the estimator reads (None when it reads none)."""
    n, k = _feature_shape(train)
    query_tensor = _as_queries(queries)
    if query_tensor.ndim != 2 or query_tensor.shape[1] != k:
        raise InvalidInputError(
            f"queries must have shape (m, {k}) to match the features, got {tuple(query_tensor.shape)}"
        )
    if int(chunk_rows) < 1:
        raise InvalidInputError("chunk_rows must be positive")
    if device is not None:
        query_tensor = query_tensor.to(device)
    # Norms only matter to estimators that scale rows by them (cosine): the others never read them.
    norm_tensor = _norms_as_tensor(norms, n) if estimator.needs_norms else None
    if query_tensor.dtype in (torch.float16, torch.bfloat16):
        query_tensor = query_tensor.float()  # the transform is done at no less than float32 precision
    # Transform once (DataInf works in float64 inside), then score in float32.
    transformed = estimator.transform_query(query_tensor).to(torch.float32)
    return n, k, transformed, norm_tensor


def _score_streamed(
    train: Any,
    n: int,
    k: int,
    transformed: torch.Tensor,
    estimator: Estimator,
    norm_tensor: torch.Tensor | None,
    chunk_rows: int,
) -> torch.Tensor:
    device = transformed.device
    out = torch.empty((n, transformed.shape[0]), dtype=torch.float32, device=device)
    on_device = isinstance(train, torch.Tensor) and train.device.type != "cpu"
    block_rows = max(1, min(int(chunk_rows), n))
    if not on_device:
        block_rows = max(1, min(block_rows, DEVICE_BLOCK_ELEMENTS // max(1, k)))
    pinned = device.type == "cuda" and not on_device
    staging: list[torch.Tensor] = []
    # Per staging buffer, the event recorded after its last copy to the device was queued: the buffer is
    # refilled only once that copy has read it.
    sent: list[Any] = [None, None]
    for step, i0 in enumerate(range(0, n, block_rows)):
        i1 = min(n, i0 + block_rows)
        if on_device:
            rows = train[i0:i1].to(device)
        else:
            host = _host_rows(train, i0, i1)
            slot = step % 2
            if not staging:
                staging = [
                    torch.empty((block_rows, k), dtype=host.dtype, pin_memory=pinned) for _ in range(2)
                ]
            if sent[slot] is not None:
                sent[slot].synchronize()
            buffer = staging[slot][: i1 - i0]
            buffer.copy_(host)
            rows = buffer.to(device, non_blocking=pinned)  # on the CPU: the buffer itself, scored at once
            if pinned:
                sent[slot] = torch.cuda.Event()
                sent[slot].record()
        chunk_norms = None if norm_tensor is None else norm_tensor[i0:i1].to(device)
        out[i0:i1] = estimator.score_transformed(rows, transformed, chunk_norms)
    return out


def _host_rows(train: Any, i0: int, i1: int) -> torch.Tensor:
    """Rows i0:i1 of host rows as a CPU tensor in the dtype they are sent in, without a copy where the source
    allows (a read-only memmap is only read, by the copy into the staging buffer)."""
    if isinstance(train, torch.Tensor):
        rows = train[i0:i1]
        return rows if rows.dtype in (torch.float16, torch.float32) else rows.float()
    block = np.asarray(train[i0:i1])
    if block.dtype not in _SENT_AS_STORED:  # float64, a non-native byte order, integers
        block = np.ascontiguousarray(block, dtype=np.float32)
    try:
        return _readonly_view(block)
    except ValueError:  # negative strides, which torch does not take
        return _readonly_view(np.ascontiguousarray(block))


def score_token_rows(train: Any, queries: Any, estimator: Estimator, norms: Any = None) -> torch.Tensor:
    """Exact scores (n, m) float32 of a token-row unit (influence.tokens): Estimator.score_token_rows."""
    if not (isinstance(train, TokenRows) and isinstance(queries, TokenRows)):
        raise InvalidInputError("a token-row unit's train rows and queries must both be TokenRows")
    norm_tensor = _norms_as_tensor(norms, len(train)) if norms is not None else None
    return estimator.score_token_rows(train, queries, norm_tensor).float()


class LazyScores:
    """A (n, U, m) score tensor computed on demand, layer by layer, for `aggregate`.

    Serves ``[:, u, j0:j1]`` (layer u's scores; the last layer's full (n, m) block is cached so a sweep over
    column chunks computes it once) and ``[i0:i1]`` (rows, U, m). Nothing of size n * U * m is ever held.
    features: layer name -> (n, k_u) train features; queries: name -> (m, k_u); estimators: name -> fitted
    Estimator; norms: optional name -> (n,) train feature norms. Layer order is that of `features`.
    """

    def __init__(
        self,
        features: Mapping[str, Any],
        queries: Mapping[str, Any],
        estimators: Mapping[str, Estimator],
        norms: Mapping[str, Any] | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ):
        self.layers: list[str] = list(features)
        if not self.layers:
            raise InvalidInputError("LazyScores needs at least one layer")
        for mapping, what in ((queries, "queries"), (estimators, "estimators")):
            missing = [name for name in self.layers if name not in mapping]
            if missing:
                raise InvalidInputError(f"{what} missing for layers {missing}")
        sizes = {name: _feature_shape(features[name], f"features[{name!r}]") for name in self.layers}
        counts = {n for n, _ in sizes.values()}
        if len(counts) != 1:
            raise InvalidInputError(
                f"every layer must have the same number of train rows, got {sorted(counts)}"
            )
        self.features = dict(features)
        self.queries = {name: _as_queries(queries[name]) for name in self.layers}
        widths = set()
        for name in self.layers:
            q = self.queries[name]
            if q.ndim != 2 or q.shape[1] != sizes[name][1]:
                raise InvalidInputError(
                    f"queries[{name!r}] must have shape (m, {sizes[name][1]}), got {tuple(q.shape)}"
                )
            widths.add(int(q.shape[0]))
        if len(widths) != 1:
            raise InvalidInputError(f"every layer must have the same number of queries, got {sorted(widths)}")
        self.estimators = dict(estimators)
        self.norms = dict(norms) if norms is not None else {}
        self.chunk_rows = int(chunk_rows)
        n = counts.pop()
        self.shape: tuple[int, int, int] = (n, len(self.layers), widths.pop())
        self._cached: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def layer_scores(self, u: int) -> torch.Tensor:
        """All scores (n, m) float32 of layer u (cached: the last one asked for)."""
        if self._cached is not None and self._cached[0] == u:
            return self._cached[1]
        self._cached = None  # free the previous block before computing the next one
        name = self.layers[u]
        block = score_layer(
            self.features[name],
            self.queries[name],
            self.estimators[name],
            self.norms.get(name),
            self.chunk_rows,
        )
        self._cached = (u, block)
        return block

    def rows(self, i0: int, i1: int) -> torch.Tensor:
        """Scores (i1 - i0, U, m) float32 of train rows i0:i1 for every layer."""
        parts = []
        for name in self.layers:
            norms = self.norms.get(name)
            parts.append(
                score_layer(
                    self.features[name][i0:i1],
                    self.queries[name],
                    self.estimators[name],
                    None if norms is None else norms[i0:i1],
                    self.chunk_rows,
                )
            )
        return torch.stack(parts, dim=1)

    def __getitem__(self, key: Any) -> torch.Tensor:
        n, num_layers, _ = self.shape
        if isinstance(key, slice):
            i0, i1 = _unit_slice(key, n)
            return self.rows(i0, i1)
        if (
            isinstance(key, tuple)
            and len(key) == 3
            and key[0] == slice(None)
            and isinstance(key[1], int | np.integer)
            and isinstance(key[2], slice)
        ):
            u = int(key[1])
            if not -num_layers <= u < num_layers:
                raise IndexError(f"layer index {u} out of range for {num_layers} layers")
            j0, j1 = _unit_slice(key[2], self.shape[2])
            return self.layer_scores(u % num_layers)[:, j0:j1]
        raise TypeError("LazyScores supports only [i0:i1] and [:, u, j0:j1]")


def _unit_slice(key: slice, size: int) -> tuple[int, int]:
    start, stop, step = key.indices(size)
    if step != 1:
        raise TypeError("LazyScores slices must have step 1")
    return start, max(start, stop)


def score_tensor(
    features: Mapping[str, Any],
    queries: Mapping[str, Any],
    estimators: Mapping[str, Estimator],
    norms: Mapping[str, Any] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    *,
    layer_major: bool = False,
) -> np.ndarray:
    """Materialise the (n, U, m) float32 score tensor (small sets, a query); layers in `features` order.

    C-ordered by default. layer_major=True returns a transposed view of a (U, m, n) array instead, in which
    each layer's column out[:, u, j] is contiguous, as score_layer produces it and as ranking reads it
    (aggregate and average_ranks sort along n per voter): no copy goes through a stride of U x m (a query)."""
    lazy = LazyScores(features, queries, estimators, norms, chunk_rows)
    n, num_layers, m = lazy.shape
    if not layer_major:
        out = np.empty(lazy.shape, dtype=np.float32)
        for u in range(num_layers):
            out[:, u, :] = lazy.layer_scores(u).cpu().numpy()
        return out
    by_layer = np.empty((num_layers, m, n), dtype=np.float32)
    for u in range(num_layers):
        by_layer[u] = lazy.layer_scores(u).cpu().numpy().T
    return by_layer.transpose(2, 0, 1)


def top_k(agg: Any, k: int, direction: Literal["helpful", "harmful"]) -> np.ndarray:
    """Indices (min(k, n),) int64 of the k most helpful (highest) or harmful (lowest) aggregated scores.

    agg: (n,) scores, numpy or torch. Most extreme first; ties go to the lower index.
    """
    values = agg.detach().cpu().numpy() if isinstance(agg, torch.Tensor) else np.asarray(agg)
    if values.ndim != 1:
        raise InvalidInputError(f"aggregated scores must be one-dimensional, got shape {values.shape}")
    if np.isnan(values.astype(np.float64)).any():
        raise InvalidInputError("aggregated scores contain NaN")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise InvalidInputError(f"k must be a non-negative integer, got {k!r}")
    if direction == "harmful":
        keys = values
    elif direction == "helpful":
        # Negating keeps the lower-index-first rule for ties (float64: exact for any input).
        keys = -values.astype(np.float64)
    else:
        raise InvalidInputError(f"direction must be 'helpful' or 'harmful', got {direction!r}")
    return _smallest_first(keys, int(k))


def _smallest_first(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest keys, ascending, ties to the lower index: np.argsort(keys, kind="stable")[:k]
    computed by partial selection (O(n) instead of O(n log n): the top-10 of 1M rows in a few ms)."""
    n = len(keys)
    if k >= n or n <= 4 * k or n < 1024:
        return np.argsort(keys, kind="stable")[:k].astype(np.int64)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(keys, k - 1)[k - 1]
    below = np.flatnonzero(keys < kth)
    tied = np.flatnonzero(keys == kth)[: k - len(below)]  # the lowest indices among the k-th value's ties
    chosen = np.concatenate([below, tied])
    # primary key: the value; secondary: the index (np.lexsort sorts by its last key first)
    return chosen[np.lexsort((chosen, keys[chosen]))].astype(np.int64)
