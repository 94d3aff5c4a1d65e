"""What an index build reports about its layers: the ones whose stored features are all zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from influence import FeatureStore
from influence.statistics import fit_store_statistics, zero_layers
from influence.store import LayerSpec, StoreManifest


def test_zero_layers_reads_the_stored_values_and_datainf_still_fits(tmp_path: Path) -> None:
    layers = {"block.0.attn.q.lora_A": 8, "block.0.attn.q.lora_B": 8, "head": 4}
    manifest = StoreManifest(
        model_id="m", revision="r", weights_hash="w", tokenizer="t", dataset_hash="d",
        layers=[LayerSpec(name, dim, dim) for name, dim in layers.items()],
        projection={"kind": "gaussian", "dim": 8, "seed": 0}, dtype="float16", library_version="0.1.0",
        num_rows=40, chunk_size=20,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    features = {name: rng.normal(size=(40, dim)).astype(np.float32) for name, dim in layers.items()}
    # Gradients of a LoRA A tensor after a short fine-tune: non-zero, but below float16's smallest subnormal.
    features["block.0.attn.q.lora_A"] *= 1e-9
    store = FeatureStore.create(tmp_path / "store", manifest)
    for i, (start, stop) in enumerate(store.chunk_ranges()):
        store.write_chunk(i, np.arange(start, stop), {n: f[start:stop] for n, f in features.items()})
    store.finalize()
    assert float(np.asarray(store.norms("block.0.attn.q.lora_A")).min()) > 0  # the norms do not show it
    assert zero_layers(store) == ["block.0.attn.q.lora_A"]
    fit_store_statistics(store)  # DataInf of the zero layer fits (its scores are all zero) instead of failing
    assert all(store.has_layer_statistics(name) for name in layers)
