"""Audits: which training rows look harmful, ranked over the whole index against a reference set.

Conventions (the same as queries, app/schemas/indexes.py):
- a per-layer score is the estimator's influence of a training row on a reference example: POSITIVE = the
  row HELPS; the aggregated score orders rows the same way, so the LOWEST aggregated score is the most
  detrimental row, and the ranking lists rows by ascending aggregated score (ties: lower row id first);
- `rank` is the row's 0-based position in that ranking (0 = most detrimental); a layer's `rank` is the row's
  0-based position when the rows are ranked by that layer's own aggregate alone (ties: lower row id first).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import UTCDateTime, strict_body_config
from app.schemas.indexes import (
    AGGREGATION_HELP,
    ESTIMATOR_HELP,
    NOT_SENT,
    SETTINGS_SOURCE,
    AggregationName,
    EstimatorName,
    LayerSelector,
    VoteK,
    WorkflowSettings,
    fidelity_field,
    fidelity_warning_field,
)
from app.schemas.jobs import WorkflowOut
from app.schemas.references import NoisyRows, ReferenceSet

RowsFormat = Literal["json", "csv", "jsonl"]

AUDIT_CONVENTIONS = (
    "score > 0: the training row helps the reference examples (per layer and aggregated). Rows are listed by "
    "ascending aggregated score, ties by row id: rank 0 = the most detrimental row. A layer's `aggregate` is "
    "the same aggregation over that layer's voters only, its `score` the mean raw score over those voters, "
    "its `rank` the row's 0-based position when ranked by that layer alone."
)


class AuditReview(BaseModel):
    """Where a reviewer can stop reading the ranking: the prefix expected to hold target_recall of the noisy
    rows, measured against a noisy mask."""

    model_config = strict_body_config()

    target_recall: float = Field(
        gt=0, le=1, description="Share of the noisy rows the reviewed prefix should hold, in (0, 1]"
    )
    noisy: Literal["dataset"] | NoisyRows | None = Field(
        None,
        description="Which training rows are noisy: `dataset` (the index dataset's noisy column) or {rows: [...]}. "
        "Omitted: `dataset` when the dataset has a noisy column; without a mask the review is refused (422)",
    )


class AuditCreate(BaseModel):
    """Rank every training row of an index against a reference set, most detrimental first."""

    model_config = strict_body_config(
        {
            "reference": {"dataset_id": "9a1b...", "limit": 500},
            "layers": "middle",
            "estimator": "grad-dot",
            "aggregation": "rank",
            "correct_only": True,
        }
    )

    reference: ReferenceSet
    layers: LayerSelector | None = Field(
        None,
        description="Layer names, groups or selectors, among the index's layers. Not sent: the index's settings "
        "(GET /v1/indexes/{id}/settings: its layer report's recommendation), else all of them",
    )
    estimator: EstimatorName = Field("grad-dot", description=f"{NOT_SENT}; {ESTIMATOR_HELP}")
    aggregation: AggregationName = Field("rank", description=f"{NOT_SENT}; {AGGREGATION_HELP}")
    correct_only: bool = Field(
        False,
        description="Aggregate over the reference rows the model predicts correctly only (the paper's `-c` "
        f"variants; classification only). {NOT_SENT} (true when the recommended aggregation ends in `-c`)",
    )
    vote_k: VoteK = 0.2
    review: AuditReview | None = Field(
        None,
        description="Also mark the review prefix: the shortest start of the ranking expected to hold "
        "target_recall of the noisy rows (GET /v1/audits/{id}/rows?review=true pages it)",
    )


class AuditTopRow(BaseModel):
    rank: int
    row: int = Field(description="Row position in the index's dataset")
    score: float = Field(description="Aggregated score (lower = more detrimental)")
    text: str | None
    label: Any
    label_name: str | None
    noisy: bool | None


class NoiseDetection(BaseModel):
    """How well this ranking finds the rows the dataset flags as noisy (method.md §4)."""

    noisy_rows: int = Field(description="Audited rows flagged noisy")
    ndr_at_30: float | None = Field(description="Share of the noisy rows among the first 30% of the ranking")
    auc_ndr: float | None = Field(description="Area under the NDR curve (1 = every noisy row first)")
    random_ndr_at_30: float | None = Field(description="NDR@30 expected of a random order")
    random_auc_ndr: float | None = Field(description="AUC-NDR expected of a random order")
    ndr_at: dict[str, float] | None = Field(description="NDR@p for p = 5, 10, ..., 90 (percent -> rate)")


class AuditSummary(BaseModel):
    num_rows: int = Field(description="Training rows ranked (the index's live rows when the audit ran)")
    layers: list[str] = Field(
        description="The layers scored, in index order (the U axis of the score tensor)"
    )
    num_reference: int = Field(description="Reference rows scored against (the m axis of the score tensor)")
    reference_accuracy: float | None = Field(
        description="Share of reference rows the model predicts correctly"
    )
    correct_reference: int | None = Field(description="Reference rows the model predicts correctly")
    num_voters: int = Field(description="(layer, reference row) pairs aggregated")
    estimator: str
    aggregation: str
    correct_only: bool
    vote_k: float
    dataset_id: str = Field(description="The index's dataset (the rows' texts and labels)")
    index_deleted_rows_at_audit: int = Field(
        description="Rows deleted from the index (tombstoned, not yet compacted away) when the audit ran: "
        "excluded from it. The audit is a snapshot: rows deleted later stay in it (see "
        "`rows_deleted_since_audit`); a new audit excludes them"
    )
    top: list[AuditTopRow] = Field(description="The 10 most detrimental rows")
    noise: NoiseDetection | None = Field(
        description="Noise detection of this ranking, when the dataset flags noise"
    )
    score_tensor_bytes: int = Field(description="Size of the raw score tensor (n x U x m float32)")
    review: dict[str, Any] | None = Field(
        None,
        description="When the audit was asked for a review prefix: its length (`rows`, the first rows of the "
        "ranking a reviewer reads) and how it was measured",
    )
    fidelity: dict[str, float | None] | None = fidelity_field("scored")
    fidelity_warning: str | None = fidelity_warning_field("scored")
    seconds: float


class AuditOut(WorkflowOut):
    id: str = Field(description="The audit id (also its job's id)")
    params: dict[str, Any] = Field(description="What was asked, with the reference set and layers resolved")
    settings_source: str | None = Field(
        None, description=SETTINGS_SOURCE + " (null for audits made before settings were recorded)"
    )
    settings: WorkflowSettings | None = Field(
        None, description="The settings the audit ran with, each with its source"
    )
    summary: AuditSummary | None = Field(description="When the audit succeeded")
    rows_deleted_since_audit: int | None = Field(
        None,
        description="Audited rows deleted from the index since (GET /v1/audits/{id} only; null in lists, "
        "before the audit finished or when the index is gone)",
    )
    conventions: str = AUDIT_CONVENTIONS
    created_at: UTCDateTime


class AuditLayerScore(BaseModel):
    layer: str
    score: float = Field(description="Mean raw score of the row over this layer's voters (> 0 helps)")
    aggregate: float = Field(
        description="The aggregation over this layer's voters only (lower = more harmful)"
    )
    rank: int = Field(description="0-based position when ranked by this layer's aggregate (0 = most harmful)")


class AuditRow(BaseModel):
    rank: int = Field(description="0-based position in the ranking (0 = most detrimental)")
    row: int = Field(description="Row position in the dataset (as GET /v1/datasets/{id}/rows numbers it)")
    score: float = Field(description="Aggregated score (lower = more detrimental)")
    text: str | None
    text_pair: str | None
    label: Any = Field(description="The stored label (class index, or the completion for causal LM)")
    label_name: str | None = Field(description="The class name, when the dataset has label names")
    noisy: bool | None = Field(description="The dataset's noisy flag of the row, when it has one")
    layers: list[AuditLayerScore]


class AuditRowsPage(BaseModel):
    """A page of the ranking, most detrimental first."""

    items: list[AuditRow]
    total: int = Field(description="Rows in the ranking (review=true: in its review prefix)")
    review: bool = Field(False, description="Whether the page is of the review prefix only")
    offset: int
    limit: int
    layers: list[str]
    estimator: str
    aggregation: str
    conventions: str = AUDIT_CONVENTIONS
