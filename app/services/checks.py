"""Batch checks (CI hooks): score a new batch of rows against a reference set next to an index's existing rows,
flag the rows that look detrimental, give a verdict, and optionally let a passing batch join the index.

In the API (`create_check`): the batch file is parsed and validated exactly as a dataset registration parses
one (app/services/datasets.py: formats, column mapping, text and size limits), label names are mapped to the
index dataset's classes, the reference set is resolved, and the normalised batch is written to the job's folder
(artifacts/jobs/<id>/batch.jsonl, its sha256 in the job's params) before the job is enqueued; if the request
fails, the folder goes with the rolled-back job row.

In the worker (`run_check`, the `batch_check` runner), in two stages, each resumable:
  1. scoring. The batch rows are featurized as TRAINING rows (the store's featurizer, projection and max_length,
     checked against its manifest; their features are cast to the store's dtype and their norms taken before
     the cast, exactly as FeatureStore.append would store them), the reference as a query is. The score tensor
     S over the existing LIVE rows followed by the batch rows (influence.LazyScores, i.e. score_tensor computed
     layer by layer, with the index's estimators) is aggregated over the chosen layers with the chosen method
     across that union, so both live on one scale. Per new row: percentile = 100 x (existing live rows with a
     strictly LOWER aggregated score) / (existing live rows) (ties do not count as lower, so a tie with the
     lowest existing row is percentile 0), flagged = percentile < threshold_percentile; per layer the same
     with the layer's own aggregate, and the layer's score averaged over the voting reference rows. The
     verdict fails when more than max_flagged rows are flagged. Written to check.json (then reused by a rerun).
  2. append (append=true): only when the verdict passes (a failed batch never enters the index); then the
     rows join the index's dataset and its feature store without a rebuild (app/services/appends.py, which
     says why a crash leaves a consistent index and why a rerun never appends twice). Cancellation is honoured
     up to the start of the append; an append that has started completes.
The reference accuracy near chance is reported as a warning, never as a failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, after_rollback
from app.errors import Conflict, Invalid, PayloadTooLarge
from app.models import Dataset, Index, Job, RegisteredModel
from app.schemas.references import ReferenceSet
from app.services import datasets as dataset_files
from app.services import isolation, runners
from app.services import jobs as job_service
from app.services.indexes import get_index, require_ready
from app.services.pipelines import index_sources
from app.services.runners import JobCancelled, JobRun, job_runner

CHECK = "batch_check"
BATCH_FILE = "batch.jsonl"
RESULT_FILE = "check.json"
# The batch's float32 features for every layer of the store, kept between the stages of a passing check that
# appends (so the rows that join are the rows that were scored); removed once the append is done.
FEATURES_FILE = "batch_features.npz"
# A model whose reference accuracy is within this of the majority-class share is "near chance" (a warning).
NEAR_CHANCE_MARGIN = 0.05
# Existing rows below which a percentile is coarse (it moves in steps of 100 / n): a warning.
FEW_EXISTING_ROWS = 100
LISTED_FLAGGED = 10
TIE_RULE = (
    "percentile = 100 x (existing live rows whose aggregated score is strictly lower) / (existing live rows); "
    "ties do not count as lower; flagged = percentile < threshold_percentile"
)


@dataclass(frozen=True)
class CheckRequest:
    """The form of POST /v1/indexes/{id}/checks, besides the file."""

    reference: str  # JSON text of a ReferenceSet
    columns: dataset_files.ColumnSpec
    format: str | None = None
    layers: str | None = None  # JSON (a list or an object) or a plain selector string
    estimator: str = "grad-dot"
    aggregation: str = "rank"
    vote_k: float = 0.2
    correct_only: bool = False
    threshold_percentile: float = 5.0
    max_flagged: int = 0
    append: bool = False


# --------------------------------------------------------------------------------------------- in the API


def create_check(
    session: Session,
    settings: Settings,
    queue: job_service.JobQueue,
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
    from app.services.queries import select_query_layers
    from app.services.references import resolve_reference

    index = get_index(session, index_id, tenant_id)
    require_ready(index)
    model, dataset = index_sources(session, index)
    for name, value in (("vote_k", request.vote_k), ("threshold_percentile", request.threshold_percentile)):
        if not math.isfinite(value):
            raise Invalid(f"{name} must be a finite number")
    if request.correct_only and model.task != "classification":
        raise Invalid(
            "correct_only needs a classification model (it keeps the reference rows predicted correctly)"
        )
    reference = _parse_reference(request.reference)
    try:
        layers = select_query_layers(index, model, _parse_layers(request.layers))
    except (TypeError, ValueError, re.error):  # a selector object of the wrong shape, e.g. {"blocks": 5}
        raise Invalid("layers: a malformed selector (see the layer selector syntax)") from None
    spec = resolve_reference(session, settings, reference, tenant_id=tenant_id, model=model, trained=dataset)
    with dataset_files.staged_upload(settings, upload) as staged:
        batch, source = parse_batch(settings, dataset, model, request, staged, filename)
        if request.append:
            _check_append(settings, dataset, batch)
        job = job_service.create_job(
            session,
            CHECK,
            tenant_id=tenant_id,
            target_id=index.id,
            max_active=settings.max_active_jobs_per_tenant,
            params={
                "index_id": index.id,
                "layers": layers,
                "estimator": request.estimator,
                "aggregation": request.aggregation,
                "vote_k": request.vote_k,
                "correct_only": request.correct_only,
                "threshold_percentile": request.threshold_percentile,
                "max_flagged": request.max_flagged,
                "append": request.append,
                "reference": spec,
                "batch": {**source, "file": BATCH_FILE, "sha256": batch.sha256},
            },
            total=_total_steps(batch.rows, _reference_size(spec), len(layers), request.append),
        )
        _store_batch(session, settings, job.id, batch.path)
    job_service.enqueue_after_commit(session, queue, job)
    return job


def _check_append(settings: Settings, dataset: Dataset, batch: _Batch) -> None:
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
    from pydantic import TypeAdapter

    from app.schemas.indexes import LayerSelector

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


def _reference_size(spec: Mapping[str, Any]) -> int:
    if spec.get("examples") is not None:
        return len(spec["examples"])
    return len(spec["rows"]) if spec.get("rows") is not None else int(spec["limit"])


def _total_steps(rows: int, reference_rows: int, layers: int, append: bool) -> int:
    """Progress units: batch rows and reference rows featurized, layers scored, the append."""
    return rows + reference_rows + layers + (1 if append else 0)


def parse_batch(
    settings: Settings,
    dataset: Dataset,
    model: RegisteredModel,
    request: CheckRequest,
    staged: Path,
    filename: str | None,
) -> tuple[_Batch, dict[str, Any]]:
    """The batch file `staged` (an upload copied into its staging folder) read and validated by the dataset
    registration's own readers, in a request process (app/services/isolation.py), and written beside it as
    normalised rows (rows.jsonl lines: {"text", "text_pair", "label", "noisy"}, labels in the index dataset's
    numbering); and a description of the file."""
    fmt = dataset_files._pick_format(request.format, filename, "the uploaded file")
    columns = request.columns
    if columns.label is None and dataset.task == "classification":
        columns = dataclasses.replace(columns, label="label")
    spec = dataset_files.DatasetSpec(columns=columns, task=dataset.task)
    dataset_files._check_spec(spec)
    pairs = bool((dataset.columns or {}).get("text_pair"))
    if pairs != (columns.text_pair is not None):
        raise Invalid(
            "the index's dataset has a text_pair in every row: give text_pair_column"
            if pairs
            else "the index's dataset has no text_pair: leave text_pair_column out"
        )
    classes = int(model.num_labels or 2) if dataset.task == "classification" else None
    target = staged.with_name(BATCH_FILE)
    batch = isolation.run(read_batch, settings, spec, staged, fmt, dataset.label_names, classes, target)
    source = {
        "filename": (filename or "")[:200] or None,
        "format": fmt,
        "size_bytes": batch.file_size,
        "upload_sha256": batch.file_sha256,
        "rows": batch.rows,
        "columns": columns.as_dict(),
    }
    return batch, source


@dataclass(frozen=True)
class _Batch:
    path: Path  # the normalised rows, as rows.jsonl lines
    rows: int
    bytes: int  # of `path`
    sha256: str  # of `path`
    file_size: int  # of the file sent
    file_sha256: str


def read_batch(
    settings: Settings,
    spec: dataset_files.DatasetSpec,
    source: Path,
    fmt: str,
    label_names: list[str] | None,
    classes: int | None,
    target: Path,
) -> _Batch:
    """Read and validate a batch file and write its normalised rows to `target`, counted against
    max_dataset_bytes; classification labels become the index dataset's class indices (`label_names`: its
    names, or None when it numbers its classes; `classes`: the model's)."""
    by_name = {name: i for i, name in enumerate(label_names or [])}
    validator = dataset_files._Rows(spec, settings)
    written = dataset_files._Budget(settings.max_dataset_bytes, "the batch's rows")
    digest = hashlib.sha256()
    with open(source, "rb") as handle, open(target, "wb") as out:
        size, file_digest = dataset_files._size_and_hash(handle, limit=None)
        if size == 0:
            raise Invalid("the file is empty")
        handle.seek(0)
        for where, record in dataset_files.read_records(handle, fmt, spec.columns, settings):
            row = validator.normalise(where, record)
            if classes is not None:
                row["label"] = _class_index(row["label"], where, label_names, by_name, classes)
            line = dataset_files.encode_row(row)
            written.charge(len(line), where)
            digest.update(line)
            out.write(line)
        dataset_files._fsync_handle(out)
    if validator.count == 0:
        raise Invalid("the file has no data rows")
    return _Batch(target, validator.count, written.used, digest.hexdigest(), size, file_digest)


def _class_index(
    label: Any, where: str, names: list[str] | None, by_name: dict[str, int], classes: int
) -> int:
    """A batch row's label as the index dataset's class index: a name mapped by name, an integer kept."""
    if names is not None:
        if not isinstance(label, str):
            raise Invalid(
                f"{where}: label {label!r} is a class index, but the index's dataset names its classes "
                f"({', '.join(names[:10])}); give label names"
            )
        if label not in by_name:
            raise Invalid(
                f"{where}: label {label!r} is not a label of the index's dataset ({', '.join(names[:10])})"
            )
        label = by_name[label]
    elif isinstance(label, str):
        raise Invalid(
            f"{where}: label {label!r} is a name, but the index's dataset numbers its classes; give class indices"
        )
    if not 0 <= label < classes:
        raise Invalid(f"{where}: label {label} is not a class of the model [0, {classes})")
    return label


def _store_batch(session: Session, settings: Settings, job_id: str, batch: Path) -> None:
    """Move the normalised batch into the job's folder now; the folder goes if the transaction rolls back.

    Like a dataset registration, the request holds an fcntl lock on `.registering.lock` in the folder until its
    transaction ends, so a sweep can tell a folder left by a killed request from one still being made."""
    from app.services.pipelines import remove_tree

    directory = runners.job_dir(settings, job_id)
    directory.mkdir(parents=True, exist_ok=False)
    lock = open(directory / dataset_files.REGISTERING_LOCK, "a+")  # noqa: SIM115 - closed by the hooks below
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
        os.replace(batch, directory / BATCH_FILE)  # both under the artifacts folder: a rename
    except BaseException:
        lock.close()
        remove_tree(directory)
        raise

    def committed() -> None:
        with contextlib.suppress(FileNotFoundError):
            (directory / dataset_files.REGISTERING_LOCK).unlink()
        lock.close()

    def rolled_back() -> None:
        remove_tree(directory)
        lock.close()

    after_commit(session, committed)
    after_rollback(session, rolled_back)


def get_check(session: Session, check_id: str, tenant_id: str) -> Job:
    """A check of this tenant (NotFound for another tenant's, as for an unknown id)."""
    return runners.get_workflow_job(session, check_id, tenant_id, CHECK)


def list_checks(
    session: Session, *, tenant_id: str, index_id: str | None = None, offset: int = 0, limit: int = 50
) -> tuple[Sequence[Job], int]:
    """A page of this tenant's checks, newest first, and the total."""
    return job_service.list_jobs(
        session, tenant_id=tenant_id, kind=CHECK, target_id=index_id, offset=offset, limit=limit
    )


def read_check(
    session: Session,
    settings: Settings,
    check_id: str,
    tenant_id: str,
    *,
    offset: int = 0,
    limit: int = 1000,
    flagged_only: bool = False,
) -> tuple[Job, list[dict[str, Any]] | None, int | None]:
    """A check with a page of its scored rows once it has succeeded (from check.json, checksum verified):
    (job, rows, rows_total); rows are numbered in the batch, with the dataset row each became if appended."""
    job = get_check(session, check_id, tenant_id)
    if job.status != "succeeded":
        return job, None, None
    path = runners.artifact_path(settings, job, RESULT_FILE)
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    if flagged_only:
        rows = [row for row in rows if row["flagged"]]
    appended = ((job.result or {}).get("append") or {}).get("dataset_rows")
    page = rows[offset : offset + limit]
    for row in page:
        row["dataset_row"] = appended[0] + row["row"] if appended else None
    return job, page, len(rows)


def delete_check(session: Session, settings: Settings, check_id: str, tenant_id: str) -> None:
    """Delete a finished check and its files (409 while it is queued or running: cancel it first). Rows a
    passing check appended stay in the index and its dataset: they are theirs now."""
    runners.delete_job_resource(session, settings, get_check(session, check_id, tenant_id))


def append_view(job: Job) -> dict[str, Any]:
    """What happened to `append` (CheckAppend), for any state of the job."""
    params, result = job.params or {}, job.result or {}
    if result.get("append") is not None:
        return result["append"]
    requested = bool(params.get("append"))
    if not requested:
        return {"requested": False, "status": "not-requested"}
    if job.status in job_service.ACTIVE:
        return {"requested": True, "status": "pending"}
    return {
        "requested": True,
        "status": "incomplete",
        "reason": f"the check {job.status} before it recorded an append; the index holds only rows it has "
        "features for (see the job's error)",
    }


# ---------------------------------------------------------------------------------------------- in workers


class _UnionRows:
    """Rows of one layer: the store's rows at `positions` followed by `extra` rows, as an (n, k) matrix that
    influence.scoring reads by row slices (copies of the rows asked for; nothing of size n is held)."""

    def __init__(self, stored: Any, positions: np.ndarray, extra: np.ndarray):
        self.stored, self.positions, self.extra = stored, positions, extra
        self.everything = len(positions) == len(stored)  # no deleted rows: read slices, not gathers
        self.split = len(positions)
        self.shape = (self.split + len(extra), int(extra.shape[1]))

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("only contiguous row slices")
        parts = []
        if start < self.split:
            end = min(stop, self.split)
            parts.append(
                self.stored[start:end] if self.everything else self.stored[self.positions[start:end]]
            )
        if stop > self.split:
            parts.append(self.extra[max(start - self.split, 0) : stop - self.split])
        if not parts:
            return self.extra[:0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def union_rows(stored: Any, positions: np.ndarray, extra: Any) -> Any:
    """The store's rows at `positions` followed by `extra`: token rows (the exact embedding) gathered at
    once (a few numbers per row), dense layers through _UnionRows."""
    from influence.tokens import TokenRows

    if isinstance(stored, TokenRows):
        return TokenRows.concat([stored.select(positions), extra])
    return _UnionRows(stored, positions, extra)


def as_stored(
    features: Mapping[str, np.ndarray], dtype: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features as a store holds them: cast to its dtype, norms (float32) from the float32 values before the
    cast (FeatureStore.append does the same), so the batch rows score now as they will once appended."""
    from influence.tokens import TokenRows

    stored, norms = {}, {}
    for name, values in features.items():
        if isinstance(values, TokenRows):  # the exact embedding: its entries' vectors are what is stored
            norms[name] = values.norms().numpy()
            vectors = np.asarray(values.values, dtype=np.float32).astype(np.dtype(dtype), copy=False)
            stored[name] = TokenRows(values.offsets, values.tokens, vectors, check=False)
            continue
        values32 = np.ascontiguousarray(values, dtype=np.float32)
        norms[name] = np.sqrt(np.einsum("ij,ij->i", values32, values32, dtype=np.float64)).astype(np.float32)
        stored[name] = values32.astype(np.dtype(dtype), copy=False)
    return stored, norms


def percentiles(existing: np.ndarray, new: np.ndarray) -> np.ndarray:
    """100 x share of `existing` strictly below each value of `new` (ties do not count): (len(new),) float64."""
    ordered = np.sort(np.asarray(existing, dtype=np.float64))
    lower = np.searchsorted(ordered, np.asarray(new, dtype=np.float64), side="left")
    return 100.0 * lower / len(ordered)


def _ordinal(value: float) -> str:
    if float(value).is_integer():
        number = int(value)
        suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
        return f"{number}{suffix}"
    return f"{value:g}th"


def verdict_reasons(
    rows: Sequence[Mapping[str, Any]], existing: int, threshold: float, max_flagged: int
) -> tuple[str, list[str]]:
    """The verdict (pass | fail) and its reasons in plain words."""
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: (r["percentile"], r["score"], r["row"]))
    verdict = "fail" if len(flagged) > max_flagged else "pass"
    head = (
        f"{len(flagged):,} of {len(rows):,} new rows score below the {_ordinal(threshold)} percentile of the "
        f"{existing:,} existing rows"
    )
    if flagged:
        worst = flagged[0]
        head += f" (most detrimental: row {worst['row']}, percentile {worst['percentile']:.1f})"
    reasons = [head]
    if flagged:
        listed = ", ".join(
            f"row {r['row']} (percentile {r['percentile']:.1f})" for r in flagged[:LISTED_FLAGGED]
        )
        more = len(flagged) - LISTED_FLAGGED
        reasons.append(
            f"flagged, most detrimental first: {listed}" + (f", and {more:,} more" if more > 0 else "")
        )
    allowed = f"at most {max_flagged:,} may be flagged (max_flagged)"
    reasons.append(f"fail: {allowed}" if verdict == "fail" else f"pass: {allowed}")
    return verdict, reasons


def _warnings(reference: Any, existing: int, threshold: float) -> list[str]:
    out = []
    accuracy = reference.accuracy
    if accuracy is not None:
        counts = np.bincount(reference.labels)
        chance = float(counts.max() / counts.sum())
        if accuracy <= chance + NEAR_CHANCE_MARGIN:
            out.append(
                f"the model predicts {accuracy:.0%} of the {len(reference.labels):,} reference rows correctly, near "
                f"chance ({chance:.0%} by always predicting the most common label): influence scores of a model "
                "that has not learnt the task say little about the rows"
            )
    if existing < FEW_EXISTING_ROWS:
        out.append(
            f"only {existing:,} existing rows: a percentile moves in steps of {100 / existing:.2g}"
            + (
                ", so only rows that score below every existing row can be flagged"
                if threshold * existing / 100 <= 1
                else ""
            )
        )
    return out


def _read_batch(run: JobRun) -> list[dict[str, Any]]:
    """The normalised batch the API stored, checked against the sha256 in the job's params."""
    info = run.params["batch"]
    path = run.directory / info["file"]
    try:
        data = path.read_bytes()
    except OSError:
        raise Conflict(f"the batch of check {run.job_id!r} is missing; submit it again") from None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise Conflict(f"the batch of check {run.job_id!r} is corrupted (checksum mismatch); submit it again")
    return [json.loads(line) for line in data.splitlines()]


@dataclass
class _Loaded:
    index: Index
    model: RegisteredModel
    dataset: Dataset


def _load(run: JobRun) -> _Loaded:
    with run.session() as session:
        index = session.get(Index, run.target_id)
        if index is None:  # deleted: the delete cancelled this job
            raise JobCancelled(run.job_id)
        model, dataset = index_sources(session, index)
        for item in (index, model, dataset):
            session.expunge(item)
    return _Loaded(index, model, dataset)


def _examples(rows: Sequence[Mapping[str, Any]]) -> list:
    from influence.data import Example

    return [Example(text=r["text"], label=r["label"], text_pair=r.get("text_pair")) for r in rows]


def _score(
    run: JobRun, loaded: _Loaded, batch: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Stage 1: the outcome (verdict, reasons, warnings, summary, rows) and the batch's float32 features (every
    layer of the store when the check may append, in the store's order; else the scored layers)."""
    from app.services.queries import index_estimators
    from app.services.references import (
        featurize_for_index,
        featurize_reference,
        load_reference,
        open_index_store,
    )
    from influence import LazyScores, aggregate

    started = time.perf_counter()
    params, settings, ctx = run.params, run.settings, run.ctx
    layers: list[str] = list(params["layers"])
    method, vote_k = params["aggregation"], float(params["vote_k"])
    store = open_index_store(settings, loaded.index)
    with run.session() as session:
        reference_examples = load_reference(settings, session, params["reference"])
    b, m, u_count = len(batch), len(reference_examples), len(layers)
    total = _total_steps(b, m, u_count, bool(params["append"]))
    # Every layer of the store when the rows may join it (it holds them all), else the scored ones only.
    feature_layers = list(store.layers) if params["append"] else layers
    batch_features = featurize_for_index(
        settings,
        ctx.models,
        ctx.device,
        store,
        loaded.model,
        loaded.dataset,
        _examples(batch),
        feature_layers,
        progress=lambda done, _: run.progress(done, total),
    )
    reference = featurize_reference(
        settings,
        ctx.models,
        ctx.device,
        store,
        loaded.model,
        loaded.dataset,
        reference_examples,
        layers,
        progress=lambda done, _: run.progress(b + done, total),
    )
    correct = reference.correct if params["correct_only"] else None
    if correct is not None and not correct.any():
        raise Conflict(
            f"correct_only: the model predicts none of the {m:,} reference rows correctly, so no reference row votes"
        )
    voters = np.flatnonzero(correct) if correct is not None else np.arange(m)
    stored, norms = as_stored({name: batch_features.features[name] for name in layers}, store.manifest.dtype)
    existing = _existing_positions(run, loaded, store)
    n_existing = len(existing)
    scores = LazyScores(
        {name: union_rows(store.layer(name), existing, stored[name]) for name in layers},
        reference.features,
        index_estimators(store, layers, params["estimator"]),
        {name: np.concatenate([np.asarray(store.norms(name))[existing], norms[name]]) for name in layers},
    )
    layer_aggregates = np.empty((n_existing + b, u_count), dtype=np.float64)
    layer_scores = np.empty((b, u_count), dtype=np.float64)
    for u in range(u_count):
        block = scores.layer_scores(u).cpu().numpy()  # (n_existing + b, m)
        layer_aggregates[:, u] = aggregate(block[:, None, :], method, vote_k=vote_k, correct=correct)
        layer_scores[:, u] = block[n_existing:][:, voters].astype(np.float64).mean(axis=1)
        run.progress(b + m + u + 1, total)
    aggregated = aggregate(scores, method, vote_k=vote_k, correct=correct)
    rank = percentiles(aggregated[:n_existing], aggregated[n_existing:])
    layer_ranks = np.stack(
        [
            percentiles(layer_aggregates[:n_existing, u], layer_aggregates[n_existing:, u])
            for u in range(u_count)
        ],
        axis=1,
    )
    threshold = float(params["threshold_percentile"])
    rows = []
    for i, row in enumerate(batch):
        rows.append(
            {
                "row": i,
                "text": row["text"],
                "text_pair": row.get("text_pair"),
                "label": row["label"],
                "score": float(aggregated[n_existing + i]),
                "percentile": float(rank[i]),
                "flagged": bool(rank[i] < threshold),
                "layers": [
                    {
                        "layer": name,
                        "score": float(layer_scores[i, u]),
                        "aggregate": float(layer_aggregates[n_existing + i, u]),
                        "percentile": float(layer_ranks[i, u]),
                    }
                    for u, name in enumerate(layers)
                ],
            }
        )
    verdict, reasons = verdict_reasons(rows, n_existing, threshold, int(params["max_flagged"]))
    summary = {
        "rows": b,
        "existing_rows": n_existing,
        "flagged": sum(1 for row in rows if row["flagged"]),
        "threshold_percentile": threshold,
        "max_flagged": int(params["max_flagged"]),
        "layers": layers,
        "estimator": params["estimator"],
        "aggregation": method,
        "vote_k": vote_k,
        "correct_only": bool(params["correct_only"]),
        "reference": {
            "rows": m,
            "voters": len(voters),
            "accuracy": reference.accuracy,
            "correct": None if reference.correct is None else int(reference.correct.sum()),
        },
        "percentile_rule": TIE_RULE,
        "seconds": round(time.perf_counter() - started, 3),
    }
    outcome = {
        "verdict": verdict,
        "reasons": reasons,
        "warnings": _warnings(reference, n_existing, threshold),
        "summary": summary,
        "rows": rows,
    }
    return outcome, {name: batch_features.features[name] for name in feature_layers}


def _existing_positions(run: JobRun, loaded: _Loaded, store: Any) -> np.ndarray:
    """Store positions of the existing live rows the batch is compared with: a rerun that finds its own rows
    appended already (it died after the append began, and must score again) leaves them out."""
    from app.services.appends import recorded_append

    live = store.live_positions()
    own = recorded_append(run.settings, loaded.dataset, run.job_id)
    if own is None:
        return live
    row_ids = store.row_ids()[live]
    return live[(row_ids < own[0]) | (row_ids >= own[1])]


def _load_outcome(run: JobRun) -> dict[str, Any] | None:
    """check.json of an earlier attempt of this job (it is written whole or not at all), registered again."""
    path = run.directory / RESULT_FILE
    try:
        outcome = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(outcome, dict) or outcome.get("verdict") not in ("pass", "fail"):
        return None
    run.artifacts[RESULT_FILE] = dataset_files.sha256_file(path)
    return outcome


def _save_features(run: JobRun, features: Mapping[str, np.ndarray]) -> None:
    """Keep the features of every store layer (keyed by their position in the store's layer order)."""
    from influence.featurize import feature_arrays

    with runners.atomic_path(run.directory / FEATURES_FILE) as tmp, open(tmp, "wb") as out:
        np.savez(out, **feature_arrays({f"layer_{u}": values for u, values in enumerate(features.values())}))


def _append_features(run: JobRun, loaded: _Loaded, batch: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The batch's float32 features for every store layer: those scored in stage 1 (saved), or computed again
    the same way when that file is gone."""
    from app.services.references import featurize_for_index, open_index_store
    from influence.errors import InvalidInputError
    from influence.featurize import features_from_arrays

    store = open_index_store(run.settings, loaded.index)
    layers = list(store.layers)
    with contextlib.suppress(OSError, ValueError, KeyError, InvalidInputError):
        with np.load(run.directory / FEATURES_FILE, allow_pickle=False) as saved:
            by_position = features_from_arrays(saved, [f"layer_{u}" for u in range(len(layers))])
        features = {name: by_position[f"layer_{u}"] for u, name in enumerate(layers)}
        if all(features[name].shape == (len(batch), store.layer_spec(name).dim) for name in layers):
            return features
    computed = featurize_for_index(
        run.settings,
        run.ctx.models,
        run.ctx.device,
        store,
        loaded.model,
        loaded.dataset,
        _examples(batch),
        layers,
    )
    return {name: computed.features[name] for name in layers}


@job_runner(CHECK)
def run_check(run: JobRun) -> dict[str, Any]:
    """The batch_check runner: stage 1 (scoring, resumed from check.json), stage 2 (append on pass)."""
    from app.services.appends import AppendRefused, IndexDeleted, append_rows

    params = run.params
    batch = _read_batch(run)
    loaded = _load(run)
    outcome = _load_outcome(run)
    if outcome is None:
        outcome, features = _score(run, loaded, batch)
        if params["append"] and outcome["verdict"] == "pass":
            _save_features(run, features)
        run.write_json(RESULT_FILE, outcome)
    append: dict[str, Any] = {"requested": bool(params["append"]), "status": "not-requested"}
    appended = 0
    if params["append"] and outcome["verdict"] == "fail":
        append.update(status="skipped", reason="the verdict is fail: a failed batch never enters the index")
    elif params["append"]:
        # The last point where a cancel is honoured: an append that has started completes.
        total = _total_steps(
            len(batch), int(outcome["summary"]["reference"]["rows"]), len(params["layers"]), True
        )
        run.progress(total - 1, total)
        try:
            result = append_rows(
                run.ctx,
                job_id=run.job_id,
                index_id=loaded.index.id,
                dataset_id=loaded.dataset.id,
                rows=batch,
                features=lambda: _append_features(run, loaded, batch),
            )
        except AppendRefused as exc:
            append.update(status="refused", reason=str(exc))
        except IndexDeleted:
            raise JobCancelled(run.job_id) from None
        else:
            appended = len(batch)
            append.update(
                status="appended",
                dataset_rows=list(result.dataset_rows),
                index_rows=result.index_rows,
            )
        with contextlib.suppress(FileNotFoundError):
            (run.directory / FEATURES_FILE).unlink()
    return {
        "verdict": outcome["verdict"],
        "reasons": outcome["reasons"],
        "warnings": outcome["warnings"],
        "summary": outcome["summary"],
        "appended": appended,
        "append": append,
    }
