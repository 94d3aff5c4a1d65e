"""Whether a layer report recommends: the random-order baselines, the margins to clear, and the pick.

AUC-NDR of a uniformly random order is an affine function of the Mann-Whitney statistic of the noisy rows'
positions, so its mean and standard deviation are exact:
    sum_t NDR(t) = (n + 1) - (1/a) sum_{noisy i} pos_i,  Var = (n - a)(n + 1) / (12 a),   a = #noisy,
    AUC-NDR = sum_t NDR(t) / (a/2 + n - a).
The best entry is picked among N candidates, so it must clear the one-sided Bonferroni bound
z* = Phi^-1(1 - alpha / N) standard deviations above random (alpha = 0.01: under random features the chance
of any recommendation is below 1%), and at least `min_auc_gain` (a floor so that a huge n does not make a
useless improvement "significant"). The model must also be above chance on the reference set by
max(min_accuracy_gain, accuracy_z * sqrt(c (1 - c) / m)) (c = 1/num_classes; accuracy_z = 3 binomial standard
deviations of a chance-level classifier on m rows): a model at chance has gradients that say nothing about the
task, so its influence scores say nothing about which rows hurt it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

from influence.errors import InvalidInputError
from influence.metrics import random_baseline_auc_ndr, random_baseline_ndr_at
from influence.report.inputs import percent_key
from influence.report.results import Criteria, RandomBaseline, Recommendation, ReportEntry

# How many entries after the best one a recommendation lists.
_RUNNERS_UP = 5


def random_auc_ndr_std(n: int, n_noisy: int) -> float:
    """Exact standard deviation of AUC-NDR under a uniformly random order of n rows with n_noisy noisy.

    sum_t NDR(t) = (n + 1) - mean position of the noisy rows; the sum of a random n_noisy-subset of 1..n
    has variance a (n - a)(n + 1) / 12.
    """
    if not 1 <= n_noisy <= n:
        raise InvalidInputError(f"n_noisy must be in [1, n={n}], got {n_noisy}")
    variance = (n - n_noisy) * (n + 1) / (12 * n_noisy)
    return math.sqrt(variance) / (n_noisy / 2 + (n - n_noisy))


def random_ndr_std(percents: Sequence[float], n: int, n_noisy: int) -> dict[str, float]:
    """Standard deviation of NDR@p under a random order: hypergeometric count of noisy rows among t, over a."""
    out = {}
    baseline = random_baseline_ndr_at(percents, n)
    for p in percents:
        t = round(baseline[p] * n)
        share = n_noisy / n
        variance = t * share * (1 - share) * ((n - t) / (n - 1) if n > 1 else 0.0)
        out[percent_key(p)] = math.sqrt(variance) / n_noisy
    return out


def random_baseline(percents: Sequence[float], n: int, n_noisy: int) -> RandomBaseline:
    """What a uniformly random order of n rows, n_noisy of them noisy, scores, and its standard deviations."""
    return RandomBaseline(
        ndr={percent_key(p): v for p, v in random_baseline_ndr_at(percents, n).items()},
        ndr_std=random_ndr_std(percents, n, n_noisy),
        auc_ndr=random_baseline_auc_ndr(n, n_noisy),
        auc_ndr_std=random_auc_ndr_std(n, n_noisy),
    )


def accuracy_threshold(num_classes: int, m: int, min_accuracy_gain: float, accuracy_z: float) -> float:
    """The reference accuracy a model needs on m rows to count as having learned a num_classes-way task."""
    chance = 1.0 / num_classes
    return chance + max(min_accuracy_gain, accuracy_z * math.sqrt(chance * (1 - chance) / m))


def accuracy_warning(
    reference_accuracy: float | None, num_classes: int, threshold: float, m: int
) -> str | None:
    """Why no layers can be recommended at this accuracy (near chance, or unknown); None when it suffices."""
    chance = 1.0 / num_classes
    if reference_accuracy is None:
        return (
            "The model's accuracy on the reference set is unknown (pass reference_accuracy or reference_correct):"
            " without it we cannot tell whether the model learned the task, so no layers are recommended."
        )
    if reference_accuracy < threshold:
        return (
            f"The model is near chance on the reference set: accuracy {reference_accuracy:.1%} against "
            f"{chance:.1%} for guessing (it needs at least {threshold:.1%} on {m} rows to count as "
            "having learned the task). Its gradients say little about the task, so influence scores are "
            "uninformative and no layers are recommended."
        )
    return None


def criteria(
    entries: Sequence[ReportEntry],
    baseline: RandomBaseline | None,
    *,
    alpha: float,
    min_auc_gain: float,
    num_classes: int,
    min_accuracy_gain: float,
    accuracy_z: float,
    accuracy_threshold: float,
) -> Criteria:
    """The margins the best of `entries` must clear (required_auc_gain None without a baseline or entries)."""
    num_candidates = len(entries)
    z_critical = required_gain = None
    if baseline is not None and num_candidates:
        z_critical = NormalDist().inv_cdf(1 - alpha / num_candidates)
        required_gain = max(min_auc_gain, z_critical * baseline.auc_ndr_std)
    return Criteria(
        alpha=alpha,
        num_candidates=num_candidates,
        z_critical=z_critical,
        min_auc_gain=min_auc_gain,
        required_auc_gain=required_gain,
        chance_accuracy=1.0 / num_classes,
        min_accuracy_gain=min_accuracy_gain,
        accuracy_z=accuracy_z,
        accuracy_threshold=accuracy_threshold,
        explanation=(
            "A recommendation needs (1) the best AUC-NDR to exceed the random-order AUC-NDR by "
            "max(min_auc_gain, z_critical x its exact standard deviation), z_critical being the one-sided "
            "Bonferroni bound for picking the best of num_candidates entries at level alpha, and (2) the model's "
            "reference accuracy to be at least chance + max(min_accuracy_gain, accuracy_z x the binomial "
            "standard deviation of a chance-level classifier on the reference rows)."
        ),
    )


def recommend(
    entries: Sequence[ReportEntry],
    baseline: RandomBaseline | None,
    required_gain: float | None,
    near_chance: bool | None,
) -> tuple[Recommendation | None, str | None]:
    """The best entry by AUC-NDR (ties: fewer layers, then the earlier entry) when it clears `required_gain`
    and the model is known to be above chance; and the warning when no entry clears it."""
    if not entries or baseline is None or required_gain is None:
        return None, None
    order = sorted(
        range(len(entries)), key=lambda i: (-entries[i].auc_ndr, len(entries[i].layers.members), i)
    )
    best = entries[order[0]]
    if best.auc_ndr_gain < required_gain:
        return None, (
            "No layer set is clearly better than a random order at finding the noisy rows: the best AUC-NDR "
            f"is {best.auc_ndr:.3f} ({best.estimator}, {best.aggregation}, {best.layers.name}) against "
            f"{baseline.auc_ndr:.3f} ± {baseline.auc_ndr_std:.3f} for a random order, and a recommendation "
            f"needs at least {baseline.auc_ndr + required_gain:.3f}. Influence is uninformative here, so no "
            "layers are recommended."
        )
    if near_chance is not False:
        return None, None
    singles = [entries[i] for i in order if entries[i].layers.kind == "layer"]
    recommendation = Recommendation(
        estimator=best.estimator,
        aggregation=best.aggregation,
        layers=best.layers,
        auc_ndr=best.auc_ndr,
        ndr=dict(best.ndr),
        auc_ndr_gain=best.auc_ndr_gain,
        required_gain=required_gain,
        auc_ndr_z=best.auc_ndr_z,
        best_single_layer=_brief(singles[0]) if singles else None,
        runners_up=[_brief(entries[i]) for i in order[1 : 1 + _RUNNERS_UP]],
        fidelity_min=best.fidelity_min,
        fidelity_mean=best.fidelity_mean,
    )
    return recommendation, None


def _brief(entry: ReportEntry) -> dict[str, Any]:
    return {
        "estimator": entry.estimator,
        "aggregation": entry.aggregation,
        "kind": entry.layers.kind,
        "layers": entry.layers.name,
        "auc_ndr": entry.auc_ndr,
        "ndr": dict(entry.ndr),
        "fidelity_min": entry.fidelity_min,
    }
