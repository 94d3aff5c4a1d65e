"""CPU-heavy request work runs in processes beside the API, so that it cannot stall the API's other requests.

Parsing and normalising an uploaded file, or inspecting a model folder, is Python work: its thread holds the GIL
for tens of milliseconds at a time, and the objects it allocates set off full garbage collections of the API's
whole heap (torch, transformers, the query model cache), during which every other request of the process waits,
/healthz included. A thread pool does not help; a process does. So the API's lifespan starts a small pool of
spawned processes (`request_processes`) and the services hand such work to `run`; its exceptions (the service's
4xx errors) come back as they were raised. At most WAITING_PER_PROCESS requests per process wait for the pool;
more are told 503 at once. A process that dies (the kernel's OOM killer, on a hostile file) breaks the pool:
every request it held is a 503, and the pool is replaced. Where no pool was started (Celery workers, scripts, an
app whose lifespan did not run) `run` calls the function in place: same code, same errors.

Spawned, not forked: the API process has threads (torch's, the scoring kernel's compiler), and a fork copies
their locks in whatever state they are. A child leaves as soon as its parent is gone, so nothing an abandoned
request started keeps writing after the API restarted and swept its folders.
"""

from __future__ import annotations

import concurrent.futures
import importlib
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
PRELOAD = ("app.services.datasets", "app.workflows.check.batch", "app.services.models")

# Requests a pool process may have running or queued: more would each hold a server thread and a database
# connection while they wait.
WAITING_PER_PROCESS = 4

_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None
_slots: threading.BoundedSemaphore | None = None
_processes = 0


def start(processes: int) -> None:
    """Start the pool (idempotent; 0 processes: work stays in this process). Call from the thread that lives as
    long as the server (the lifespan's): the children are spawned here, not by request threads."""
    global _pool, _processes, _slots
    with _lock:
        if processes <= 0 or _pool is not None:
            return
        _processes = processes
        _slots = threading.BoundedSemaphore(processes * WAITING_PER_PROCESS)
        _pool = _new_pool(processes)


def stop() -> None:
    """Stop the pool; later work runs in this process."""
    global _pool, _slots
    with _lock:
        pool, _pool, _slots = _pool, None, None
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def started() -> bool:
    return _pool is not None


def run(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in a pool process (in this process when no pool runs). Its exception is raised here.
    503 (Unavailable) when WAITING_PER_PROCESS requests per process are in the pool already (each waiting
    request holds a server thread and a database connection), and when a pool process died: every request the
    pool held then gets it, and the pool is replaced."""
    pool, slots = _pool, _slots
    if pool is None or slots is None:
        return function(*args)
    if not slots.acquire(blocking=False):
        raise Unavailable(
            f"the service is busy reading other requests' files ({_processes} request processes, "
            f"{_processes * WAITING_PER_PROCESS} requests at most); try again shortly"
        )
    try:
        try:
            future = pool.submit(function, *args)
        except (RuntimeError, concurrent.futures.BrokenExecutor):  # broken, or stopped: shutting down
            _replace(pool)
            raise Unavailable("the request processes are restarting; try again shortly") from None
        try:
            return future.result()
        except concurrent.futures.BrokenExecutor:
            _replace(pool)
            raise Unavailable(
                "a process that read requests' data died (out of memory?), and with it the requests it held, "
                "this one included; nothing of them was kept: try again, or send less"
            ) from None
    finally:
        slots.release()


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
    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    for module in PRELOAD:
        importlib.import_module(module)
