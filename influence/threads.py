"""Small batches on one intra-op thread: a second OpenMP thread costs more to wake than it saves on them.

A one-example query gradient (12 tokens through MiniLM) is ~130 GEMMs of a dozen rows. With torch's two
intra-op threads each of them wakes the second thread, and with OMP_WAIT_POLICY=PASSIVE (what the service runs
under on shared hosts) a wake-up is a futex round trip: that gradient took 34 ms on two threads, 19 ms on one.
Up to about 128 tokens per batch one thread wins; past it two do (32 rows of 12 tokens: 140 ms on two threads,
186 ms on one). Measured with `python -m bench.featurize --small-batches` (docs/benchmarks.md, item 6).

torch's intra-op thread count is kept per OS thread (OpenMP's nthreads ICV and MKL's local count), but
torch.set_num_threads also sets the default that threads starting later inherit. Switching the count around
each call would make any thread that starts meanwhile single-threaded for life, so small work runs instead on
one dedicated thread, set once to one intra-op thread, and the process default is put back right away.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

# Batches with at most this many token positions (rows x padded length) run on one intra-op thread.
SMALL_BATCH_TOKENS = 128


class _SingleThreadRunner:
    """A worker thread whose torch ops use one intra-op thread; started at first use (again after a fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0

    def _start(self) -> ThreadPoolExecutor:
        default = torch.get_num_threads()  # this thread's count, which is also the process default
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influence-one-thread")

        def set_up() -> None:
            torch.get_num_threads()  # let torch initialise this thread's settings first (it would redo it later)
            torch.set_num_threads(1)

        executor.submit(set_up).result()
        torch.set_num_threads(default)  # the default for threads started later; this thread's count is unchanged
        return executor

    def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the one-thread worker; inline when torch already uses one thread."""
        if torch.get_num_threads() == 1:
            return fn(*args, **kwargs)
        with self._lock:
            # A forked child inherits the executor but not its thread: its queue would never be served.
            if self._executor is None or self._pid != os.getpid():
                self._executor, self._pid = self._start(), os.getpid()
            executor = self._executor
        return executor.submit(fn, *args, **kwargs).result()

    def thread_count(self) -> int:
        """The intra-op thread count the worker runs with (1 once started); for tests and diagnostics."""
        return self.run(torch.get_num_threads)


ONE_THREAD = _SingleThreadRunner()


def is_small_batch(rows: int, length: int) -> bool:
    """Whether a (rows, length) batch is small enough that one intra-op thread beats several."""
    return rows * length <= SMALL_BATCH_TOKENS
