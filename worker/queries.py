"""The query task, and what a worker that serves the `query` queue does beside: compute settings at its start, a
heartbeat while it runs (app/jobs/query_heartbeat.py), the sweep of expired query files.

`python -m worker --queues query` runs one such worker: Celery's thread pool, so that its threads share one copy
of each model and store (as the API's request threads did when the API answered queries itself)."""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from celery.signals import worker_init, worker_ready, worker_shutdown

from app.config import get_settings
from app.jobs.celery_app import QUERY_QUEUE, QUERY_TASK, consumed_queues, filesystem_folders
from app.jobs.context import configure_compute
from app.jobs.query_heartbeat import HeartbeatThread, heartbeat_for
from app.jobs.query_results import sweep_query_files
from app.jobs.query_worker import QueryWorkerContext, serve_query
from worker.celery_app import TASK_MODULES, get_app

log = logging.getLogger(__name__)
app = get_app(include=TASK_MODULES)
# Pools that run tasks in the worker's main process (prefork pool processes configure themselves at their start,
# worker/tasks.py).
IN_PROCESS_POOLS = ("celery.concurrency.thread", "celery.concurrency.solo", "threads", "solo")

_heartbeat: HeartbeatThread | None = None


@lru_cache(maxsize=1)
def _context(pid: int) -> QueryWorkerContext:
    # One per process (keyed by pid): a database engine must not cross a fork, and the caches are the point.
    return QueryWorkerContext.create(get_settings())


# Celery logs each task's return value: an answer quotes training rows, so only its start goes in the log (the
# index id, or the problem's status).
@app.task(
    name=QUERY_TASK, acks_late=False, ignore_result=False, reject_on_worker_lost=False, resultrepr_maxsize=64
)
def query(payload: dict) -> dict:
    return serve_query(_context(os.getpid()), payload)


def serves_queries() -> bool:
    return QUERY_QUEUE in consumed_queues(app)


def _pool_name(worker) -> str:
    pool = getattr(worker, "pool_cls", "")
    return pool if isinstance(pool, str) else getattr(pool, "__module__", "")


@worker_init.connect
def _configure(sender=None, **_) -> None:
    """A query worker whose tasks run in its main process sets its compute up once, before it takes a query:
    the scoring kernel compiles in the background now, and the first query waits for it rather than for a
    compile."""
    if serves_queries() and _pool_name(sender) in IN_PROCESS_POOLS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        configure_compute(get_settings(), compile_now=True)


@worker_ready.connect
def _start_heartbeat(sender=None, **_) -> None:
    global _heartbeat
    if not serves_queries() or _heartbeat is not None:
        return
    settings = get_settings()
    heartbeat = heartbeat_for(settings)
    if heartbeat is None:
        log.error(
            "the broker %s has no query heartbeat: the API will not send queries",
            settings.resolved_broker_url,
        )
        return
    processed = filesystem_folders(settings)["processed"]
    name = getattr(sender, "hostname", None) or f"query-worker-{os.getpid()}"
    _heartbeat = HeartbeatThread(
        heartbeat, name, chores=lambda: sweep_query_files(settings, processed)
    ).start()
    log.info("serving queries; heartbeat every %.0fs", _heartbeat.interval)


@worker_shutdown.connect
def _stop_heartbeat(**_) -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None
