"""CPU-heavy request work runs in processes beside the API, so that it cannot stall the API's other requests.

Parsing and normalising an uploaded file, or inspecting a model folder, is Python work: its thread holds the GIL
for tens of milliseconds at a time, and the objects it allocates set off full garbage collections of the API's
whole heap (torch, transformers, the query model cache), during which every other request of the process waits,
/healthz included. A thread pool does not help; a process does. So the API's lifespan starts a small pool of
spawned processes (`request_processes`) and the services hand such work to `run`; its exceptions (the service's
4xx errors) come back as they were raised. A process that dies (the kernel's OOM killer, on a hostile file) is a
503 for the requests it held, and the pool is replaced. Where no pool was started (Celery workers, scripts, an
app whose lifespan did not run) `run` calls the function in place: same code, same errors.

Spawned, not forked: the API process has threads (torch's, the scoring kernel's compiler), and a fork copies
their locks in whatever state they are. A child leaves as soon as its parent is gone, so nothing an abandoned
request started keeps writing after the API restarted and swept its folders.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from app.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a child looks whether its parent is still there.
PARENT_POLL_SECONDS = 0.2
# Imported by every child as it starts, so the first request it serves does not pay for the imports.
PRELOAD = ("app.services.datasets", "app.services.checks", "app.services.models")

_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None
_processes = 0


def start(processes: int) -> None:
    """Start the pool (idempotent; 0 processes: work stays in this process). Call from the thread that lives as
    long as the server (the lifespan's): the children are spawned here, not by request threads."""
    global _pool, _processes
    with _lock:
        if processes <= 0 or _pool is not None:
            return
        _processes = processes
        _pool = _new_pool(processes)


def stop() -> None:
    """Stop the pool; later work runs in this process."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def started() -> bool:
    return _pool is not None


def run(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a pool process (in this process when no pool runs). Its exception is raised here;
    a pool process that died answers 503 (Unavailable) and the pool is replaced for the next request."""
    pool = _pool
    if pool is None:
        return function(*args)
    try:
        future = pool.submit(function, *args)
    except (RuntimeError, concurrent.futures.BrokenExecutor):  # broken, or shut down by a concurrent stop()
        return _run_after_failure(pool, function, *args)
    try:
        return future.result()
    except concurrent.futures.BrokenExecutor:
        _replace(pool)
        raise Unavailable(
            "the process that read this request's data died (out of memory?); nothing of it was kept: try "
            "again, or send less"
        ) from None


def _run_after_failure(pool: concurrent.futures.ProcessPoolExecutor, function: Callable[..., T], *args: Any) -> T:
    _replace(pool)
    current = _pool
    if current is None or current is pool:
        return function(*args)
    return current.submit(function, *args).result()


def _replace(broken: concurrent.futures.ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is not broken:
            return  # replaced already, or stopped
        log.warning("a request process died; starting a new pool of %d", _processes)
        broken.shutdown(wait=False, cancel_futures=True)
        _pool = _new_pool(_processes)


def _new_pool(processes: int) -> concurrent.futures.ProcessPoolExecutor:
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_child_started,
        initargs=(os.getpid(),),
    )
    # One task per process, submitted now: the pool spawns a process for each task it cannot give to an idle one.
    for _ in range(processes):
        pool.submit(_ready)
    return pool


def _ready() -> int:
    return os.getpid()


def _child_started(parent: int) -> None:
    import importlib

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    for module in PRELOAD:
        importlib.import_module(module)
