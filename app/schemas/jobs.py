"""Job state as the API reports it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import UTCDateTime

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobOut(BaseModel):
    id: str
    kind: str
    status: JobStatus
    target_id: str | None = Field(description="The object the job works on (an index id, ...)")
    done: int
    total: int
    progress: float | None = Field(description="done / total in [0, 1]; null while total is unknown")
    cancel_requested: bool
    attempts: int
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: UTCDateTime
    started_at: UTCDateTime | None
    finished_at: UTCDateTime | None
    duration_s: float | None = Field(description="Seconds from start to finish (to now while running)")


class WorkflowOut(BaseModel):
    """The fields a workflow resource (an audit, a layer report, a check) shows of its job, filled by
    app/workflows/resources.job_fields; a subclass says in its own words what `id` and `params` are, and ends
    with `created_at`."""

    id: str
    index_id: str | None
    status: JobStatus
    params: dict[str, Any]
    job: JobOut
