"""Index builds as plain functions: plan, build one chunk, finalize. Celery tasks (worker/tasks.py) call them
with ids only; `run_build_inline` runs a whole build in-process without Celery.

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
Job state lives in the database (app/services/jobs.py helpers); the worker's device is chosen automatically.
A step that finds its index deleted (DELETE /v1/indexes/{id}) ends the job as cancelled and removes whatever
it may have written since (the API removed the rest).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import session_scope
from app.errors import Conflict
from app.models import Dataset, Index, Job, RegisteredModel
from app.services import jobs as job_service
from app.services.runners import WORKFLOW_KINDS

log = logging.getLogger(__name__)

INDEX_BUILD = "index_build"
INDEX_COMPACT = "index_compact"
# Job kinds the workers run: `start_job` hands out their first step, `recover_interrupted` restarts them.
# The workflows (audit, layer report, batch check, experiment) are single-step jobs (app/services/runners.py).
JOB_KINDS = (INDEX_BUILD, INDEX_COMPACT, *WORKFLOW_KINDS)
# Rows of one layer's features handed to DataInf's fit at a time (float32 copies of float16 memmaps).
STATISTICS_BLOCK_ROWS = 8192
# Estimators whose per-layer statistics are fitted when an index is finalized.
FITTED_ESTIMATORS = ("datainf",)


def resolve_device(setting: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cpu` / `cuda` as given."""
    if setting == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def configure_compute(settings: Any, *, compile_now: bool) -> None:
    """This process' compute settings, applied once at its start (the API's lifespan, each worker pool process).

    The one-thread worker for small featurization batches is started first, while the process has no other
    thread of ours: starting it sets torch's default thread count to 1 for an instant (influence.threads), and
    the kernel's compile thread builds for the count it sees. compile_now compiles the scoring kernel in the
    background (the API, whose queries need it); otherwise at the first call that uses it (a worker)."""
    from influence.kernels import enable_compiled_scoring
    from influence.threads import ONE_THREAD

    ONE_THREAD.start()
    if settings.small_batch_threads != "auto":
        ONE_THREAD.decide(one_thread=settings.small_batch_threads == "one")
    if settings.compiled_scoring:
        enable_compiled_scoring(warm_up=compile_now)


# ------------------------------------------------------------------------------------------ model cache


@dataclass(frozen=True)
class ModelSpec:
    """What loading a registered model needs (a detached copy of the row, safe across sessions/threads)."""

    id: str
    source: str
    revision: str | None
    task: str
    num_labels: int
    adapter: str | None
    weights_hash: str
    layers: tuple[dict, ...]

    @classmethod
    def of(cls, model: RegisteredModel) -> ModelSpec:
        adapter, expected = model.adapter, model.weights_hash
        if adapter is None and model.checkpoints:
            # No adapter of its own: featurize at the last checkpoint (the final model state).
            last = model.checkpoints[-1]
            adapter, expected = last["adapter"], last["weights_hash"]
        return cls(
            id=model.id,
            source=model.source,
            revision=model.revision,
            task=model.task,
            num_labels=int(model.num_labels or 2),
            adapter=adapter,
            weights_hash=expected,
            layers=tuple(model.layers),
        )


@dataclass
class CachedModel:
    """A loaded model with its layers; `lock` serialises featurisation (hooks are per model object)."""

    loaded: Any  # influence.LoadedModel
    layers: list  # influence.Layer, in model order
    tokenizer_id: str
    device: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    featurizers: dict[tuple, Any] = field(default_factory=dict)

    def featurizer(self, layer_names: Sequence[str], projection: dict[str, Any]):
        """The Featurizer for these layers and projection (cached: projectors hold generated matrices).

        `projection` is a mapping ProjectionSpec.from_dict takes: an index row's (indexes.projection_of) or a
        store manifest's, whose resolved per-unit choices are then honoured as recorded."""
        from influence import Featurizer, ProjectionSpec

        key = (tuple(layer_names), json.dumps(projection, sort_keys=True, default=str))
        if key not in self.featurizers:
            by_name = {layer.name: layer for layer in self.layers}
            missing = [name for name in layer_names if name not in by_name]
            if missing:
                raise Conflict(
                    f"the loaded model lacks layers {missing[:5]} that the index names; was it re-registered?"
                )
            spec = ProjectionSpec.from_dict(projection)
            self.featurizers[key] = Featurizer(self.loaded.model, [by_name[n] for n in layer_names], spec)
        return self.featurizers[key]


def tokenizer_identity(tokenizer) -> str:
    """A stable name for a tokenizer's behaviour: its class and a hash of its vocabulary and special tokens."""
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
    return f"{type(tokenizer).__name__}:{digest[:16]}"


class ModelCache:
    """Loaded models of this process, keyed by (model id, weights hash, device); the least recently used
    goes when more than `capacity` are held. Thread-safe: each key is loaded once."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple, CachedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}

    def get(self, spec: ModelSpec, device: str) -> CachedModel:
        key = (spec.id, spec.weights_hash, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            cached = self._load(spec, device)
            with self._lock:
                self._items[key] = cached
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
                self._loading.pop(key, None)
            return cached

    @staticmethod
    def _load(spec: ModelSpec, device: str) -> CachedModel:
        from app.services.models import check_before_load
        from influence import discover_layers, load_model

        check_before_load(spec.source, spec.revision, [spec.adapter] if spec.adapter else [])
        started = time.perf_counter()
        loaded = load_model(
            spec.source,
            revision=spec.revision,
            task=spec.task,
            num_labels=spec.num_labels,
            adapter=spec.adapter,
            device=device,
        )
        if loaded.weights_hash != spec.weights_hash:
            raise Conflict(
                f"the weights of model {spec.id!r} changed since it was registered (sha256 "
                f"{loaded.weights_hash[:12]}..., registered {spec.weights_hash[:12]}...); register it again"
            )
        layers = discover_layers(loaded.model)
        log.info("loaded model %s on %s in %.1fs", spec.id, device, time.perf_counter() - started)
        return CachedModel(loaded, layers, tokenizer_identity(loaded.tokenizer), device)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def drop(self, model_id: str) -> None:
        """Forget every loaded copy of a model (it was deleted)."""
        with self._lock:
            for key in [key for key in self._items if key[0] == model_id]:
                del self._items[key]


# ------------------------------------------------------------------------------------------ paths, locks


def index_dir(settings: Settings, index_id: str) -> Path:
    return settings.resolved_artifacts_dir / "indexes" / index_id


def store_dir(settings: Settings, index: Index) -> Path:
    """The feature store of an index (Index.store_path is relative to the artifacts dir)."""
    return settings.resolved_artifacts_dir / index.store_path


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[bool]:
    """Try to take an fcntl lock on `path` without waiting: yields True if taken (released on exit, or by the
    kernel when the process dies), False if another live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def directory_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(root) / name).stat().st_size
    return total


# ------------------------------------------------------------------------------------------- dispatching


class Dispatcher(Protocol):
    """Hands build steps to workers (Celery: worker/queue.py) or runs them (InlineDispatcher)."""

    def plan(self, job_id: str) -> None: ...

    def build_chunks(self, job_id: str, chunks: Sequence[int]) -> None: ...

    def finalize(self, job_id: str) -> None: ...

    def compact(self, job_id: str) -> None: ...

    def run(self, job_id: str) -> None: ...


def start_job(dispatcher: Dispatcher, kind: str, job_id: str) -> None:
    """Hand the first step of a job of `kind` to the workers (ValueError for kinds no worker runs)."""
    if kind == INDEX_BUILD:
        dispatcher.plan(job_id)
    elif kind == INDEX_COMPACT:
        dispatcher.compact(job_id)
    elif kind in WORKFLOW_KINDS:
        dispatcher.run(job_id)
    else:
        raise ValueError(f"no worker task runs jobs of kind {kind!r}")


@dataclass
class BuildContext:
    """What a build step needs besides ids: settings, a database, this process's models, a dispatcher."""

    settings: Settings
    session_factory: sessionmaker[Session]
    models: ModelCache
    dispatcher: Dispatcher
    device: str = ""

    def __post_init__(self) -> None:
        if not self.device:
            self.device = resolve_device(self.settings.device)


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


def index_sources(session: Session, index: Index) -> tuple[RegisteredModel, Dataset]:
    """The model and dataset an index was built from (409 if either was removed since)."""
    model = session.get(RegisteredModel, index.model_id)
    dataset = session.get(Dataset, index.dataset_id)
    if model is None or dataset is None:
        raise Conflict(f"index {index.id!r} names a model or dataset that no longer exists")
    return model, dataset


def _load_rows(session: Session, job: Job) -> _BuildRows:
    from app.services.indexes import projection_of  # indexes imports this module

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
        model=ModelSpec.of(model),
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


def _gone(ctx: BuildContext, job_id: str, index_id: str | None) -> str:
    """The index was deleted under the job: end the job and remove what this step may have recreated."""
    with session_scope(ctx.session_factory) as session:
        if job_service.mark_cancelled(session, job_id):
            session.execute(update(Job).where(Job.id == job_id).values(error="its index was deleted"))
    if index_id:
        remove_tree(index_dir(ctx.settings, index_id))
    log.info("job %s: index %s was deleted; stopped", job_id, index_id)
    return "cancelled"


def remove_tree(path: Path) -> None:
    """Remove a directory tree, tolerating files that vanish (or appear) meanwhile."""
    import shutil

    for _ in range(3):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return


def _cancel(ctx: BuildContext, rows: _BuildRows) -> str:
    with session_scope(ctx.session_factory) as session:
        job_service.mark_cancelled(session, rows.job_id)
        _set_index(session, rows.index_id, status="cancelled")
    log.info("index build %s cancelled", rows.job_id)
    return "cancelled"


def fail_build(ctx: BuildContext, job_id: str, error: str) -> None:
    """Mark the job failed and its index failed (no-op for a job that already finished)."""
    fail_job(ctx, job_id, error)


def _record_progress(ctx: BuildContext, job_id: str, done: int, total: int) -> None:
    # Only upwards: two chunk tasks finishing together may count the chunk files in either order.
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.done < done)
            .values(done=done, total=total)
            .execution_options(synchronize_session=False)
        )


# ------------------------------------------------------------------------------------------------ steps


def plan_build(ctx: BuildContext, job_id: str) -> str:
    """Claim the job, create (or reopen) the store with its manifest, dispatch what is left to do."""
    from influence import FeatureStore, store_manifest

    with session_scope(ctx.session_factory) as session:
        job = job_service.mark_running(session, job_id)
        if job is None:
            # Finished or cancelled before it started (a cancel of a queued job): the index follows suit.
            finished = session.get(Job, job_id)
            if finished is not None and finished.target_id and finished.status in ("cancelled", "failed"):
                _set_index(session, finished.target_id, status=finished.status)
            return "skipped"
        target = job.target_id
        try:
            rows = _load_rows(session, job)
        except IndexGone:
            rows = None
    if rows is None:
        return _gone(ctx, job_id, target)
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
        extra={"index_id": rows.index_id, "dataset_id": rows.dataset.id},
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
        ctx.dispatcher.build_chunks(job_id, pending)
    else:
        ctx.dispatcher.finalize(job_id)
    log.info("index build %s planned: %d of %d chunks to do", job_id, len(pending), total)
    return "planned"


def _running_rows(ctx: BuildContext, job_id: str) -> _BuildRows | str:
    """The rows of a running job, or the step's outcome when there is nothing to do ("skipped", or
    "cancelled" when its index was deleted)."""
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "running":
            return "skipped"
        target = job.target_id
        try:
            return _load_rows(session, job)
        except IndexGone:
            pass
    return _gone(ctx, job_id, target)


def build_chunk(ctx: BuildContext, job_id: str, chunk: int) -> str:
    """Featurize and write one chunk (skipped when written already or held by a live process)."""
    from app.services.datasets import read_rows
    from influence import FeatureStore, featurize_examples
    from influence.data import Example

    rows = _running_rows(ctx, job_id)
    if isinstance(rows, str):
        return rows
    if rows.cancel_requested:
        return _cancel(ctx, rows)
    store = FeatureStore.open(ctx.settings.resolved_artifacts_dir / rows.store_path, verify=False)
    outcome = "done"
    if not store.is_complete and chunk in store.pending_chunks():
        lock = index_dir(ctx.settings, rows.index_id) / "locks" / f"chunk-{chunk:06d}.lock"
        with exclusive(lock) as claimed:
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
                        batch_size=int(rows.params.get("batch_size", ctx.settings.batch_size)),
                        max_length=store.manifest.max_length,
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
        ctx.dispatcher.finalize(job_id)
    return outcome


def finalize_build(ctx: BuildContext, job_id: str) -> str:
    """Consolidate the store, fit estimator statistics, build the FAISS indexes, measure the projection's
    fidelity, mark the index ready."""
    from app.services.fidelity import measure_build_fidelity
    from influence import FeatureStore, build_store_indexes

    rows = _running_rows(ctx, job_id)
    if isinstance(rows, str):
        return rows
    if rows.cancel_requested:
        return _cancel(ctx, rows)
    with exclusive(index_dir(ctx.settings, rows.index_id) / "locks" / "finalize.lock") as claimed:
        if not claimed:
            return "busy"
        path = ctx.settings.resolved_artifacts_dir / rows.store_path
        store = FeatureStore.open(path, verify=False)
        pending = store.pending_chunks()
        if pending:
            # A chunk went missing (its task was lost): hand it out again rather than fail the build.
            ctx.dispatcher.build_chunks(job_id, pending)
            return "replanned"
        started = time.perf_counter()
        store.finalize()
        fit_statistics(store)
        build_store_indexes(store, kind=rows.faiss_kind, keep=False)
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
            if job_service.mark_succeeded(session, job_id, result):
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


def zero_layers(store) -> list[str]:
    """Layers whose STORED features are zero in every row (read back: the norms are taken before the float16
    cast, so they do not show features that underflowed)."""
    import numpy as np

    from influence.tokens import TokenRows

    def values(block):
        return block.values if isinstance(block, TokenRows) else block

    return [
        name
        for name in store.layers
        if not any(np.any(values(block)) for _, block in store.iter_layer_chunks(name, STATISTICS_BLOCK_ROWS))
    ]


def fit_statistics(store) -> None:
    """Fit, per layer, the statistics of estimators that need them (DataInf's M_u) and save them in the store.
    Layers that already have statistics (a resumed finalize) are skipped."""
    import numpy as np
    import torch

    from influence import make_estimator

    for name in store.layers:
        if store.has_layer_statistics(name):
            continue

        def chunks(layer: str = name) -> Iterator[torch.Tensor]:
            for _, block in store.iter_layer_chunks(layer, STATISTICS_BLOCK_ROWS):
                yield torch.from_numpy(np.array(block, dtype=np.float32))

        estimator = make_estimator("datainf")
        if store.layer_spec(name).layout == "tokens":
            estimator.fit_token_rows(store.layer(name), store.layer_spec(name).num_params)
        else:
            estimator.fit(chunks, store.layer_spec(name).num_params)
        store.save_layer_statistics(name, {k: v.numpy() for k, v in estimator.state_dict().items()})


def compact_index(ctx: BuildContext, job_id: str) -> str:
    """Rewrite an index's store without its deleted rows, refit the statistics, rebuild stale FAISS indexes.

    Every part is idempotent (FeatureStore.compact is crash-safe and a no-op once done; statistics are
    refitted only where stale; FAISS indexes only where they no longer cover the store), so a redelivered or
    re-run job after a crash simply finishes the work.
    """
    from influence import FeatureStore, build_store_indexes
    from influence.index import stale_store_indexes

    with session_scope(ctx.session_factory) as session:
        job = job_service.mark_running(session, job_id)
        if job is None:
            return "skipped"
        target = job.target_id
        try:
            rows = _load_rows(session, job)
        except IndexGone:
            rows = None
    if rows is None:
        return _gone(ctx, job_id, target)
    if rows.cancel_requested:
        with session_scope(ctx.session_factory) as session:
            job_service.mark_cancelled(session, job_id)
        return "cancelled"
    with exclusive(index_dir(ctx.settings, rows.index_id) / "locks" / "compact.lock") as claimed:
        if not claimed:
            return "busy"
        path = ctx.settings.resolved_artifacts_dir / rows.store_path
        started = time.perf_counter()
        store = FeatureStore.open(path, verify=True)
        removed = store.compact()
        fit_statistics(store)
        stale = stale_store_indexes(store)
        if stale:
            build_store_indexes(store, kind=rows.faiss_kind, layers=stale, keep=False)
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
            if job_service.mark_succeeded(session, job_id, result):
                _set_index(
                    session,
                    rows.index_id,
                    num_rows=store.num_live_rows,
                    deleted_rows=int(store.deleted_row_ids().size),
                    size_bytes=size,
                )
    log.info("index %s compacted: %d rows removed", rows.index_id, removed)
    return "compacted"


def fail_job(ctx: BuildContext, job_id: str, error: str) -> None:
    """Mark a job failed; an index build fails its index too (a compaction leaves the index as it was)."""
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        if job_service.mark_failed(session, job_id, error) and job.target_id and job.kind == INDEX_BUILD:
            _set_index(session, job.target_id, status="failed")


def recover_interrupted(ctx: BuildContext) -> list[str]:
    """Start again every worker job that is queued or running: a worker that starts cannot tell whether the
    messages of those jobs died with a worker, and every step is idempotent. Returns the job ids."""
    with ctx.session_factory() as session:
        jobs = list(
            session.execute(
                select(Job.id, Job.kind).where(Job.kind.in_(JOB_KINDS), Job.status.in_(job_service.ACTIVE))
            )
        )
    for job_id, kind in jobs:
        start_job(ctx.dispatcher, kind, job_id)
    builds = sum(1 for _, kind in jobs if kind == INDEX_BUILD)
    if builds:
        log.info("re-planned %d interrupted index build(s)", builds)
    if len(jobs) > builds:
        log.info("restarted %d other interrupted job(s)", len(jobs) - builds)
    return [job_id for job_id, _ in jobs]


# ------------------------------------------------------------------------------------ without Celery


class InlineDispatcher:
    """Collects dispatched steps so `run_build_inline` can run them in this process, in order."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, int | None]] = []

    def plan(self, job_id: str) -> None:
        self.steps.append(("plan", job_id, None))

    def build_chunks(self, job_id: str, chunks: Sequence[int]) -> None:
        self.steps.extend(("chunk", job_id, int(c)) for c in chunks)

    def finalize(self, job_id: str) -> None:
        self.steps.append(("finalize", job_id, None))

    def compact(self, job_id: str) -> None:
        self.steps.append(("compact", job_id, None))

    def run(self, job_id: str) -> None:
        self.steps.append(("run", job_id, None))


def run_build_inline(
    settings: Settings,
    session_factory: sessionmaker[Session],
    job_id: str,
    models: ModelCache | None = None,
    after_step: Callable[[int, int], None] | None = None,
) -> None:
    """Run a whole index build in this process (no broker, no worker): plan, every chunk, finalize.

    after_step(chunks_done, steps_known) is called between steps (a caller's progress and cancellation
    point: what it raises ends the run without failing the build)."""
    dispatcher = InlineDispatcher()
    ctx = BuildContext(settings, session_factory, models or ModelCache(), dispatcher)
    dispatcher.plan(job_id)
    _run_inline(ctx, dispatcher, job_id, after_step)


def run_job_inline(
    settings: Settings, session_factory: sessionmaker[Session], job_id: str, models: ModelCache | None = None
) -> None:
    """Run any worker job (build, compaction, workflow) in this process, step after step, without Celery."""
    dispatcher = InlineDispatcher()
    ctx = BuildContext(settings, session_factory, models or ModelCache(), dispatcher)
    with session_factory() as session:
        job = session.get(Job, job_id)
        kind = job.kind if job is not None else INDEX_BUILD
    start_job(dispatcher, kind, job_id)
    _run_inline(ctx, dispatcher, job_id)


def _run_inline(
    ctx: BuildContext,
    dispatcher: InlineDispatcher,
    job_id: str,
    after_step: Callable[[int, int], None] | None = None,
) -> None:
    runners = {
        "plan": lambda j, _: plan_build(ctx, j),
        "chunk": lambda j, c: build_chunk(ctx, j, c),
        "finalize": lambda j, _: finalize_build(ctx, j),
        "compact": lambda j, _: compact_index(ctx, j),
        "run": lambda j, _: run_workflow_job(ctx, j),
    }
    chunks_done = 0
    while dispatcher.steps:
        step, step_job, chunk = dispatcher.steps.pop(0)
        try:
            runners[step](step_job, chunk)
        except Exception as exc:
            fail_job(ctx, job_id, describe_error(exc))
            raise
        if after_step is not None:
            chunks_done += step == "chunk"
            pending = sum(1 for queued in dispatcher.steps if queued[0] == "chunk")
            after_step(chunks_done, chunks_done + pending + 1)


def run_workflow_job(ctx: BuildContext, job_id: str) -> str:
    """A workflow job's one step (runners.run_job); imported here so a task needs one module."""
    from app.services.runners import run_job

    return run_job(ctx, job_id)


def describe_error(exc: BaseException) -> str:
    """What a failed job reports: the error's class and message (never a traceback)."""
    detail = getattr(exc, "detail", None) or str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {detail}"
