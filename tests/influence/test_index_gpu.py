"""FAISS on the GPU, tested without one: with faiss-cpu nothing moves; with a stand-in for faiss-gpu that says it
sees one GPU, indexes move on build and load, searches keep their answers (deleted rows included, which a GPU
index cannot filter itself), and files on disk are CPU indexes.

The stand-in's "GPU index" is a real faiss index (a clone) behind a proxy that behaves as a GPU index does where
it matters here: it refuses search parameters (a GPU index ignores ID selectors) and a k above the GPU's limit,
and faiss.write_index cannot take it (a proxy is no faiss object). index_cpu_to_gpu and index_gpu_to_cpu record
their calls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

import influence.index.devices as devices
import influence.index.kinds as kinds
from influence.errors import InvalidInputError
from influence.index import (
    LayerIndex,
    build_store_indexes,
    faiss_gpu_count,
    load_store_indexes,
    sync_store_indexes,
    to_search_device,
)
from influence.store import FeatureStore
from tests.influence.test_index import LAYERS, brute_force_top_k, clustered, make_store


class ProxyGpuIndex:
    """A "GPU index": a real faiss index behind a proxy, searched only the way a GPU index can be."""

    def __init__(self, real: Any, gpu: int, calls: list) -> None:
        object.__setattr__(self, "real", real)
        object.__setattr__(self, "gpu", gpu)
        object.__setattr__(self, "calls", calls)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.real, name, value)

    def search(self, x: np.ndarray, k: int, *, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        assert params is None, "a GPU index ignores search parameters (ID selectors)"
        assert k <= devices.GPU_MAX_K
        self.calls.append(("search", k))
        return self.real.search(x, k)

    def train(self, x: np.ndarray) -> None:
        self.calls.append(("train", len(x)))
        self.real.train(x)


class FakeGpuFaiss:
    """faiss with GPU support and `gpus` GPUs: the real module for everything but the GPU functions."""

    def __init__(self, gpus: int = 1, refuse: bool = False) -> None:
        self.gpus = gpus
        self.refuse = refuse
        self.calls: list[tuple] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(faiss, name)

    class StandardGpuResources:
        pass

    class GpuClonerOptions:
        useFloat16 = False

    def get_num_gpus(self) -> int:
        return self.gpus

    def index_cpu_to_gpu(self, resources: Any, gpu: int, index: Any, options: Any) -> ProxyGpuIndex:
        assert isinstance(resources, self.StandardGpuResources)
        if self.refuse:
            raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl: out of memory")
        self.calls.append(("to_gpu", type(index).__name__, gpu, bool(index.is_trained), options.useFloat16))
        return ProxyGpuIndex(faiss.clone_index(index), gpu, self.calls)

    def index_gpu_to_cpu(self, index: Any) -> Any:
        assert isinstance(index, ProxyGpuIndex), "only a GPU index is copied back"
        self.calls.append(("to_cpu", type(index.real).__name__))
        return faiss.clone_index(index.real)

    def moves(self, what: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == what]


@pytest.fixture
def gpu(monkeypatch) -> FakeGpuFaiss:
    fake = FakeGpuFaiss()
    monkeypatch.setattr(devices, "faiss", fake)
    monkeypatch.setattr(devices, "_RESOURCES", {})
    return fake


def test_with_faiss_cpu_nothing_moves() -> None:
    """The faiss installed here has no GPU support: a worker whose device is cuda searches on the CPU."""
    assert not hasattr(faiss, "StandardGpuResources") and faiss_gpu_count() == 0
    rows, queries = clustered(300, 8, 4, 3, seed=0)
    index = faiss.IndexFlatIP(8)
    assert to_search_device(index, "cuda") is index
    built = LayerIndex.build(rows, "flat", device="cuda")
    assert built.device == "cpu"
    np.testing.assert_array_equal(built.search(queries, 5)[1], brute_force_top_k(rows, queries, 5)[1])


def test_a_gpu_without_a_cuda_device_or_gpus_moves_nothing(monkeypatch) -> None:
    none = FakeGpuFaiss(gpus=0)
    monkeypatch.setattr(devices, "faiss", none)
    rows, _ = clustered(300, 8, 4, 3, seed=0)
    assert LayerIndex.build(rows, "flat", device="cuda").device == "cpu"
    one = FakeGpuFaiss(gpus=1)
    monkeypatch.setattr(devices, "faiss", one)
    for device in (None, "cpu"):
        assert LayerIndex.build(rows, "flat", device=device).device == "cpu"
    assert none.calls == one.calls == []


def test_devices_are_checked(gpu) -> None:
    assert devices.search_gpu("cuda") == 0 and devices.search_gpu("cuda:0") == 0
    with pytest.raises(InvalidInputError, match="faiss sees 1 GPU"):
        devices.search_gpu("cuda:3")
    with pytest.raises(InvalidInputError, match="unknown device"):
        devices.search_gpu("banana")


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_built_on_the_gpu_answers_as_on_the_cpu(gpu, kind: str) -> None:
    """Moved before training and adding (an ivf index is trained where it lies), float32 vectors (float16
    storage would make the exact kind inexact), and the same answers as the CPU build, deleted rows included."""
    rows, queries = clustered(2000, 16, 8, 6, seed=1)
    on_cpu = LayerIndex.build(rows, kind)
    on_gpu = LayerIndex.build(rows, kind, device="cuda")
    assert on_gpu.device == "cuda:0" and on_cpu.device == "cpu" and on_gpu.params == on_cpu.params
    faiss_class = "IndexFlatIP" if kind == "flat" else "IndexIVFFlat"
    assert gpu.moves("to_gpu") == [("to_gpu", faiss_class, 0, kind == "flat", False)]
    if kind == "ivf":
        assert ("train", 2000) in gpu.calls  # on the GPU copy
    excluded = [int(p) for p in on_cpu.search(queries, 3)[1][:, 0]] + [5, 7, 7]
    for exclude in (None, excluded):
        cpu_scores, cpu_positions = on_cpu.search(queries, 10, exclude=exclude)
        gpu_scores, gpu_positions = on_gpu.search(queries, 10, exclude=exclude)
        np.testing.assert_array_equal(gpu_positions, cpu_positions)
        np.testing.assert_array_equal(gpu_scores, cpu_scores)
    assert not np.isin(gpu_positions, excluded).any()
    if kind == "flat":
        live = np.setdiff1d(np.arange(len(rows)), excluded)
        _, expected = brute_force_top_k(rows[live], queries, 10)
        np.testing.assert_array_equal(gpu_positions, live[expected])
    # over-fetched by the number of excluded rows (5 distinct), then filtered
    assert ("search", 10 + len(set(excluded))) in gpu.calls


def test_gpu_padding_and_the_cpu_copy_past_the_gpu_k_limit(gpu, monkeypatch) -> None:
    rows, queries = clustered(40, 8, 2, 2, seed=2)
    index = LayerIndex.build(rows, "flat", device="cuda")
    scores, positions = index.search(queries, 50, exclude=[0, 1])
    assert (positions[:, 38:] == -1).all() and np.isneginf(scores[:, 38:]).all()
    live = np.arange(2, 40)
    np.testing.assert_array_equal(positions[:, :38], live[brute_force_top_k(rows[live], queries, 38)[1]])
    # More than the GPU's k: a CPU copy searches with the selector, same answer.
    monkeypatch.setattr(kinds, "GPU_MAX_K", 8)
    assert not gpu.moves("to_cpu")
    again_scores, again_positions = index.search(queries, 50, exclude=[0, 1])
    assert gpu.moves("to_cpu") == [("to_cpu", "IndexFlatIP")]
    np.testing.assert_array_equal(again_positions, positions)
    np.testing.assert_array_equal(again_scores, scores)


def test_hnsw_stays_on_the_cpu(gpu) -> None:
    rows, _ = clustered(500, 8, 4, 3, seed=3)
    index = LayerIndex.build(rows, "hnsw", device="cuda")
    assert index.device == "cpu" and gpu.calls == []
    assert to_search_device(index.faiss_index, "cuda") is index.faiss_index


def test_saved_as_cpu_indexes_and_moved_on_load(gpu, tmp_path: Path) -> None:
    rows, queries = clustered(500, 8, 4, 3, seed=4)
    index = LayerIndex.build(rows, "flat", device="cuda")
    index.save(tmp_path / "a.faiss")
    assert gpu.moves("to_cpu") == [("to_cpu", "IndexFlatIP")]
    on_disk = faiss.read_index(str(tmp_path / "a.faiss"))
    assert type(on_disk) is faiss.IndexFlatIP and on_disk.ntotal == 500
    gpu.calls.clear()
    assert LayerIndex.load(tmp_path / "a.faiss").device == "cpu" and gpu.calls == []
    loaded = LayerIndex.load(tmp_path / "a.faiss", device="cuda")
    assert loaded.device == "cuda:0" and gpu.moves("to_gpu") == [("to_gpu", "IndexFlatIP", 0, True, False)]
    np.testing.assert_array_equal(loaded.search(queries, 5)[1], brute_force_top_k(rows, queries, 5)[1])


def test_store_indexes_on_the_gpu(gpu, tmp_path: Path) -> None:
    """A worker with a GPU builds and syncs on it and writes CPU files; an API with one loads them onto it;
    a process without one reads the same files."""
    store, _ = make_store(tmp_path / "s")
    queries = np.random.default_rng(7).normal(size=(5, 16)).astype(np.float32)
    name = "block.3.attn.v.lora_B"
    built = build_store_indexes(store, kind="flat", device="cuda")
    assert {layer.device for layer in built.values()} == {"cuda:0"}
    assert len(gpu.moves("to_cpu")) == len(LAYERS)  # each saved as a CPU index
    for path in (store.path / "faiss").glob("*.faiss"):
        assert type(faiss.read_index(str(path))) is faiss.IndexFlatIP

    loaded = load_store_indexes(FeatureStore.open(store.path), device="cuda")
    assert {layer.device for layer in loaded.values()} == {"cuda:0"}
    _, expected = brute_force_top_k(store.layer(name), queries, 7)
    np.testing.assert_array_equal(loaded[name].search(queries, 7)[1], expected)

    new = {n: 5.0 * np.random.default_rng(8).normal(size=(20, d)).astype(np.float32) for n, d in LAYERS}
    store.append(np.arange(10_000, 10_020), new)
    synced = sync_store_indexes(store, device="cuda")
    assert {n: (i.ntotal, i.device) for n, i in synced.items()} == {n: (620, "cuda:0") for n, _ in LAYERS}
    on_cpu = load_store_indexes(store, layers=[name])[name]
    assert on_cpu.device == "cpu" and on_cpu.ntotal == 620
    _, expected = brute_force_top_k(store.layer(name), queries, 7)
    np.testing.assert_array_equal(on_cpu.search(queries, 7)[1], expected)


def test_a_gpu_that_refuses_the_index_leaves_it_on_the_cpu(monkeypatch, caplog) -> None:
    monkeypatch.setattr(devices, "faiss", FakeGpuFaiss(refuse=True))
    monkeypatch.setattr(devices, "_RESOURCES", {})
    rows, queries = clustered(300, 8, 4, 3, seed=5)
    with caplog.at_level(logging.WARNING, logger="influence.index.devices"):
        index = LayerIndex.build(rows, "flat", device="cuda")
    assert index.device == "cpu" and "out of memory" in caplog.text
    np.testing.assert_array_equal(index.search(queries, 5)[1], brute_force_top_k(rows, queries, 5)[1])
