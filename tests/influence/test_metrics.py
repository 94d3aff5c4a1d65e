"""NDR, AUC-NDR, their random baselines (method.md §4) and cancellation (§5) against direct formulas."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch

from influence import metrics
from influence.errors import InvalidInputError
from tests.conftest import every_noisy_mask


def brute_curve(agg, noisy) -> list[float]:
    """NDR(t), t = 1..n, with ties broken by index (Python's sort is stable)."""
    order = sorted(range(len(agg)), key=lambda i: agg[i])
    total = sum(noisy)
    return [sum(noisy[i] for i in order[:t]) / total for t in range(1, len(agg) + 1)]


def half_up(x: Decimal) -> int:
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def test_default_percents():
    assert metrics.DEFAULT_NDR_PERCENTS == (5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60, 70, 80, 90)


def test_curve_at_and_auc_match_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 60))
        agg = rng.integers(0, 5, size=n).astype(float) if trial % 2 else rng.standard_normal(n)
        noisy = rng.random(n) < 0.3
        noisy[rng.integers(n)] = True
        expected = brute_curve(agg.tolist(), noisy.tolist())
        for a, y in ((agg, noisy), (torch.from_numpy(agg).float(), torch.from_numpy(noisy))):
            curve = metrics.ndr_curve(a, y)
            assert curve.dtype == np.float64 and curve.shape == (n,)
            np.testing.assert_allclose(curve, expected, rtol=1e-12)
            n_noisy = int(noisy.sum())
            area = sum(expected) / (n_noisy / 2 + n - n_noisy)
            assert metrics.auc_ndr(a, y) == pytest.approx(area, rel=1e-12)
            at = metrics.ndr_at(a, y)
            assert list(at) == list(metrics.DEFAULT_NDR_PERCENTS)
            for p, value in at.items():
                t = half_up(Decimal(p) * n / 100)
                assert value == (0.0 if t == 0 else pytest.approx(expected[t - 1], rel=1e-12))


def test_ties_keep_the_input_order():
    agg = np.zeros(4)
    np.testing.assert_array_equal(
        metrics.ndr_curve(agg, np.array([False, True, False, True])), [0, 0.5, 0.5, 1]
    )
    np.testing.assert_array_equal(
        metrics.ndr_curve(agg, np.array([True, True, False, False])), [0.5, 1, 1, 1]
    )


def test_ndr_at_rounds_half_up():
    # n = 10: p = 5 -> t = 0.5 -> 1 (Python's round would give 0); 15 -> 1.5 -> 2; 25 -> 2.5 -> 3.
    agg = np.arange(10.0)
    noisy = np.ones(10, dtype=bool)
    at = metrics.ndr_at(agg, noisy, percents=(0, 5, 15, 25, 100, 2.5))
    assert at == {0: 0.0, 5: 0.1, 15: 0.2, 25: 0.3, 100: 1.0, 2.5: 0.0}  # 2.5 % of 10 = 0.25 -> t = 0
    all_noisy = np.ones(20, dtype=bool)
    assert metrics.ndr_at(np.arange(20.0), all_noisy, percents=(2.5,)) == {2.5: 0.05}  # 0.5 -> 1
    with pytest.raises(InvalidInputError, match="percent"):
        metrics.ndr_at(agg, noisy, percents=(101,))


def test_auc_extremes():
    for n_noisy, n_clean in ((1, 1), (3, 7), (20, 80), (50, 0)):
        n = n_noisy + n_clean
        noisy = np.array([True] * n_noisy + [False] * n_clean)
        agg = np.arange(n, dtype=float)  # the noisy samples have the lowest scores: found first
        best = ((n_noisy + 1) / 2 + n_clean) / (n_noisy / 2 + n_clean)
        assert metrics.auc_ndr(agg, noisy) == pytest.approx(best, rel=1e-12)
        worst = ((n_noisy + 1) / 2) / (n_noisy / 2 + n_clean)  # reverse order: found last
        assert metrics.auc_ndr(-agg, noisy) == pytest.approx(worst, rel=1e-12)
        np.testing.assert_array_equal(
            metrics.ndr_at(-agg, noisy, percents=(100 * n_clean / n,))[100 * n_clean / n], 0.0
        )


def test_random_baselines_are_exact_expectations():
    # Exhaustive: every placement of 2 noisy among 7 samples is equally likely under a random order.
    n, n_noisy = 7, 2
    aucs, ats = [], []
    for noisy in every_noisy_mask(n, n_noisy):
        aucs.append(metrics.auc_ndr(np.arange(n, dtype=float), noisy))
        ats.append(metrics.ndr_at(np.arange(n, dtype=float), noisy, percents=(10, 30, 50, 90)))
    assert np.mean(aucs) == pytest.approx(metrics.random_baseline_auc_ndr(n, n_noisy), rel=1e-12)
    baseline_at = metrics.random_baseline_ndr_at((10, 30, 50, 90), n)
    for p in (10, 30, 50, 90):
        assert np.mean([a[p] for a in ats]) == pytest.approx(baseline_at[p], rel=1e-12)
    # t = 0.7 -> 1, 2.1 -> 2, 3.5 -> 4, 6.3 -> 6
    assert baseline_at == {10: 1 / 7, 30: 2 / 7, 50: 4 / 7, 90: 6 / 7}


def test_random_order_mean_is_close_to_the_baseline():
    n, n_noisy = 500, 100
    noisy = np.zeros(n, dtype=bool)
    noisy[:n_noisy] = True
    rng = np.random.default_rng(42)
    aucs = np.array([metrics.auc_ndr(rng.permutation(n).astype(float), noisy) for _ in range(2000)])
    baseline = metrics.random_baseline_auc_ndr(n, n_noisy)
    assert baseline == pytest.approx(0.5561, abs=1e-3)  # "about 0.56 for a random order at 20% noise"
    assert abs(aucs.mean() - baseline) < 4 * aucs.std() / math.sqrt(len(aucs))
    ndr30 = np.array(
        [metrics.ndr_at(rng.permutation(n).astype(float), noisy, (30,))[30] for _ in range(2000)]
    )
    expected30 = metrics.random_baseline_ndr_at((30,), n)[30]
    assert abs(ndr30.mean() - expected30) < 4 * ndr30.std() / math.sqrt(2000)


def test_metric_errors():
    with pytest.raises(InvalidInputError, match="no sample"):
        metrics.ndr_curve(np.arange(3.0), np.zeros(3, dtype=bool))
    with pytest.raises(InvalidInputError, match="shape"):
        metrics.auc_ndr(np.arange(3.0), np.ones(4, dtype=bool))
    with pytest.raises(InvalidInputError, match="NaN"):
        metrics.ndr_at(np.array([0.0, np.nan]), np.array([True, False]))
    with pytest.raises(InvalidInputError, match="boolean"):
        metrics.ndr_curve(np.arange(3.0), np.array([0.0, 0.5, 1.0]))
    np.testing.assert_array_equal(metrics.ndr_curve(np.arange(3.0), np.array([0, 1, 1])), [0, 0.5, 1])
    with pytest.raises(InvalidInputError, match="n_noisy"):
        metrics.random_baseline_auc_ndr(10, 0)
    with pytest.raises(InvalidInputError, match="n must"):
        metrics.random_baseline_ndr_at((5,), 0)


# ---------------------------------------------------------------- cancellation


def direct_cancellation(grads: np.ndarray) -> tuple[float, float]:
    l1_each = sum(sum(abs(v) for v in row) for row in grads.tolist())
    total = grads.sum(axis=0)
    return l1_each / float(np.abs(total).sum()), l1_each / float(np.sqrt((total**2).sum()))


def test_cancellation_matches_the_direct_formula():
    rng = np.random.default_rng(3)
    grads = rng.standard_normal((50, 17))
    l1, l2 = direct_cancellation(grads)
    for value in (grads, torch.from_numpy(grads).float(), grads.astype(np.float16)):
        result = metrics.cancellation(value)
        as_numpy = value.numpy() if isinstance(value, torch.Tensor) else value
        reference = direct_cancellation(as_numpy.astype(np.float64))
        assert isinstance(result, metrics.Cancellation) and result.num_samples == 50
        assert result.l1_over_l1 == pytest.approx(reference[0], rel=1e-10)
        assert result.l1_over_l2 == pytest.approx(reference[1], rel=1e-10)
    assert metrics.cancellation(grads).l1_over_l1 == pytest.approx(l1, rel=1e-12)
    assert metrics.cancellation(grads).l1_over_l2 == pytest.approx(l2, rel=1e-12)
    # Identical gradients do not cancel at all: C_L1/L1 = 1.
    assert metrics.cancellation(np.tile(grads[:1], (9, 1))).l1_over_l1 == pytest.approx(1.0, rel=1e-12)
    # A gradient and its opposite cancel completely.
    assert metrics.cancellation(np.stack([grads[0], -grads[0]])).l1_over_l1 == math.inf
    assert math.isnan(metrics.cancellation(np.zeros((3, 4))).l1_over_l1)


def test_cancellation_dict():
    rng = np.random.default_rng(4)
    grads = {"embed": rng.standard_normal((6, 3)), "head": torch.from_numpy(rng.standard_normal((6, 8)))}
    result = metrics.cancellation(grads)
    assert set(result) == {"embed", "head"}
    assert result["head"].l1_over_l2 == pytest.approx(
        direct_cancellation(grads["head"].numpy())[1], rel=1e-12
    )


def test_accumulator_in_batches_equals_one_shot():
    rng = np.random.default_rng(5)
    grads = rng.standard_normal((40, 12)).astype(np.float32)
    one_shot = metrics.cancellation(grads)
    accumulator = metrics.CancellationAccumulator()
    for start, stop in ((0, 3), (3, 4), (4, 25), (25, 40)):
        batch = torch.from_numpy(grads[start:stop])
        accumulator.add(batch.abs().sum(dim=1), batch.sum(dim=0))
    result = accumulator.result()
    assert result.num_samples == 40
    assert result.l1_over_l1 == pytest.approx(one_shot.l1_over_l1, rel=1e-6)
    assert result.l1_over_l2 == pytest.approx(one_shot.l1_over_l2, rel=1e-6)


def test_accumulator_row_sparse_embedding_gradients():
    # An embedding's per-batch gradient sum touches only the rows of tokens present: pass it sparse.
    rng = np.random.default_rng(6)
    vocab, dim = 30, 4
    dense_batches, accumulator = [], metrics.CancellationAccumulator()
    for _ in range(3):
        rows = torch.from_numpy(rng.choice(vocab, size=5, replace=False))
        values = torch.from_numpy(rng.standard_normal((5, dim)))
        indices = torch.stack([rows.repeat_interleave(dim), torch.arange(dim).repeat(5)])
        grad_sum = torch.sparse_coo_tensor(indices, values.reshape(-1), (vocab, dim), check_invariants=True)
        l1 = torch.from_numpy(rng.random(2) + 1.0)
        accumulator.add(l1, grad_sum)
        dense_batches.append((l1, grad_sum.to_dense()))
    total_l1 = sum(float(l1.sum()) for l1, _ in dense_batches)
    total = sum(g for _, g in dense_batches)
    result = accumulator.result()
    assert result.l1_over_l1 == pytest.approx(total_l1 / float(total.abs().sum()), rel=1e-12)
    assert result.l1_over_l2 == pytest.approx(total_l1 / float(total.norm()), rel=1e-12)
    assert result.num_samples == 6


def test_accumulator_errors():
    with pytest.raises(InvalidInputError, match="no gradients"):
        metrics.CancellationAccumulator().result()
    accumulator = metrics.CancellationAccumulator()
    accumulator.add(torch.ones(2), torch.ones(5))
    with pytest.raises(InvalidInputError, match="parameters"):
        accumulator.add(torch.ones(2), torch.ones(6))
    with pytest.raises(InvalidInputError, match=r"\(b,\)"):
        accumulator.add(torch.ones(2, 2), torch.ones(5))
    with pytest.raises(InvalidInputError, match=r"\(n, p\)"):
        metrics.cancellation(np.ones(5))
