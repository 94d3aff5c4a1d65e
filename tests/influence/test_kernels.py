"""The compiled scoring kernel (influence.kernels): the same numbers as float64 brute force to float32 rounding,
used by score_layer exactly where it should be, and a clean fall back to BLAS when it cannot compile."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import influence.kernels as kernels
import influence.scoring as scoring
from influence.estimators import make_estimator
from influence.kernels import COMPILED_DOTS, COMPILED_MAX_QUERIES, _CompiledDots, compiled_scoring_status
from influence.scoring import score_layer


@pytest.fixture(scope="module")
def compiled():
    """The process's kernel, compiled once for this module (a real torch.compile with the real compiler)."""
    kernels.enable_compiled_scoring(warm_up=False)
    assert COMPILED_DOTS.serves(torch.float16, 1)  # compiles here, in this thread
    assert compiled_scoring_status() == {"state": "ready", "failure": None}
    return COMPILED_DOTS


def float32_bound(train: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Worst-case error of a float32 dot product of length k summed in any order: k * eps * sum |x_t q_t|
    (the products of float16 and float32 values are exact in float64)."""
    k = train.shape[1]
    magnitude = np.abs(train.astype(np.float64)) @ np.abs(queries.astype(np.float64)).T
    return k * np.finfo(np.float32).eps * magnitude + 1e-30


@pytest.mark.parametrize("m", [1, 2, 5, COMPILED_MAX_QUERIES])
@pytest.mark.parametrize("k", [3, 40, 256])
def test_the_kernel_matches_float64_to_float32_rounding(compiled, m, k):
    rng = np.random.default_rng(k * 10 + m)
    n = 1031
    train = (rng.standard_normal((n, k)) * np.exp(rng.standard_normal((n, 1)))).astype(np.float16)
    queries = rng.standard_normal((m, k)).astype(np.float32)
    exact = train.astype(np.float64) @ queries.astype(np.float64).T
    got = compiled(torch.from_numpy(train), torch.from_numpy(queries))
    assert got.dtype == torch.float32 and tuple(got.shape) == (n, m)
    assert np.all(np.abs(got.numpy() - exact) <= float32_bound(train, queries))
    # and the eager path keeps the same bound: neither is the more exact one
    eager = torch.from_numpy(train).float() @ torch.from_numpy(queries).T
    assert np.all(np.abs(eager.numpy() - exact) <= float32_bound(train, queries))


class CallCounter:
    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = 0

    def serves(self, dtype, num_queries):
        return self.kernel.serves(dtype, num_queries)

    def __call__(self, rows, queries):
        self.calls += 1
        return self.kernel(rows, queries)


@pytest.mark.parametrize("name", ["grad-dot", "cosine"])
def test_score_layer_uses_the_kernel_for_float16_rows_and_few_queries(tmp_path, compiled, monkeypatch, name):
    rng = np.random.default_rng(1)
    train = rng.standard_normal((500, 24)).astype(np.float16)
    train[7] = 0  # a zero row: cosine gives 0, not NaN
    np.save(tmp_path / "layer.npy", train)
    memmap = np.load(tmp_path / "layer.npy", mmap_mode="r")  # read-only, as a store serves it
    norms = np.linalg.norm(train.astype(np.float32), axis=1)
    queries = rng.standard_normal((3, 24)).astype(np.float32)
    estimator = make_estimator(name)
    counter = CallCounter(compiled)
    monkeypatch.setattr(scoring, "COMPILED_DOTS", counter)

    got = score_layer(memmap, queries, estimator, norms)

    assert counter.calls == 1
    expected = estimator.score(torch.from_numpy(train.astype(np.float64)), torch.from_numpy(queries).double())
    scaled_bound = float32_bound(train, queries)
    if name == "cosine":
        scaled_bound = scaled_bound / np.where(norms > 0, norms, 1.0)[:, None] + 1e-6 * np.abs(expected.numpy())
    assert np.all(np.abs(got.numpy() - expected.numpy()) <= scaled_bound)
    assert np.all(got[7].numpy() == 0)


class LazyRows:
    """An array-like that only serves row slices (like a report's view of a store's live rows)."""

    def __init__(self, matrix: np.ndarray, with_dtype: bool = True):
        self.matrix = matrix
        self.shape = matrix.shape
        if with_dtype:
            self.dtype = matrix.dtype

    def __getitem__(self, key):
        return np.asarray(self.matrix[key])


@pytest.mark.parametrize("name", ["grad-dot", "cosine"])
def test_a_row_scores_the_same_bit_for_bit_whatever_holds_or_blocks_it(compiled, name):
    """Query, audit, report and batch check read rows through memmaps, lazy views, blocks or single rows: with
    the kernel on, the same float16 row against the same query gives the same float32 score on every path (a
    report's detrimental rows are a query's harmful hits, near-ties included)."""
    rng = np.random.default_rng(3)
    train = rng.standard_normal((301, 20)).astype(np.float16)
    norms = np.linalg.norm(train.astype(np.float32), axis=1)
    queries = rng.standard_normal((2, 20)).astype(np.float32)
    estimator = make_estimator(name)
    whole = score_layer(train, queries, estimator, norms)
    assert torch.equal(score_layer(torch.from_numpy(train), queries, estimator, norms), whole)
    assert torch.equal(score_layer(LazyRows(train), queries, estimator, norms), whole)
    assert torch.equal(score_layer(train, queries, estimator, norms, chunk_rows=7), whole)
    for i in (0, 150, 300):
        assert torch.equal(score_layer(train[i : i + 1], queries, estimator, norms[i : i + 1]), whole[i : i + 1])
    if name == "cosine":  # norms computed per block when none are given, as score_transformed does
        computed = score_layer(LazyRows(train), queries, estimator, None, chunk_rows=50)
        assert torch.allclose(computed, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["float32 rows", "too many queries", "array-like without a dtype"])
def test_score_layer_keeps_blas_where_the_kernel_does_not_pay(compiled, monkeypatch, case):
    rng = np.random.default_rng(2)
    train = rng.standard_normal((64, 8)).astype(np.float16)
    queries = rng.standard_normal((2, 8)).astype(np.float32)
    estimator, norms = make_estimator("grad-dot"), None
    if case == "float32 rows":
        train = train.astype(np.float32)
    elif case == "too many queries":
        queries = rng.standard_normal((COMPILED_MAX_QUERIES + 1, 8)).astype(np.float32)
    source = LazyRows(train, with_dtype=False) if case == "array-like without a dtype" else train
    counter = CallCounter(compiled)
    monkeypatch.setattr(scoring, "COMPILED_DOTS", counter)
    got = score_layer(source, queries, estimator, norms)
    assert counter.calls == 0
    expected = estimator.score(torch.from_numpy(train.astype(np.float64)), torch.from_numpy(queries).double())
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_failed_compile_leaves_scoring_on_blas_and_says_why(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", no_compiler)
    kernel = _CompiledDots()
    assert kernel.status()["state"] == "off"
    kernel.enable(warm_up=False)
    assert kernel.status()["state"] == "enabled"
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(16, 8, generator=generator).half()
    assert not kernel.serves(torch.float16, 1)
    assert kernel.status() == {"state": "failed", "failure": "RuntimeError: no C++ compiler found"}
    # the process-wide switch in score_layer: a failed kernel scores through BLAS, correctly
    monkeypatch.setattr(scoring, "COMPILED_DOTS", kernel)
    queries = torch.randn(1, 8, generator=generator)
    got = score_layer(rows, queries, make_estimator("grad-dot"))
    assert torch.equal(got, rows.float() @ queries.T)  # the BLAS path itself


def test_a_background_warm_up_is_waited_for_and_disable_returns_to_blas(monkeypatch):
    compiled_calls = []

    def fake_compile(fn, dynamic):
        compiled_calls.append(dynamic)
        return fn  # the eager function stands in for the compiled one: this test is about the life cycle

    monkeypatch.setattr(torch, "compile", fake_compile)
    kernel = _CompiledDots()
    kernel.enable(warm_up=True)
    kernel.enable(warm_up=True)  # idempotent: one compile
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 4, generator=generator).half()
    queries = torch.randn(2, 4, generator=generator)
    assert kernel.serves(torch.float16, 2)  # waits for the background compile
    assert compiled_calls == [True]
    assert kernel.status() == {"state": "ready", "failure": None}
    exact = rows.double() @ queries.double().T
    bound = float32_bound(rows.numpy(), queries.numpy())
    assert np.all(np.abs(kernel(rows, queries).double().numpy() - exact.numpy()) <= bound)
    kernel.disable()
    assert kernel.status()["state"] == "off"
    assert not kernel.serves(torch.float16, 2)


def test_rows_beyond_one_kernel_block_score_as_they_would_alone(compiled):
    """The kernel is called on blocks of KERNEL_BLOCK_ROWS rows (it holds the GIL while it runs); a row's score
    does not depend on the block it falls in."""
    rng = np.random.default_rng(4)
    n = kernels.KERNEL_BLOCK_ROWS + 3
    rows = torch.from_numpy(rng.standard_normal((n, 12)).astype(np.float16))
    queries = torch.from_numpy(rng.standard_normal((2, 12)).astype(np.float32))
    whole = compiled(rows, queries)
    assert tuple(whole.shape) == (n, 2)
    for i in (0, kernels.KERNEL_BLOCK_ROWS - 1, kernels.KERNEL_BLOCK_ROWS, n - 1):
        assert torch.equal(compiled(rows[i : i + 1], queries), whole[i : i + 1])


def test_reversed_and_foreign_byte_order_rows_still_score(compiled):
    rng = np.random.default_rng(5)
    train = rng.standard_normal((40, 6)).astype(np.float16)
    queries = rng.standard_normal((1, 6)).astype(np.float32)
    estimator = make_estimator("grad-dot")
    forward = score_layer(train, queries, estimator)
    assert torch.equal(score_layer(train[::-1], queries, estimator), forward.flip(0))  # negative strides
    big_endian = train.astype(np.float64).astype(">f8")
    expected = torch.from_numpy(train.astype(np.float64)) @ torch.from_numpy(queries.astype(np.float64)).T
    assert torch.allclose(score_layer(big_endian, queries, estimator).double(), expected, rtol=1e-6, atol=1e-6)


def test_a_hung_compile_is_given_up_once_and_its_late_result_ignored(monkeypatch):
    release = threading.Event()

    def hanging_compile(fn, dynamic):
        release.wait(30)
        return fn

    monkeypatch.setattr(torch, "compile", hanging_compile)
    monkeypatch.setattr(kernels, "COMPILE_WAIT_SECONDS", 0.2)
    kernel = _CompiledDots()
    kernel.enable(warm_up=True)
    assert not kernel.serves(torch.float16, 1)
    status = kernel.status()
    assert status["state"] == "failed" and "did not finish within" in status["failure"]
    started = time.monotonic()
    assert not kernel.serves(torch.float16, 1)  # no second wait
    assert time.monotonic() - started < 0.1
    release.set()
    deadline = time.monotonic() + 10
    while threading.active_count() > 1 and any(t.name == "influence-compile" for t in threading.enumerate()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert kernel.status()["state"] == "failed"  # the compile finished late: not used
