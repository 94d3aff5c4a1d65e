"""Evaluation without retraining (method.md §4) and the cancellation effect (method.md §5).

Noise detection: training samples are ordered by aggregated score ascending (most detrimental first) and
the share of the known-noisy samples found among the first t is NDR(t). Ties in the aggregated score keep the
input order (a stable sort: the lower index comes first), so results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from influence.errors import InvalidInputError

DEFAULT_NDR_PERCENTS: tuple[int, ...] = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 90)


def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _checked(agg: Any, noisy: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = _as_numpy(agg)
    mask = _as_numpy(noisy)
    if scores.ndim != 1 or scores.shape[0] == 0:
        raise InvalidInputError(
            f"aggregated scores must be a non-empty (n,) vector, got shape {scores.shape}"
        )
    if mask.shape != scores.shape:
        raise InvalidInputError(f"noisy must have the shape of the scores {scores.shape}, got {mask.shape}")
    if mask.dtype != np.bool_:
        if not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
            raise InvalidInputError(f"noisy must be a boolean mask (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask.astype(bool)
    if not np.issubdtype(scores.dtype, np.number) or np.issubdtype(scores.dtype, np.complexfloating):
        raise InvalidInputError(f"aggregated scores must be real numbers, got dtype {scores.dtype}")
    if np.isnan(scores.astype(np.float64)).any():
        raise InvalidInputError("aggregated scores contain NaN")
    if not mask.any():
        raise InvalidInputError("noisy marks no sample: the noise detection rate is undefined")
    return scores, mask


def ndr_curve(agg: Any, noisy: Any) -> np.ndarray:
    """Noise detection rate NDR(t) for t = 1..n: share of noisy samples among the t lowest scores.

    agg: (n,) aggregated scores (lower = more detrimental); noisy: (n,) bool. Returns (n,) float64.
    Ties keep the input order (stable sort).
    """
    scores, mask = _checked(agg, noisy)
    order = np.argsort(scores, kind="stable")
    return np.cumsum(mask[order], dtype=np.float64) / float(mask.sum())


def _percent_to_count(percent: float, n: int) -> int:
    """round(p n / 100), half up, computed exactly (no float error at the .5 boundary)."""
    if isinstance(percent, bool) or not isinstance(percent, int | float | np.integer | np.floating):
        raise InvalidInputError(f"percent must be a number, got {percent!r}")
    if not (math.isfinite(percent) and 0 <= percent <= 100):
        raise InvalidInputError(f"percent must be in [0, 100], got {percent!r}")
    return math.floor(Fraction(percent) * n / 100 + Fraction(1, 2))


def ndr_at(agg: Any, noisy: Any, percents: Iterable[float] = DEFAULT_NDR_PERCENTS) -> dict[Any, float]:
    """NDR@p = NDR(round(p n / 100)) per percent p (round half up; t = 0 gives 0), keyed by the percents."""
    curve = ndr_curve(agg, noisy)
    n = len(curve)
    result: dict[Any, float] = {}
    for p in percents:
        t = _percent_to_count(p, n)
        result[p] = 0.0 if t == 0 else float(curve[t - 1])
    return result


def auc_ndr(agg: Any, noisy: Any) -> float:
    """AUC-NDR = sum_{t=1..n} NDR(t) / (n_noisy / 2 + n_clean): about 1 when all noisy samples come first."""
    _, mask = _checked(agg, noisy)
    curve = ndr_curve(agg, noisy)
    n_noisy = int(mask.sum())
    return float(curve.sum() / (n_noisy / 2 + (len(curve) - n_noisy)))


def _check_counts(n: int, n_noisy: int | None = None) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise InvalidInputError(f"n must be a positive integer, got {n!r}")
    if n_noisy is not None and (
        isinstance(n_noisy, bool) or not isinstance(n_noisy, int | np.integer) or not 1 <= n_noisy <= n
    ):
        raise InvalidInputError(f"n_noisy must be an integer in [1, n={n}], got {n_noisy!r}")


def random_baseline_auc_ndr(n: int, n_noisy: int) -> float:
    """Expected AUC-NDR of a uniformly random order.

    E[NDR(t)] = t / n (hypergeometric mean), so the expectation is ((n + 1) / 2) / (n_noisy / 2 + n_clean).
    """
    _check_counts(n, n_noisy)
    return (n + 1) / 2 / (n_noisy / 2 + (n - n_noisy))


def random_baseline_ndr_at(percents: Iterable[float], n: int) -> dict[Any, float]:
    """Expected NDR@p of a uniformly random order over n samples: t / n with t = round(p n / 100)."""
    _check_counts(n)
    return {p: _percent_to_count(p, n) / n for p in percents}


@dataclass(frozen=True)
class Cancellation:
    """Cancellation of one layer's per-sample gradients (method.md §5); large = gradients cancel out.

    l1_over_l1 = sum_i ||g_i||_1 / ||sum_i g_i||_1; l1_over_l2 = sum_i ||g_i||_1 / ||sum_i g_i||_2.
    A zero gradient sum gives inf (nan when every gradient is zero: 0/0).
    """

    l1_over_l1: float
    l1_over_l2: float
    num_samples: int


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else math.nan


class CancellationAccumulator:
    """Streams per-sample gradient batches of one layer into its Cancellation, in float64.

    add(l1_norms (b,), grad_sum (p,)): the batch's per-sample L1 norms and the sum of its b gradients (dense,
    or a torch sparse tensor for row-sparse embedding gradients; any shape, flattened to p).
    """

    def __init__(self) -> None:
        self._l1_total = 0.0
        self._grad_sum: torch.Tensor | None = None
        self._num_samples = 0

    def add(self, l1_norms: Any, grad_sum: Any) -> None:
        """Add a batch: l1_norms (b,) per-sample ||g_i||_1, grad_sum (p,) = sum over the batch of g_i."""
        norms = l1_norms if isinstance(l1_norms, torch.Tensor) else torch.as_tensor(_as_numpy(l1_norms))
        if norms.ndim != 1:
            raise InvalidInputError(f"l1_norms must be (b,), got shape {tuple(norms.shape)}")
        grads = grad_sum if isinstance(grad_sum, torch.Tensor) else torch.as_tensor(_as_numpy(grad_sum))
        if grads.is_sparse:
            grads = grads.coalesce().to_dense()
        grads = grads.detach().reshape(-1).to(torch.float64)
        if self._grad_sum is None:
            self._grad_sum = grads.clone()
        elif grads.shape != self._grad_sum.shape:
            raise InvalidInputError(
                f"grad_sum has {grads.numel()} parameters, earlier batches had {self._grad_sum.numel()}"
            )
        else:
            self._grad_sum += grads.to(self._grad_sum.device)
        self._l1_total += float(norms.detach().to(torch.float64).sum())
        self._num_samples += int(norms.shape[0])

    def result(self) -> Cancellation:
        """The Cancellation of everything added so far."""
        if self._grad_sum is None or self._num_samples == 0:
            raise InvalidInputError("no gradients were added: cancellation is undefined")
        l1 = float(torch.linalg.vector_norm(self._grad_sum, ord=1))
        l2 = float(torch.linalg.vector_norm(self._grad_sum, ord=2))
        return Cancellation(_ratio(self._l1_total, l1), _ratio(self._l1_total, l2), self._num_samples)


# Rows per accumulator batch in cancellation(): bounds the float64 copy of a large (n, p) matrix.
_CANCELLATION_ROWS = 4096


def _cancellation_one(grads: Any) -> Cancellation:
    matrix = grads if isinstance(grads, torch.Tensor) else _as_numpy(grads)
    if matrix.ndim != 2:
        raise InvalidInputError(f"per-sample gradients must be (n, p), got shape {tuple(matrix.shape)}")
    accumulator = CancellationAccumulator()
    for i0 in range(0, matrix.shape[0], _CANCELLATION_ROWS):
        rows = matrix[i0 : i0 + _CANCELLATION_ROWS]
        block = (rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.array(rows))).to(
            torch.float64
        )
        accumulator.add(block.abs().sum(dim=1), block.sum(dim=0))
    return accumulator.result()


def cancellation(grads: Any) -> Cancellation | dict[str, Cancellation]:
    """Cancellation of per-sample gradients (n, p) (array or tensor), or of each value of a dict of them."""
    if isinstance(grads, Mapping):
        return {name: _cancellation_one(value) for name, value in grads.items()}
    return _cancellation_one(grads)
