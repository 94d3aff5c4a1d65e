"""A fused CPU kernel for the scoring hot path, compiled by torch.compile (inductor); off unless enabled.

A query scores one or a few examples against every stored row: for each layer, (n, k) float16 features dotted
with (m, k) float32 query vectors. The eager path (influence.scoring) converts blocks to float32 and calls
BLAS; on CPU the float16 -> float32 conversion in torch's copy kernel is the bottleneck, not memory: it costs
more than reading the same bytes and multiplying them together. This kernel converts in registers and reduces
in one pass, (F.float()[:, None, :] * Q[None]).sum(-1). It reads every row once per query vector, so from a
handful of vectors on, one BLAS product over converted blocks wins again (COMPILED_MAX_QUERIES). The figures:
docs/benchmarks.md, item 6, third round; `python -m bench.scoring` measures them.

Numbers: float16 x float32 products are formed in float32 and summed in float32, as in the eager path; only
the summation order differs (a few float32 ulps; tests/influence/test_kernels.py bounds both against float64).

It needs a C++ compiler (inductor generates and builds C++ at run time), and compiling takes seconds with a
warm cache (TORCHINDUCTOR_CACHE_DIR, by default under /tmp) and longer cold. So it is opt-in:
enable_compiled_scoring() starts the compile (in a background thread with warm_up=True, else at first use);
scoring then waits for it, so every score of a process comes from the same kernel. Any failure (no compiler,
a compile error) is logged once and scoring stays eager.

It serves CPU rows only. With queries on a GPU (influence.scoring.score_layer_streamed), a chunk of float16
rows is converted to float32 on the device and multiplied by cuBLAS. For rows streamed from a store's
memory-mapped files, the bus and the host's reads bound the speed, not the conversion, which no kernel on the
device would shorten. For rows resident on the GPU, the float32 copy makes each feature cost 10 bytes of device
memory traffic instead of 2; bench/gpu.py measures how far that is from the card's bandwidth.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from influence.lazy import lazy_module

torch = lazy_module("torch")

log = logging.getLogger(__name__)

# Above this many query vectors, one BLAS product over converted blocks beats re-reading rows per vector.
COMPILED_MAX_QUERIES = 8
# Row dtypes the kernel serves: a store's float16, whose conversion is the cost. float32 rows go straight to
# BLAS, which already reads them at memory speed: the kernel is no faster on them.
COMPILED_DTYPES = ("float16",)  # torch dtype names (torch.float16): naming them imports no torch
# The longest a scoring call waits for a compile in progress; past it the kernel is given up as failed (a hung
# compiler), so that no later call waits again.
COMPILE_WAIT_SECONDS = 300.0
# Rows per call into the kernel. Inductor's kernels hold the GIL while they run, so the block bounds how long
# other threads (the API's event loop, other requests) wait, to a few milliseconds for 64 MiB of float16. A
# row's sum does not depend on the block it is in (tested), and a call's own overhead is small next to a
# block's work (docs/benchmarks.md, item 6, third round).
KERNEL_BLOCK_ROWS = 131072


def _dtype_name(dtype: Any) -> str | None:
    """"float16" for torch.float16; None for anything that is not a torch dtype."""
    text = str(dtype)
    return text.removeprefix("torch.") if text.startswith("torch.") else None


def _row_dots(rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(n, m) float32: rows (n, k) in any float dtype, widened in registers, dotted with queries (m, k)."""
    return (rows.float()[:, None, :] * queries[None, :, :]).sum(-1)


class _CompiledDots:
    """The compiled kernel and its life: off -> enabled -> compiling -> ready, or failed (eager for good)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the state below, and serialises calls into dynamo
        self._enabled = False
        self._ready = threading.Event()
        self._function: Any = None
        self._failure: str | None = None
        self._started = False  # whether a compile was started since enabling

    def enable(self, warm_up: bool) -> None:
        with self._lock:
            self._enabled = True
            start = warm_up and not self._started
            self._started = self._started or warm_up
        if start:
            threading.Thread(target=self._compile, name="influence-compile", daemon=True).start()

    def _compile_once(self) -> None:
        """Compile in the calling thread unless a compile was started already (lazy enabling)."""
        with self._lock:
            if self._started or not self._enabled:
                return
            self._started = True
        self._compile()

    def disable(self) -> None:
        """Back to eager scoring (tests; a compile in progress finishes but is not used)."""
        with self._lock:
            self._enabled = False
            self._function = None
            self._failure = None
            self._started = False
            self._ready = threading.Event()

    def _compile(self) -> None:
        ready = self._ready
        function = None
        failure = None
        try:
            # Inside the try: inductor (a compiler toolchain) may be missing or broken, and then scoring stays on BLAS.
            import torch._inductor.config as inductor_config

            # Build in this thread: no pool of compile worker processes for one small kernel.
            inductor_config.compile_threads = 1
            compiled = torch.compile(_row_dots, dynamic=True)
            # One call per dtype and per query count class (m = 1 is specialised, m >= 2 is symbolic), so that
            # no query compiles again later.
            with torch.no_grad():
                for dtype in (getattr(torch, name) for name in COMPILED_DTYPES):
                    rows = torch.randn(64, 32).to(dtype)
                    for m in (1, 2):
                        queries = torch.randn(m, 32)
                        got = compiled(rows, queries)
                        expected = rows.double() @ queries.double().T
                        if not torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5):
                            raise RuntimeError(f"compiled kernel disagrees with float64 for {dtype}, m={m}")
            function = compiled
        except Exception as exc:  # no compiler, an inductor error: scoring stays eager
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("compiled scoring is unavailable, scoring eagerly: %s", failure)
        with self._lock:
            if ready is self._ready and self._enabled:
                self._function = function
                self._failure = failure
            ready.set()

    def status(self) -> dict[str, Any]:
        with self._lock:
            if not self._enabled:
                state = "off"
            elif not self._started:
                state = "enabled"
            elif not self._ready.is_set():
                state = "compiling"
            elif self._function is not None:
                state = "ready"
            else:
                state = "failed"
            return {"state": state, "failure": self._failure}

    def serves(self, dtype: Any, num_queries: int) -> bool:
        """Whether CPU rows of this dtype against this many query vectors go through the kernel (waiting for a
        compile in progress). Every such call of the process then does, whatever the rows' container or
        blocking: a row's score never depends on the path that computed it."""
        if not (self._enabled and _dtype_name(dtype) in COMPILED_DTYPES and 1 <= num_queries <= COMPILED_MAX_QUERIES):
            return False
        self._compile_once()
        return self._wait(self._ready) and self._function is not None

    def wait_if_compiling(self) -> None:
        """Wait for a compile already running (never start one)."""
        with self._lock:
            running = self._enabled and self._started and not self._ready.is_set()
            ready = self._ready
        if running:
            self._wait(ready)

    def _wait(self, ready: threading.Event) -> bool:
        """Wait for a compile to end; past COMPILE_WAIT_SECONDS give it up for good. Whether it ended."""
        if ready.wait(COMPILE_WAIT_SECONDS):
            return True
        self._give_up(ready, f"the compile did not finish within {COMPILE_WAIT_SECONDS:.0f} s")
        return False

    def _give_up(self, ready: threading.Event, why: str) -> None:
        """Mark a compile that hangs as failed for good: a fresh, set event, so the compile's late result (tied
        to the old event) is discarded and no call waits again."""
        with self._lock:
            if ready is not self._ready or ready.is_set():
                return
            log.warning("compiled scoring is unavailable, scoring eagerly: %s", why)
            self._failure = why
            self._function = None
            done = threading.Event()
            done.set()
            self._ready = done

    def __call__(self, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(n, m) float32 dots of CPU rows (n, k) with queries (m, k); call when serves() said so."""
        n, k = rows.shape
        queries = queries.to(torch.float32)
        if n < 2 or k < 2:
            # Sizes 0 and 1 are specialised by dynamo (another compile): pad with zeros instead, which leaves
            # each real row's sum as it is (its extra products are exact zeros).
            padded = torch.zeros((max(n, 2), max(k, 2)), dtype=rows.dtype)
            padded[:n, :k] = rows
            wide = torch.zeros((queries.shape[0], max(k, 2)), dtype=torch.float32)
            wide[:, :k] = queries
            return self(padded, wide)[:n]
        queries = queries.contiguous()
        if n > KERNEL_BLOCK_ROWS:
            blocks = range(0, n, KERNEL_BLOCK_ROWS)
            return torch.cat([self(rows[i : i + KERNEL_BLOCK_ROWS], queries) for i in blocks])
        with self._lock, torch.no_grad():
            function = self._function
            if function is None:  # disabled meanwhile: the same sums, eagerly
                return rows.float() @ queries.T
            return function(rows.contiguous(), queries)


COMPILED_DOTS = _CompiledDots()


def enable_compiled_scoring(*, warm_up: bool = True) -> None:
    """Score float16 rows against up to COMPILED_MAX_QUERIES vectors with the compiled kernel.

    warm_up=True compiles now in a background thread (the API at start-up); False compiles at the first
    call that uses the kernel (a worker, which may never need it). Idempotent."""
    COMPILED_DOTS.enable(warm_up)


def disable_compiled_scoring() -> None:
    """Score with the eager path only."""
    COMPILED_DOTS.disable()


def wait_for_compile_in_progress() -> None:
    """Return once no compile of the kernel is running (at once when none is; never starts one): for a caller
    about to time other work, which a compile beside it would slow (influence.threads' first small batch)."""
    COMPILED_DOTS.wait_if_compiling()


def compiled_scoring_status() -> dict[str, Any]:
    """{"state": "off" | "enabled" (not compiled yet) | "compiling" | "ready" | "failed", "failure": why}."""
    return COMPILED_DOTS.status()
