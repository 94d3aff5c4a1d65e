"""Audit routes: rank every training row of an index against a reference set (docs/decisions/0005-workflows.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import JobQueueDep, SessionDep, SettingsDep, TenantDep
from app.config import Settings
from app.jobs.kinds import AUDIT
from app.models import Job
from app.schemas.common import MAX_OFFSET, problems
from app.workflows.audit import service
from app.workflows.audit.schemas import AuditCreate, AuditOut, AuditRowsPage, AuditSummary, RowsFormat
from app.workflows.resources import WorkflowResource, add_list_and_delete, job_fields

router = APIRouter(tags=["audits"])

_DOWNLOADS = {
    "text/csv": {"schema": {"type": "string"}},
    "application/x-ndjson": {"schema": {"type": "string"}},
}


def audit_out(job: Job, session: Session | None = None, settings: Settings | None = None) -> AuditOut:
    """An audit as the API shows it; with a session, also how many of its rows were deleted since."""
    summary = (job.result or {}).get("summary") if job.status == "succeeded" else None
    deleted_since = None
    if session is not None and settings is not None:
        deleted_since = service.rows_deleted_since(session, settings, job)
    params = job.params or {}
    return AuditOut(
        **job_fields(job),
        settings_source=params.get("settings_source"),
        settings=params.get("settings"),
        summary=AuditSummary.model_validate(summary) if summary else None,
        rows_deleted_since_audit=deleted_since,
    )


def _listed(job: Job, session: Session, settings: Settings) -> AuditOut:
    # A list leaves rows_deleted_since_audit out: it opens the index's store and the audit's ranking.
    return audit_out(job)


AUDITS = WorkflowResource(kind=AUDIT, name="audit", plural="audits", item=AuditOut, summary=_listed)


@router.post(
    "/indexes/{index_id}/audits",
    status_code=202,
    response_model=AuditOut,
    responses=problems(404, 409, 422, 429, 503),
    summary="Audit a dataset: rank every training row, most detrimental first (asynchronous)",
    description=(
        "Queues an audit job: the reference set is featurized with the index's projection, every live row of "
        "the index is scored against every reference row in every chosen layer (exactly), the scores are "
        "aggregated over layers and reference rows, and the rows are ranked by ascending aggregated score. "
        "Follow `job`; when it succeeds read the ranking at GET /v1/audits/{id}/rows and the raw score "
        "tensor at GET /v1/audits/{id}/scores. 409 when the index is not ready; 422 for layers the index "
        "does not hold, a bad reference set, correct_only with a causal LM, or a score tensor over the size "
        "limit. Layers, estimator, aggregation, vote_k and correct_only not sent come from the index's settings "
        "(GET /v1/indexes/{id}/settings); `settings_source` and `settings` say what was used. `review` also "
        "marks the review prefix (target_recall in (0, 1]: 422 naming review.target_recall otherwise; 422 "
        "naming review.noisy without a noisy mask)."
    ),
)
def create_audit(
    index_id: str,
    body: AuditCreate,
    session: SessionDep,
    settings: SettingsDep,
    queue: JobQueueDep,
    tenant: TenantDep,
) -> AuditOut:
    return audit_out(service.create_audit(session, settings, queue, index_id, body, tenant.id))


add_list_and_delete(router, AUDITS)


@router.get("/audits/{audit_id}", response_model=AuditOut, responses=problems(404), summary="Read an audit")
def get_audit(audit_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> AuditOut:
    return audit_out(AUDITS.find(session, audit_id, tenant.id), session, settings)


@router.get(
    "/audits/{audit_id}/rows",
    response_model=AuditRowsPage,
    responses={
        200: {"description": "A page (JSON), or the rows as a CSV / JSONL download", "content": _DOWNLOADS},
        **problems(404, 409, 422),
    },
    summary="The ranked training rows, most detrimental first",
    description=(
        "Every live row of the index when the audit ran, by ascending aggregated score (ties by row id), with "
        "its text, label and noisy flag and its per-layer contributions. format=json (default): a page, "
        "limit <= 1000 (default 50). format=csv or jsonl: a download of every row, or of the offset/limit "
        "slice when given (CSV: one column group `<layer>:score`, `<layer>:aggregate`, `<layer>:rank` per "
        "layer; rows end with CRLF). CSV text cells (text, text_pair, label_name, and label when it is a "
        "completion) that a spreadsheet would evaluate as a formula, i.e. that start with `=`, `+`, `-`, `@`, a "
        "tab or a carriage return, are written with a leading `'` (OWASP's rule against CSV injection); the "
        "numeric columns are plain numbers (a negative score stays a number). JSON pages and JSONL carry the "
        "raw values. Downloads come with `Content-Disposition: attachment`. review=true: only the review "
        "prefix (the first rows a reviewer reads, for an audit made with `review`). 409 while the audit is "
        "unfinished, when it failed, when its files are corrupted, or for review=true on an audit without one."
    ),
)
def audit_rows(
    audit_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int | None, Query(ge=1, le=MAX_OFFSET, description="json: at most 1000")] = None,
    format: Annotated[RowsFormat, Query()] = "json",
    review: Annotated[
        bool, Query(description="Only the review prefix (audits made with `review`; 409 otherwise)")
    ] = False,
) -> AuditRowsPage | Response:
    if format == "json":
        page = service.rows_page(
            session, settings, audit_id, tenant.id, offset, 50 if limit is None else limit, review
        )
        return AuditRowsPage.model_validate(page)
    chunks, media_type, filename = service.export_rows(
        session, settings, audit_id, tenant.id, format, offset, limit, review
    )
    return StreamingResponse(
        chunks, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


@router.get(
    "/audits/{audit_id}/scores",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The raw score tensor as safetensors",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        },
        **problems(404, 409),
    },
    summary="Download the raw score tensor (safetensors)",
    description=(
        "Tensors `scores` (n rows, U layers, m reference rows) float32, `row_ids` (n,) int64 (the dataset row "
        "of each i), `reference_correct` (m,) uint8; metadata `layers` (a JSON list, the U axis), "
        "`estimator`, `aggregation`, `index_id`, `reference`, `convention`. scores > 0 help."
    ),
)
def audit_scores(
    audit_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> FileResponse:
    path = service.scores_file(session, settings, audit_id, tenant.id)
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"audit-{audit_id}-scores.safetensors"
    )
