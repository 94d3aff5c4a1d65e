"""The layer report: every layer set scored with every estimator and aggregation, its noise detection measured
against a random order, and a recommendation when one is clearly better (influence.report.recommendation)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from influence.errors import InvalidInputError
from influence.estimators import Estimator
from influence.fidelity import FIDELITY_WARNING
from influence.layers import Layer
from influence.metrics import DEFAULT_NDR_PERCENTS, Cancellation, auc_ndr, ndr_at
from influence.report.cancellation import cancellation_summary
from influence.report.defaults import DEFAULT_AGGREGATIONS, DEFAULT_ESTIMATORS, DEFAULT_QUANTILES
from influence.report.fidelity import fidelity_input, fidelity_summary, set_fidelity
from influence.report.inputs import (
    as_mapping,
    boolean_mask,
    layer_sets,
    percent_key,
    reference_size,
    split_aggregation,
    train_source,
)
from influence.report.recommendation import (
    accuracy_threshold,
    accuracy_warning,
    criteria,
    random_baseline,
    recommend,
)
from influence.report.results import (
    DetrimentalRow,
    LayerReport,
    LayerSet,
    RandomBaseline,
    ReportEntry,
    ScoreDistribution,
)
from influence.report.scores import score_estimator
from influence.scoring import top_k
from influence.store import FeatureStore

_NO_MASK = "no noisy mask was given: the noise detection rate needs to know which training rows are noisy"


def layer_report(
    features: FeatureStore | Mapping[str, Any],
    reference_features: Mapping[str, Any],
    *,
    layers: Sequence[Layer],
    noisy: Any = None,
    reference_correct: Any = None,
    reference_accuracy: float | None = None,
    num_classes: int = 2,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    aggregations: Sequence[str] = DEFAULT_AGGREGATIONS,
    vote_k: float = 0.2,
    percents: Sequence[float] = DEFAULT_NDR_PERCENTS,
    cancellation: Mapping[str, Cancellation] | None = None,
    extra_groups: Mapping[str, Sequence[str]] | None = None,
    estimator_options: Mapping[str, Mapping[str, Any]] | None = None,
    fitted_estimators: Mapping[str, Mapping[str, Estimator]] | None = None,
    alpha: float = 0.01,
    min_auc_gain: float = 0.02,
    min_accuracy_gain: float = 0.05,
    accuracy_z: float = 3.0,
    top_rows: int = 20,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    fidelity: Mapping[str, float | None] | None = None,
    fidelity_threshold: float | None = None,
) -> LayerReport:
    """Noise detection of every layer, group, aggregation and estimator, with baselines and a recommendation.

    features: train features (n, k_u) per layer (FeatureStore, FeatureSet or mapping); reference_features:
    (m, k_u) per layer. layers: the units to report (names must match; groups come from them). noisy: (n,)
    bool or None. reference_correct: (m,) bool, whether the model predicts each reference row correctly (needed
    by the "-c" aggregations; gives the accuracy when reference_accuracy is None). cancellation: layer ->
    metrics.Cancellation. extra_groups: name -> member layers. fitted_estimators: estimator name -> layer ->
    an Estimator used as given instead of one fitted on `features` (e.g. DataInf restored from the statistics an
    index was built with, so the report scores as its queries do). A FeatureStore's deleted rows are left out.
    fidelity: layer -> projection fidelity (influence.fidelity: Spearman of the unit's projected vs exact scores;
    None or absent: unknown): every entry then carries the lowest and mean fidelity of its units, and each unit
    below `fidelity_threshold` (default influence.fidelity.FIDELITY_WARNING) gets a warning naming the entries
    whose AUC-NDR it makes uncertain. The margins are explained in influence.report.recommendation.
    """
    layers = list(layers)
    if not layers:
        raise InvalidInputError("layer_report needs at least one layer")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise InvalidInputError("layer names must be unique")
    if not estimators:
        raise InvalidInputError("layer_report needs at least one estimator")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not (0 < alpha < 1):
        raise InvalidInputError(f"alpha must be in (0, 1), got {alpha!r}")
    for a in aggregations:
        split_aggregation(a)
    unit_fidelity = fidelity_input(fidelity, names)
    if fidelity_threshold is None:
        fidelity_threshold = FIDELITY_WARNING
    source = train_source(features, names)
    queries = as_mapping(reference_features, "reference_features")
    m = reference_size(queries, names)
    n = len(source.row_ids)
    sets = layer_sets(layers, extra_groups)

    unavailable: list[str] = []
    reasons: dict[str, str] = {}
    warnings: list[str] = []

    mask = None if noisy is None else boolean_mask(noisy, n, "noisy")
    usable_mask = mask
    if mask is None:
        reason = _NO_MASK
    elif not mask.any() or mask.all():
        reason = (
            f"the noisy mask marks {'no' if not mask.any() else 'every'} training row: the noise detection rate "
            "needs both noisy and clean rows"
        )
        usable_mask = None
    if usable_mask is None:
        for what in ("ndr", "auc_ndr", "recommendation"):
            unavailable.append(what)
            reasons[what] = reason

    correct = None if reference_correct is None else boolean_mask(reference_correct, m, "reference_correct")
    run_aggregations = []
    for a in aggregations:
        _, only_correct = split_aggregation(a)
        if only_correct and correct is None:
            unavailable.append(a)
            reasons[a] = "needs reference_correct (which reference rows the model predicts correctly)"
        elif only_correct and not correct.any():
            unavailable.append(a)
            reasons[a] = (
                "the model predicts no reference row correctly: the correct-only variant has no voters"
            )
        else:
            run_aggregations.append(a)
    # The most detrimental rows are ranked by "rank" over all layers, whether or not "rank" is reported.
    scored_aggregations = [*run_aggregations, *(["rank"] if "rank" not in run_aggregations else [])]

    if reference_accuracy is None and correct is not None:
        reference_accuracy = float(correct.mean())
    if reference_accuracy is not None and not 0.0 <= float(reference_accuracy) <= 1.0:
        raise InvalidInputError(f"reference_accuracy must be in [0, 1], got {reference_accuracy!r}")
    threshold = accuracy_threshold(num_classes, m, min_accuracy_gain, accuracy_z)
    near_chance = None if reference_accuracy is None else bool(reference_accuracy < threshold)
    accuracy_problem = accuracy_warning(reference_accuracy, num_classes, threshold, m)
    if accuracy_problem is not None:
        warnings.append(accuracy_problem)

    all_total = LayerSet("group", "all layers", tuple(names))
    entries: list[ReportEntry] = []
    distributions: list[ScoreDistribution] = []
    detrimental: list[DetrimentalRow] = []
    baseline = None if usable_mask is None else random_baseline(percents, n, int(usable_mask.sum()))
    for estimator in estimators:
        scored = score_estimator(
            source,
            queries,
            layers,
            estimator,
            dict((estimator_options or {}).get(estimator, {})),
            scored_aggregations,
            [*sets, all_total],
            correct,
            vote_k,
            usable_mask,
            quantiles,
            (fitted_estimators or {}).get(estimator),
        )
        distributions.extend(scored.distributions)
        harmful = scored.scores[("group", all_total.name, "rank")]
        detrimental.extend(_most_detrimental(estimator, harmful, top_rows, source.row_ids, mask))
        if usable_mask is None or baseline is None:
            continue
        for layer_set in sets:
            for agg in run_aggregations:
                values = scored.scores[(layer_set.kind, layer_set.name, agg)]
                entries.append(
                    _entry(estimator, agg, layer_set, values, usable_mask, percents, baseline, unit_fidelity)
                )

    margins = criteria(
        entries,
        baseline,
        alpha=alpha,
        min_auc_gain=min_auc_gain,
        num_classes=num_classes,
        min_accuracy_gain=min_accuracy_gain,
        accuracy_z=accuracy_z,
        accuracy_threshold=threshold,
    )
    recommendation, uninformative = recommend(entries, baseline, margins.required_auc_gain, near_chance)
    if uninformative is not None:
        warnings.append(uninformative)

    fidelity_report = None
    if unit_fidelity is not None:
        fidelity_report = fidelity_summary(
            unit_fidelity, float(fidelity_threshold), sets, entries, recommendation
        )
        warnings.extend(fidelity_report.warnings)

    summary = None
    if cancellation is not None:
        summary = cancellation_summary(cancellation, sets, entries, names)
        missing = [n for n in names if n not in cancellation]
        if missing:
            warnings.append(
                f"No cancellation was given for {len(missing)} layers ({', '.join(missing[:5])}...)."
            )

    return LayerReport(
        n_train=n,
        n_reference=m,
        n_noisy=None if mask is None else int(mask.sum()),
        noise_rate=None if mask is None else float(mask.mean()),
        num_classes=num_classes,
        reference_accuracy=None if reference_accuracy is None else float(reference_accuracy),
        reference_correct_count=None if correct is None else int(correct.sum()),
        near_chance=near_chance,
        estimators=list(estimators),
        aggregations=run_aggregations,
        percents=list(percents),
        vote_k=float(vote_k),
        layers=names,
        groups={s.name: list(s.members) for s in sets if s.kind == "group"},
        random_baseline=baseline,
        criteria=margins,
        entries=entries,
        recommendation=recommendation,
        cancellation=summary,
        distributions=distributions,
        detrimental=detrimental,
        unavailable=unavailable,
        unavailable_reasons=reasons,
        warnings=warnings,
        fidelity=fidelity_report,
    )


def _most_detrimental(
    estimator: str, harmful: np.ndarray, count: int, row_ids: np.ndarray, noisy: np.ndarray | None
) -> list[DetrimentalRow]:
    """The `count` rows of lowest aggregated score, their dataset ids and, given a mask, whether noisy."""
    return [
        DetrimentalRow(
            estimator,
            int(position),
            int(row_ids[position]),
            float(harmful[position]),
            None if noisy is None else bool(noisy[position]),
        )
        for position in top_k(harmful, count, "harmful")
    ]


def _entry(
    estimator: str,
    aggregation: str,
    layer_set: LayerSet,
    values: np.ndarray,
    noisy: np.ndarray,
    percents: Sequence[float],
    baseline: RandomBaseline,
    fidelity: Mapping[str, float | None] | None,
) -> ReportEntry:
    """One layer set's noise detection under one estimator and aggregation, against a random order."""
    auc = auc_ndr(values, noisy)
    low, mean = set_fidelity(layer_set, fidelity)
    return ReportEntry(
        estimator=estimator,
        aggregation=aggregation,
        layers=layer_set,
        ndr={percent_key(p): v for p, v in ndr_at(values, noisy, percents).items()},
        auc_ndr=auc,
        random_ndr=dict(baseline.ndr),
        random_auc_ndr=baseline.auc_ndr,
        auc_ndr_gain=auc - baseline.auc_ndr,
        auc_ndr_z=(auc - baseline.auc_ndr) / baseline.auc_ndr_std if baseline.auc_ndr_std > 0 else math.nan,
        fidelity_min=low,
        fidelity_mean=mean,
    )
