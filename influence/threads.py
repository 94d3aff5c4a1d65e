"""Small batches on one intra-op thread, where a second OpenMP thread costs more to wake than it saves.

A one-example query gradient (12 tokens through MiniLM) is ~130 GEMMs of a dozen rows. With torch's two
intra-op threads each of them wakes the second thread, and with OMP_WAIT_POLICY=PASSIVE (what the service runs
under on shared hosts) a wake-up is a futex round trip. Whether that costs more than the second thread saves
depends on the host: of two 2-core VMs, one ran the gradient clearly faster on one thread, the other clearly
slower (docs/benchmarks.md, item 6, fourth round). So the choice is measured, once per process, on the first
small batch itself: it runs a few times each way, alternating, and one thread is kept if it is clearly faster
(CALIBRATION_MARGIN); a deployment can also fix the choice (decide()). Batches above SMALL_BATCH_TOKENS always
use every thread: there the second thread's work outweighs its wake-ups (the same section's table, by batch
shape, which `python -m bench.featurize --small-batches` measures).

torch's intra-op thread count is kept per OS thread (OpenMP's nthreads ICV and MKL's local count), but
torch.set_num_threads also sets the default that threads starting later inherit. Switching the count around
each call would make any thread that starts meanwhile single-threaded for life, so small work runs instead on
one dedicated thread, set once to one intra-op thread, and the process default is put back right away (from a
throwaway thread, so that no other thread's count changes). Servers start the worker before their other threads.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from influence.kernels import wait_for_compile_in_progress
from influence.lazy import lazy_module

torch = lazy_module("torch")

log = logging.getLogger(__name__)

T = TypeVar("T")

# Batches with at most this many token positions (rows x padded length) may run on one intra-op thread.
SMALL_BATCH_TOKENS = 128
# Runs each way of the first small batch (alternating) that decide whether one thread pays on this host.
CALIBRATION_RUNS = 3
# One thread is chosen only when its median is at least this much faster: when the two are close, the
# measurement is a coin toss and every thread (torch's own behaviour) is kept.
CALIBRATION_MARGIN = 0.10


class _SingleThreadRunner:
    """A worker thread whose torch ops use one intra-op thread (started at first use, again in a forked child),
    and the process' decision whether small work runs there."""

    def __init__(self) -> None:
        self._reset()
        self.one_thread_pays: bool | None = None  # None until measured (or set by decide())
        self.calibration: dict[str, float] = {}  # median seconds each way, once measured
        if hasattr(os, "register_at_fork"):
            # A child inherits the executor without its thread, and maybe a lock some other thread held.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._calibration_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._worker_ident: int | None = None

    def _start(self) -> ThreadPoolExecutor:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influence-one-thread")

        def set_up() -> int:
            # A new thread first takes torch's process default: read it (this also initialises the thread's
            # settings, which torch would otherwise redo at its first op), then go to one thread.
            default = torch.get_num_threads()
            torch.set_num_threads(1)
            self._worker_ident = threading.get_ident()
            return default

        default = executor.submit(set_up).result()
        # set_num_threads(1) also made 1 the default for threads that start later: a throwaway thread puts the
        # default back (setting its own count with it), so no thread of the caller's is touched.
        restore = threading.Thread(target=lambda: (torch.get_num_threads(), torch.set_num_threads(default)))
        restore.start()
        restore.join()
        return executor

    def start(self) -> None:
        """Start the worker now: a server does it before its other threads exist, because starting it sets
        torch's default thread count to 1 for an instant (threads that first touch torch then would keep it)."""
        self.on_worker(lambda: None)

    def decide(self, one_thread: bool) -> None:
        """Fix the choice instead of measuring it (a deployment setting)."""
        with self._lock:
            self.one_thread_pays, self.calibration = one_thread, {}

    def on_worker(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the one-thread worker; inline when torch already uses one thread, when called
        from the worker itself, and once the interpreter is shutting down (no new threads then)."""
        if torch.get_num_threads() == 1 or threading.get_ident() == self._worker_ident:
            return fn(*args, **kwargs)
        with self._lock:
            if self._executor is None:
                self._executor = self._start()
            executor = self._executor
        try:
            future = executor.submit(fn, *args, **kwargs)
        except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown"
            return fn(*args, **kwargs)
        return future.result()

    def run_small(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs), a small piece of work, the faster way on this host: on the worker or inline.

        The first call measures both ways on fn itself (CALIBRATION_RUNS each), so fn must be repeatable."""
        if torch.get_num_threads() == 1:
            return fn(*args, **kwargs)
        if self.one_thread_pays is None:
            with self._calibration_lock:
                if self.one_thread_pays is None:
                    return self._calibrate(fn, *args, **kwargs)
        if self.one_thread_pays:
            return self.on_worker(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def _calibrate(self, fn: Callable[..., T], *args, **kwargs) -> T:
        wait_for_compile_in_progress()  # the API's first query can come while its kernel compiles on a core
        self.start()  # not timed
        seconds: dict[str, list[float]] = {"one thread": [], "all threads": []}
        results: dict[str, T] = {}
        for i in range(CALIBRATION_RUNS):
            for way in ("one thread", "all threads") if i % 2 == 0 else ("all threads", "one thread"):
                start = time.perf_counter()
                results[way] = self.on_worker(fn, *args, **kwargs) if way == "one thread" else fn(*args, **kwargs)
                seconds[way].append(time.perf_counter() - start)
        medians = {way: statistics.median(values) for way, values in seconds.items()}
        one_thread = medians["one thread"] < (1 - CALIBRATION_MARGIN) * medians["all threads"]
        with self._lock:
            self.one_thread_pays, self.calibration = one_thread, medians
        log.info(
            "small batches run on %s (first small batch: %.1f ms on one intra-op thread, %.1f ms on %d)",
            "one intra-op thread" if one_thread else "every intra-op thread",
            1000 * medians["one thread"],
            1000 * medians["all threads"],
            torch.get_num_threads(),
        )
        # The chosen way's result: the two ways can differ in the last bits (GEMM blocking), and every later call
        # of this process goes the chosen way, so the same batch gives the same bits from the first call on.
        return results["one thread" if one_thread else "all threads"]

    def status(self) -> dict:
        """{"one_thread": the choice (None until the first small batch), "measured_ms": what decided it, or None
        when it was set, not measured}."""
        with self._lock:
            one_thread, calibration = self.one_thread_pays, dict(self.calibration)
        measured = {way: round(1000 * value, 2) for way, value in calibration.items()}
        return {"one_thread": one_thread, "measured_ms": measured or None}


ONE_THREAD = _SingleThreadRunner()


def is_small_batch(rows: int, length: int) -> bool:
    """Whether a (rows, length) batch is small enough that one intra-op thread may beat several."""
    return rows * length <= SMALL_BATCH_TOKENS
