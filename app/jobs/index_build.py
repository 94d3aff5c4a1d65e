"""The index build's steps as plain functions: plan, build one chunk, finalize; and the compaction. The worker's
one task (worker/tasks.py -> app/jobs/steps.py) calls them with ids only; steps.run_build_inline runs a whole
build in-process without Celery.

    plan_build(job)            queued -> running; load the model; create (or reopen) the feature store with its
                               manifest; dispatch one build_chunk per pending chunk (none pending: finalize)
    build_chunk(job, chunk)    featurize rows [start, stop) of the dataset and write chunk `chunk` atomically
    finalize_build(job)        consolidate the chunks, fit DataInf statistics, build FAISS indexes, mark ready
    compact_index(job)         (an `index_compact` job) rewrite the store without its deleted rows, refit the
                               statistics and rebuild the FAISS indexes that no longer match

Every step is idempotent and safe to run twice, concurrently, or after a crash, because its effects are files
written whole-or-not-at-all and conditional database updates:
- a chunk is a file (FeatureStore.write_chunk is atomic); a chunk already written is skipped;
- a chunk being computed is held under an fcntl lock (artifacts/indexes/<id>/locks/chunk-N.lock). The kernel
  drops the lock when its process dies, even by kill -9, so a lock that is held means a live process is on it:
  a duplicate delivery (a redelivered message, a re-plan) skips the chunk instead of computing it twice;
- finalize runs under its own lock and is a no-op once the index is ready;
- progress (job.done) is the number of chunk files present, recorded only upwards.
Job state lives in the database (app/jobs/state.py); the worker's device is chosen automatically.
A step that finds its index deleted (DELETE /v1/indexes/{id}) ends the job as cancelled and removes whatever
it may have written since (the API removed the rest).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import session_scope
from app.jobs import state as job_state
from app.jobs.context import COMPUTE_DTYPE_KEY, WorkerContext, featurize_options
from app.jobs.model_cache import ModelSpec
from app.models import Dataset, Index, Job
from app.services.datasets import read_rows
from app.services.fidelity import measure_build_fidelity
from app.services.indexes import index_sources, projection_of
from app.stores import index_dir
from influence import FeatureStore, build_store_indexes, featurize_examples, store_manifest
from influence.data import Example
from influence.files import directory_size, remove_tree, try_locked
from influence.index import stale_store_indexes
from influence.statistics import fit_store_statistics, zero_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _BuildRows:
    """A detached snapshot of what a step reads from the database."""

    job_id: str
    index_id: str
    status: str
    cancel_requested: bool
    model: ModelSpec
    dataset: Dataset
    index_layers: tuple[str, ...]
    projection: dict[str, Any]
    dtype: str
    faiss_kind: str
    store_path: str
    params: dict[str, Any]


class IndexGone(Exception):
    """The job's index was deleted: the step ends the job (cancelled) and cleans up after itself."""


def _load_rows(session: Session, job: Job) -> _BuildRows:
    index = session.get(Index, job.target_id)
    if index is None:
        raise IndexGone(job.target_id)
    model, dataset = index_sources(session, index)
    session.expunge(dataset)
    return _BuildRows(
        job_id=job.id,
        index_id=index.id,
        status=job.status,
        cancel_requested=bool(job.cancel_requested),
        # A job created before compute dtypes existed computed in float32: its chunks must stay comparable.
        model=ModelSpec.of(model, str((job.params or {}).get("compute_dtype", "float32"))),
        dataset=dataset,
        index_layers=tuple(index.layers),
        projection=projection_of(index),
        dtype=index.dtype,
        faiss_kind=index.faiss_kind,
        store_path=index.store_path,
        params=dict(job.params or {}),
    )


def _set_index(session: Session, index_id: str, **values: Any) -> None:
    session.execute(update(Index).where(Index.id == index_id).values(**values))


def _gone(ctx: WorkerContext, job_id: str, index_id: str | None) -> str:
    """The index was deleted under the job: end the job and remove what this step may have recreated."""
    with session_scope(ctx.session_factory) as session:
        if job_state.mark_cancelled(session, job_id):
            session.execute(update(Job).where(Job.id == job_id).values(error="its index was deleted"))
    if index_id:
        remove_tree(index_dir(ctx.settings, index_id))
    log.info("job %s: index %s was deleted; stopped", job_id, index_id)
    return "cancelled"


def _cancel(ctx: WorkerContext, rows: _BuildRows) -> str:
    with session_scope(ctx.session_factory) as session:
        job_state.mark_cancelled(session, rows.job_id)
        _set_index(session, rows.index_id, status="cancelled")
    log.info("index build %s cancelled", rows.job_id)
    return "cancelled"


def _record_progress(ctx: WorkerContext, job_id: str, done: int, total: int) -> None:
    # Only upwards: two chunk tasks finishing together may count the chunk files in either order.
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.done < done)
            .values(done=done, total=total)
            .execution_options(synchronize_session=False)
        )


def _step_rows(ctx: WorkerContext, job_id: str, *, claim: bool = False) -> _BuildRows | str:
    """The rows of a running job (with `claim`, claimed first: queued -> running), or the step's outcome when
    there is nothing to do ("skipped", or "cancelled" when its index was deleted)."""
    with session_scope(ctx.session_factory) as session:
        job = job_state.mark_running(session, job_id) if claim else session.get(Job, job_id)
        if job is None or job.status != "running":
            return "skipped"
        target = job.target_id
        try:
            return _load_rows(session, job)
        except IndexGone:
            pass
    return _gone(ctx, job_id, target)


def _index_follows_unstarted_job(ctx: WorkerContext, job_id: str) -> None:
    """A build job that finished before it started (a cancel while queued, a broker's refusal): its index
    takes the job's status."""
    with session_scope(ctx.session_factory) as session:
        finished = session.get(Job, job_id)
        if finished is not None and finished.target_id and finished.status in ("cancelled", "failed"):
            _set_index(session, finished.target_id, status=finished.status)


# ------------------------------------------------------------------------------------------------ steps


def plan_build(ctx: WorkerContext, job_id: str) -> str:
    """Claim the job, create (or reopen) the store with its manifest, dispatch what is left to do."""
    rows = _step_rows(ctx, job_id, claim=True)
    if rows == "skipped":
        _index_follows_unstarted_job(ctx, job_id)
    if isinstance(rows, str):
        return rows
    if rows.cancel_requested:
        return _cancel(ctx, rows)
    cached = ctx.models.get(rows.model, ctx.device)
    featurizer = cached.featurizer(rows.index_layers, rows.projection)
    params = rows.params
    manifest = store_manifest(
        featurizer,
        model_id=rows.model.id,
        revision=rows.model.revision,
        weights_hash=rows.model.weights_hash,
        tokenizer_name=cached.tokenizer_id,
        dataset_hash=rows.dataset.content_hash,
        num_rows=rows.dataset.row_count,
        task=rows.model.task,
        max_length=int(params.get("max_length", ctx.settings.max_length)),
        dtype=rows.dtype,
        chunk_size=int(params.get("chunk_size", ctx.settings.chunk_size)),
        extra={"index_id": rows.index_id, "dataset_id": rows.dataset.id, COMPUTE_DTYPE_KEY: rows.model.dtype},
    )
    store = FeatureStore.create(ctx.settings.resolved_artifacts_dir / rows.store_path, manifest)
    pending = store.pending_chunks()
    total = store.num_chunks
    with session_scope(ctx.session_factory) as session:
        gone = session.get(Index, rows.index_id) is None  # deleted while the model loaded: drop the new store
    if gone:
        return _gone(ctx, job_id, rows.index_id)
    with session_scope(ctx.session_factory) as session:
        _set_index(
            session,
            rows.index_id,
            status="building",
            manifest=manifest.to_dict(),
            num_rows=manifest.num_rows,
        )
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running")
            .values(total=total, done=total - len(pending))
            .execution_options(synchronize_session=False)
        )
    if pending:
        for chunk in pending:
            ctx.dispatcher.send("chunk", job_id, int(chunk))
    else:
        ctx.dispatcher.send("finalize", job_id)
    log.info("index build %s planned: %d of %d chunks to do", job_id, len(pending), total)
    return "planned"


def build_chunk(ctx: WorkerContext, job_id: str, chunk: int) -> str:
    """Featurize and write one chunk (skipped when written already or held by a live process)."""
    rows = _step_rows(ctx, job_id)
    if isinstance(rows, str):
        return rows
    if rows.cancel_requested:
        return _cancel(ctx, rows)
    store = FeatureStore.open(ctx.settings.resolved_artifacts_dir / rows.store_path, verify=False)
    outcome = "done"
    if not store.is_complete and chunk in store.pending_chunks():
        lock = index_dir(ctx.settings, rows.index_id) / "locks" / f"chunk-{chunk:06d}.lock"
        with try_locked(lock) as claimed:
            if not claimed:
                return "busy"
            # Checked again under the lock: the previous holder may have just written it.
            if not store.is_complete and chunk in store.pending_chunks():
                start, stop = store.chunk_ranges()[chunk]
                records = read_rows(ctx.settings, rows.dataset, start, stop - start)
                examples = [
                    Example(text=r["text"], label=r["label"], text_pair=r.get("text_pair")) for r in records
                ]
                cached = ctx.models.get(rows.model, ctx.device)
                featurizer = cached.featurizer(rows.index_layers, rows.projection)
                started = time.perf_counter()
                with cached.lock:
                    features = featurize_examples(
                        featurizer,
                        cached.loaded.tokenizer,
                        examples,
                        store.manifest.task,
                        max_length=store.manifest.max_length,
                        **featurize_options(ctx.settings, rows.params),
                    )
                store.write_chunk(chunk, [r["row"] for r in records], features.features)
                outcome = "written"
                log.info(
                    "index build %s: chunk %d (%d rows) in %.1fs",
                    job_id,
                    chunk,
                    stop - start,
                    time.perf_counter() - started,
                )
    pending = store.pending_chunks()
    _record_progress(ctx, job_id, store.num_chunks - len(pending), store.num_chunks)
    if not pending:
        ctx.dispatcher.send("finalize", job_id)
    return outcome


def finalize_build(ctx: WorkerContext, job_id: str) -> str:
    """Consolidate the store, fit estimator statistics, build the FAISS indexes, measure the projection's
    fidelity, mark the index ready."""
    rows = _step_rows(ctx, job_id)
    if isinstance(rows, str):
        return rows
    if rows.cancel_requested:
        return _cancel(ctx, rows)
    with try_locked(index_dir(ctx.settings, rows.index_id) / "locks" / "finalize.lock") as claimed:
        if not claimed:
            return "busy"
        path = ctx.settings.resolved_artifacts_dir / rows.store_path
        store = FeatureStore.open(path, verify=False)
        pending = store.pending_chunks()
        if pending:
            # A chunk went missing (its task was lost): hand it out again rather than fail the build.
            for missing in pending:
                ctx.dispatcher.send("chunk", job_id, int(missing))
            return "replanned"
        started = time.perf_counter()
        store.finalize()
        fit_store_statistics(store)
        build_store_indexes(store, kind=rows.faiss_kind, keep=False, device=ctx.device)
        size = directory_size(path)
        seconds = time.perf_counter() - started
        result = {
            "index_id": rows.index_id,
            "num_rows": store.num_rows,
            "num_layers": len(store.layers),
            "size_bytes": size,
            "finalize_seconds": round(seconds, 3),
            "zero_layers": zero_layers(store),
        }
        if result["zero_layers"]:
            result["warning"] = (
                f"{len(result['zero_layers'])} layers hold only zero features (every row's gradient is zero, or "
                f"too small for {store.manifest.dtype}): they score every row 0. A LoRA A tensor is zero while "
                "its B still is; otherwise rebuild with dtype float32"
            )
        # Projection fidelity per unit (app/services/fidelity.py), stored with `ready` so that a ready index has it;
        # a failed measurement is recorded as skipped, never fails the build. None: a cancel came in meanwhile.
        fidelity = measure_build_fidelity(ctx, rows, store)
        if fidelity is None:
            return _cancel(ctx, rows)
        with session_scope(ctx.session_factory) as session:
            # Ready only together with the job's success (a step that saw a cancel may have ended the job).
            if job_state.mark_succeeded(session, job_id, result):
                _set_index(
                    session,
                    rows.index_id,
                    status="ready",
                    num_rows=store.num_rows,
                    size_bytes=size,
                    manifest=store.manifest.to_dict(),
                    fidelity=fidelity,
                )
    log.info("index build %s finished: %d rows, %d bytes", job_id, store.num_rows, size)
    return "finalized"


def compact_index(ctx: WorkerContext, job_id: str) -> str:
    """Rewrite an index's store without its deleted rows, refit the statistics, rebuild stale FAISS indexes.

    Every part is idempotent (FeatureStore.compact is crash-safe and a no-op once done; statistics are
    refitted only where stale; FAISS indexes only where they no longer cover the store), so a redelivered or
    re-run job after a crash simply finishes the work.
    """
    rows = _step_rows(ctx, job_id, claim=True)
    if isinstance(rows, str):
        return rows
    if rows.cancel_requested:
        with session_scope(ctx.session_factory) as session:
            job_state.mark_cancelled(session, job_id)
        return "cancelled"
    with try_locked(index_dir(ctx.settings, rows.index_id) / "locks" / "compact.lock") as claimed:
        if not claimed:
            return "busy"
        path = ctx.settings.resolved_artifacts_dir / rows.store_path
        started = time.perf_counter()
        store = FeatureStore.open(path, verify=True)
        removed = store.compact()
        fit_store_statistics(store)
        stale = stale_store_indexes(store)
        if stale:
            build_store_indexes(store, kind=rows.faiss_kind, layers=stale, keep=False, device=ctx.device)
        store.refresh()
        size = directory_size(path)
        result = {
            "index_id": rows.index_id,
            "rows_removed": removed,
            "num_rows": store.num_rows,
            "deleted_rows": int(store.deleted_row_ids().size),
            "faiss_rebuilt": len(stale),
            "size_bytes": size,
            "seconds": round(time.perf_counter() - started, 3),
        }
        with session_scope(ctx.session_factory) as session:
            if job_state.mark_succeeded(session, job_id, result):
                _set_index(
                    session,
                    rows.index_id,
                    num_rows=store.num_live_rows,
                    deleted_rows=int(store.deleted_row_ids().size),
                    size_bytes=size,
                )
    log.info("index %s compacted: %d rows removed", rows.index_id, removed)
    return "compacted"
