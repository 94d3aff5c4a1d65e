"""Layer reports, the API side: check a request, record its job, read the finished report.

`create_report` checks the index is ready, picks its layers, checks estimator and aggregation names against the
library's registries (`-c` variants included), resolves the reference set and the noisy mask (the dataset's noisy
column, or explicit row ids that must be rows of the index), then records a `layer_report` job and enqueues it
once committed. `read_report` and `report_page` read a finished one (the job row is the resource:
docs/decisions/0005-workflows.md; routes.py lists and deletes it through app/workflows/resources.py).

The worker side, which computes the report, is runner.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, Invalid
from app.jobs import state as job_state
from app.jobs.kinds import LAYER_REPORT
from app.models import Dataset, Job
from app.services.datasets import read_rows
from app.services.index_settings import REPORT_FILE as REPORT_FILE
from app.services.index_settings import read_report_document
from app.services.indexes import get_index, index_sources, require_index_capacity, require_ready
from app.services.noisy import default_noisy, resolve_noisy
from app.services.queries.layers import select_query_layers
from app.services.references import resolve_reference
from app.web.report_page import render_report_html
from app.workflows.report.schemas import ReportCreate
from influence.aggregation import aggregation_names
from influence.report import CORRECT_SUFFIX


def check_aggregations(names: Sequence[str]) -> list[str]:
    """The aggregation names, deduplicated in order; 422 for names the library does not know."""
    registered = aggregation_names()
    unknown = []
    for name in names:
        base = name[: -len(CORRECT_SUFFIX)] if name.endswith(CORRECT_SUFFIX) else name
        if name not in registered and base not in registered:
            unknown.append(name)
    if unknown:
        raise Invalid(
            f"unknown aggregations {unknown[:5]}; expected one of {', '.join(registered)}, each optionally with "
            f"the correct-only suffix '{CORRECT_SUFFIX}'"
        )
    return list(dict.fromkeys(names))


def create_report(
    session: Session,
    settings: Settings,
    queue: job_state.JobQueue,
    index_id: str,
    body: ReportCreate,
    tenant_id: str,
) -> Job:
    """Check the request against a ready index of this tenant and queue its `layer_report` job."""
    index = get_index(session, index_id, tenant_id)
    require_ready(index)
    model, dataset = index_sources(session, index)
    require_index_capacity(settings, model, index)
    layers = select_query_layers(index, model, body.layers)
    aggregations = check_aggregations(body.aggregations)
    reference = resolve_reference(
        session, settings, body.reference, tenant_id=tenant_id, model=model, trained=dataset
    )
    given = body.noisy if "noisy" in body.model_fields_set else default_noisy(dataset)
    noisy = resolve_noisy(settings, index, dataset, given)
    params = {
        "index_id": index.id,
        "model": {"id": model.id, "name": model.name, "task": model.task},
        "dataset": {"id": dataset.id, "name": dataset.name},
        "reference": reference,
        "layers": layers,
        "estimators": list(dict.fromkeys(body.estimators)),
        "aggregations": aggregations,
        "vote_k": body.vote_k,
        "noisy": noisy,
        "cancellation_rows": body.cancellation_rows,
        "top_rows": body.top_rows,
    }
    return job_state.submit_job(
        session, settings, queue, LAYER_REPORT, tenant_id=tenant_id, target_id=index.id, params=params
    )


def read_report(settings: Settings, job: Job) -> dict[str, Any] | None:
    """The finished report (LayerReport.to_dict()), its checksum verified; None while it is not done."""
    # Read in the service layer: an index's settings follow its reports' recommendations (index_settings).
    return read_report_document(settings, job)


def _detrimental_texts(
    settings: Settings, session: Session, job: Job, report: dict[str, Any]
) -> dict[str, Any]:
    """Row id -> {text, text_pair, label} of the report's most detrimental rows, while the dataset exists."""
    dataset = session.get(Dataset, (job.params.get("dataset") or {}).get("id", ""))
    if dataset is None or dataset.tenant_id != job.tenant_id:
        return {}
    out: dict[str, Any] = {}
    for row in report.get("detrimental") or []:
        row_id = row.get("row_id")
        if not isinstance(row_id, int) or str(row_id) in out or not 0 <= row_id < dataset.row_count:
            continue
        try:
            found = read_rows(settings, dataset, row_id, 1)[0]
        except Conflict:  # the dataset's rows are gone or corrupted: the page shows ids only
            return {}
        label = found.get("label")
        if isinstance(label, int) and dataset.label_names and 0 <= label < len(dataset.label_names):
            label = dataset.label_names[label]
        out[str(row_id)] = {"text": found.get("text"), "text_pair": found.get("text_pair"), "label": label}
    return out


def report_page(session: Session, settings: Settings, job: Job) -> str:
    """The report as one self-contained HTML page (409 until the report has succeeded)."""
    if job.status != "succeeded":
        why = {
            "queued": "it is queued",
            "running": "it is still running",
            "failed": f"it failed ({job.error})",
            "cancelled": "it was cancelled",
        }.get(job.status, job.status)
        raise Conflict(f"report {job.id!r} has no page: {why}; the page exists once the report has succeeded")
    report = read_report(settings, job)
    assert report is not None
    params = job.params or {}
    model = params.get("model") or {}
    dataset = params.get("dataset") or {}
    created = job_state.as_utc(job.created_at)
    context = {
        "report_id": job.id,
        "index_id": job.target_id,
        "model": f"{model.get('name')} ({model.get('id')})" if model else None,
        "dataset": f"{dataset.get('name')} ({dataset.get('id')})" if dataset else None,
        "reference_size": report.get("n_reference"),
        "created": created.isoformat() if isinstance(created, dt.datetime) else None,
        "rows": _detrimental_texts(settings, session, job, report),
    }
    title = f"Layer report: {model.get('name', 'model')} on {dataset.get('name', 'dataset')}"
    return render_report_html(report, title=title, context=context)
