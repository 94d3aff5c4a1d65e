"""Thin Celery tasks: ids in, one pipeline step, the outcome recorded in the database.

Each task builds nothing itself: it hands its ids to app/services/pipelines.py, which is idempotent, so a
task delivered twice (acks_late redelivery, a re-plan after a crash) does no harm. A step that raises marks
its job (and index) failed; the task then ends normally, so the message is acknowledged and not retried.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from celery.signals import worker_process_init, worker_ready

from app.config import get_settings
from app.db import make_engine, make_session_factory
from app.services import pipelines
from app.services.pipelines import resolve_device
from worker.celery_app import BUILD_CHUNK, COMPACT_INDEX, FINALIZE_BUILD, PLAN_BUILD, RUN_JOB, get_app
from worker.queue import CeleryDispatcher

log = logging.getLogger(__name__)
app = get_app()


@lru_cache(maxsize=1)
def _context(pid: int) -> pipelines.BuildContext:
    # One per process (keyed by pid): a database engine must not cross a fork, and the model cache is what
    # makes every chunk after the first cheap.
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    return pipelines.BuildContext(
        settings=settings,
        session_factory=make_session_factory(engine),
        models=pipelines.ModelCache(),
        dispatcher=CeleryDispatcher(app, settings),
    )


def context() -> pipelines.BuildContext:
    return _context(os.getpid())


def _run(job_id: str, step, *args) -> str:
    ctx = context()
    try:
        return step(ctx, job_id, *args)
    except Exception as exc:
        log.exception("job %s failed in %s", job_id, step.__name__)
        pipelines.fail_job(ctx, job_id, pipelines.describe_error(exc))
        return "failed"


@app.task(name=PLAN_BUILD)
def plan_build(job_id: str) -> str:
    return _run(job_id, pipelines.plan_build)


@app.task(name=BUILD_CHUNK)
def build_chunk(job_id: str, chunk: int) -> str:
    return _run(job_id, pipelines.build_chunk, int(chunk))


@app.task(name=FINALIZE_BUILD)
def finalize_build(job_id: str) -> str:
    return _run(job_id, pipelines.finalize_build)


@app.task(name=COMPACT_INDEX)
def compact_index(job_id: str) -> str:
    return _run(job_id, pipelines.compact_index)


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> str:
    """A workflow job (audit, layer report, batch check, experiment): app/services/runners.py."""
    return _run(job_id, pipelines.run_workflow_job)


@worker_process_init.connect
def _init_process(**_) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The scoring kernel compiles at the first job that scores against a few reference rows (most never do), so
    # that such a job scores with the same kernel as the API's queries.
    pipelines.configure_compute(get_settings(), compile_now=False)
    if resolve_device(get_settings().device) == "cuda":
        # One pool process per GPU (python -m worker): process i featurizes on GPU i.
        import torch
        from billiard.process import current_process

        index = getattr(current_process(), "index", 0) or 0
        torch.cuda.set_device(index % torch.cuda.device_count())


@worker_ready.connect
def _recover(**_) -> None:
    """A starting worker restarts jobs left queued or running (their messages may have died with a worker);
    every step is idempotent and skips what is done or held by a live process."""
    # Runs in the worker's main process, after the pool forked: a throw-away engine, disposed at once, so no
    # connection of this process is ever inherited by a pool process forked later.
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        ctx = pipelines.BuildContext(
            settings=settings,
            session_factory=make_session_factory(engine),
            models=pipelines.ModelCache(capacity=0),
            dispatcher=CeleryDispatcher(app, settings),
            device="cpu",
        )
        pipelines.recover_interrupted(ctx)
    except Exception:  # a database that is not up yet must not keep the worker from starting
        log.exception("could not restart interrupted jobs")
    finally:
        engine.dispose()
