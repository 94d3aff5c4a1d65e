"""Batch checks (CI hooks): does a new batch of rows look detrimental next to the rows already in an index?

A check is a `batch_check` job over a ready index (docs/decisions/0005-workflows.md). It is created from a
multipart form (the batch file plus plain fields, see app/api/v1/checks.py), so only its answers are models here.

Conventions of every answer:
- a row's `score` is its aggregated influence on the reference set (higher = more helpful), aggregated over the
  chosen layers with the chosen method across the existing rows and the new rows together (one scale);
- `percentile` = 100 x (existing live rows whose aggregated score is strictly LOWER) / (existing live rows).
  Ties do not count as lower: a new row that scores exactly as the lowest existing row has percentile 0;
- `flagged` = percentile < threshold_percentile; the verdict fails when more than max_flagged rows are flagged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import UTCDateTime
from app.schemas.indexes import SETTINGS_SOURCE, WorkflowSettings
from app.schemas.jobs import WorkflowOut

Verdict = Literal["pass", "fail"]
AppendStatus = Literal["not-requested", "pending", "appended", "skipped", "refused", "incomplete"]


class CheckLayer(BaseModel):
    layer: str
    score: float = Field(
        description="The row's score in this layer, averaged over the reference rows that vote"
    )
    aggregate: float = Field(description="The layer's own aggregate (same method, this layer alone)")
    percentile: float = Field(
        description="Percentile of `aggregate` among the existing rows' aggregates of this layer (same rule)"
    )


class CheckRow(BaseModel):
    row: int = Field(description="Position of the row in the uploaded batch, from 0, in file order")
    dataset_row: int | None = Field(
        description="The dataset row the batch row became when the batch was appended (null otherwise)"
    )
    text: str
    text_pair: str | None
    label: Any = Field(
        description="Class index in the index dataset's numbering (classification) or completion"
    )
    score: float = Field(description="Aggregated score over the chosen layers (higher = more helpful)")
    percentile: float = Field(
        description="100 x share of the existing live rows with a strictly lower aggregated score"
    )
    flagged: bool = Field(description="percentile < threshold_percentile")
    layers: list[CheckLayer]


class CheckAppend(BaseModel):
    """What happened to `append`: the batch joins the index (no rebuild) only when the verdict passes."""

    requested: bool
    status: AppendStatus = Field(
        description="not-requested | pending (the job has not finished) | appended | skipped (the verdict "
        "failed: nothing joined) | refused (the dataset would exceed max_rows: nothing joined) | incomplete (the "
        "job failed or was cancelled before it recorded an append)"
    )
    reason: str | None = None
    dataset_rows: list[int] | None = Field(
        None, description="[start, stop): the dataset rows the batch became (appended only)"
    )
    index_rows: int | None = Field(None, description="Rows of the index that answer queries after the append")


class CheckOut(WorkflowOut):
    """A batch check: its job, and once it has succeeded the verdict, the reasons and the scored rows."""

    id: str = Field(description="The check's id (also its job's id)")
    params: dict[str, Any] = Field(
        description="What the check was asked for, resolved (layers, reference, ...)"
    )
    settings_source: str | None = Field(
        None, description=SETTINGS_SOURCE + " (null for checks made before settings were recorded)"
    )
    settings: WorkflowSettings | None = Field(
        None, description="The settings the check ran with, each with its source"
    )
    verdict: Verdict | None = Field(description="pass | fail once succeeded; null before")
    reasons: list[str] = Field(description="Why the verdict is what it is, in plain words")
    warnings: list[str] = Field(description="What limits the verdict's value (e.g. a model near chance)")
    summary: dict[str, Any] | None = Field(
        description="When succeeded: rows, existing rows, flagged count, threshold, layers, estimator, "
        "aggregation, reference size and accuracy, the tie rule"
    )
    appended: int = Field(0, description="Rows of the batch added to the index (no rebuild)")
    append: CheckAppend
    rows: list[CheckRow] | None = Field(
        None, description="GET /v1/checks/{id} once succeeded: a page of the batch's rows; null in lists"
    )
    rows_total: int | None = Field(
        None, description="Rows the page was taken from (all, or the flagged ones)"
    )
    created_at: UTCDateTime
