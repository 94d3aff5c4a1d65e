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
composes them); results.py is what a report holds, defaults.py what a caller who names nothing gets.
"""

from __future__ import annotations

from influence.lazy import lazy_package
from influence.report.defaults import (
    CORRECT_SUFFIX,
    DEFAULT_AGGREGATIONS,
    DEFAULT_ESTIMATORS,
    DEFAULT_QUANTILES,
)
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

# Public names resolved on first access (PEP 562): importing the package, or one of its modules, loads no
# other module of it than those imported above (torch and faiss come with the modules that use them).
_LAZY: dict[str, str] = {
    "layer_report": "influence.report.build",
    "layer_sets": "influence.report.inputs",
    "random_auc_ndr_std": "influence.report.recommendation",
    "random_ndr_std": "influence.report.recommendation",
    "aggregated_scores": "influence.report.scores",
}

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


__getattr__, __dir__ = lazy_package(__name__, _LAZY, globals())
