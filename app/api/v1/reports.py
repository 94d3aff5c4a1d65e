"""Layer report routes (docs/decisions/0005-workflows.md): make one over an index, read it as JSON or as a page."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response
from fastapi.responses import HTMLResponse

from app.api.deps import JobQueueDep, SessionDep, SettingsDep, TenantDep
from app.api.v1.jobs import job_out
from app.models import Job
from app.schemas.common import MAX_OFFSET, Page, problems
from app.schemas.jobs import JobStatus
from app.schemas.reports import ReportCreate, ReportOut
from app.services import reports as service
from app.services.report_page import CONTENT_SECURITY_POLICY_HEADER

router = APIRouter(tags=["reports"])


def report_out(job: Job, report: dict[str, Any] | None = None) -> ReportOut:
    result = job.result or {}
    return ReportOut(
        id=job.id,
        index_id=job.target_id,
        status=job.status,  # type: ignore[arg-type]
        params=job.params or {},
        job=job_out(job),
        summary=result.get("summary") if job.status == "succeeded" else None,
        report=report,
        created_at=job.created_at,
    )


@router.post(
    "/indexes/{index_id}/reports",
    status_code=202,
    response_model=ReportOut,
    responses=problems(404, 409, 422, 429, 503),
    summary="Make a layer report of an index (asynchronous)",
    description=(
        "Scores every training row against the reference set with every estimator, for every single layer and "
        "group (WE, block ranges, first / middle / last, CL, total) and every aggregation, and measures NDR@p and "
        "AUC-NDR against the noisy mask and their random-order baselines, cancellation per layer, score "
        "distributions and the most detrimental rows; recommends layers only when the model is above chance and "
        "the best entry clearly beats a random order. Without a noisy mask, NDR, AUC-NDR and the recommendation "
        "are listed as unavailable and the rest is reported. Deleted rows are left out. 409 when the index is not "
        "ready; 422 for unknown estimators or aggregations, layers the index does not hold, a reference set that "
        "does not fit, `noisy: dataset` without a noisy column or noisy rows the index does not hold."
    ),
)
def create_report(
    index_id: str,
    body: ReportCreate,
    session: SessionDep,
    settings: SettingsDep,
    queue: JobQueueDep,
    tenant: TenantDep,
) -> ReportOut:
    return report_out(service.create_report(session, settings, queue, index_id, body, tenant.id))


@router.get(
    "/reports",
    response_model=Page[ReportOut],
    responses=problems(422),
    summary="List layer reports, newest first",
)
def list_reports(
    session: SessionDep,
    tenant: TenantDep,
    index_id: Annotated[str | None, Query(max_length=32)] = None,
    status: Annotated[JobStatus | None, Query()] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[ReportOut]:
    rows, total = service.list_reports(
        session, tenant_id=tenant.id, index_id=index_id, status=status, offset=offset, limit=limit
    )
    return Page[ReportOut](items=[report_out(job) for job in rows], total=total, offset=offset, limit=limit)


@router.get(
    "/reports/{report_id}",
    response_model=ReportOut,
    responses=problems(404, 409),
    summary="Read a layer report",
    description="Its job and, once it has succeeded, `summary` and the full `report` (checksum verified; 409 if "
    "the stored report is missing or corrupted).",
)
def get_report(report_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ReportOut:
    job, report = service.get_report_with_body(session, settings, report_id, tenant.id)
    return report_out(job, report)


@router.get(
    "/reports/{report_id}/html",
    response_class=HTMLResponse,
    responses=problems(404, 409),
    summary="A layer report as a self-contained HTML page",
    description="Inline SVG plots (NDR curves, per-layer bars, a layer x aggregation heat map, cancellation), "
    "the warnings, the recommendation and the tables; no network access: its Content-Security-Policy (a header, "
    "and a meta tag for saved copies) forbids every fetch and framing. 409 until the report has succeeded.",
)
def get_report_page(
    report_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> HTMLResponse:
    return HTMLResponse(
        service.report_page(session, settings, report_id, tenant.id),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY_HEADER,
            "Content-Disposition": f'inline; filename="report-{report_id}.html"',
        },
    )


@router.delete(
    "/reports/{report_id}",
    status_code=204,
    responses=problems(404, 409),
    summary="Delete a layer report and its artifacts",
    description="409 while it is queued or running: cancel it first (POST /v1/jobs/{id}/cancel).",
)
def delete_report(report_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    service.delete_report(session, settings, report_id, tenant.id)
    return Response(status_code=204)
