"""Batch check routes (CI hooks): submit a batch against an index, read the verdict; list and delete checks
(app/workflows/resources.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from app.api.deps import JobQueueDep, SessionDep, SettingsDep, TenantDep
from app.jobs.kinds import BATCH_CHECK
from app.models import Job
from app.schemas.common import MAX_OFFSET, problems
from app.schemas.datasets import DatasetFormat
from app.schemas.indexes import AggregationName, EstimatorName
from app.services.datasets import ColumnSpec, blank_to_none
from app.workflows.check import service
from app.workflows.check.schemas import CheckAppend, CheckOut, CheckRow
from app.workflows.resources import WorkflowResource, add_list_and_delete, job_fields

router = APIRouter(tags=["checks"])

_CREATE_DESCRIPTION = """
Check a new batch of training rows before it joins an index (a CI hook). A **multipart/form-data** request:

- `file`: the batch, in any format a dataset registration takes (JSONL, CSV, TSV, Parquet; `format`, else the
  file name's extension), mapped by `text_column` (default `text`), `text_pair_column` (exactly when the
  index's dataset has pairs) and `label_column` (default `label`). Labels are class indices or, when the
  index's dataset names its classes, its label names. Every bad row is refused with 422 naming its line; a
  batch whose rows take more than `max_dataset_bytes` once decoded is refused with 413.
- `reference`: the reference set as JSON text: `{"dataset_id", "rows" | "limit"}` or `{"examples": [...]}`.
- `layers` (a selector string, or JSON), `estimator`, `aggregation`, `vote_k`, `correct_only`: as for an audit;
  those not sent come from the index's settings (GET /v1/indexes/{id}/settings: its layer report's
  recommendation, else the defaults). `settings_source` and `settings` say what was used.
- `threshold_percentile` (default 5): a new row is flagged when its percentile among the existing rows is
  below it; `max_flagged` (default 0): the verdict fails when more rows are flagged.
- or `target_precision` / `target_recall` (one of them, in (0, 1], not with `threshold_percentile`): the threshold
  is calibrated on the existing rows against a noisy mask, `noisy`: `dataset` or JSON `{"rows": [...]}`;
  omitted, the dataset's noisy column, else the explicit rows of the index's layer report. It needs at least
  10 known-noisy and 10 clean live rows (422 naming the target otherwise).
- `append` (default false): when true and the verdict passes, the batch joins the index (and its dataset) as
  new rows, without a rebuild; a failing batch never joins.

The check runs as a job (follow `job` or GET /v1/checks/{id}). Percentile of a new row = 100 x (existing live
rows whose aggregated score is strictly lower) / (existing live rows); the scores of the existing rows and the
new rows are aggregated together, so both are on one scale.
"""


def check_out(job: Job, rows: list[dict] | None = None, rows_total: int | None = None) -> CheckOut:
    result = (job.result or {}) if job.status == "succeeded" else {}
    params = job.params or {}
    return CheckOut(
        **job_fields(job),
        settings_source=params.get("settings_source"),
        settings=params.get("settings"),
        verdict=result.get("verdict"),
        reasons=result.get("reasons") or [],
        warnings=result.get("warnings") or [],
        summary=result.get("summary"),
        appended=int(result.get("appended") or 0),
        append=CheckAppend(**service.append_view(job)),
        rows=[CheckRow(**row) for row in rows] if rows is not None else None,
        rows_total=rows_total,
    )


CHECKS = WorkflowResource(
    kind=BATCH_CHECK,
    name="check",
    plural="checks",
    item=CheckOut,
    summary=lambda job, _session, _settings: check_out(job),
    delete_note="Rows a passing check appended stay in the index and its dataset.",
)


@router.post(
    "/indexes/{index_id}/checks",
    status_code=202,
    response_model=CheckOut,
    responses=problems(404, 409, 413, 422, 429, 503),
    summary="Check a new batch against an index (asynchronous)",
    description=_CREATE_DESCRIPTION,
)
def create_check(
    index_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    queue: JobQueueDep,
    file: Annotated[UploadFile, File(description="The batch file")],
    reference: Annotated[str, Form(min_length=2, description="The reference set, as JSON text")],
    format: Annotated[DatasetFormat | None, Form(description="Default: from the file extension")] = None,
    text_column: Annotated[
        str, Form(min_length=1, max_length=200, description="Column of the text")
    ] = "text",
    text_pair_column: Annotated[
        str | None, Form(max_length=200, description="Column of the second text")
    ] = None,
    label_column: Annotated[
        str | None,
        Form(
            max_length=200,
            description="Column of the label (classification: default `label`; causal-lm: optional)",
        ),
    ] = None,
    layers: Annotated[
        str | None, Form(max_length=10_000, description="Layer selector (a string, or JSON); default all")
    ] = None,
    estimator: Annotated[
        EstimatorName | None, Form(description="Default: the index's settings, else grad-dot")
    ] = None,
    aggregation: Annotated[
        AggregationName | None, Form(description="Default: the index's settings, else rank")
    ] = None,
    vote_k: Annotated[
        float | None,
        Form(
            gt=0,
            le=1,
            description="vote: share of the ranked rows each voter scores (default: the index's "
            "settings, else 0.2)",
        ),
    ] = None,
    correct_only: Annotated[
        bool | None,
        Form(
            description="Only the reference rows the model predicts correctly vote (the paper's -c); default: "
            "the index's settings, else false"
        ),
    ] = None,
    threshold_percentile: Annotated[
        float | None,
        Form(
            ge=0,
            le=100,
            description="Flag a new row whose percentile is below this (default 5; not with a target)",
        ),
    ] = None,
    target_precision: Annotated[
        float | None,
        Form(
            gt=0, le=1, description="Calibrate the threshold on the noisy mask for this precision, in (0, 1]"
        ),
    ] = None,
    target_recall: Annotated[
        float | None,
        Form(gt=0, le=1, description="Calibrate the threshold on the noisy mask for this recall, in (0, 1]"),
    ] = None,
    noisy: Annotated[
        str | None,
        Form(
            description='The noisy mask to calibrate on: `dataset`, or JSON {"rows": [...]}; default: the '
            "dataset's noisy column, else the index's report's explicit rows"
        ),
    ] = None,
    max_flagged: Annotated[int, Form(ge=0, le=2**31 - 1, description="Fail when more rows are flagged")] = 0,
    append: Annotated[
        bool, Form(description="Append the batch to the index when the verdict passes")
    ] = False,
) -> CheckOut:
    request = service.CheckRequest(
        reference=reference,
        columns=ColumnSpec.from_form(text_column, text_pair_column, label_column),
        format=format,
        layers=blank_to_none(layers),
        estimator=estimator,
        aggregation=aggregation,
        vote_k=vote_k,
        correct_only=correct_only,
        threshold_percentile=threshold_percentile,
        target_precision=target_precision,
        target_recall=target_recall,
        noisy=noisy,
        max_flagged=max_flagged,
        append=append,
    )
    job = service.create_check(
        session, settings, queue, index_id, request, file.file, file.filename, tenant.id
    )
    return check_out(job)


add_list_and_delete(router, CHECKS)


@router.get(
    "/checks/{check_id}",
    response_model=CheckOut,
    responses=problems(404, 409),
    summary="Read a check: verdict, reasons and a page of its rows",
    description="Once the check has succeeded, `rows` is a page (`offset`, `limit`) of the batch's rows, or of "
    "its flagged rows only (`flagged_only`), in batch order. 409 if its stored result fails its checksum.",
)
def get_check(
    check_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    flagged_only: Annotated[bool, Query()] = False,
) -> CheckOut:
    job = CHECKS.find(session, check_id, tenant.id)
    if job.status != "succeeded":
        return check_out(job)
    rows, total = service.scored_rows(settings, job, offset=offset, limit=limit, flagged_only=flagged_only)
    return check_out(job, rows, total)
