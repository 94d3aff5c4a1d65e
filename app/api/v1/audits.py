"""Audit routes: rank every training row of an index against a reference set (docs/decisions/0005-workflows.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import JobQueueDep, SessionDep, SettingsDep, TenantDep
from app.api.v1.jobs import job_out
from app.config import Settings
from app.models import Job
from app.schemas.audits import AuditCreate, AuditOut, AuditRowsPage, AuditSummary, RowsFormat
from app.schemas.common import MAX_OFFSET, Page, problems
from app.services import audits as service

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
    return AuditOut(
        id=job.id,
        index_id=job.target_id,
        status=job.status,  # type: ignore[arg-type]
        params=job.params or {},
        job=job_out(job),
        summary=AuditSummary.model_validate(summary) if summary else None,
        rows_deleted_since_audit=deleted_since,
        created_at=job.created_at,
    )


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
        "limit."
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


@router.get(
    "/audits", response_model=Page[AuditOut], responses=problems(422), summary="List audits, newest first"
)
def list_audits(
    session: SessionDep,
    tenant: TenantDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[AuditOut]:
    jobs, total = service.list_audits(session, tenant.id, offset, limit)
    return Page[AuditOut](items=[audit_out(job) for job in jobs], total=total, offset=offset, limit=limit)


@router.get("/audits/{audit_id}", response_model=AuditOut, responses=problems(404), summary="Read an audit")
def get_audit(audit_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> AuditOut:
    return audit_out(service.get_audit(session, audit_id, tenant.id), session, settings)


@router.delete(
    "/audits/{audit_id}",
    status_code=204,
    responses=problems(404, 409),
    summary="Delete an audit and its files",
    description="409 while it is queued or running: cancel it first (POST /v1/jobs/{id}/cancel).",
)
def delete_audit(audit_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    service.delete_audit(session, settings, audit_id, tenant.id)
    return Response(status_code=204)


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
        "raw values. Downloads come with `Content-Disposition: attachment`. 409 while the audit is unfinished, "
        "when it failed, or when its files are corrupted."
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
) -> AuditRowsPage | Response:
    if format == "json":
        page = service.rows_page(
            session, settings, audit_id, tenant.id, offset, 50 if limit is None else limit
        )
        return AuditRowsPage.model_validate(page)
    chunks, media_type, filename = service.export_rows(
        session, settings, audit_id, tenant.id, format, offset, limit
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
