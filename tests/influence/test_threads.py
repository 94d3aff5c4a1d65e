"""Small batches on the one-intra-op-thread worker (influence.threads): where they run, with how many threads,
what they leave of the process' thread settings, and that their features are those of the inline path."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

import influence.gradients as gradients
import influence.threads as threads
from influence.data import Example, encode_examples, iter_batches, pad_token_id
from influence.errors import InvalidInputError
from influence.layers import discover_layers
from influence.loading import load_model
from influence.projection import ProjectionSpec
from influence.threads import ONE_THREAD, SMALL_BATCH_TOKENS, is_small_batch


@pytest.fixture
def one_thread_pays():
    """The process' measured decision set to 'one thread pays' for the test, then put back."""
    before = ONE_THREAD.one_thread_pays
    ONE_THREAD.one_thread_pays = True
    yield
    ONE_THREAD.one_thread_pays = before


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for the test (CI may run on one: the worker is then not used)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _in_new_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    thread.join()
    return out["value"]


def test_the_worker_runs_on_one_thread_and_leaves_every_other_thread_alone(two_threads):
    runner = threads._SingleThreadRunner()  # a fresh one: the module's may have been started by earlier tests
    waiting = threading.Event()
    release = threading.Event()
    counts = {}

    def existing_thread():  # started before the worker, first touches torch after it
        waiting.set()
        release.wait(30)
        counts["existing"] = torch.get_num_threads()

    before = threading.Thread(target=existing_thread)
    before.start()
    waiting.wait(30)
    runner.start()
    release.set()
    before.join()
    assert runner.on_worker(torch.get_num_threads) == 1
    assert runner.on_worker(lambda: threading.current_thread().name).startswith("influence-one-thread")
    # The caller, a thread that existed, and a thread started afterwards all keep the process default.
    assert torch.get_num_threads() == 2
    assert counts["existing"] == 2
    assert _in_new_thread(torch.get_num_threads) == 2


def test_the_worker_restores_the_process_default_not_the_callers_count(two_threads):
    """The default that new threads take can differ from the caller's own count (another thread set it)."""
    _in_new_thread(lambda: torch.set_num_threads(3))  # the default is now 3; this thread keeps 2
    assert torch.get_num_threads() == 2 and _in_new_thread(torch.get_num_threads) == 3
    runner = threads._SingleThreadRunner()
    runner.start()
    assert runner.on_worker(torch.get_num_threads) == 1
    assert torch.get_num_threads() == 2 and _in_new_thread(torch.get_num_threads) == 3


def test_the_worker_passes_results_and_errors_through_and_nests_inline(two_threads):
    assert ONE_THREAD.on_worker(lambda a, b=0: a + b, 2, b=3) == 5

    def fail():
        raise InvalidInputError("bad input on the worker")

    with pytest.raises(InvalidInputError, match="bad input on the worker"):
        ONE_THREAD.on_worker(fail)

    def nested():
        # Called from the worker itself, on_worker runs inline instead of waiting on itself, even if the
        # work raised the worker's thread count meanwhile.
        torch.set_num_threads(2)
        try:
            return ONE_THREAD.on_worker(lambda: threading.current_thread().name)
        finally:
            torch.set_num_threads(1)

    assert ONE_THREAD.on_worker(nested).startswith("influence-one-thread")
    assert ONE_THREAD.on_worker(torch.get_num_threads) == 1


def test_one_thread_callers_run_inline():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert ONE_THREAD.on_worker(lambda: threading.current_thread()) is threading.current_thread()
    finally:
        torch.set_num_threads(before)


def _child_thread_count(queue):
    queue.put(ONE_THREAD.on_worker(torch.get_num_threads))


def test_a_forked_child_starts_its_own_worker(two_threads):
    # Started in the parent: the child inherits it without its thread.
    assert ONE_THREAD.on_worker(torch.get_num_threads) == 1
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_thread_count, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == 1


@pytest.mark.parametrize("one_thread_is_faster", [True, False])
def test_the_first_small_work_decides_the_faster_way(two_threads, monkeypatch, one_thread_is_faster):
    """run_small times its first piece of work both ways and keeps the faster; here the work is made slow on
    one way (a sleep chosen by the intra-op thread count it sees), as a slow wake-up or a slow core would."""
    runner = threads._SingleThreadRunner()
    calls = []

    def work(value):
        on_one = torch.get_num_threads() == 1
        calls.append(on_one)
        time.sleep(0.001 if on_one == one_thread_is_faster else 0.02)
        return value * 2, on_one

    # The first call returns the chosen way's result (the ways may differ in the last bits; later calls go the
    # chosen way), whichever ran last.
    assert runner.run_small(work, 21) == (42, one_thread_is_faster)
    assert calls.count(True) == calls.count(False) == threads.CALIBRATION_RUNS
    assert runner.one_thread_pays is one_thread_is_faster
    assert runner.calibration["one thread"] != runner.calibration["all threads"]
    calls.clear()
    assert [runner.run_small(work, 1) for _ in range(3)] == [(2, one_thread_is_faster)] * 3
    assert calls == [one_thread_is_faster] * 3  # decided once: no more timing, the chosen way only


def test_close_timings_keep_every_thread(two_threads):
    """One thread is chosen only when clearly faster (CALIBRATION_MARGIN): equal timings keep torch's own way."""
    runner = threads._SingleThreadRunner()

    def work():
        time.sleep(0.01)
        return torch.get_num_threads()

    assert runner.run_small(work) == 2  # the all-threads result, the chosen way
    assert runner.one_thread_pays is False
    one, every = runner.calibration["one thread"], runner.calibration["all threads"]
    assert one >= (1 - threads.CALIBRATION_MARGIN) * every


def test_a_fixed_choice_is_not_measured(two_threads):
    runner = threads._SingleThreadRunner()
    runner.decide(one_thread=True)
    assert runner.status() == {"one_thread": True, "measured_ms": None}
    assert runner.run_small(torch.get_num_threads) == 1  # straight to the worker: no timing runs
    runner.decide(one_thread=False)
    assert runner.run_small(torch.get_num_threads) == 2


def test_small_batch_threshold():
    assert is_small_batch(1, SMALL_BATCH_TOKENS)
    assert is_small_batch(4, SMALL_BATCH_TOKENS // 4)
    assert not is_small_batch(1, SMALL_BATCH_TOKENS + 1)
    assert not is_small_batch(32, 12)


def _batch(tokenizer, texts, labels):
    encoded = encode_examples(
        tokenizer, [Example(t, label=y) for t, y in zip(texts, labels, strict=True)], "classification", 64
    )
    return next(iter(iter_batches(encoded, pad_token_id(tokenizer), "classification", 64, sort_by_length=False)))


def test_small_batches_featurize_on_the_worker_with_the_inline_features(
    two_threads, one_thread_pays, tiny_model_dir, sst2_train
):
    loaded = load_model(tiny_model_dir("bert", "classification"), task="classification", num_labels=3)
    model = loaded.model
    featurizer = gradients.Featurizer(model, discover_layers(model), ProjectionSpec("factorized", 64, seed=3))
    texts = [row.text for row in sst2_train[:40]]
    small = _batch(loaded.tokenizer, texts[:2], [0, 1])
    large = _batch(loaded.tokenizer, texts, [i % 2 for i in range(40)])
    assert is_small_batch(*small.input_ids.shape) and not is_small_batch(*large.input_ids.shape)

    seen = []
    first_block = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    hook = first_block.register_forward_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads()))
    )
    try:
        on_worker = featurizer.featurize(small)
        featurizer.featurize(large)
    finally:
        hook.remove()
    assert seen[0][0].startswith("influence-one-thread") and seen[0][1] == 1
    assert seen[1] == (threading.current_thread().name, 2)

    inline_path = gradients.is_small_batch
    gradients.is_small_batch = lambda rows, length: False
    try:
        inline = featurizer.featurize(small)
    finally:
        gradients.is_small_batch = inline_path
    assert on_worker.features.keys() == inline.features.keys()
    for name, value in on_worker.features.items():
        # One thread or two only changes the order of float32 sums inside the GEMMs.
        torch.testing.assert_close(value, inline.features[name], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(on_worker.losses, inline.losses, rtol=1e-5, atol=1e-7)
