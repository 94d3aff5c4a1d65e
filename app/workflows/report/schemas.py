"""Layer reports: which layers, aggregation and estimator find the noisy training rows (docs/decisions/0005).

A report is a `layer_report` job over a ready index; `report` is `influence.LayerReport.to_dict()` once the job
has succeeded (its numbers: NDR@p and AUC-NDR of every (estimator, aggregation, layer set), their random-order
baselines, cancellation per layer and group, score distributions, the most detrimental rows, warnings, what
could not be computed and why, and a recommendation only when it is clearly better than random).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import UTCDateTime, strict_body_config
from app.schemas.indexes import EstimatorName, LayerSelector, VoteK
from app.schemas.jobs import WorkflowOut
from app.schemas.references import NoisyRows, ReferenceSet
from influence import report as library_report

# The library's defaults: every estimator any index can serve, and the paper's aggregations.
DEFAULT_ESTIMATORS: list[str] = list(library_report.DEFAULT_ESTIMATORS)
DEFAULT_AGGREGATIONS: list[str] = list(library_report.DEFAULT_AGGREGATIONS)
# What a layer report compares: estimators, and aggregations each optionally with the correct-only suffix `-c`
# (a report's request and an experiment's report settings alike).
ReportEstimators = Annotated[
    list[EstimatorName], Field(default_factory=lambda: list(DEFAULT_ESTIMATORS), min_length=1, max_length=8)
]
ReportAggregations = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64)]],
    Field(default_factory=lambda: list(DEFAULT_AGGREGATIONS), min_length=1, max_length=32),
]


class ReportCreate(BaseModel):
    """Make a layer report of an index against a reference set (asynchronous)."""

    model_config = strict_body_config(
        {
            "reference": {"dataset_id": "9a1b...", "limit": 500},
            "estimators": DEFAULT_ESTIMATORS,
            "aggregations": ["mean", "rank", "vote", "rank-c", "vote-c"],
            "noisy": "dataset",
            "cancellation_rows": 1000,
        }
    )

    reference: ReferenceSet
    layers: LayerSelector | None = Field(
        None, description="Layer names, groups or selectors among the index's layers; default all of them"
    )
    estimators: ReportEstimators
    aggregations: ReportAggregations = Field(
        description="Registered aggregations (mean, rank, vote, zmean, median, rrf, ...), each optionally with "
        "the correct-only suffix `-c` (only the reference rows the model predicts correctly vote). For a "
        "causal-LM index the `-c` variants are reported as unavailable (there is no class prediction to be "
        "correct), never refused",
    )
    vote_k: VoteK = 0.2
    noisy: Literal["dataset"] | NoisyRows | None = Field(
        None,
        description="Which training rows are noisy: `dataset` (the index dataset's noisy column), {rows: [...]}, "
        "or null (no mask: NDR, AUC-NDR and the recommendation are then unavailable, the rest is reported). "
        "Omitted: `dataset` when the dataset has a noisy column, else null",
    )
    cancellation_rows: int = Field(
        1000, ge=0, le=100_000, description="Training rows the cancellation is measured over (0: skip it)"
    )
    top_rows: int = Field(20, ge=1, le=1000, description="Most detrimental rows listed per estimator")


class ReportOut(WorkflowOut):
    """A layer report: its job, a short summary when done, and (single reads only) the full report."""

    id: str = Field(description="The report's id (also its job's id)")
    params: dict[str, Any] = Field(
        description="What the report was asked for, resolved (layers, reference, ...)"
    )
    summary: dict[str, Any] | None = Field(
        description="When succeeded: recommendation, reference accuracy, warnings, unavailable metrics, sizes"
    )
    report: dict[str, Any] | None = Field(
        None,
        description="GET /v1/reports/{id} once succeeded: influence.LayerReport.to_dict() (entries, "
        "random_baseline, recommendation, cancellation, distributions, detrimental, unavailable, "
        "unavailable_reasons, warnings, ...); null in lists and while not done",
    )
    created_at: UTCDateTime
