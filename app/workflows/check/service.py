"""Batch checks (CI hooks) in the API: a new batch of rows is scored against a reference set next to an index's
existing rows by the `batch_check` runner (runner.py, which says how), which flags the rows that look
detrimental, gives a verdict, and optionally lets a passing batch join the index.

`create_check` validates everything before anything is queued: the batch file (batch.py), its labels against
the index dataset's classes, the reference set, the layers, and a calibration's target and noisy mask. Settings
the form leaves out come from the index's settings (app/services/index_settings.py). The normalised batch goes
to the job's folder (artifacts/jobs/<id>/batch.jsonl, its sha256 in the job's params) before the job is
enqueued; if the request fails, the folder goes with the rolled-back job row. `scored_rows` serves the scored
rows from check.json.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Invalid, PayloadTooLarge
from app.jobs import state as job_state
from app.jobs.kinds import BATCH_CHECK
from app.jobs.resources import artifact_path
from app.models import Dataset, Index, Job
from app.schemas.indexes import LayerSelector
from app.schemas.references import NoisyRows, NoisySpec, ReferenceSet
from app.services import datasets as dataset_files
from app.services.index_settings import effective_report, resolve_settings
from app.services.indexes import get_index, index_sources, require_index_capacity, require_ready
from app.services.noisy import default_noisy, noisy_mask, resolve_noisy
from app.services.queries.layers import select_query_layers
from app.services.references import resolve_reference
from app.stores import open_store
from app.workflows.check.batch import BATCH_FILE, Batch, parse_batch, store_batch
from influence.calibration import MIN_CLEAN, MIN_NOISY

RESULT_FILE = "check.json"
# A check that names no threshold and no target flags rows below this percentile.
DEFAULT_THRESHOLD_PERCENTILE = 5.0


@dataclass(frozen=True)
class CheckRequest:
    """The form of POST /v1/indexes/{id}/checks, besides the file."""

    reference: str  # JSON text of a ReferenceSet
    columns: dataset_files.ColumnSpec
    format: str | None = None
    # Settings left None are not named: the index's settings decide them (app/services/index_settings.py).
    layers: str | None = None  # JSON (a list or an object) or a plain selector string
    estimator: str | None = None
    aggregation: str | None = None
    vote_k: float | None = None
    correct_only: bool | None = None
    threshold_percentile: float | None = None  # None: DEFAULT_THRESHOLD_PERCENTILE, or calibrated
    target_precision: float | None = None
    target_recall: float | None = None
    noisy: str | None = None  # "dataset" or JSON {"rows": [...]}: the mask a target is calibrated on
    max_flagged: int = 0
    append: bool = False


def create_check(
    session: Session,
    settings: Settings,
    queue: job_state.JobQueue,
    index_id: str,
    request: CheckRequest,
    upload: IO[bytes],
    filename: str | None,
    tenant_id: str,
) -> Job:
    """Validate everything, record the check's job (queued) with its normalised batch, enqueue it after the
    commit. 404 for another tenant's index or reference dataset, 409 for an index that is not ready, 413 for a
    file over max_upload_bytes or rows over max_dataset_bytes, 422 naming the line and column of a bad row, 429
    over the tenant's job limit."""
    index = get_index(session, index_id, tenant_id)
    require_ready(index)
    model, dataset = index_sources(session, index)
    require_index_capacity(settings, model, index)
    for name, value in (("vote_k", request.vote_k), ("threshold_percentile", request.threshold_percentile)):
        if value is not None and not math.isfinite(value):
            raise Invalid(f"{name} must be a finite number")
    named = {
        "layers": _parse_layers(request.layers),
        "estimator": request.estimator,
        "aggregation": request.aggregation,
        "vote_k": request.vote_k,
        "correct_only": request.correct_only,
    }
    named = {name: value for name, value in named.items() if value is not None}
    resolved = resolve_settings(session, settings, index, named, kind="check")
    if resolved.correct_only and model.task != "classification":
        raise Invalid(
            "correct_only needs a classification model (it keeps the reference rows predicted correctly)"
        )
    reference = _parse_reference(request.reference)
    try:
        layers = select_query_layers(index, model, resolved.layers)
    except (TypeError, ValueError, re.error):  # a selector object of the wrong shape, e.g. {"blocks": 5}
        raise Invalid("layers: a malformed selector (see the layer selector syntax)") from None
    calibration = calibration_params(session, settings, index, dataset, request)
    threshold = request.threshold_percentile
    if threshold is None and calibration is None:
        threshold = DEFAULT_THRESHOLD_PERCENTILE
    spec = resolve_reference(session, settings, reference, tenant_id=tenant_id, model=model, trained=dataset)
    with dataset_files.staged_upload(settings, upload) as staged:
        batch, source = parse_batch(
            settings, dataset, model, request.columns, request.format, staged, filename
        )
        if request.append:
            _check_append(settings, dataset, batch)
        # Not job_state.submit_job: the batch's commit hook (it releases the job folder's lock) must run before
        # the enqueue's, which raises when the broker refuses the job.
        job = job_state.create_job(
            session,
            BATCH_CHECK,
            tenant_id=tenant_id,
            target_id=index.id,
            max_active=settings.max_active_jobs_per_tenant,
            params={
                "index_id": index.id,
                "layers": layers,
                "estimator": resolved.estimator,
                "aggregation": resolved.aggregation,
                "vote_k": resolved.vote_k,
                "correct_only": resolved.correct_only,
                # None when calibrated: the runner derives it from `calibration`.
                "threshold_percentile": threshold,
                "calibration": calibration,
                "settings_source": resolved.source,
                "settings": resolved.as_dict(),
                "max_flagged": request.max_flagged,
                "append": request.append,
                "reference": spec,
                "batch": {**source, "file": BATCH_FILE, "sha256": batch.sha256},
            },
            total=total_steps(batch.rows, reference_size(spec), len(layers), request.append),
        )
        store_batch(session, settings, job.id, batch.path)
    job_state.enqueue_after_commit(session, queue, job)
    return job


def calibration_params(
    session: Session, settings: Settings, index: Index, dataset: Dataset, request: CheckRequest
) -> dict[str, Any] | None:
    """{target, value, noisy spec} when the check calibrates its threshold on a noisy mask, else None. 422
    naming the field: a target outside (0, 1], both targets, a target with threshold_percentile, a target
    without a mask or with a mask too small to calibrate on, a mask without a target."""
    targets = [
        (name, value)
        for name, value in (
            ("target_precision", request.target_precision),
            ("target_recall", request.target_recall),
        )
        if value is not None
    ]
    if not targets:
        if request.noisy is not None:
            raise Invalid(
                "noisy: only with target_precision or target_recall (the mask a threshold is calibrated on)"
            )
        return None
    for name, value in targets:
        if not (math.isfinite(value) and 0 < value <= 1):
            raise Invalid(f"{name} must be in (0, 1]; got {value!r}")
    if len(targets) > 1:
        raise Invalid("target_precision, target_recall: give one of them, not both")
    field, value = targets[0]
    if request.threshold_percentile is not None:
        raise Invalid(
            f"threshold_percentile: {field} calibrates the threshold; leave threshold_percentile out"
        )
    given = _parse_noisy(request.noisy)
    if given is None:
        given = default_noisy(dataset)
    noisy = resolve_noisy(settings, index, dataset, given, field="noisy")
    if noisy is None:
        # The rows a report was measured against (e.g. confirmed by a reviewer) are the next best mask.
        report = effective_report(session, index)
        recorded = (report.params or {}).get("noisy") if report is not None else None
        if isinstance(recorded, dict) and recorded.get("source") == "rows":
            noisy = recorded
    if noisy is None:
        raise Invalid(
            f"{field}: no noisy mask to calibrate on: dataset {dataset.id!r} has no noisy column and the index's "
            'layer report names no noisy rows; pass noisy: {"rows": [...]} with the known-noisy row ids'
        )
    store = open_store(settings, index)
    mask, _ = noisy_mask(settings, dataset, noisy, store.row_ids()[store.live_positions()])
    assert mask is not None
    known_noisy = int(mask.sum())
    clean = len(mask) - known_noisy
    if known_noisy < MIN_NOISY or clean < MIN_CLEAN:
        raise Invalid(
            f"{field}: the noisy mask is too small to calibrate on: {known_noisy} known-noisy and {clean} clean "
            f"live rows of index {index.id!r}; calibrating needs at least {MIN_NOISY} known-noisy and "
            f"{MIN_CLEAN} clean rows"
        )
    return {"target": field.removeprefix("target_"), "value": value, "noisy": noisy}


def _parse_noisy(text: str | None) -> NoisySpec:
    """The form's noisy mask: "dataset", JSON {"rows": [...]}, or None when not sent."""
    if text is None or not text.strip():
        return None
    if text.strip() == "dataset":
        return "dataset"
    try:
        return NoisyRows.model_validate_json(text)
    except ValidationError:
        raise Invalid('noisy: expected "dataset" or JSON {"rows": [dataset row ids]}') from None


def _check_append(settings: Settings, dataset: Dataset, batch: Batch) -> None:
    """The dataset a passing batch would be appended to stays within max_rows and max_dataset_bytes."""
    if dataset.row_count + batch.rows > settings.max_rows:
        raise Invalid(
            f"appending {batch.rows:,} rows would give dataset {dataset.id!r} {dataset.row_count + batch.rows:,} "
            f"rows, more than max_rows = {settings.max_rows:,}"
        )
    grown = dataset_files.rows_path(settings, dataset).stat().st_size + batch.bytes
    if grown > settings.max_dataset_bytes:
        raise PayloadTooLarge(
            f"appending this batch would give dataset {dataset.id!r} {grown:,} bytes of rows, more than "
            f"max_dataset_bytes = {settings.max_dataset_bytes} (the setting INFLUENCE_MAX_DATASET_BYTES)"
        )


def _parse_reference(text: str) -> ReferenceSet:
    try:
        return ReferenceSet.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'reference'}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        raise Invalid(f"reference is not a valid reference set (JSON): {problems}") from None


def _parse_layers(text: str | None) -> Any:
    """A layer selector from a form field: JSON (a list, an object or a string) or a plain selector string."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text.strip()
    if value is None:
        return None
    try:
        return TypeAdapter(LayerSelector).validate_python(value)
    except ValidationError:
        raise Invalid("layers must be a selector string, a JSON list of selectors or a JSON object") from None


def reference_size(spec: Mapping[str, Any]) -> int:
    if spec.get("examples") is not None:
        return len(spec["examples"])
    return len(spec["rows"]) if spec.get("rows") is not None else int(spec["limit"])


def total_steps(rows: int, reference_rows: int, layers: int, append: bool) -> int:
    """Progress units: batch rows and reference rows featurized, layers scored, the append."""
    return rows + reference_rows + layers + (1 if append else 0)


def scored_rows(
    settings: Settings, job: Job, *, offset: int = 0, limit: int = 1000, flagged_only: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """A page of a succeeded check's scored rows (from check.json, checksum verified) and the rows it was taken
    from; rows are numbered in the batch, with the dataset row each became if appended."""
    path = artifact_path(settings, job, RESULT_FILE)
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    if flagged_only:
        rows = [row for row in rows if row["flagged"]]
    appended = ((job.result or {}).get("append") or {}).get("dataset_rows")
    page = rows[offset : offset + limit]
    for row in page:
        row["dataset_row"] = appended[0] + row["row"] if appended else None
    return page, len(rows)


def append_view(job: Job) -> dict[str, Any]:
    """What happened to `append` (CheckAppend), for any state of the job."""
    params, result = job.params or {}, job.result or {}
    if result.get("append") is not None:
        return result["append"]
    requested = bool(params.get("append"))
    if not requested:
        return {"requested": False, "status": "not-requested"}
    if job.status in job_state.ACTIVE:
        return {"requested": True, "status": "pending"}
    return {
        "requested": True,
        "status": "incomplete",
        "reason": f"the check {job.status} before it recorded an append; the index holds only rows it has "
        "features for (see the job's error)",
    }
