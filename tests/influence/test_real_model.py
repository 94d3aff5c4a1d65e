"""Real-model check: the packaged MiniLM, LoRA r=4 on query and value, fine-tuned on real SST-2 rows; all layers
featurized end to end into a feature store; factorized grad-dot at the default dimension against exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from influence.data import Example, encode_examples, iter_batches, stratified_subsample
from influence.featurize import build_store, featurize_examples
from influence.gradients import Featurizer, per_sample_gradients
from influence.layers import discover_layers, select_layers
from influence.loading import load_model, packaged_minilm_path
from influence.projection import DEFAULT_DIM, ProjectionSpec
from influence.store import FeatureStore
from tests.conftest import manifest_for

N_TRAIN, N_TEST, MAX_LENGTH = 256, 32, 64


@pytest.fixture(scope="module")
def tuned(minilm_run):
    """MiniLM + LoRA (r = 4, query and value) fine-tuned on 256 SST-2 rows (tests/influence/conftest.py's run)."""
    return load_model(packaged_minilm_path(), adapter=minilm_run["result"].best_adapter)


def test_all_layers_end_to_end_and_factorized_matches_exact(
    tuned, sst2_train, sst2_validation, tmp_path, record_property
):
    model, tokenizer = tuned.model, tuned.tokenizer
    layers = discover_layers(model)
    assert len(layers) == 63 and {layer.kind for layer in layers} == {"embedding", "linear"}
    lora_layers = select_layers(layers, "role:lora")
    assert len(lora_layers) == 24

    train = stratified_subsample(sst2_train[1000:], N_TRAIN, seed=1)
    test = sst2_validation[:N_TEST]
    featurizer = Featurizer(model, layers, ProjectionSpec("factorized", DEFAULT_DIM, seed=0))

    # every layer, end to end into a store: chunks, finalize, reopen with checksums
    manifest = manifest_for(
        featurizer,
        N_TRAIN,
        96,
        max_length=MAX_LENGTH,
        model_id="minilm",
        weights_hash=tuned.weights_hash,
        tokenizer_name="minilm",
        dataset_hash="sst2-256",
    )
    store = FeatureStore.create(tmp_path / "store", manifest)
    assert build_store(featurizer, tokenizer, train, store, batch_size=32) == [0, 1, 2]
    store.finalize()
    store = FeatureStore.open(tmp_path / "store")
    assert store.num_rows == N_TRAIN and store.layers == [layer.name for layer in layers]
    assert all(store.layer(name).shape == (N_TRAIN, featurizer.dims[name]) for name in store.layers)
    assert store.layer("embed").shape[1] == DEFAULT_DIM and float(np.abs(store.layer("embed")).sum()) > 0

    queries = featurize_examples(featurizer, tokenizer, test, "classification", max_length=MAX_LENGTH)
    assert queries.predictions.shape == (N_TEST,)

    # exact per-sample gradients of the LoRA layers, without projection
    exact_train = _exact(model, tokenizer, train, lora_layers)
    exact_test = _exact(model, tokenizer, test, lora_layers)
    rhos = {}
    group_exact = np.zeros((N_TRAIN, N_TEST))
    group_projected = np.zeros((N_TRAIN, N_TEST))
    for layer in lora_layers:
        exact_scores = exact_train[layer.name] @ exact_test[layer.name].T
        projected = (
            store.layer(layer.name).astype(np.float64) @ queries.features[layer.name].astype(np.float64).T
        )
        rhos[layer.name] = _mean_spearman(exact_scores, projected)
        group_exact += exact_scores
        group_projected += projected
    values = np.array(list(rhos.values()))
    group_rho = _mean_spearman(group_exact, group_projected)
    print(
        f"Spearman, LoRA layers together: {group_rho:.3f}; per layer: min {values.min():.3f} "
        f"({min(rhos, key=rhos.get)}), median {np.median(values):.3f}, mean {values.mean():.3f}"
    )
    record_property("lora_group_spearman", group_rho)
    record_property("lora_layer_spearman", rhos)
    # The LoRA layers as the service scores them together, and the typical single layer, track exact scores.
    # A few single layers whose per-sample gradients are nearly orthogonal (exact scores near zero, e.g. block
    # 0's query) rank less faithfully at 256 dimensions: a dense Gaussian projection of the same size does no
    # better there (measured 0.59 vs 0.57), so this is the Johnson-Lindenstrauss limit, not the Kronecker form.
    assert group_rho >= 0.9
    assert np.median(values) >= 0.9


def _mean_spearman(exact: np.ndarray, projected: np.ndarray) -> float:
    """Mean over test columns of the Spearman correlation of the training-row rankings."""
    return float(np.mean([spearmanr(exact[:, j], projected[:, j]).statistic for j in range(exact.shape[1])]))


def _exact(model, tokenizer, examples: list[Example], layers) -> dict[str, np.ndarray]:
    encoded = encode_examples(tokenizer, examples, "classification", MAX_LENGTH)
    out = {layer.name: np.zeros((len(examples), layer.num_params)) for layer in layers}
    for batch in iter_batches(encoded, tokenizer.pad_token_id, "classification", 32):
        grads = per_sample_gradients(model, batch, layers)
        for name, value in grads.items():
            out[name][batch.row_ids.numpy()] = value.to(torch.float64).numpy()
    return out
