"""Calibrated thresholds: derive the cut of a ranking from rows whose noise is known, instead of guessing a
percentile, and say how precise and complete it is expected to be.

Scores are aggregated influence scores (LOWER = more detrimental). Flagging the m lowest of n rows is the rule
"percentile < 100 m / n", where a row's percentile is 100 x (rows with a strictly LOWER score) / n: ties do not
count as lower, so a cut inside a run of tied scores cannot be expressed and only cuts m with
sorted[m - 1] < sorted[m] (or m = n) are candidates.

`calibrate` picks, for a target precision, the largest such cut whose share of known-noisy rows among the m
lowest reaches it (the most recall at that precision), and for a target recall the smallest cut that finds that
share of the known-noisy rows. `review_prefix` does the same for an ordering that is already total (an audit's
ranking): the shortest head of it that holds a target share of the known-noisy rows.

What the numbers assume. The expected precision and recall carry over to NEW rows only if those rows behave like
the calibration rows: bad and good rows have the same distributions of scores as in the index (same source of
data, same model and reference set, the same aggregation over the same rows). It does not hold for a batch from
another source or of another kind of noise, for a model retrained since the index was built, or when the mask
itself is incomplete: noisy rows nobody marked count as clean, so the stated precision is then a lower bound
(and the recall is the recall of the MARKED noisy rows). The cut is chosen on the same rows it is measured on,
which makes the point estimate optimistic (the largest cut that still reaches the target is, on average, one
where the noise happened to help); that is why every estimate comes with a Wilson score interval at the given
confidence, which is the honest statement of what to expect on new rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from influence.errors import InvalidInputError

MIN_NOISY = 10
MIN_CLEAN = 10
ASSUMPTION = (
    "the expected precision and recall hold for new rows that behave like the existing ones (same source, same "
    "model, the same distributions of scores for bad and good rows); noisy rows missing from the mask count as "
    "clean, which makes the precision a lower bound; precision also depends on the share of bad rows: a batch "
    "with fewer bad rows than the index gets a lower one (recall and the clean-row flag rate do not depend on "
    "it); the cut is chosen on these rows, so the point estimate is optimistic and the interval is the statement "
    "to rely on"
)

Interval = tuple[float, float]


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a binomial proportion k / n at `confidence` (two-sided); (0, 1) for n = 0.

    center = (p + z^2 / 2n) / (1 + z^2 / n), half width = z / (1 + z^2 / n) x sqrt(p (1 - p) / n + z^2 / 4n^2),
    with z the standard normal quantile at (1 + confidence) / 2: unlike p +- z sqrt(p (1 - p) / n), it stays
    inside [0, 1] and is not empty at p = 0 or 1."""
    _check_confidence(confidence)
    k, n = int(k), int(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise InvalidInputError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At k = 0 (k = n) the bound is 0 (1) exactly; rounding must not move it off.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return (lo, hi)


@dataclass(frozen=True)
class Calibration:
    """A threshold derived from rows with a known noise mask: flag the `cutoff_rows` lowest of `rows`, i.e.
    percentile < threshold_percentile; expected precision and recall with their Wilson intervals."""

    target: Literal["precision", "recall"]
    value: float
    cutoff_rows: int
    rows: int
    threshold_percentile: float
    score_cutoff: float
    known_noisy: int
    found: int
    precision: float
    precision_interval: Interval
    recall: float
    recall_interval: Interval
    # Share of the clean rows below the cut: what a batch with no bad row is expected to flag (the number that
    # decides max_flagged: a clean batch of b rows flags about b x this).
    clean_flag_rate: float
    clean_flag_rate_interval: Interval
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("precision_interval", "recall_interval", "clean_flag_rate_interval"):
            out[name] = list(getattr(self, name))
        return out


@dataclass(frozen=True)
class ReviewPrefix:
    """The shortest head of an ordering that holds `target_recall` of the known-noisy rows: its length, its
    share of the ordering, the known-noisy rows it holds, recall and expected precision with intervals."""

    target_recall: float
    rows: int
    total_rows: int
    share: float
    known_noisy: int
    found: int
    recall: float
    recall_interval: Interval
    precision: float
    precision_interval: Interval
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["recall_interval"] = list(self.recall_interval)
        out["precision_interval"] = list(self.precision_interval)
        return out


def check_mask(noisy: Any, *, min_noisy: int = MIN_NOISY, min_clean: int = MIN_CLEAN) -> np.ndarray:
    """The mask as a (n,) bool array, refused (InvalidInputError) when it has fewer than `min_noisy` noisy or
    `min_clean` clean rows: too few to calibrate on. A caller may run this before the costly scoring."""
    mask = np.asarray(noisy)
    if mask.ndim != 1 or mask.dtype != np.bool_:
        raise InvalidInputError(
            f"the noisy mask must be a 1-D bool array, got {mask.dtype} of shape {mask.shape}"
        )
    if int(min_noisy) < 1 or int(min_clean) < 0:
        raise InvalidInputError("min_noisy must be at least 1 and min_clean at least 0")
    noisy_rows = int(mask.sum())
    clean_rows = len(mask) - noisy_rows
    if noisy_rows < min_noisy or clean_rows < min_clean:
        needed = f"{min_noisy:,} noisy" + (f" and {min_clean:,} clean" if min_clean else "")
        raise InvalidInputError(
            f"too small to calibrate: {noisy_rows:,} known noisy and {clean_rows:,} clean rows among "
            f"{len(mask):,} (at least {needed} rows are needed)"
        )
    return mask


def calibrate(
    scores: Any,
    noisy: Any,
    *,
    target_precision: float | None = None,
    target_recall: float | None = None,
    min_noisy: int = MIN_NOISY,
    min_clean: int = MIN_CLEAN,
    confidence: float = 0.95,
) -> Calibration:
    """The threshold reaching a target precision or recall on rows with known noise (see the module docstring).

    scores: (n,) aggregated scores of the rows (lower = more detrimental); noisy: (n,) bool, the known-noisy
    rows. Exactly one target, in (0, 1]. target_precision: the LARGEST expressible cut m >= 1 whose precision
    (noisy among the m lowest / m) is at least the target; target_recall: the SMALLEST expressible cut whose
    recall (noisy among the m lowest / noisy) is at least the target. InvalidInputError when the mask is too
    small (check_mask), a target is missing, doubled or out of range, or no expressible cut reaches it."""
    _check_confidence(confidence)
    target, value = _one_target(target_precision=target_precision, target_recall=target_recall)
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise InvalidInputError("scores must be a 1-D array of finite numbers")
    mask = check_mask(noisy, min_noisy=min_noisy, min_clean=min_clean)
    if len(mask) != len(values):
        raise InvalidInputError(f"{len(values):,} scores but a noisy mask of {len(mask):,} rows")
    n = len(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Within a run of ties the order is arbitrary, but only cuts at the end of a run are used, where the count
    # of noisy rows below the cut does not depend on it.
    found = np.cumsum(mask[order], dtype=np.int64)
    cuts = np.flatnonzero(np.append(ordered[:-1] < ordered[1:], True)) + 1  # expressible m, ascending
    hits = found[cuts - 1]
    known = int(found[-1])
    # Shares compared as quotients (k / m >= value, not k >= value x m): 7 / 25 >= 0.28 holds as a reader
    # expects, while 0.28 x 25 rounds to 7.000000000000001.
    if target == "precision":
        precision = hits / cuts
        reaching = cuts[precision >= value]
        if len(reaching) == 0:
            best = float(precision.max())
            at = int(cuts[np.flatnonzero(precision == best)[-1]])
            raise InvalidInputError(
                f"no threshold reaches precision {value:g} on these rows; the best is {best:.2f} at the "
                f"{_ordinal(100 * at / n)} percentile (the {at:,} lowest of {n:,} rows)"
            )
        m = int(reaching[-1])
    else:
        reaching = cuts[hits / known >= value]
        if (
            len(reaching) == 0
        ):  # unreachable today (m = n finds every noisy row); a clear error if that changes
            raise InvalidInputError(f"no threshold reaches recall {value:g} on these rows")
        m = int(reaching[0])
    k = int(found[m - 1])
    return Calibration(
        target=target,
        value=value,
        cutoff_rows=m,
        rows=n,
        threshold_percentile=100.0 * m / n,
        score_cutoff=float(ordered[m - 1]),
        known_noisy=known,
        found=k,
        precision=k / m,
        precision_interval=wilson_interval(k, m, confidence),
        recall=k / known,
        recall_interval=wilson_interval(k, known, confidence),
        clean_flag_rate=(m - k) / (n - known),
        clean_flag_rate_interval=wilson_interval(m - k, n - known, confidence),
        confidence=confidence,
    )


def review_prefix(
    noisy_in_rank_order: Any, target_recall: float, confidence: float = 0.95, *, min_noisy: int = MIN_NOISY
) -> ReviewPrefix:
    """The smallest m such that the first m rows of a total ordering (ties already broken, e.g. an audit's
    ranking) hold at least `target_recall` of the known-noisy rows, with the recall and the expected precision
    of that prefix and their Wilson intervals. InvalidInputError for a target outside (0, 1] or fewer than
    `min_noisy` known-noisy rows."""
    _check_confidence(confidence)
    _, value = _one_target(target_precision=None, target_recall=target_recall)
    mask = check_mask(noisy_in_rank_order, min_noisy=min_noisy, min_clean=0)
    found = np.cumsum(mask, dtype=np.int64)
    known = int(found[-1])
    m = int(np.flatnonzero(found / known >= value)[0]) + 1
    k = int(found[m - 1])
    n = len(mask)
    return ReviewPrefix(
        target_recall=value,
        rows=m,
        total_rows=n,
        share=m / n,
        known_noisy=known,
        found=k,
        recall=k / known,
        recall_interval=wilson_interval(k, known, confidence),
        precision=k / m,
        precision_interval=wilson_interval(k, m, confidence),
        confidence=confidence,
    )


def _one_target(
    *, target_precision: float | None, target_recall: float | None
) -> tuple[Literal["precision", "recall"], float]:
    given = [
        (name, v) for name, v in (("precision", target_precision), ("recall", target_recall)) if v is not None
    ]
    if len(given) != 1:
        raise InvalidInputError(
            "give exactly one of target_precision and target_recall"
            + (" (both were given)" if given else " (neither was given)")
        )
    name, raw = given[0]
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InvalidInputError(f"target_{name} must be a number in (0, 1], got {raw!r}") from None
    if not 0 < value <= 1:  # also refuses NaN
        raise InvalidInputError(f"target_{name} must be in (0, 1], got {value:g}")
    return ("precision" if name == "precision" else "recall"), value


def _check_confidence(confidence: float) -> None:
    if not 0 < float(confidence) < 1:
        raise InvalidInputError(f"confidence must be in (0, 1), got {confidence}")


def _ordinal(value: float) -> str:
    """12 -> '12th', 3 -> '3rd', 12.5 -> '12.5th' (a percentile as a reader says it)."""
    if float(value).is_integer():
        number = int(value)
        suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
        return f"{number}{suffix}"
    return f"{value:.3g}th"
