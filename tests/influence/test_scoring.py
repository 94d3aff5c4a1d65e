"""Exact scoring over per-layer feature matrices: chunked, lazy and materialised, against direct products."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from influence.aggregation import aggregate
from influence.errors import InvalidInputError
from influence.estimators import GradDot, make_estimator
from influence.scoring import LazyScores, score_layer, score_tensor, top_k


def store_layer(tmp_path, name: str, matrix: np.ndarray) -> np.memmap:
    """Write a (n, k) matrix as the feature store would (a .npy file) and reopen it read-only as a memmap."""
    path = tmp_path / f"{name}.npy"
    np.save(path, matrix)
    return np.load(path, mmap_mode="r")


class CountingGradDot(GradDot):
    """Grad-Dot that counts query transforms: one per score_layer call."""

    def __init__(self):
        self.transforms = 0

    def transform_query(self, queries):
        self.transforms += 1
        return super().transform_query(queries)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("name", ["grad-dot", "cosine"])
def test_score_layer_on_a_memmap_matches_the_direct_product(tmp_path, dtype, name):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((37, 6)).astype(dtype)
    train[4] = 0  # a zero row: cosine must give 0, not NaN
    queries = torch.from_numpy(rng.standard_normal((5, 6)).astype(np.float32))
    stored = store_layer(tmp_path, "layer", train)
    exact = train.astype(np.float64) @ queries.numpy().astype(np.float64).T
    if name == "cosine":
        row = np.linalg.norm(train.astype(np.float64), axis=1, keepdims=True)
        col = np.linalg.norm(queries.numpy().astype(np.float64), axis=1)
        exact = np.divide(exact, row * col, out=np.zeros_like(exact), where=row * col > 0)
    estimator = make_estimator(name)
    for chunk_rows in (1, 8, 65536):
        got = score_layer(stored, queries, estimator, chunk_rows=chunk_rows)
        assert got.dtype == torch.float32 and tuple(got.shape) == (37, 5)
        np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=1e-5)
    norms = torch.from_numpy(np.linalg.norm(train.astype(np.float32), axis=1))
    np.testing.assert_allclose(
        score_layer(stored, queries, estimator, norms, 8).numpy(), exact, rtol=1e-5, atol=1e-5
    )
    # A store's norms are a read-only memmap: taken as they are (no copy, no warning from torch).
    stored_norms = store_layer(tmp_path, "norms", norms.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = score_layer(stored, queries, estimator, stored_norms, 8)
    np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=1e-5)


def test_score_layer_errors():
    with pytest.raises(InvalidInputError, match="queries"):
        score_layer(np.zeros((3, 4)), torch.zeros(2, 5), make_estimator("grad-dot"))
    with pytest.raises(InvalidInputError, match="norms"):
        score_layer(np.ones((3, 4)), torch.ones(2, 4), make_estimator("cosine"), norms=np.ones(2))
    with pytest.raises(InvalidInputError, match="matrix"):
        score_layer(np.ones(3), torch.ones(2, 4), make_estimator("grad-dot"))


def make_layers(tmp_path, n=29, m=6):
    """Three layers of different widths and estimators, stored as float16 memmaps."""
    rng = np.random.default_rng(1)
    widths = {"embed": 5, "block.3.attn": 8, "head": 3}
    features, raw, queries = {}, {}, {}
    for name, k in widths.items():
        raw[name] = rng.standard_normal((n, k)).astype(np.float16)
        features[name] = store_layer(tmp_path, name, raw[name])
        queries[name] = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    datainf = make_estimator("datainf")
    datainf.fit(lambda: [torch.from_numpy(raw["block.3.attn"].astype(np.float32))], num_params=64)
    estimators = {
        "embed": make_estimator("grad-dot"),
        "block.3.attn": datainf,
        "head": make_estimator("cosine"),
    }
    return features, raw, queries, estimators


def test_lazy_scores_match_the_materialised_tensor(tmp_path):
    features, raw, queries, estimators = make_layers(tmp_path)
    expected = np.stack(
        [
            estimators[name]
            .score(torch.from_numpy(raw[name].astype(np.float64)), queries[name].double())
            .numpy()
            for name in features
        ],
        axis=1,
    )
    full = score_tensor(features, queries, estimators, chunk_rows=7)
    assert full.shape == (29, 3, 6) and full.dtype == np.float32
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-4)

    lazy = LazyScores(features, queries, estimators, chunk_rows=7)
    assert lazy.layers == ["embed", "block.3.attn", "head"]
    assert lazy.shape == (29, 3, 6)
    # Same row chunks as score_tensor: bit-identical. Row blocks are other matmul shapes: float32 rounding.
    np.testing.assert_array_equal(lazy[:, 1, 2:5].numpy(), full[:, 1, 2:5])
    np.testing.assert_array_equal(lazy[:, -1, :].numpy(), full[:, 2, :])
    np.testing.assert_allclose(lazy[3:11].numpy(), full[3:11], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(lazy[20:].numpy(), full[20:], rtol=1e-6, atol=1e-4)
    for method in ("mean", "rank", "vote", "zmean"):
        np.testing.assert_allclose(
            aggregate(lazy, method, chunk_elements=40), aggregate(full, method), rtol=1e-12, atol=1e-12
        )
    np.testing.assert_allclose(
        aggregate(lazy, "median", chunk_elements=40), aggregate(full, "median"), rtol=1e-6, atol=1e-4
    )


def test_lazy_scores_compute_each_layer_once_per_column_sweep(tmp_path):
    features, _, queries, _ = make_layers(tmp_path)
    estimators = {name: CountingGradDot() for name in features}
    lazy = LazyScores(features, queries, estimators)
    for u in range(3):
        for j0 in range(0, 6, 2):
            lazy[:, u, j0 : j0 + 2]
    assert [e.transforms for e in estimators.values()] == [1, 1, 1]
    lazy[:, 0, 0:1]  # a layer visited again after another one is recomputed: only the last is cached
    assert estimators["embed"].transforms == 2
    # aggregate's voter sweep goes layer by layer (3 column blocks each), so each layer is computed once,
    # and layer 0, still cached from the line above, not at all.
    aggregate(lazy, "rank", chunk_elements=29 * 2)
    assert [e.transforms for e in estimators.values()] == [2, 2, 2]
    aggregate(lazy, "vote", chunk_elements=29 * 2)
    assert [e.transforms for e in estimators.values()] == [3, 3, 3]


def test_lazy_scores_errors(tmp_path):
    features, _, queries, estimators = make_layers(tmp_path)
    lazy = LazyScores(features, queries, estimators)
    for key in [(0, 1, slice(None)), (slice(None), 1), slice(0, 10, 2), (slice(None), 0, slice(0, 4, 2))]:
        with pytest.raises(TypeError):
            lazy[key]
    with pytest.raises(IndexError):
        lazy[:, 3, 0:2]
    with pytest.raises(InvalidInputError, match="missing"):
        LazyScores(features, {"embed": queries["embed"]}, estimators)
    with pytest.raises(InvalidInputError, match="same number of train rows"):
        LazyScores({**features, "head": np.zeros((5, 3), np.float16)}, queries, estimators)
    with pytest.raises(InvalidInputError, match="same number of queries"):
        LazyScores(features, {**queries, "head": torch.zeros(2, 3)}, estimators)
    with pytest.raises(InvalidInputError, match="shape"):
        LazyScores(features, {**queries, "head": torch.zeros(6, 4)}, estimators)


def test_top_k():
    agg = np.array([0.5, -1.0, 3.0, -1.0, 3.0, 0.0])
    np.testing.assert_array_equal(top_k(agg, 3, "harmful"), [1, 3, 5])  # ties: lower index first
    np.testing.assert_array_equal(top_k(agg, 3, "helpful"), [2, 4, 0])
    np.testing.assert_array_equal(top_k(torch.from_numpy(agg).float(), 2, "helpful"), [2, 4])
    np.testing.assert_array_equal(top_k(agg, 10, "harmful"), [1, 3, 5, 0, 2, 4])
    assert top_k(agg, 0, "helpful").shape == (0,)
    with pytest.raises(InvalidInputError, match="direction"):
        top_k(agg, 2, "worst")
    with pytest.raises(InvalidInputError, match="k must"):
        top_k(agg, -1, "helpful")
    with pytest.raises(InvalidInputError, match="one-dimensional"):
        top_k(agg.reshape(2, 3), 1, "helpful")


def test_top_k_partial_selection_equals_a_stable_full_sort_on_large_tie_heavy_inputs():
    """Above 1,024 rows top_k selects partially; it must equal argsort(kind="stable")[:k], ties included."""
    rng = np.random.default_rng(7)
    for values in (rng.integers(0, 20, size=5000).astype(np.float32), rng.normal(size=5000)):
        for k in (1, 10, 37, 1000):
            assert np.array_equal(top_k(values, k, "harmful"), np.argsort(values, kind="stable")[:k])
            want = np.argsort(-values.astype(np.float64), kind="stable")[:k]
            assert np.array_equal(top_k(values, k, "helpful"), want)
