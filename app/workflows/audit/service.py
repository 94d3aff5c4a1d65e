"""Audits, the API side: every live training row of an index ranked against a reference set, most detrimental
first. The job's runner (the worker side) is app/workflows/audit/runner.py.

Created (`create_audit`): the index is this tenant's and ready, the layers are among the index's, the reference
set is resolved (references.resolve_reference), the raw score tensor it would produce fits
max_score_tensor_bytes, and a fitted estimator's statistics are in the index; the job (kind `audit`, target the
index) is queued once committed.

Served: GET /v1/audits/{id}/rows (pages, CSV, JSONL: rows joined with the dataset's texts) and
/v1/audits/{id}/scores (the safetensors file), each artifact's checksum verified first (409 if corrupted). The
runner writes both files: `ranking.npy` (an array of `ranking_dtype`, in rank order) and `scores.safetensors`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, Invalid
from app.jobs import state as job_state
from app.jobs.kinds import AUDIT
from app.jobs.resources import artifact_path, get_workflow_job
from app.models import Dataset, Index, Job
from app.services.datasets import read_rows
from app.services.index_settings import WORKFLOW_FIELDS, named_fields, resolve_settings
from app.services.indexes import get_index, index_sources, require_index_capacity, require_ready
from app.services.noisy import default_noisy, resolve_noisy
from app.services.queries.layers import select_query_layers
from app.services.references import resolve_reference
from app.stores import job_dir, open_store
from app.workflows.audit.schemas import AuditCreate, AuditReview
from influence.errors import InfluenceError

# The estimator registry and the store's statistics keys: what an estimator needs, read, nothing computed.
from influence.estimators import estimator_class
from influence.statistics import missing_statistics

SCORES_FILE = "scores.safetensors"
RANKING_FILE = "ranking.npy"
MAX_PAGE_ROWS = 1000
EXPORT_BLOCK_ROWS = 500


# ---------------------------------------------------------------------------------------------- creating


def _reference_size(spec: dict[str, Any]) -> int:
    if spec.get("examples") is not None:
        return len(spec["examples"])
    return len(spec["rows"]) if spec.get("rows") is not None else int(spec["limit"])


def create_audit(
    session: Session,
    settings: Settings,
    queue: job_state.JobQueue,
    index_id: str,
    body: AuditCreate,
    tenant_id: str,
) -> Job:
    """Check an audit request cheaply and queue its job (409: index not ready; 422: layers, reference, size)."""
    index = get_index(session, index_id, tenant_id)
    model, dataset = index_sources(session, index)
    resolved = resolve_settings(session, settings, index, named_fields(body, WORKFLOW_FIELDS), kind="audit")
    if resolved.correct_only and model.task != "classification":
        raise Invalid(
            "correct_only needs a classification model (it keeps the reference rows the model predicts "
            f"correctly); model {model.id!r} is {model.task}"
        )
    require_ready(index)
    require_index_capacity(settings, model, index)
    layers = select_query_layers(index, model, resolved.layers)
    reference = resolve_reference(
        session, settings, body.reference, tenant_id=tenant_id, model=model, trained=dataset
    )
    m = _reference_size(reference)
    size = int(index.num_rows) * len(layers) * m * 4
    if size > settings.max_score_tensor_bytes:
        raise Invalid(
            f"the score tensor would take {size:,} bytes ({index.num_rows} rows x {len(layers)} layers x {m} "
            f"reference rows x 4 bytes), over the limit of {settings.max_score_tensor_bytes:,} "
            "(max_score_tensor_bytes): choose fewer layers or reference rows"
        )
    _require_statistics(settings, index, layers, resolved.estimator)
    review = _review(settings, index, dataset, body.review)
    params = {
        "reference": reference,
        "num_reference": m,
        "layer_selector": resolved.layers,
        "layers": layers,
        "estimator": resolved.estimator,
        "aggregation": resolved.aggregation,
        "correct_only": resolved.correct_only,
        "vote_k": resolved.vote_k,
        "dataset_id": dataset.id,
        "settings_source": resolved.source,
        "settings": resolved.as_dict(),
        "review": review,
    }
    total = total_steps(m, len(layers))
    return job_state.submit_job(
        session, settings, queue, AUDIT, tenant_id=tenant_id, target_id=index.id, params=params, total=total
    )


def _review(
    settings: Settings, index: Index, dataset: Dataset, review: AuditReview | None
) -> dict[str, Any] | None:
    """The review prefix's request for the runner: {target_recall, noisy spec}; 422 naming review.noisy when
    there is no mask to measure recall against."""
    if review is None:
        return None
    given = review.noisy if "noisy" in review.model_fields_set else default_noisy(dataset)
    noisy = resolve_noisy(settings, index, dataset, given, field="review.noisy")
    if noisy is None:
        raise Invalid(
            f"review.noisy: a review prefix needs a noisy mask to measure recall against, and dataset "
            f'{dataset.id!r} has no noisy column; pass review.noisy: {{"rows": [...]}} with the noisy row ids'
        )
    return {"target_recall": review.target_recall, "noisy": noisy}


def total_steps(m: int, num_layers: int) -> int:
    """Progress units: reference rows featurized, layers scored, the aggregation, the ranking written."""
    return m + num_layers + 2


def _require_statistics(settings: Settings, index: Index, layers: Sequence[str], estimator: str) -> None:
    """409 when the estimator scores with fitted statistics that some of the layers lack (422 for an unknown
    estimator: estimator_class names the registered ones)."""
    if not estimator_class(estimator).requires_fit:
        return
    missing = missing_statistics(open_store(settings, index), layers, estimator)
    if missing:
        raise Conflict(
            f"index {index.id!r} has no {estimator} statistics for layers {missing[:5]}; compact or rebuild it "
            f"to audit with {estimator}"
        )


# ------------------------------------------------------------------------------------------------ reading


def rows_deleted_since(session: Session, settings: Settings, job: Job) -> int | None:
    """How many of a finished audit's rows were deleted from its index since it ran (None when unknowable:
    the audit did not succeed, the index is gone or not ready, or the files cannot be read)."""
    if job.status != "succeeded" or not job.target_id:
        return None
    index = session.get(Index, job.target_id)
    if index is None or index.status != "ready":
        return None
    try:
        store = open_store(settings, index)
        live = store.row_ids()[store.live_positions()]
        audited = np.load(job_dir(settings, job.id) / RANKING_FILE, mmap_mode="r", allow_pickle=False)
        return int(np.isin(np.asarray(audited["row"]), live, invert=True).sum())
    except (OSError, ValueError, KeyError, InfluenceError):
        return None


def _finished_audit(session: Session, audit_id: str, tenant_id: str) -> Job:
    """This tenant's audit, once it has succeeded (409 while queued or running, or when it failed)."""
    job = get_workflow_job(session, audit_id, tenant_id, AUDIT)
    if job.status != "succeeded":
        why = f": {job.error}" if job.error else ""
        follow = "; follow its job" if job.status in job_state.ACTIVE else ""
        raise Conflict(f"audit {job.id!r} is {job.status}{why}{follow}")
    return job


def scores_file(session: Session, settings: Settings, audit_id: str, tenant_id: str) -> Path:
    """The audit's score tensor file, its checksum verified (409 if unfinished, missing or corrupted)."""
    return artifact_path(settings, _finished_audit(session, audit_id, tenant_id), SCORES_FILE)


def ranking_dtype(num_layers: int) -> np.dtype:
    """The ranking file's rows: a training row, its aggregated score, and per layer its mean score over the
    voters, its own aggregate and its rank by that aggregate alone."""
    return np.dtype(
        [
            ("row", "<i8"),
            ("score", "<f8"),
            ("layer_score", "<f8", (num_layers,)),
            ("layer_aggregate", "<f8", (num_layers,)),
            ("layer_rank", "<i8", (num_layers,)),
        ]
    )


def _label_name(label: Any, names: Sequence[str] | None) -> str | None:
    if names and isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return names[label]
    return None


def _dataset_row(settings: Settings, dataset: Dataset, row_id: int) -> dict[str, Any] | None:
    rows = read_rows(settings, dataset, int(row_id), 1) if 0 <= row_id < dataset.row_count else []
    return rows[0] if rows else None


@dataclass
class RankedRows:
    """A finished audit's ranking opened for reading (memory-mapped), with the dataset its rows are joined
    with."""

    settings: Settings
    audit_id: str
    ranking: np.ndarray  # the structured array of ranking_dtype, in rank order
    dataset: Dataset
    layers: list[str]
    estimator: str
    aggregation: str
    review_rows: int | None = None  # the review prefix's length, when the audit was asked for one

    def __len__(self) -> int:
        return len(self.ranking)

    def length(self, review: bool) -> int:
        """Rows served: the whole ranking, or its review prefix (409 when the audit has none)."""
        if not review:
            return len(self)
        if self.review_rows is None:
            raise Conflict(
                f"audit {self.audit_id!r} has no review prefix; make an audit with review: {{target_recall}} to "
                "have one"
            )
        return min(len(self), self.review_rows)

    def records(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Rows [start, stop) of the ranking as AuditRow dicts."""
        names = self.dataset.label_names
        block = np.array(self.ranking[start:stop])
        for i, record in enumerate(block):
            row_id = int(record["row"])
            row = _dataset_row(self.settings, self.dataset, row_id) or {}
            label = row.get("label")
            yield {
                "rank": start + i,
                "row": row_id,
                "score": float(record["score"]),
                "text": row.get("text"),
                "text_pair": row.get("text_pair"),
                "label": label,
                "label_name": _label_name(label, names),
                "noisy": row.get("noisy"),
                "layers": [
                    {
                        "layer": name,
                        "score": float(record["layer_score"][u]),
                        "aggregate": float(record["layer_aggregate"][u]),
                        "rank": int(record["layer_rank"][u]),
                    }
                    for u, name in enumerate(self.layers)
                ],
            }


def open_ranking(session: Session, settings: Settings, audit_id: str, tenant_id: str) -> RankedRows:
    """A finished audit's ranking, its checksum verified (409 if unfinished, missing or corrupted), and the
    dataset its rows come from (409 if that dataset is gone or its rows unreadable)."""
    job = _finished_audit(session, audit_id, tenant_id)
    path = artifact_path(settings, job, RANKING_FILE)
    summary = (job.result or {}).get("summary") or {}
    layers = list(summary.get("layers") or job.params.get("layers") or [])
    ranking = np.load(path, mmap_mode="r", allow_pickle=False)
    if ranking.dtype != ranking_dtype(len(layers)) or ranking.shape != (summary.get("num_rows"),):
        raise Conflict(f"the ranking of audit {job.id!r} does not match its summary; run the audit again")
    dataset_id = summary.get("dataset_id") or job.params.get("dataset_id")
    dataset = session.get(Dataset, dataset_id) if dataset_id else None
    if dataset is None or dataset.tenant_id != job.tenant_id:
        raise Conflict(
            f"the dataset of audit {job.id!r} was deleted: its rows' texts are gone (the raw scores are still "
            f"at GET /v1/audits/{job.id}/scores)"
        )
    if dataset.row_count:  # missing or corrupted rows: 409 now, not halfway through a download
        read_rows(settings, dataset, 0, 1)
    session.expunge(dataset)  # read after the request's session has closed (downloads stream)
    review = summary.get("review")
    review_rows = review.get("rows") if isinstance(review, dict) else None
    return RankedRows(
        settings=settings,
        audit_id=job.id,
        ranking=ranking,
        dataset=dataset,
        layers=layers,
        estimator=str(summary.get("estimator")),
        aggregation=str(summary.get("aggregation")),
        review_rows=int(review_rows) if isinstance(review_rows, int) else None,
    )


def rows_page(
    session: Session,
    settings: Settings,
    audit_id: str,
    tenant_id: str,
    offset: int,
    limit: int,
    review: bool = False,
) -> dict[str, Any]:
    """A page of the ranking, or of its review prefix (AuditRowsPage as a dict)."""
    if limit > MAX_PAGE_ROWS:
        raise Invalid(
            f"limit {limit} is over {MAX_PAGE_ROWS} rows per page; use format=csv or jsonl for all rows"
        )
    ranked = open_ranking(session, settings, audit_id, tenant_id)
    total = ranked.length(review)
    stop = min(total, offset + limit)
    return {
        "items": list(ranked.records(offset, stop)) if offset < stop else [],
        "total": total,
        "review": review,
        "offset": offset,
        "limit": limit,
        "layers": ranked.layers,
        "estimator": ranked.estimator,
        "aggregation": ranked.aggregation,
    }


# ---------------------------------------------------------------------------------------------- downloads


# The CSV columns that hold text (the dataset's texts and names, and a causal LM's completion in `label`): a
# spreadsheet evaluates a cell that starts with one of FORMULA_PREFIXES, so such a cell is written with a
# leading apostrophe (OWASP's CSV-injection rule). Every other column is a number, written as one: a negative
# score stays a number. JSON pages and JSONL keep the raw values.
CSV_TEXT_COLUMNS = ("text", "text_pair", "label", "label_name")
CSV_COLUMNS = ("rank", "row", "score", "text", "text_pair", "label", "label_name", "noisy")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralize_cell(value: str) -> str:
    """A text cell as a spreadsheet shows it literally: prefixed with `'` when it could start a formula."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def _csv_header(layers: Sequence[str]) -> list[str]:
    columns = list(CSV_COLUMNS)
    for name in layers:
        columns += [f"{name}:score", f"{name}:aggregate", f"{name}:rank"]
    return [neutralize_cell(column) for column in columns]  # layer names come from the model's modules


def _csv_cells(record: dict[str, Any]) -> list[Any]:
    def cell(key: str) -> Any:
        value = record[key]
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if key in CSV_TEXT_COLUMNS and isinstance(value, str):
            return neutralize_cell(value)
        return value  # floats print as their shortest round-trip repr

    cells = [cell(key) for key in CSV_COLUMNS]
    for layer in record["layers"]:
        cells += [layer["score"], layer["aggregate"], layer["rank"]]
    return cells


def export_rows(
    session: Session,
    settings: Settings,
    audit_id: str,
    tenant_id: str,
    fmt: str,
    offset: int,
    limit: int | None,
    review: bool = False,
) -> tuple[Iterator[bytes], str, str]:
    """The ranking or its review prefix (every row, or the [offset, offset + limit) slice) as CSV or JSONL,
    streamed in blocks: (chunks, media type, file name). Everything that can fail is checked before the first
    chunk. CSV text cells are neutralized against formulas (neutralize_cell); JSONL carries the raw values."""
    ranked = open_ranking(session, settings, audit_id, tenant_id)
    total = ranked.length(review)
    stop = total if limit is None else min(total, offset + limit)

    def csv_chunks() -> Iterator[bytes]:
        out = io.StringIO()
        # CRLF rows (RFC 4180): the writer then quotes every cell holding a CR or an LF, so a text with a bare
        # carriage return cannot split its row.
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(_csv_header(ranked.layers))
        for start in range(offset, max(offset, stop), EXPORT_BLOCK_ROWS):
            for record in ranked.records(start, min(stop, start + EXPORT_BLOCK_ROWS)):
                writer.writerow(_csv_cells(record))
            yield out.getvalue().encode("utf-8")
            out.seek(0)
            out.truncate()
        if out.tell():
            yield out.getvalue().encode("utf-8")

    def jsonl_chunks() -> Iterator[bytes]:
        for start in range(offset, max(offset, stop), EXPORT_BLOCK_ROWS):
            lines = [
                json.dumps(record, allow_nan=False, ensure_ascii=False)
                for record in ranked.records(start, min(stop, start + EXPORT_BLOCK_ROWS))
            ]
            yield ("\n".join(lines) + "\n").encode("utf-8")

    if fmt == "csv":
        return csv_chunks(), "text/csv; charset=utf-8", f"audit-{ranked.audit_id}-rows.csv"
    if fmt == "jsonl":
        return jsonl_chunks(), "application/x-ndjson", f"audit-{ranked.audit_id}-rows.jsonl"
    raise Invalid(f"unknown format {fmt!r}; expected json, csv or jsonl")
