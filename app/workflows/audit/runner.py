"""Audits, the worker side: the `audit` job's runner (`run_audit`, registered with app.jobs.run.job_runner).

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
With params["review"] = {target_recall, noisy: a mask spec of app/services/noisy.py}, the summary's `review` is
the shortest head of the ranking holding target_recall of the known-noisy rows (influence.calibration
.review_prefix), with its expected precision; the mask is read before any scoring, so one too small fails the
audit at once.
A rerun (a worker killed mid-audit, recovered) recomputes everything from the same inputs: the same result.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Settings
from app.errors import Conflict, Invalid
from app.jobs.kinds import AUDIT
from app.jobs.run import JobRun, job_runner
from app.models import Dataset, Index
from app.services.datasets import iter_rows
from app.services.noisy import noisy_mask
from app.services.queries.compute import answer_fidelity, index_estimators
from app.services.references import load_index_reference
from app.workflows.audit.schemas import AuditTopRow
from app.workflows.audit.service import RANKING_FILE, SCORES_FILE, RankedRows, ranking_dtype, total_steps
from influence import (
    DEFAULT_NDR_PERCENTS,
    aggregate,
    auc_ndr,
    ndr_at,
    random_baseline_auc_ndr,
    random_baseline_ndr_at,
    score_layer,
)
from influence.aggregation import EXACTLY_COMBINABLE, combine_layer_aggregates
from influence.calibration import check_mask, review_prefix

TOP_ROWS = 10
REVIEW_ASSUMPTION = (
    "the prefix holds the stated share of the rows the mask marks noisy, exactly; the intervals say what to "
    "expect of noisy rows the mask does not know, if they rank like the known ones (noisy rows missing from the "
    "mask count as clean, which makes the precision a lower bound)"
)
SCORES_CONVENTION = (
    "scores[i, u, j] = influence of training row row_ids[i] on reference row j in layer layers[u]; "
    "> 0 helps the reference prediction. reference_correct[j] = 1 when the model predicts reference row j "
    "correctly (classification)."
)


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


def _order(values: np.ndarray, row_ids: np.ndarray) -> np.ndarray:
    """Ascending values, ties by ascending row id: a total, deterministic order."""
    return np.lexsort((row_ids, values))


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed attempt left (run_job holds the job's lock: no live process writes them)."""
    if directory.is_dir():
        for path in directory.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


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


def _ranking(computed: _Computed) -> np.ndarray:
    """The ranking file's array (service.ranking_dtype): rows by ascending aggregated score, ties by row id,
    each with its per-layer contributions and its rank by each layer alone."""
    n, num_layers = computed.layer_aggregate.shape
    order = _order(computed.aggregated, computed.row_ids)
    ranking = np.empty(n, dtype=ranking_dtype(num_layers))
    ranking["row"] = computed.row_ids[order]
    ranking["score"] = computed.aggregated[order]
    ranking["layer_score"] = computed.layer_score[order]
    ranking["layer_aggregate"] = computed.layer_aggregate[order]
    layer_rank = np.empty((n, num_layers), dtype=np.int64)
    for u in range(num_layers):
        layer_rank[_order(computed.layer_aggregate[:, u], computed.row_ids), u] = np.arange(n)
    ranking["layer_rank"] = layer_rank[order]
    return ranking


def _noise_detection(
    settings: Settings, dataset: Dataset, ranked_rows: np.ndarray, ranked_scores: np.ndarray
) -> dict[str, Any] | None:
    """NDR@p and AUC-NDR of the ranking against the dataset's noisy flags (None without flags)."""
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


@dataclass
class _ReviewMask:
    """The known-noisy flags of the index's live rows, by dataset row id (sorted), and what the mask left out."""

    row_ids: np.ndarray  # (n,) int64, ascending
    noisy: np.ndarray  # (n,) bool
    info: dict[str, Any]

    def ranked(self, rows: np.ndarray) -> np.ndarray:
        """The flags of `rows` (dataset row ids, each a live row), in their order."""
        return self.noisy[np.searchsorted(self.row_ids, np.asarray(rows, dtype=np.int64))]


def _review_mask(settings: Settings, dataset: Dataset, store, spec: dict[str, Any]) -> _ReviewMask:
    """The review's mask over the index's live rows; refused (InvalidInputError, the job's error) before any
    scoring when it holds too few noisy rows to measure recall against."""
    row_ids = np.sort(np.asarray(store.row_ids()[store.live_positions()], dtype=np.int64))
    mask, info = noisy_mask(settings, dataset, spec["noisy"], row_ids)
    if mask is None:
        raise Invalid("review: the audit names no noisy mask to measure recall against")
    return _ReviewMask(row_ids, check_mask(mask, min_clean=0), dict(info or {}))


def _review(
    audit_id: str, mask: _ReviewMask, ranked_rows: np.ndarray, target_recall: float
) -> dict[str, Any]:
    """The review prefix of the ranking: the shortest head holding target_recall of the known-noisy rows."""
    prefix = review_prefix(mask.ranked(ranked_rows), target_recall)
    return {
        **prefix.to_dict(),
        "noisy": mask.info,
        "assumes": REVIEW_ASSUMPTION,
        "read": f"the first {prefix.rows:,} rows of the ranking: GET /v1/audits/{audit_id}/rows?review=true",
    }


def _reference_description(spec: dict[str, Any]) -> dict[str, Any]:
    """Which rows the m axis of the tensor is (dataset rows), or that it is the request's inline examples."""
    if spec.get("examples") is not None:
        return {"examples": len(spec["examples"])}
    rows = spec["rows"] if spec.get("rows") is not None else list(range(int(spec["limit"])))
    return {"dataset_id": spec["dataset_id"], "rows": rows}


@job_runner(AUDIT)
def run_audit(run: JobRun) -> dict[str, Any]:
    """The audit job (see the module docstring); returns its result: {"summary": ...}."""
    started = time.perf_counter()
    settings, params = run.settings, run.params
    _remove_stale_temporaries(run.directory)
    with run.session() as session:
        index = session.get(Index, run.target_id) if run.target_id else None
        if index is None:
            raise Conflict("the audit's index was deleted")
        inputs = load_index_reference(settings, session, index, params["reference"])
    dataset, store, examples = inputs.dataset, inputs.store, inputs.examples
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
    review = params.get("review")
    # Read before the scoring, so that a mask too small to measure recall against fails the audit at once.
    review_mask = _review_mask(settings, dataset, store, review) if review else None
    total = total_steps(m, num_layers)
    run.progress(0, total)
    reference = inputs.featurize(run.ctx, layers, progress=lambda done, _: run.progress(done, total))
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
    ranking = _ranking(computed)
    with run.write_file(RANKING_FILE) as ranking_path, open(ranking_path, "wb") as handle:
        np.save(handle, ranking, allow_pickle=False)
    run.progress(total, total)

    # The top rows as GET /v1/audits/{id}/rows serves them, less the fields AuditTopRow leaves out.
    ranked = RankedRows(
        settings, run.job_id, ranking, dataset, layers, params["estimator"], params["aggregation"]
    )
    top = [
        {field: record[field] for field in AuditTopRow.model_fields}
        for record in ranked.records(0, min(TOP_ROWS, n))
    ]
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
        "review": None
        if review_mask is None
        else _review(run.job_id, review_mask, ranking["row"], float(review["target_recall"])),
        **answer_fidelity(index, layers),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return {"summary": summary}
