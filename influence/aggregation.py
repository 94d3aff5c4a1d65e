"""Cross-layer aggregation (method.md §3): turn a (n train, U layers, m test) score tensor into one number per
training sample, where LOWER means MORE detrimental.

The score tensor may be far larger than memory (n = 100k, U = 24, m = 500 is 1.2e9 scores), so it is read
through exactly two access patterns, which a lazy source (scores computed per layer on demand) can serve:

- ``scores[:, u, j0:j1]`` -> (n, j1 - j0): one layer's block of test columns (voter-wise methods);
- ``scores[i0:i1]`` -> (i1 - i0, U, m): a block of training rows (row-wise methods such as the median).

Voter-wise methods stream over layers u and column blocks, keeping O(n) accumulators plus one block;
row-wise methods stream over row blocks. Block sizes follow an element budget, so peak memory does not grow
with U or m.

A new method is one function and one line::

    @register_aggregator("my-method")
    def _my_method(source: ScoreSource, options: AggregationOptions) -> torch.Tensor: ...

torch is imported here on first use (influence.lazy): the service's API reads the method names without it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from influence.errors import InvalidInputError
from influence.lazy import lazy_module

# Imported on first use: the API reads this registry (the method names) without loading torch.
torch = lazy_module("torch")

# 64 MiB per float64 block; ranking holds a few temporaries of that size: a few hundred MiB whatever n, U, m.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class AggregationOptions:
    """Method parameters: `vote_k` is the share of samples each voter may vote for, `rrf_k` the RRF offset."""

    vote_k: float = 0.2
    rrf_k: float = 60.0


Aggregator = Callable[["ScoreSource", AggregationOptions], "torch.Tensor | np.ndarray"]
AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(name: str) -> Callable[[Aggregator], Aggregator]:
    """Register `fn(source, options) -> (n,) scores` under `name` (lower = more detrimental)."""

    def decorate(fn: Aggregator) -> Aggregator:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is already registered")
        AGGREGATORS[name] = fn
        return fn

    return decorate


def aggregation_names() -> list[str]:
    """Registered aggregation methods, in registration order."""
    return list(AGGREGATORS)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks along dim 0 in ascending order, ties sharing their average rank.

    x: (n, ...) real tensor without NaN. Returns float64 of the same shape and device (exact: ranks are
    half-integers).
    """
    if x.ndim == 0:
        raise InvalidInputError("average_ranks needs at least one dimension")
    x = x.detach()
    if not _on_cpu(x):
        return _average_ranks_torch(x)
    n = x.shape[0]
    rows = _rows_first(x.reshape(n, -1))
    return torch.from_numpy(_map_row_parts(_average_ranks_rows, rows)).T.reshape(x.shape)


def _on_cpu(x: torch.Tensor) -> bool:
    """Whether to rank with numpy (CPU tensors) rather than torch (accelerators, where torch.sort is fast)."""
    return x.device.type == "cpu"


def _rows_first(block: torch.Tensor) -> np.ndarray:
    """A CPU (n, c) block as a C-contiguous (c, n) numpy array of float32/float64 (sortable with SIMD)."""
    if block.dtype not in (torch.float32, torch.float64):
        block = block.to(torch.float64 if not block.is_floating_point() else torch.float32)
    return np.ascontiguousarray(block.T.numpy())


def _sort_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorting permutation of each row of a (c, n) float array, (c, n) int64, and tied (c, n - 1) bool:
    whether sorted positions t and t + 1 hold equal values.

    Sorting is the whole cost of rank-based aggregation, and numpy's SIMD sorts are about twice as fast as
    torch.sort on CPU. For float32 rows, sorting uint64 words (order-preserving key << 32 | column) with
    np.sort is a further ~25% faster than np.argsort followed by a gather of the sorted values.
    """
    n = rows.shape[1]
    if rows.dtype != np.float32 or n >= 2**32:
        order = np.argsort(rows, axis=1)
        ordered = np.take_along_axis(rows, order, axis=1)
        return order, ordered[:, 1:] == ordered[:, :-1]
    bits = (rows + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into 0.0: equal values, equal keys
    # Flip the magnitude bits of negatives, then the sign bit: unsigned order = float order.
    keys = (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).view(np.uint32) ^ np.uint32(0x80000000)
    words = keys.astype(np.uint64)
    del bits, keys
    words <<= np.uint64(32)
    words |= np.arange(n, dtype=np.uint64)
    words.sort(axis=1)
    high = (words >> np.uint64(32)).astype(np.uint32)
    words &= np.uint64(0xFFFFFFFF)
    return words.view(np.int64), high[:, 1:] == high[:, :-1]


def _average_ranks_rows(rows: np.ndarray) -> np.ndarray:
    """Average ranks along axis 1 of a (c, n) float array: (c, n) float64."""
    c, n = rows.shape
    order, tied = _sort_rows(rows)
    ranks = np.empty((c, n), dtype=np.float64)
    positions = np.arange(n, dtype=np.float64)
    for i in range(c):  # one plain scatter per row: half the time of np.put_along_axis
        ranks[i, order[i]] = positions
    pairs = np.flatnonzero(tied)  # (row, t) with sorted positions t and t + 1 equal, as row * (n - 1) + t
    if len(pairs) == 0:
        return ranks
    if len(pairs) * 16 > c * n:
        _fix_many_ties(ranks, order, tied)
        return ranks
    # Fix only the members of tie groups, when they are few: runs of sorted positions tied with a neighbour.
    row, t = np.divmod(pairs, n - 1)
    flat = np.union1d(row * n + t, row * n + t + 1)  # members as row * n + sorted position, ascending
    position = flat % n
    member_row = flat // n
    tied_with_previous = np.zeros(len(flat), dtype=bool)
    has_previous = position > 0
    tied_with_previous[has_previous] = tied[member_row[has_previous], position[has_previous] - 1]
    starts = ~tied_with_previous
    group = np.cumsum(starts) - 1
    average = (position[starts] + (np.bincount(group) - 1) / 2.0)[group]
    ranks[member_row, order[member_row, position]] = average
    return ranks


def _fix_many_ties(ranks: np.ndarray, order: np.ndarray, tied: np.ndarray) -> None:
    """_average_ranks_rows' tie fix-up in whole-array passes, for rows where ties are common (e.g. every row
    whose features are all zero scores exactly 0): faster there than collecting the tied pairs one by one."""
    c, n = ranks.shape
    member = np.zeros((c, n), dtype=bool)
    member[:, :-1] = tied
    member[:, 1:] |= tied
    flat = np.flatnonzero(member)
    tied_with_previous = np.zeros((c, n), dtype=bool)
    tied_with_previous[:, 1:] = tied
    starts = ~tied_with_previous.reshape(-1)[flat]
    group = np.cumsum(starts) - 1
    position = flat % n
    average = (position[starts] + (np.bincount(group) - 1) / 2.0)[group]
    ranks.reshape(-1)[flat - position + order.reshape(-1)[flat]] = average


def _average_ranks_torch(x: torch.Tensor) -> torch.Tensor:
    """average_ranks for accelerator tensors, with torch.sort and running max/min over tie groups."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # exact widening
    n = x.shape[0]
    values, order = torch.sort(x, dim=0)
    positions = torch.arange(n, dtype=torch.float64, device=x.device).view((n,) + (1,) * (x.ndim - 1))
    positions = positions.expand(x.shape)
    ranks = torch.empty(order.shape, dtype=torch.float64, device=order.device)
    tied = values[1:] == values[:-1]
    del values
    if not bool(tied.any()):
        return ranks.scatter_(0, order, positions)
    starts_group = torch.ones(order.shape, dtype=torch.bool, device=order.device)
    starts_group[1:] = ~tied
    ends_group = torch.ones(order.shape, dtype=torch.bool, device=order.device)
    ends_group[:-1] = ~tied
    # First position of each tie group carried forward, last position carried backward.
    first = torch.where(starts_group, positions, 0.0).cummax(dim=0).values
    last = torch.where(ends_group, positions, float(n)).flip(0).cummin(dim=0).values.flip(0)
    return ranks.scatter_(0, order, first.add_(last).mul_(0.5))


def _truncated_borda_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """Sum over the rows of a (c, n) array of max(0, k - average rank): (n,) float64, by partial selection.

    Only a row's k lowest entries can score. Their ranks are exact when ranked among themselves, because every
    entry below the k-th lowest value is among them; the tie group at the k-th value, which may extend beyond
    the k selected, is completed with a count over the whole row. About 3x cheaper than a full sort.
    """
    c, n = rows.shape
    if k >= n:
        return np.maximum(k - _average_ranks_rows(rows), 0.0).sum(axis=0)
    lowest = np.argpartition(rows, k - 1, axis=1)[:, :k]  # (c, k); column k-1 holds the k-th lowest
    values = np.take_along_axis(rows, lowest, axis=1)
    kth = values[:, k - 1 : k]
    below = values < kth
    points = np.where(below, k - _average_ranks_rows(values), 0.0)
    total = np.bincount(lowest.reshape(-1), weights=points.reshape(-1), minlength=n)
    equal_rows, equal_cols = np.nonzero(rows == kth)
    group_rank = below.sum(axis=1) + (np.bincount(equal_rows, minlength=c) - 1) / 2.0
    group_points = np.maximum(k - group_rank, 0.0)
    total += np.bincount(equal_cols, weights=group_points[equal_rows], minlength=n)
    return total


class ScoreSource:
    """A (n, U, m) score tensor read in blocks, restricted to the selected test columns.

    `scores` is a numpy array / memmap, a torch tensor, or any object with a 3-tuple `.shape` whose
    `__getitem__` serves ``[:, u, j0:j1]`` and ``[i0:i1]`` with numpy arrays or torch tensors. Blocks come
    back as float32 tensors (float64 when the source is float64), never with NaN.
    """

    def __init__(self, scores: Any, correct: Any = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        shape = getattr(scores, "shape", None)
        if shape is None or not hasattr(scores, "__getitem__"):
            raise InvalidInputError(
                "scores must be an array, a tensor or an object with .shape and [] access"
            )
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise InvalidInputError(f"scores must have shape (n train, U layers, m test), got {shape}")
        if min(shape) < 1:
            raise InvalidInputError(
                f"scores must have at least one train row, layer and test column, got {shape}"
            )
        if int(chunk_elements) < 1:
            raise InvalidInputError("chunk_elements must be positive")
        self.scores = scores
        self.n, self.num_layers, self.num_tests = shape
        self.chunk_elements = int(chunk_elements)
        self.columns = _selected_columns(correct, self.num_tests)

    @property
    def num_voters(self) -> int:
        """Number of (layer, kept test column) pairs."""
        return self.num_layers * len(self.columns)

    def layer_blocks(self, u: int) -> Iterator[torch.Tensor]:
        """Yield layer u's kept columns as (n, c) blocks, c bounded by the element budget."""
        width = max(1, self.chunk_elements // self.n)
        cols = self.columns
        a = 0
        while a < len(cols):
            # Take every kept column within `width` of the first one: one read covers them all.
            b = int(np.searchsorted(cols, cols[a] + width, side="left"))
            j0, j1 = int(cols[a]), int(cols[b - 1]) + 1
            block = self._fetch((slice(None), u, slice(j0, j1)), (self.n, j1 - j0))
            if b - a != j1 - j0:
                block = block[:, torch.as_tensor(cols[a:b] - j0, device=block.device)]
            yield block
            a = b

    def voter_blocks(self) -> Iterator[torch.Tensor]:
        """Yield (n, c) blocks covering every voter once, layer by layer."""
        for u in range(self.num_layers):
            yield from self.layer_blocks(u)

    def row_blocks(self) -> Iterator[torch.Tensor]:
        """Yield (rows, U, kept m) blocks covering every training row once, in order."""
        step = max(1, self.chunk_elements // (self.num_layers * self.num_tests))
        keep_all = len(self.columns) == self.num_tests
        for i0 in range(0, self.n, step):
            i1 = min(self.n, i0 + step)
            block = self._fetch(slice(i0, i1), (i1 - i0, self.num_layers, self.num_tests))
            if not keep_all:
                block = block[:, :, torch.as_tensor(self.columns, device=block.device)]
            yield block

    def _fetch(self, key: Any, expected: tuple[int, ...]) -> torch.Tensor:
        block = self.scores[key]
        if isinstance(block, torch.Tensor):
            tensor = block.detach()
        else:
            array = np.asarray(block)
            if not array.flags.writeable:
                array = array.copy()  # torch refuses read-only memory (e.g. a memmap opened with mode "r")
            tensor = torch.from_numpy(array)
        if tuple(tensor.shape) != expected:
            raise InvalidInputError(
                f"score source returned shape {tuple(tensor.shape)} for {key}, expected {expected}"
            )
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise InvalidInputError(f"scores must be real numbers, got {tensor.dtype}")
        if tensor.dtype != torch.float64:
            # float32 is exact for half inputs and keeps order for float32 ones; integers widen to float64.
            tensor = tensor.to(torch.float32 if tensor.is_floating_point() else torch.float64)
        if bool(torch.isnan(tensor.max())):  # max propagates NaN: one reduction, no (n, c) mask
            raise InvalidInputError("scores contain NaN")
        return tensor


def _selected_columns(correct: Any, m: int) -> np.ndarray:
    if correct is None:
        return np.arange(m, dtype=np.int64)
    if isinstance(correct, torch.Tensor):
        correct = correct.detach().cpu().numpy()
    mask = np.asarray(correct)
    if mask.dtype != np.bool_:
        raise InvalidInputError(f"correct must be a boolean mask, got dtype {mask.dtype}")
    if mask.shape != (m,):
        raise InvalidInputError(
            f"correct must have shape ({m},) (one flag per test sample), got {mask.shape}"
        )
    columns = np.flatnonzero(mask).astype(np.int64)
    if len(columns) == 0:
        raise InvalidInputError("correct selects no test sample: nothing to aggregate")
    return columns


def _row_parts(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    """[fn(part)] over consecutive row parts of a (c, n) array, the parts run in threads.

    numpy's sorts release the GIL, so threads use every core torch is allowed (torch.get_num_threads()).
    """
    workers = min(torch.get_num_threads(), rows.shape[0])
    if workers <= 1:
        return [fn(rows)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, np.array_split(rows, workers)))


def _sum_over_row_parts(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """fn(part) -> (n,) summed over row parts of a (c, n) array, the parts run in threads."""
    return sum(_row_parts(fn, rows))


def _map_row_parts(fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray) -> np.ndarray:
    """fn(part) -> (rows of part, n), stacked back in order, the parts run in threads."""
    parts = _row_parts(fn, rows)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _voter_rows(source: ScoreSource) -> Iterator[np.ndarray | torch.Tensor]:
    """Every voter once: CPU blocks as (c, n) numpy rows (_rows_first), accelerator blocks as they come.

    Consecutive CPU blocks are joined up to the element budget, so that a few test columns per layer (a query:
    one column in each of 12 layers) make one array that the threads of _sum_over_row_parts share, instead of
    12 single-row arrays sorted one after another on one core."""
    pending: list[np.ndarray] = []
    size = 0
    for block in source.voter_blocks():
        if not _on_cpu(block):
            yield block
            continue
        pending.append(_rows_first(block))
        size += block.numel()
        if size >= source.chunk_elements:
            yield pending[0] if len(pending) == 1 else np.concatenate(pending)
            pending, size = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def _sum_over_voters(source: ScoreSource, points: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum over voters of points(average ranks of the voter's column): (n,) float64.

    Each voter's points are computed in threads, then summed voter after voter in one fixed order, so that
    inexact points (rrf's reciprocals) give the same sums whatever the number of threads."""

    def rows_points(rows: np.ndarray) -> np.ndarray:
        return points(torch.from_numpy(_average_ranks_rows(rows))).numpy()

    total = torch.zeros(source.n, dtype=torch.float64)
    for rows in _voter_rows(source):
        if isinstance(rows, np.ndarray):
            # numpy adds the rows of a C-ordered (c, n) array one after another along axis 0
            total += torch.from_numpy(_map_row_parts(rows_points, rows).sum(axis=0))
        else:
            total += points(_average_ranks_torch(rows)).sum(dim=1).cpu()
    return total


@register_aggregator("mean")
def _mean(source: ScoreSource, options: AggregationOptions) -> torch.Tensor:
    """Raw mean over (u, j): dominated by large-gradient layers, as in the paper."""
    total: torch.Tensor | None = None
    for block in source.voter_blocks():
        partial = block.to(torch.float64).sum(dim=1)
        total = partial if total is None else total.add_(partial)
    assert total is not None
    return total / source.num_voters


@register_aggregator("rank")
def _rank(source: ScoreSource, options: AggregationOptions) -> torch.Tensor:
    """Mean over voters of the average rank (0 = lowest score)."""
    return _sum_over_voters(source, lambda ranks: ranks) / source.num_voters


def vote_size(vote_k: float, n: int) -> int:
    """K = round(vote_k * n), rounding half up, at least 1 so that every voter votes."""
    return max(1, math.floor(vote_k * n + 0.5))


@register_aggregator("vote")
def _vote(source: ScoreSource, options: AggregationOptions) -> torch.Tensor:
    """Truncated Borda count: minus the points max(0, K - rank) summed over voters."""
    k = vote_size(options.vote_k, source.n)
    total = torch.zeros(source.n, dtype=torch.float64)
    for rows in _voter_rows(source):
        if isinstance(rows, np.ndarray):
            total += torch.from_numpy(_sum_over_row_parts(lambda part: _truncated_borda_rows(part, k), rows))
        else:
            total += (k - _average_ranks_torch(rows)).clamp_(min=0.0).sum(dim=1).cpu()
    return -total


@register_aggregator("rrf")
def _rrf(source: ScoreSource, options: AggregationOptions) -> torch.Tensor:
    """Reciprocal-rank fusion: minus the sum over voters of 1 / (rrf_k + rank + 1)."""
    offset = options.rrf_k + 1.0
    return -_sum_over_voters(source, lambda ranks: (ranks + offset).reciprocal_())


@register_aggregator("zmean")
def _zmean(source: ScoreSource, options: AggregationOptions) -> torch.Tensor:
    """Mean over (u, j) after z-scoring each layer over all its kept (i, j) entries (population std).

    A constant layer contributes 0. Single pass per layer: mean_j z_ij = (row sum_i - m mu) / (m sd).
    """
    total = torch.zeros(source.n, dtype=torch.float64)
    for u in range(source.num_layers):
        row_sums: torch.Tensor | None = None
        count, mean, m2 = 0, 0.0, 0.0
        for block in source.layer_blocks(u):
            block = block.to(torch.float64)
            partial = block.sum(dim=1)
            row_sums = partial if row_sums is None else row_sums.add_(partial)
            # Chan et al.'s merge of (count, mean, M2): stable where sum of squares would cancel.
            block_count = block.numel()
            block_mean = float(block.mean())
            block_m2 = float((block - block_mean).square_().sum())
            delta = block_mean - mean
            merged = count + block_count
            mean += delta * block_count / merged
            m2 += block_m2 + delta * delta * count * block_count / merged
            count = merged
        assert row_sums is not None
        std = math.sqrt(m2 / count)
        if std > 0:
            total = total.to(row_sums.device)
            total += (row_sums - len(source.columns) * mean) / std
    return total / source.num_voters


@register_aggregator("median")
def _median(source: ScoreSource, options: AggregationOptions) -> torch.Tensor:
    """Median over voters (the mean of the two middle values when the count is even)."""
    parts = []
    v = source.num_voters
    for block in source.row_blocks():
        ordered = block.reshape(block.shape[0], v).to(torch.float64).sort(dim=1).values
        median = ordered[:, v // 2] if v % 2 else (ordered[:, v // 2 - 1] + ordered[:, v // 2]) / 2
        parts.append(median)
    return torch.cat(parts)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def aggregate(
    scores: Any,
    method: str,
    *,
    vote_k: float = 0.2,
    correct: Any = None,
    rrf_k: float = 60.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> np.ndarray:
    """Aggregate per-layer scores into one score per training sample (lower = more detrimental).

    scores: (n, U, m), see ScoreSource. method: a key of AGGREGATORS. correct: optional bool (m,), keep only
    those test columns (the paper's "-c" variants). chunk_elements: memory budget of one block, in scores.
    Returns (n,) float64.
    """
    if method not in AGGREGATORS:
        raise InvalidInputError(
            f"unknown aggregation method {method!r}; expected one of {', '.join(AGGREGATORS)}"
        )
    if not (_is_real(vote_k) and 0.0 < vote_k <= 1.0):
        raise InvalidInputError(f"vote_k must be in (0, 1], got {vote_k!r}")
    if not (_is_real(rrf_k) and math.isfinite(rrf_k) and rrf_k >= 0.0):
        raise InvalidInputError(f"rrf_k must be a finite number >= 0, got {rrf_k!r}")
    source = ScoreSource(scores, correct=correct, chunk_elements=chunk_elements)
    result = AGGREGATORS[method](source, AggregationOptions(vote_k=float(vote_k), rrf_k=float(rrf_k)))
    if isinstance(result, torch.Tensor):
        result = result.detach().cpu().numpy()
    result = np.asarray(result, dtype=np.float64)
    if result.shape != (source.n,):
        # A broken registered aggregator is our bug, not the caller's: not an InvalidInputError.
        raise RuntimeError(f"aggregator {method!r} returned shape {result.shape}, expected ({source.n},)")
    return result


# Methods whose aggregate over several layers is assembled EXACTLY from the layers' own aggregates when every
# layer has the same voters: rank (each layer's mean rank is a half-integer rank sum T_u over V voters; the rank
# sums add exactly in float64) and vote (sums of half-integer Borda points). Others (mean, zmean, rrf) combine
# only to rounding, and median not at all.
EXACTLY_COMBINABLE = ("rank", "vote")


def combine_layer_aggregates(parts: Any, method: str, num_voters: int) -> np.ndarray:
    """aggregate(S, method) of an (n, U, m) tensor, bit for bit, from its U per-layer results.

    parts: U arrays (n,) (or one (U, n) array), part u = aggregate(S[:, u:u+1, :], method, ...) with the same
    vote_k and `correct` for every layer; num_voters: the test columns each layer votes with (m, or how many
    `correct` keeps).
    Lets a caller that needs each layer's own aggregate anyway (an audit's per-layer contributions) skip a
    second pass over the whole tensor. Returns (n,) float64.
    """
    if method not in EXACTLY_COMBINABLE:
        raise InvalidInputError(
            f"{method!r} aggregates cannot be combined exactly from per-layer ones; use one of "
            f"{', '.join(EXACTLY_COMBINABLE)} or aggregate() over all layers"
        )
    stacked = np.asarray(parts, dtype=np.float64)  # a (U, n) float64 array passes through without a copy
    if stacked.ndim != 2 or stacked.shape[0] == 0:
        raise InvalidInputError(f"parts must be U >= 1 arrays of equal length, got shape {stacked.shape}")
    if isinstance(num_voters, bool) or not isinstance(num_voters, int | np.integer) or num_voters < 1:
        raise InvalidInputError(f"num_voters must be a positive integer, got {num_voters!r}")
    if method == "vote":
        return stacked.sum(axis=0)
    # Exact half-integer rank sums per layer (T_u = mean rank x V), summed, divided once, as aggregate() does.
    # With one voter the parts are those sums already (average ranks are half-integers).
    sums = stacked if num_voters == 1 else np.round(stacked * (2 * num_voters)) / 2
    return sums.sum(axis=0) / (num_voters * stacked.shape[0])
