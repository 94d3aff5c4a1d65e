"""Audits: every live training row of an index ranked against a reference set, most detrimental first.

In the API (`create_audit`): the index is this tenant's and ready, the layers are among the index's, the
reference set is resolved (references.resolve_reference), and the raw score tensor it would produce fits
max_score_tensor_bytes; the job (kind `audit`, target the index) is queued once committed.

In the worker (`run_audit`, registered with runners.job_runner):
  1. open the index's store (every checksum verified) and featurize the reference with the index's projection
     (references.featurize_reference: the query code path), recording which reference rows the model
     predicts correctly;
  2. per layer u: score every store row against every reference row (influence.score_layer, the estimator
     restored from the index), keep the LIVE rows (tombstoned rows appear nowhere: not in the tensor, not in
     any rank), write the (n, m) block into the safetensors file's (n, U, m) tensor, which is memory-mapped,
     so the tensor is never held in memory, and aggregate the layer's own voters (its contribution);
  3. aggregate the whole tensor with influence.aggregate, read back from that file (the library's
     computation on exactly the stored tensor), and order rows by ascending aggregated score, ties by row id;
  4. write `ranking.npy` (a structured array in rank order: row, score, per-layer mean score, aggregate and
     rank) and `scores.safetensors`, each whole-or-not-at-all with its sha256 (JobRun.write_file), and return
     the summary: sizes, reference accuracy, the top rows, the projection's fidelity on the layers scored
     (measured at build time; a warning when a layer ranks rows unlike its exact gradients) and, when the
     dataset flags noise, NDR@30 and AUC-NDR of this ranking against the random baseline.
A rerun (a worker killed mid-audit, recovered) recomputes everything from the same inputs: the same result.

Served: GET /v1/audits/{id}/rows (pages, CSV, JSONL: rows joined with the dataset's texts) and
/v1/audits/{id}/scores (the safetensors file), each artifact's checksum verified first (409 if corrupted).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, Invalid
from app.models import Dataset, Index, Job
from app.schemas.audits import AuditCreate
from app.services import jobs as job_service
from app.services import runners
from app.services.datasets import iter_rows, read_rows
from app.services.indexes import get_index, require_ready
from app.services.pipelines import index_sources, store_dir
from app.services.references import featurize_reference, load_reference, open_index_store, resolve_reference
from app.services.runners import JobRun, job_runner

AUDIT = "audit"
SCORES_FILE = "scores.safetensors"
RANKING_FILE = "ranking.npy"
TOP_ROWS = 10
MAX_PAGE_ROWS = 1000
EXPORT_BLOCK_ROWS = 500
SCORES_CONVENTION = (
    "scores[i, u, j] = influence of training row row_ids[i] on reference row j in layer layers[u]; "
    "> 0 helps the reference prediction. reference_correct[j] = 1 when the model predicts reference row j "
    "correctly (classification)."
)


# ------------------------------------------------------------------------------------------------- API


def _reference_size(spec: dict[str, Any]) -> int:
    if spec.get("examples") is not None:
        return len(spec["examples"])
    return len(spec["rows"]) if spec.get("rows") is not None else int(spec["limit"])


def create_audit(
    session: Session,
    settings: Settings,
    queue: job_service.JobQueue,
    index_id: str,
    body: AuditCreate,
    tenant_id: str,
) -> Job:
    """Check an audit request cheaply and queue its job (409: index not ready; 422: layers, reference, size)."""
    from app.services.queries import select_query_layers

    index = get_index(session, index_id, tenant_id)
    model, dataset = index_sources(session, index)
    if body.correct_only and model.task != "classification":
        raise Invalid(
            "correct_only needs a classification model (it keeps the reference rows the model predicts "
            f"correctly); model {model.id!r} is {model.task}"
        )
    require_ready(index)
    layers = select_query_layers(index, model, body.layers)
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
    if body.estimator == "datainf":
        _require_statistics(settings, index, layers)
    params = {
        "reference": reference,
        "num_reference": m,
        "layer_selector": body.layers,
        "layers": layers,
        "estimator": body.estimator,
        "aggregation": body.aggregation,
        "correct_only": body.correct_only,
        "vote_k": body.vote_k,
        "dataset_id": dataset.id,
    }
    job = job_service.create_job(
        session,
        AUDIT,
        tenant_id=tenant_id,
        target_id=index.id,
        params=params,
        total=_total_steps(m, len(layers)),
        max_active=settings.max_active_jobs_per_tenant,
    )
    job_service.enqueue_after_commit(session, queue, job)
    return job


def _total_steps(m: int, num_layers: int) -> int:
    """Progress units: reference rows featurized, layers scored, the aggregation, the ranking written."""
    return m + num_layers + 2


def _require_statistics(settings: Settings, index: Index, layers: Sequence[str]) -> None:
    from influence import FeatureStore

    store = FeatureStore.open(store_dir(settings, index), verify=False)
    missing = [name for name in layers if not store.has_layer_statistics(name)]
    if missing:
        raise Conflict(
            f"index {index.id!r} has no DataInf statistics for layers {missing[:5]}; compact or rebuild it to "
            "audit with datainf"
        )


def get_audit(session: Session, audit_id: str, tenant_id: str) -> Job:
    return runners.get_workflow_job(session, audit_id, tenant_id, AUDIT)


def list_audits(session: Session, tenant_id: str, offset: int, limit: int) -> tuple[Sequence[Job], int]:
    """A page of this tenant's audits, newest first, and their total."""
    return job_service.list_jobs(session, tenant_id=tenant_id, kind=AUDIT, offset=offset, limit=limit)


def delete_audit(session: Session, settings: Settings, audit_id: str, tenant_id: str) -> None:
    """Delete a finished audit and its files (409 while queued or running: cancel it first)."""
    runners.delete_job_resource(session, settings, get_audit(session, audit_id, tenant_id))


def rows_deleted_since(session: Session, settings: Settings, job: Job) -> int | None:
    """How many of a finished audit's rows were deleted from its index since it ran (None when unknowable:
    the audit did not succeed, the index is gone or not ready, or the files cannot be read)."""
    from influence import FeatureStore, InfluenceError

    if job.status != "succeeded" or not job.target_id:
        return None
    index = session.get(Index, job.target_id)
    if index is None or index.status != "ready":
        return None
    try:
        store = FeatureStore.open(store_dir(settings, index), verify=False)
        live = store.row_ids()[store.live_positions()]
        audited = np.load(runners.job_dir(settings, job.id) / RANKING_FILE, mmap_mode="r", allow_pickle=False)
        return int(np.isin(np.asarray(audited["row"]), live, invert=True).sum())
    except (OSError, ValueError, KeyError, InfluenceError):
        return None


# ------------------------------------------------------------------------------------------- the runner


def _write_safetensors_header(
    handle, tensors: Sequence[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]
) -> dict[str, int]:
    """Write a safetensors header for `tensors` [(name, dtype code, shape, bytes)] laid out in that order,
    size the file for their data, and return each tensor's absolute byte offset in the file.

    The format (huggingface/safetensors): an 8-byte little-endian header length, a JSON header (padded with
    spaces to a multiple of 8, so the data starts aligned), then the tensors' bytes back to back."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    handle.write(len(encoded).to_bytes(8, "little"))
    handle.write(encoded)
    data_start = 8 + len(encoded)
    handle.truncate(data_start + offset)
    starts, position = {}, data_start
    for name, _, _, nbytes in tensors:
        starts[name] = position
        position += nbytes
    return starts


@dataclass
class _Computed:
    """What the scoring pass produced, rows in store order (live rows only)."""

    row_ids: np.ndarray  # (n,) int64
    aggregated: np.ndarray  # (n,) float64
    layer_score: np.ndarray  # (n, U) float64 mean over the voters
    layer_aggregate: np.ndarray  # (n, U) float64


def _ranking_dtype(num_layers: int) -> np.dtype:
    return np.dtype(
        [
            ("row", "<i8"),
            ("score", "<f8"),
            ("layer_score", "<f8", (num_layers,)),
            ("layer_aggregate", "<f8", (num_layers,)),
            ("layer_rank", "<i8", (num_layers,)),
        ]
    )


def _order(values: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Ascending values, ties by ascending row id: a total, deterministic order."""
    return np.lexsort((row_ids, values))


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed attempt left (run_job holds the job's lock: no live process writes them)."""
    if directory.is_dir():
        for path in directory.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _label_name(label: Any, names: Sequence[str] | None) -> str | None:
    if names and isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return names[label]
    return None


def _dataset_row(settings: Settings, dataset: Dataset, row_id: int) -> dict[str, Any] | None:
    rows = read_rows(settings, dataset, int(row_id), 1) if 0 <= row_id < dataset.row_count else []
    return rows[0] if rows else None


def _score_layers(
    run: JobRun,
    store,
    reference,
    layers: list[str],
    correct: np.ndarray | None,
    total: int,
    scores_path: Path,
    metadata: dict[str, str],
) -> _Computed:
    """Steps 2 and 3 of the module docstring: the tensor written to `scores_path`, the aggregates returned."""
    from app.services.queries import index_estimators
    from influence import aggregate, score_layer
    from influence.aggregation import EXACTLY_COMBINABLE, combine_layer_aggregates

    params = run.params
    method, vote_k = params["aggregation"], float(params["vote_k"])
    estimators = index_estimators(store, layers, params["estimator"])
    live = store.live_positions()
    some_deleted = len(live) < store.num_rows
    row_ids = np.array(store.row_ids()[live], dtype=np.int64)
    n, num_layers, m = len(live), len(layers), len(reference.examples)
    voters = np.arange(m) if correct is None else np.flatnonzero(correct)
    reference_correct = (
        np.zeros(m, dtype=np.uint8) if reference.correct is None else reference.correct.astype(np.uint8)
    )
    layout = [
        ("row_ids", "I64", (n,), n * 8),
        ("scores", "F32", (n, num_layers, m), n * num_layers * m * 4),
        ("reference_correct", "U8", (m,), m),
    ]
    with open(scores_path, "wb") as handle:
        starts = _write_safetensors_header(handle, layout, metadata)
    np.memmap(scores_path, dtype="<i8", mode="r+", offset=starts["row_ids"], shape=(n,))[:] = row_ids
    np.memmap(scores_path, dtype="u1", mode="r+", offset=starts["reference_correct"], shape=(m,))[:] = (
        reference_correct
    )
    tensor = np.memmap(scores_path, dtype="<f4", mode="r+", offset=starts["scores"], shape=(n, num_layers, m))
    layer_score = np.empty((n, num_layers), dtype=np.float64)
    layer_aggregate = np.empty((n, num_layers), dtype=np.float64)
    for u, name in enumerate(layers):
        block = score_layer(
            store.layer(name),
            reference.features[name],
            estimators[name],
            store.norms(name),
        ).numpy()
        if some_deleted:
            block = block[live]
        if not np.isfinite(block).all():
            raise Invalid(f"layer {name!r} gives non-finite influence scores; audit without it")
        tensor[:, u, :] = block
        layer_aggregate[:, u] = aggregate(block[:, None, :], method, vote_k=vote_k, correct=correct)
        layer_score[:, u] = block[:, voters].mean(axis=1, dtype=np.float64)
        del block
        run.progress(m + u + 1, total)
    tensor.flush()
    del tensor
    if method in EXACTLY_COMBINABLE:
        # rank and vote over all layers follow exactly from each layer's own aggregate (computed above for the
        # per-layer contributions anyway): no second pass of n x U x m sorts.
        aggregated = combine_layer_aggregates(list(layer_aggregate.T), method, len(voters))
    else:
        # Aggregated from the written file: exactly the tensor a downloader gets, read a block at a time.
        stored = np.memmap(
            scores_path, dtype="<f4", mode="r", offset=starts["scores"], shape=(n, num_layers, m)
        )
        aggregated = aggregate(stored, method, vote_k=vote_k, correct=correct)
        del stored
    run.progress(m + num_layers + 1, total)
    return _Computed(row_ids, aggregated, layer_score, layer_aggregate)


def _noise_detection(
    settings: Settings, dataset: Dataset, ranked_rows: np.ndarray, ranked_scores: np.ndarray
) -> dict[str, Any] | None:
    """NDR@p and AUC-NDR of the ranking against the dataset's noisy flags (None without flags)."""
    from influence import (
        DEFAULT_NDR_PERCENTS,
        auc_ndr,
        ndr_at,
        random_baseline_auc_ndr,
        random_baseline_ndr_at,
    )

    if not dataset.has_noisy_flag:
        return None
    flags = np.zeros(dataset.row_count, dtype=bool)
    for position, row in enumerate(iter_rows(settings, dataset)):
        flags[position] = bool(row.get("noisy"))
    noisy = flags[ranked_rows]
    count = int(noisy.sum())
    if count == 0:
        return {
            "noisy_rows": 0,
            "ndr_at_30": None,
            "auc_ndr": None,
            "random_ndr_at_30": None,
            "random_auc_ndr": None,
            "ndr_at": None,
        }
    # The arrays are in rank order, which already breaks ties by row id: the metrics' stable sort keeps it.
    rates = ndr_at(ranked_scores, noisy, DEFAULT_NDR_PERCENTS)
    n = len(ranked_rows)
    return {
        "noisy_rows": count,
        "ndr_at_30": rates[30],
        "auc_ndr": auc_ndr(ranked_scores, noisy),
        "random_ndr_at_30": random_baseline_ndr_at([30], n)[30],
        "random_auc_ndr": random_baseline_auc_ndr(n, count),
        "ndr_at": {str(p): float(v) for p, v in rates.items()},
    }


@job_runner(AUDIT)
def run_audit(run: JobRun) -> dict[str, Any]:
    """The audit job (see the module docstring); returns its result: {"summary": ...}."""
    from app.services.queries import answer_fidelity

    started = time.perf_counter()
    settings, params = run.settings, run.params
    _remove_stale_temporaries(run.directory)
    with run.session() as session:
        index = session.get(Index, run.target_id) if run.target_id else None
        if index is None:
            raise Conflict("the audit's index was deleted")
        model, dataset = index_sources(session, index)
        store = open_index_store(settings, index)
        examples = load_reference(settings, session, params["reference"])
        for row in (index, model, dataset):
            session.expunge(row)
    layers = list(params["layers"])
    missing = [name for name in layers if name not in store.layers]
    if missing:
        raise Conflict(f"index {index.id!r} no longer holds layers {missing[:5]}; audit again")
    m, num_layers = len(examples), len(layers)
    n = store.num_live_rows
    if n * num_layers * m * 4 > settings.max_score_tensor_bytes:
        raise Invalid(
            f"the score tensor ({n} x {num_layers} x {m} float32) is over {settings.max_score_tensor_bytes:,} "
            "bytes (max_score_tensor_bytes)"
        )
    total = _total_steps(m, num_layers)
    run.progress(0, total)
    reference = featurize_reference(
        settings,
        run.ctx.models,
        run.ctx.device,
        store,
        model,
        dataset,
        examples,
        layers,
        progress=lambda done, _: run.progress(done, total),
    )
    correct = None
    if params["correct_only"]:
        correct = reference.correct
        if correct is None or not correct.any():
            raise Invalid(
                "correct_only: the model predicts none of the reference rows correctly; nothing to aggregate "
                "(audit without correct_only)"
            )
    metadata = {
        "layers": json.dumps(layers),
        "estimator": params["estimator"],
        "aggregation": params["aggregation"],
        "vote_k": repr(float(params["vote_k"])),
        "correct_only": json.dumps(bool(params["correct_only"])),
        "index_id": index.id,
        "dataset_id": dataset.id,
        "audit_id": run.job_id,
        "reference": json.dumps(_reference_description(params["reference"])),
        "convention": SCORES_CONVENTION,
    }
    with run.write_file(SCORES_FILE) as scores_path:
        computed = _score_layers(run, store, reference, layers, correct, total, scores_path, metadata)

    order = _order(computed.aggregated, computed.row_ids)
    ranking = np.empty(n, dtype=_ranking_dtype(num_layers))
    ranking["row"] = computed.row_ids[order]
    ranking["score"] = computed.aggregated[order]
    ranking["layer_score"] = computed.layer_score[order]
    ranking["layer_aggregate"] = computed.layer_aggregate[order]
    layer_rank = np.empty((n, num_layers), dtype=np.int64)
    for u in range(num_layers):
        layer_rank[_order(computed.layer_aggregate[:, u], computed.row_ids), u] = np.arange(n)
    ranking["layer_rank"] = layer_rank[order]
    with run.write_file(RANKING_FILE) as ranking_path, open(ranking_path, "wb") as handle:
        np.save(handle, ranking, allow_pickle=False)
    run.progress(total, total)

    names = dataset.label_names
    top = []
    for rank in range(min(TOP_ROWS, n)):
        row = _dataset_row(settings, dataset, int(ranking["row"][rank])) or {}
        top.append(
            {
                "rank": rank,
                "row": int(ranking["row"][rank]),
                "score": float(ranking["score"][rank]),
                "text": row.get("text"),
                "label": row.get("label"),
                "label_name": _label_name(row.get("label"), names),
                "noisy": row.get("noisy"),
            }
        )
    correct_all = reference.correct
    summary = {
        "num_rows": n,
        "layers": layers,
        "num_reference": m,
        "reference_accuracy": reference.accuracy,
        "correct_reference": None if correct_all is None else int(correct_all.sum()),
        "num_voters": num_layers * (m if correct is None else int(correct.sum())),
        "estimator": params["estimator"],
        "aggregation": params["aggregation"],
        "correct_only": bool(params["correct_only"]),
        "vote_k": float(params["vote_k"]),
        "dataset_id": dataset.id,
        "index_deleted_rows_at_audit": int(store.num_rows - n),
        "top": top,
        "noise": _noise_detection(settings, dataset, ranking["row"], ranking["score"]),
        "score_tensor_bytes": n * num_layers * m * 4,
        **answer_fidelity(index, layers),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return {"summary": summary}


def _reference_description(spec: dict[str, Any]) -> dict[str, Any]:
    """Which rows the m axis of the tensor is (dataset rows), or that it is the request's inline examples."""
    if spec.get("examples") is not None:
        return {"examples": len(spec["examples"])}
    rows = spec["rows"] if spec.get("rows") is not None else list(range(int(spec["limit"])))
    return {"dataset_id": spec["dataset_id"], "rows": rows}


# ---------------------------------------------------------------------------------------- serving rows


def _finished(job: Job) -> None:
    if job.status != "succeeded":
        why = f": {job.error}" if job.error else ""
        follow = "; follow its job" if job.status in job_service.ACTIVE else ""
        raise Conflict(f"audit {job.id!r} is {job.status}{why}{follow}")


def scores_file(session: Session, settings: Settings, audit_id: str, tenant_id: str) -> Path:
    """The audit's score tensor file, its checksum verified (409 if unfinished, missing or corrupted)."""
    job = get_audit(session, audit_id, tenant_id)
    _finished(job)
    return runners.artifact_path(settings, job, SCORES_FILE)


@dataclass
class RankedRows:
    """A finished audit's ranking opened for reading (memory-mapped), with what its rows are joined with."""

    settings: Settings
    audit_id: str
    ranking: np.ndarray  # the structured array of _ranking_dtype, in rank order
    dataset: Dataset | None
    layers: list[str]
    estimator: str
    aggregation: str

    def __len__(self) -> int:
        return len(self.ranking)

    def records(self, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Rows [start, stop) of the ranking as AuditRow dicts."""
        names = self.dataset.label_names if self.dataset is not None else None
        block = np.array(self.ranking[start:stop])
        for i, record in enumerate(block):
            row_id = int(record["row"])
            row = (
                _dataset_row(self.settings, self.dataset, row_id) if self.dataset is not None else None
            ) or {}
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
    job = get_audit(session, audit_id, tenant_id)
    _finished(job)
    path = runners.artifact_path(settings, job, RANKING_FILE)
    summary = (job.result or {}).get("summary") or {}
    layers = list(summary.get("layers") or job.params.get("layers") or [])
    ranking = np.load(path, mmap_mode="r", allow_pickle=False)
    if ranking.dtype != _ranking_dtype(len(layers)) or ranking.shape != (summary.get("num_rows"),):
        raise Conflict(f"the ranking of audit {job.id!r} does not match its summary; run the audit again")
    dataset_id = summary.get("dataset_id") or job.params.get("dataset_id")
    dataset = session.get(Dataset, dataset_id) if dataset_id else None
    if dataset is None or dataset.tenant_id != job.tenant_id:
        raise Conflict(
            f"the dataset of audit {job.id!r} was deleted: its rows' texts are gone (the raw scores are still "
            f"at GET /v1/audits/{job.id}/scores)"
        )
    if dataset.row_count:
        read_rows(
            settings, dataset, 0, 1
        )  # missing or corrupted rows: 409 now, not halfway through a download
    session.expunge(dataset)  # read after the request's session has closed (downloads stream)
    return RankedRows(
        settings=settings,
        audit_id=job.id,
        ranking=ranking,
        dataset=dataset,
        layers=layers,
        estimator=str(summary.get("estimator")),
        aggregation=str(summary.get("aggregation")),
    )


def rows_page(
    session: Session, settings: Settings, audit_id: str, tenant_id: str, offset: int, limit: int
) -> dict[str, Any]:
    """A page of the ranking (AuditRowsPage as a dict)."""
    if limit > MAX_PAGE_ROWS:
        raise Invalid(
            f"limit {limit} is over {MAX_PAGE_ROWS} rows per page; use format=csv or jsonl for all rows"
        )
    ranked = open_ranking(session, settings, audit_id, tenant_id)
    stop = min(len(ranked), offset + limit)
    return {
        "items": list(ranked.records(offset, stop)) if offset < stop else [],
        "total": len(ranked),
        "offset": offset,
        "limit": limit,
        "layers": ranked.layers,
        "estimator": ranked.estimator,
        "aggregation": ranked.aggregation,
    }


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
) -> tuple[Iterator[bytes], str, str]:
    """The ranking (every row, or the [offset, offset + limit) slice) as CSV or JSONL, streamed in blocks:
    (chunks, media type, file name). Everything that can fail is checked before the first chunk. CSV text
    cells are neutralized against formulas (neutralize_cell); JSONL carries the raw values."""
    ranked = open_ranking(session, settings, audit_id, tenant_id)
    stop = len(ranked) if limit is None else min(len(ranked), offset + limit)

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
