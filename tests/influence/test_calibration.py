"""Calibrated thresholds and review prefixes (influence.calibration): every cut checked by brute force on small
inputs with ties, the Wilson interval against hand-computed values, the refusals, and the held-out property: a
threshold calibrated on rows with known noise reaches its stated precision (recall) on other rows of the same
kind within the stated interval as often as the interval's math says."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from influence.calibration import MIN_CLEAN, MIN_NOISY, calibrate, check_mask, review_prefix, wilson_interval
from influence.errors import InvalidInputError


def percentile_rule(existing: np.ndarray, new: np.ndarray) -> np.ndarray:
    """A new row's percentile as a check computes it: 100 x (existing rows strictly lower) / (existing rows)."""
    below = np.searchsorted(
        np.sort(existing), new, side="left"
    )  # the count of existing values < each new one
    return 100.0 * below / len(existing)


# ------------------------------------------------------------------------------------------------- Wilson


def test_wilson_interval_against_hand_computed_values():
    # k = 8, n = 10, z = 1.959964 (z^2 = 3.841459): p = 0.8, 1 + z^2/n = 1.3841459,
    # center = (0.8 + 0.1920729) / 1.3841459 = 0.716740,
    # half = 1.959964 / 1.3841459 x sqrt(0.016 + 0.0096036) = 1.416010 x 0.1600114 = 0.226578.
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.716740 - 0.226578, abs=2e-6)
    assert hi == pytest.approx(0.716740 + 0.226578, abs=2e-6)
    # k = 0: the lower bound is 0 and the upper one z^2 / (n + z^2) (center = half width).
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.841459 / 13.841459, abs=1e-6))
    assert wilson_interval(10, 10) == (pytest.approx(10 / 13.841459, abs=1e-6), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # 90%: z = 1.644854; symmetric in k <-> n - k.
    lo90, hi90 = wilson_interval(3, 12, confidence=0.9)
    z2 = NormalDist().inv_cdf(0.95) ** 2
    center = (0.25 + z2 / 24) / (1 + z2 / 12)
    half = math.sqrt(z2) / (1 + z2 / 12) * math.sqrt(0.25 * 0.75 / 12 + z2 / 576)
    assert (lo90, hi90) == (pytest.approx(center - half, rel=1e-12), pytest.approx(center + half, rel=1e-12))
    assert wilson_interval(9, 12, confidence=0.9) == (pytest.approx(1 - hi90), pytest.approx(1 - lo90))
    for bad in ((11, 10), (-1, 10), (0, -1)):
        with pytest.raises(InvalidInputError):
            wilson_interval(*bad)
    for confidence in (0.0, 1.0, 1.5):
        with pytest.raises(InvalidInputError, match="confidence"):
            wilson_interval(1, 2, confidence)


# --------------------------------------------------------------------------------------------- brute force


def brute_calibration(scores: list[float], noisy: list[bool], target: str, value: float):
    """(m, k) of every cut the percentile rule can express, then the chosen one (None when none reaches)."""
    ordered = sorted(scores)
    n, known = len(scores), sum(noisy)
    cuts = []
    for m in range(1, n + 1):
        if m < n and ordered[m - 1] == ordered[m]:
            continue  # inside a run of ties: "percentile < t" cannot separate the run
        k = sum(1 for s, y in zip(scores, noisy, strict=True) if y and s <= ordered[m - 1])
        cuts.append((m, k))
    if target == "precision":
        reaching = [(m, k) for m, k in cuts if k / m >= value]
        return reaching[-1] if reaching else None
    reaching = [(m, k) for m, k in cuts if k / known >= value]
    return reaching[0] if reaching else None


def test_calibrate_equals_the_brute_force_over_every_cut():
    rng = np.random.default_rng(0)
    checked = refused = 0
    for trial in range(300):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 6, size=n).astype(float) if trial % 2 else rng.standard_normal(n)
        noisy = rng.random(n) < rng.uniform(0.1, 0.9)
        noisy[0], noisy[-1] = True, False
        for target in ("precision", "recall"):
            for value in (0.1, 0.28, 0.5, 0.75, 0.9, 1.0):
                expected = brute_calibration(scores.tolist(), noisy.tolist(), target, value)
                kwargs = {f"target_{target}": value}
                if expected is None:
                    with pytest.raises(InvalidInputError, match=f"no threshold reaches {target} {value:g}"):
                        calibrate(scores, noisy, min_noisy=1, min_clean=1, **kwargs)
                    refused += 1
                    continue
                got = calibrate(scores, noisy, min_noisy=1, min_clean=1, **kwargs)
                m, k = expected
                known = int(noisy.sum())
                assert (got.cutoff_rows, got.found, got.rows, got.known_noisy) == (m, k, n, known)
                assert (got.target, got.value) == (target, value)
                assert got.precision == k / m and got.recall == k / known
                assert got.threshold_percentile == 100.0 * m / n
                assert got.score_cutoff == np.sort(scores)[m - 1]
                assert got.precision_interval == wilson_interval(k, m)
                assert got.recall_interval == wilson_interval(k, known)
                # The derived threshold, applied to the rows themselves with the check's percentile rule, flags
                # exactly the m lowest, k of them noisy.
                flagged = percentile_rule(scores, scores) < got.threshold_percentile
                assert flagged.sum() == m and (flagged & noisy).sum() == k
                if m < n:
                    assert scores[flagged].max() < scores[~flagged].min()
                checked += 1
    assert checked > 2000 and refused > 50  # both branches are exercised


def test_a_cut_inside_tied_scores_is_never_chosen():
    # Sorted by index the first row alone is a perfect cut, but it ties with a clean row: no rule can flag it
    # alone, so precision 1 is out of reach and 0.5 is the best.
    scores, noisy = np.array([0.0, 0.0, 1.0, 1.0]), np.array([True, False, True, False])
    with pytest.raises(InvalidInputError, match=r"the best is 0\.50 at the 100th percentile"):
        calibrate(scores, noisy, target_precision=0.9, min_noisy=1, min_clean=1)
    got = calibrate(scores, noisy, target_recall=0.5, min_noisy=1, min_clean=1)
    assert (got.cutoff_rows, got.found, got.threshold_percentile) == (2, 1, 50.0)


def test_review_prefix_equals_the_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 50))
        noisy = rng.random(n) < rng.uniform(0.05, 0.9)
        noisy[rng.integers(n)] = True
        known = int(noisy.sum())
        for value in (0.01, 0.3, 0.5, 0.8, 0.95, 1.0):
            m = next(m for m in range(1, n + 1) if noisy[:m].sum() / known >= value)
            k = int(noisy[:m].sum())
            got = review_prefix(noisy, value, min_noisy=1)
            assert (got.rows, got.total_rows, got.found, got.known_noisy) == (m, n, k, known)
            assert got.share == m / n and got.recall == k / known and got.precision == k / m
            assert got.recall_interval == wilson_interval(k, known)
            assert got.precision_interval == wilson_interval(k, m)
            assert got.target_recall == value and got.confidence == 0.95


def test_results_serialize():
    rng = np.random.default_rng(2)
    noisy = rng.random(200) < 0.3
    scores = rng.standard_normal(200) - noisy
    for result in (calibrate(scores, noisy, target_recall=0.5), review_prefix(noisy, 0.5, confidence=0.9)):
        document = json.loads(json.dumps(result.to_dict()))
        assert document == result.to_dict()
        assert isinstance(document["precision_interval"], list) and len(document["recall_interval"]) == 2


# ------------------------------------------------------------------------------------------------ refusals


def test_refusals():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal(100)
    noisy = np.zeros(100, dtype=bool)
    noisy[:9] = True
    with pytest.raises(InvalidInputError, match="too small to calibrate: 9 known noisy and 91 clean rows"):
        calibrate(scores, noisy, target_precision=0.5)
    with pytest.raises(InvalidInputError, match="too small to calibrate"):
        review_prefix(noisy, 0.5)
    with pytest.raises(InvalidInputError, match="too small to calibrate: 0 known noisy"):
        review_prefix(np.zeros(5, dtype=bool), 0.5, min_noisy=1)
    noisy[:95] = True
    with pytest.raises(InvalidInputError, match="95 known noisy and 5 clean rows"):
        calibrate(scores, noisy, target_recall=0.5)
    assert (MIN_NOISY, MIN_CLEAN) == (10, 10)
    noisy = np.arange(100) % 3 == 0
    for kwargs, message in (
        ({}, "neither was given"),
        ({"target_precision": 0.5, "target_recall": 0.5}, "both were given"),
        ({"target_precision": 0.0}, r"target_precision must be in \(0, 1\], got 0"),
        ({"target_recall": 1.5}, r"target_recall must be in \(0, 1\], got 1.5"),
        ({"target_recall": float("nan")}, "target_recall must be in"),
        ({"target_precision": "high"}, "must be a number"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            calibrate(scores, noisy, **kwargs)
    for value in (0.0, -0.1, 1.01):
        with pytest.raises(InvalidInputError, match="target_recall must be in"):
            review_prefix(noisy, value)
    with pytest.raises(InvalidInputError, match="100 scores but a noisy mask of 99 rows"):
        calibrate(scores, noisy[:99], target_recall=0.5)
    with pytest.raises(InvalidInputError, match="1-D bool"):
        calibrate(scores, noisy.astype(int), target_recall=0.5)
    with pytest.raises(InvalidInputError, match="finite"):
        calibrate(np.where(noisy, np.nan, scores), noisy, target_recall=0.5)
    with pytest.raises(InvalidInputError, match="1-D bool"):
        check_mask(noisy.reshape(10, 10))


def test_an_unreachable_precision_names_the_best_one():
    # Noisy rows at ranks 1, 3, ..., 19: precision is 1/2 at every even cut up to 20, below it elsewhere.
    scores = np.arange(100, dtype=float)
    noisy = np.zeros(100, dtype=bool)
    noisy[1:20:2] = True
    with pytest.raises(InvalidInputError) as caught:
        calibrate(scores, noisy, target_precision=0.95)
    assert str(caught.value) == (
        "no threshold reaches precision 0.95 on these rows; the best is 0.50 at the 20th percentile "
        "(the 20 lowest of 100 rows)"
    )
    got = calibrate(scores, noisy, target_precision=0.5)
    assert (got.cutoff_rows, got.found, got.recall) == (20, 10, 1.0)


# ----------------------------------------------------------------------------------------- held-out rows

SPLITS = 200
NOISE_RATE = 0.2
# A fixed cut's estimate from the calibration rows is binomial: its 95% Wilson interval covers the true share
# with probability ~0.95. The held-out share is a second binomial estimate of the same true share, independent,
# with variance larger by n_cal / n_held; so the held-out share falls inside the interval with probability
# ~P(|Z| < z / sqrt(1 + n_cal / n_held)). Choosing the cut on the calibration rows moves its estimate up a
# little (the last cut that still reaches a target is, on average, one where the noise helped): allowed for
# with SELECTION_ALLOWANCE, a generous bound for cuts whose true share crosses the target steeply, as here
# (noisy rows score N(-2, 1), clean ones N(0, 1)). The splits are independent (a seed each), so the number
# covered is binomial; the test asks for no less than 3 standard deviations below its expected value.
SELECTION_ALLOWANCE = 0.03


def expected_coverage(n_cal: int, n_held: int, confidence: float = 0.95) -> float:
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return 2 * NormalDist().cdf(z / math.sqrt(1 + n_cal / n_held)) - 1 - SELECTION_ALLOWANCE


def synthetic_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    noisy = rng.random(n) < NOISE_RATE
    scores = np.where(noisy, rng.normal(-2.0, 1.0, n), rng.normal(0.0, 1.0, n))
    return scores, noisy


@pytest.mark.parametrize(
    ("target", "value", "n_cal", "n_held"),
    [
        ("precision", 0.8, 1000, 20_000),  # new rows judged against a large index: coverage ~0.92
        ("recall", 0.6, 1000, 20_000),
        (
            "precision",
            0.8,
            1000,
            1000,
        ),  # equal halves: the held-out share is as noisy as the estimate (~0.80)
    ],
)
def test_a_calibrated_threshold_holds_on_held_out_rows(target, value, n_cal, n_held):
    covered = 0
    for seed in range(SPLITS):
        rng = np.random.default_rng(seed)
        scores, noisy = synthetic_rows(rng, n_cal)
        held_scores, held_noisy = synthetic_rows(rng, n_held)
        calibration = calibrate(scores, noisy, **{f"target_{target}": value})
        # Held-out rows judged as a check judges new rows: their percentile among the calibration rows.
        flagged = percentile_rule(scores, held_scores) < calibration.threshold_percentile
        if target == "precision":
            share, (lo, hi) = held_noisy[flagged].mean(), calibration.precision_interval
        else:
            share, (lo, hi) = flagged[held_noisy].mean(), calibration.recall_interval
        covered += bool(lo <= share <= hi)
    q = expected_coverage(n_cal, n_held)
    bound = math.floor(SPLITS * q - 3 * math.sqrt(SPLITS * q * (1 - q)))
    assert covered >= bound, (covered, bound, q)
    # The bound has teeth: an interval of one standard error (68%) would cover about 0.68 of the splits.
    assert bound > 0.7 * SPLITS
