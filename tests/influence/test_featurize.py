"""Featurising example sets: input order, several checkpoints (TracIn-CP), resumable store builds, cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence.data import Example, collate, encode_examples
from influence.errors import InvalidInputError
from influence.estimators import make_estimator
from influence.featurize import CheckpointFeaturizer, build_store, featurize_examples
from influence.gradients import Featurizer, layer_cancellation, per_sample_gradients
from influence.layers import discover_layers, select_layers
from influence.loading import load_model
from influence.metrics import cancellation
from influence.projection import ProjectionSpec
from influence.store import FeatureStore
from tests.conftest import manifest_for


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(tiny_model_dir("bert"), num_labels=3, dtype=torch.float64)
    return loaded.model, loaded.tokenizer


def _examples(rows, n):
    return [Example(e.text, e.label) for e in rows[:n]]


def test_features_come_back_in_input_order(tiny, sst2_train):
    model, tokenizer = tiny
    layers = discover_layers(model)
    examples = _examples(sst2_train, 20)
    featurizer = Featurizer(model, layers, ProjectionSpec("identity"))
    result = featurize_examples(featurizer, tokenizer, examples, "classification", batch_size=6)
    encoded = encode_examples(tokenizer, examples, "classification", 128)
    exact = per_sample_gradients(model, collate(encoded, 0, "classification", range(20)), layers)
    for layer in layers:
        np.testing.assert_allclose(
            result.features[layer.name], exact[layer.name].float().numpy(), rtol=1e-5, atol=1e-7
        )
    with torch.no_grad():
        batch = collate(encoded, 0, "classification", range(20))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    np.testing.assert_array_equal(result.predictions, logits.argmax(-1).numpy())


def test_tracin_cp_over_two_checkpoints_equals_the_weighted_sum(tiny_model_dir, sst2_train):
    """sum_c eta_c g^c(x).g^c(z) from concatenated checkpoint features and the tracin-cp query weights."""
    folder = tiny_model_dir("bert")
    models = [load_model(folder, num_labels=3, dtype=torch.float64, seed=s) for s in (0, 1)]  # two heads
    etas = [0.3, 0.05]
    layers = select_layers(discover_layers(models[0].model), ["head", "block.1.attn.v"])
    featurizer = CheckpointFeaturizer(
        [Featurizer(m.model, layers, ProjectionSpec("identity")) for m in models]
    )
    train = featurize_examples(featurizer, models[0].tokenizer, _examples(sst2_train, 12), "classification")
    test = featurize_examples(
        featurizer, models[0].tokenizer, _examples(sst2_train[100:], 3), "classification"
    )
    encoded_train = encode_examples(models[0].tokenizer, _examples(sst2_train, 12), "classification", 128)
    encoded_test = encode_examples(models[0].tokenizer, _examples(sst2_train[100:], 3), "classification", 128)
    for layer in layers:
        dims = featurizer.checkpoint_dims[layer.name]
        estimator = make_estimator("tracin-cp", checkpoint_dims=dims, learning_rates=etas)
        got = estimator.score(
            torch.from_numpy(train.features[layer.name]).double(),
            torch.from_numpy(test.features[layer.name]).double(),
        )
        want = torch.zeros(12, 3, dtype=torch.float64)
        for eta, loaded in zip(etas, models, strict=True):
            g_train = per_sample_gradients(
                loaded.model, collate(encoded_train, 0, "classification", range(12)), [layer]
            )[layer.name]
            g_test = per_sample_gradients(
                loaded.model, collate(encoded_test, 0, "classification", range(3)), [layer]
            )[layer.name]
            want += eta * g_train @ g_test.T
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_store_build_resumes_after_a_crash_with_identical_features(tiny, sst2_train, tmp_path):
    model, tokenizer = tiny
    layers = discover_layers(model)
    examples = _examples(sst2_train, 40)
    featurizer = Featurizer(model, layers, ProjectionSpec("factorized", 16, seed=5))

    whole = FeatureStore.create(tmp_path / "whole", manifest_for(featurizer, 40, 8))
    build_store(featurizer, tokenizer, examples, whole, batch_size=5)
    whole.finalize()

    crashed = FeatureStore.create(tmp_path / "crashed", manifest_for(featurizer, 40, 8))
    calls = {"n": 0}

    def stop_after_two() -> bool:  # a worker that dies after two chunks
        calls["n"] += 1
        return calls["n"] > 2

    assert build_store(featurizer, tokenizer, examples, crashed, should_stop=stop_after_two) == [0, 1]
    # a new worker reopens it
    resumed = FeatureStore.create(tmp_path / "crashed", manifest_for(featurizer, 40, 8))
    assert resumed.pending_chunks() == [2, 3, 4]
    assert build_store(featurizer, tokenizer, examples, resumed, batch_size=7) == [2, 3, 4]
    resumed.finalize()
    for layer in layers:
        np.testing.assert_array_equal(resumed.layer(layer.name), whole.layer(layer.name))
    np.testing.assert_array_equal(resumed.row_ids(), np.arange(40))
    with pytest.raises(InvalidInputError):
        build_store(
            featurizer,
            tokenizer,
            examples[:10],
            FeatureStore.create(tmp_path / "x", manifest_for(featurizer, 40, 8)),
        )


def test_layer_cancellation_matches_the_formula_on_exact_gradients(tiny, sst2_train):
    """Streaming, row-sparse (embedding) cancellation == cancellation() of the dense per-sample gradients."""
    model, tokenizer = tiny
    layers = discover_layers(model)
    encoded = encode_examples(tokenizer, _examples(sst2_train, 24), "classification", 128)
    batches = [
        collate(encoded[i : i + 10], 0, "classification", range(i, min(i + 10, 24))) for i in (0, 10, 20)
    ]
    got = layer_cancellation(model, layers, batches, max_samples=17)  # stops inside the second batch
    exact = per_sample_gradients(model, collate(encoded[:17], 0, "classification", range(17)), layers)
    want = cancellation({name: value for name, value in exact.items()})
    for layer in layers:
        assert got[layer.name].num_samples == 17
        assert got[layer.name].l1_over_l1 == pytest.approx(want[layer.name].l1_over_l1, rel=1e-9), layer.name
        assert got[layer.name].l1_over_l2 == pytest.approx(want[layer.name].l1_over_l2, rel=1e-9), layer.name
    # row-sparse embedding gradients cancel little by construction (method.md §5)
    assert got["embed"].l1_over_l1 < np.median([got[layer.name].l1_over_l1 for layer in layers])
