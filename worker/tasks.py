"""The job-step task: ids in, one job step run (app/jobs/steps.py), its outcome recorded in the database."""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache

import torch
from billiard.process import current_process
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init, worker_ready

from app.config import get_settings
from app.db import make_engine, make_session_factory
from app.jobs.celery_app import JOB_QUEUES, QUERY_QUEUE, STEP_TASK, consumed_queues
from app.jobs.context import WorkerContext, configure_compute, resolve_device
from app.jobs.dispatch import CeleryDispatcher
from app.jobs.model_cache import ModelCache
from app.jobs.steps import recover_interrupted, run_step
from app.logs import configure_logging
from worker.celery_app import TASK_MODULES, get_app
from worker.metrics import observe_step

log = logging.getLogger(__name__)
app = get_app(include=TASK_MODULES)


@lru_cache(maxsize=1)
def _context(pid: int) -> WorkerContext:
    # One per process (keyed by pid): a database engine must not cross a fork, and the model cache is what
    # makes every chunk after the first cheap.
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    return WorkerContext(
        settings=settings,
        session_factory=make_session_factory(engine),
        models=ModelCache(),
        dispatcher=CeleryDispatcher(app, settings),
    )


@app.task(name=STEP_TASK)
def step(name: str, job_id: str, *args) -> str:
    started = time.perf_counter()
    outcome = run_step(_context(os.getpid()), name, job_id, *args)
    observe_step(name, outcome, time.perf_counter() - started)
    return outcome


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(**_) -> None:
    # Celery sets up its handlers after this module is imported: the format (and the request id on every
    # record) goes on them once they exist.
    configure_logging(get_settings().log_format)


@worker_process_init.connect
def _init_process(**_) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The scoring kernel compiles at the first job that scores against a few reference rows (most never do), so
    # that such a job scores with the same kernel as queries; a process that answers queries compiles it now.
    configure_compute(get_settings(), compile_now=QUERY_QUEUE in consumed_queues(app))
    if resolve_device(get_settings().device) == "cuda":
        # One pool process per GPU (python -m worker): process i featurizes on GPU i.
        index = getattr(current_process(), "index", 0) or 0
        torch.cuda.set_device(index % torch.cuda.device_count())


@worker_ready.connect
def _recover(**_) -> None:
    """A starting worker restarts jobs left queued or running (their messages may have died with a worker);
    every step is idempotent and skips what is done or held by a live process. A worker that serves queries only
    leaves that to the workers that run jobs."""
    if not consumed_queues(app) & set(JOB_QUEUES):
        return
    # Runs in the worker's main process, after the pool forked: a throw-away engine, disposed at once, so no
    # connection of this process is ever inherited by a pool process forked later.
    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    try:
        ctx = WorkerContext(
            settings=settings,
            session_factory=make_session_factory(engine),
            models=ModelCache(capacity=0),
            dispatcher=CeleryDispatcher(app, settings),
            device="cpu",
        )
        recover_interrupted(ctx)
    except Exception:  # a database that is not up yet must not keep the worker from starting
        log.exception("could not restart interrupted jobs")
    finally:
        engine.dispose()
