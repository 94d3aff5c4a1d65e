"""Layer report routes (docs/decisions/0005-workflows.md): make one over an index, read it as JSON or as a page;
list and delete come from app/workflows/resources.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from app.api.deps import JobQueueDep, SessionDep, SettingsDep, TenantDep
from app.jobs.kinds import LAYER_REPORT
from app.models import Job
from app.schemas.common import problems
from app.services.index_settings import refuse_while_pinned
from app.web.report_page import CONTENT_SECURITY_POLICY_HEADER
from app.workflows.report import service as service
from app.workflows.report.schemas import ReportCreate, ReportOut
from app.workflows.resources import WorkflowResource, add_list_and_delete, job_fields

router = APIRouter(tags=["reports"])


def report_out(job: Job, report: dict[str, Any] | None = None) -> ReportOut:
    result = job.result or {}
    return ReportOut(
        **job_fields(job),
        summary=result.get("summary") if job.status == "succeeded" else None,
        report=report,
    )


REPORTS = WorkflowResource(
    kind=LAYER_REPORT,
    name="report",
    plural="reports",
    item=ReportOut,
    summary=lambda job, session, settings: report_out(job),
    title="layer report",
    before_delete=refuse_while_pinned,
    delete_note="409 while an index pins it (PUT /v1/indexes/{id}/settings).",
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


add_list_and_delete(router, REPORTS)


@router.get(
    "/reports/{report_id}",
    response_model=ReportOut,
    responses=problems(404, 409),
    summary="Read a layer report",
    description="Its job and, once it has succeeded, `summary` and the full `report` (checksum verified; 409 if "
    "the stored report is missing or corrupted).",
)
def get_report(report_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ReportOut:
    job = REPORTS.find(session, report_id, tenant.id)
    return report_out(job, service.read_report(settings, job))


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
    job = REPORTS.find(session, report_id, tenant.id)
    return HTMLResponse(
        service.report_page(session, settings, job),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY_HEADER,
            "Content-Disposition": f'inline; filename="report-{report_id}.html"',
        },
    )
