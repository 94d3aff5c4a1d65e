"""Layer report: which layers, aggregation and estimator find the noisy training rows (method.md §3, §4, §5).

For researchers choosing layers. Given train features (a FeatureStore or per-layer matrices), reference
("test") features, the layer units and, when known, the noisy mask, `layer_report` scores every single layer
and every layer group (WE, block ranges, first / middle / last, CL, total, plus caller-defined groups) with
every estimator, aggregates each set with every aggregation (mean, rank, vote and their correct-only "-c"
variants, or any registered aggregator), and measures NDR@p and AUC-NDR against their random-order baselines.

The package follows the report's making: inputs.py (the features, masks, aggregation names and layer sets),
scores.py (one estimator's aggregated scores, one (n, m) block at a time: how the work is shared),
recommendation.py (random-order baselines, the margins a recommendation must clear and why), cancellation.py
and fidelity.py (what the caller's cancellation and projection fidelity add), build.py (`layer_report`, which
composes them); results.py is what a report holds.
"""

from influence.report.build import DEFAULT_ESTIMATORS, DEFAULT_QUANTILES, layer_report
from influence.report.inputs import CORRECT_SUFFIX, DEFAULT_AGGREGATIONS, layer_sets
from influence.report.recommendation import random_auc_ndr_std, random_ndr_std
from influence.report.results import (
    CancellationSummary,
    Criteria,
    DetrimentalRow,
    FidelitySummary,
    GroupCancellation,
    LayerCancellation,
    LayerReport,
    LayerSet,
    RandomBaseline,
    Recommendation,
    ReportEntry,
    ScoreDistribution,
)
from influence.report.scores import aggregated_scores

__all__ = [
    "CORRECT_SUFFIX",
    "DEFAULT_AGGREGATIONS",
    "DEFAULT_ESTIMATORS",
    "DEFAULT_QUANTILES",
    "CancellationSummary",
    "Criteria",
    "DetrimentalRow",
    "FidelitySummary",
    "GroupCancellation",
    "LayerCancellation",
    "LayerReport",
    "LayerSet",
    "RandomBaseline",
    "Recommendation",
    "ReportEntry",
    "ScoreDistribution",
    "aggregated_scores",
    "layer_report",
    "layer_sets",
    "random_auc_ndr_std",
    "random_ndr_std",
]
