"""Estimator statistics beside a feature store: fitted once, restored per query, several fitted estimators per
layer, and stores saved before statistics were keyed by estimator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from influence.errors import InvalidInputError, StoreIncompleteError
from influence.estimators import Estimator, fitted_estimator_names, make_estimator
from influence.scoring import score_layer
from influence.statistics import fit_store_statistics, missing_statistics, store_estimators
from influence.store import FeatureStore, LayerSpec, StoreManifest
from influence.tokens import TokenRows
from tests.plugins import loaded_plugin

VOCAB, WIDTH, ROWS = 12, 4, 30
DENSE = {"block.0.attn.q": 5, "head": 3}
LAYERS = ["embed", *DENSE]
DATAINF_KEYS = {"damping", "num_samples", "matrix"}


def _token_rows(rng: np.random.Generator, rows: int) -> TokenRows:
    ids = torch.from_numpy(rng.integers(0, VOCAB, size=(rows, 5)))
    return TokenRows.from_positions(ids, torch.from_numpy(rng.normal(size=(rows, 5, WIDTH))))


def _store(path: Path) -> FeatureStore:
    """A float16 store of 30 rows in chunks of 8: an exact embedding (token rows) and two dense layers."""
    manifest = StoreManifest(
        model_id="m", revision="r", weights_hash="w", tokenizer="t", dataset_hash="d",
        layers=[LayerSpec("embed", WIDTH, VOCAB * WIDTH, "tokens")]
        + [LayerSpec(name, dim, 4 * dim) for name, dim in DENSE.items()],
        projection={"kind": "auto", "dim": 8, "seed": 0}, dtype="float16", library_version="0.1.0",
        num_rows=ROWS, chunk_size=8,
    )  # fmt: skip
    store = FeatureStore.create(path, manifest)
    rng = np.random.default_rng(0)
    for i, (start, stop) in enumerate(store.chunk_ranges()):
        features = {name: rng.normal(size=(stop - start, dim)) for name, dim in DENSE.items()}
        store.write_chunk(i, np.arange(start, stop), {"embed": _token_rows(rng, stop - start), **features})
    store.finalize()
    return store


def _queries(layer: str) -> TokenRows | torch.Tensor:
    rng = np.random.default_rng(1)
    return _token_rows(rng, 3) if layer == "embed" else torch.from_numpy(rng.normal(size=(3, DENSE[layer])))


def _stored(store: FeatureStore, layer: str) -> np.ndarray:
    """The layer's rows as stored, float64, token rows expanded to vocabulary x width numbers."""
    rows = store.layer(layer)
    if isinstance(rows, TokenRows):
        return rows.to_dense(VOCAB).double().numpy()
    return np.asarray(rows, dtype=np.float64)


def _brute_datainf(store: FeatureStore, layer: str) -> np.ndarray:
    """DataInf's scores (n, 3) by its formula (method.md §2) on the stored rows, M_u formed explicitly."""
    g = _stored(store, layer)
    q = _stored_queries(layer)
    n, k = g.shape
    squared = (g**2).sum(axis=1)
    damping = 0.1 * squared.mean() / store.layer_spec(layer).num_params
    weighted = sum(np.outer(g[i], g[i]) / (damping + squared[i]) for i in range(n))
    matrix = (np.eye(k) - weighted / n) / damping
    return g @ matrix @ q.T


def _stored_queries(layer: str) -> np.ndarray:
    queries = _queries(layer)
    return queries.to_dense(VOCAB).double().numpy() if isinstance(queries, TokenRows) else queries.numpy()


def _scores(store: FeatureStore, estimators: dict, layer: str) -> np.ndarray:
    scores = score_layer(store.layer(layer), _queries(layer), estimators[layer], store.norms(layer))
    return scores.double().numpy()


def _fitted_datainf(store: FeatureStore, layer: str) -> Estimator:
    """DataInf fitted afresh over the layer's stored rows, at once."""
    estimator = make_estimator("datainf")
    num_params = store.layer_spec(layer).num_params
    if layer == "embed":
        estimator.fit_token_rows(store.layer(layer), num_params)
    else:
        estimator.fit(lambda: [torch.from_numpy(_stored(store, layer))], num_params)
    return estimator


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)


def test_restored_datainf_scores_equal_a_freshly_fitted_one(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    fit_store_statistics(store, block_rows=7)  # fitted in blocks that straddle the chunks
    reopened = FeatureStore.open(store.path)
    assert set(reopened.layer_statistics_keys("embed")) == {"datainf.damping", "datainf.num_samples"}
    assert set(reopened.layer_statistics_keys("head")) == {f"datainf.{key}" for key in DATAINF_KEYS}
    restored = store_estimators(reopened, LAYERS, "datainf")
    for layer in LAYERS:
        got = _scores(reopened, restored, layer)
        fresh = {layer: _fitted_datainf(store, layer)}
        np.testing.assert_allclose(got, _scores(store, fresh, layer), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got, _brute_datainf(store, layer), rtol=1e-4, atol=1e-5)
    assert restored["embed"].token_rows is not None  # bound to the store's rows, which M_u sums over
    assert missing_statistics(reopened, LAYERS, "datainf") == []


def test_a_store_with_two_fitted_estimators(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    fit_store_statistics(store)  # before the toy is registered: DataInf's only
    before = {layer: store.load_layer_statistics(layer) for layer in LAYERS}
    with loaded_plugin():
        assert fitted_estimator_names() == ["datainf", "toy-diag"]
        with pytest.raises(StoreIncompleteError, match=r"'block\.0\.attn\.q'"):
            store_estimators(store, LAYERS, "toy-diag")
        # Token rows: the toy refuses them, so nothing of it is fitted or missing there.
        assert missing_statistics(store, LAYERS, "toy-diag") == list(DENSE)
        fit_store_statistics(store)  # the toy's statistics join DataInf's, which stay as they were
        for layer in LAYERS:
            saved = store.load_layer_statistics(layer)
            _assert_same({key: saved[key] for key in before[layer]}, before[layer])
            assert ("toy-diag.scale" in saved) is (layer != "embed")
        toy = store_estimators(store, LAYERS, "toy-diag")
        for layer in DENSE:
            g = _stored(store, layer)
            expected = g @ (_stored_queries(layer) / (1 + (g**2).mean(axis=0))).T
            np.testing.assert_allclose(_scores(store, toy, layer), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(InvalidInputError, match="dense features only"):
            _scores(store, toy, "embed")
        datainf = store_estimators(store, LAYERS, "datainf")
        for layer in LAYERS:
            np.testing.assert_allclose(
                _scores(store, datainf, layer), _brute_datainf(store, layer), rtol=1e-4, atol=1e-5
            )
    assert fitted_estimator_names() == ["datainf"]  # the plugin's registrations went with it


def test_statistics_saved_before_they_were_keyed_by_estimator_are_datainfs(tmp_path: Path) -> None:
    store = _store(tmp_path / "store")
    for layer in LAYERS:  # as index builds saved them: DataInf's state under its own keys
        state = _fitted_datainf(store, layer).state_dict()
        store.save_layer_statistics(layer, {key: value.numpy() for key, value in state.items()})
    old = {layer: store.load_layer_statistics(layer) for layer in LAYERS}
    restored = store_estimators(store, LAYERS, "datainf")
    for layer in LAYERS:
        np.testing.assert_allclose(
            _scores(store, restored, layer), _brute_datainf(store, layer), rtol=1e-4, atol=1e-5
        )
    fit_store_statistics(store)  # nothing missing: left as saved
    assert set(store.layer_statistics_keys("head")) == DATAINF_KEYS
    with loaded_plugin():
        fit_store_statistics(store)  # the toy's added: DataInf's state is then keyed like every other
        for layer in DENSE:
            saved = store.load_layer_statistics(layer)
            _assert_same({key: saved[f"datainf.{key}"] for key in old[layer]}, old[layer])
        assert set(store.layer_statistics_keys("embed")) == {"damping", "num_samples"}  # the toy refuses it
        assert missing_statistics(store, LAYERS, "toy-diag") == []
