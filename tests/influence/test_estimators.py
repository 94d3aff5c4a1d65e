"""Per-layer estimators (method.md §2) against their direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence import estimators
from influence.errors import InvalidInputError
from influence.estimators import DataInf, make_estimator


def features(seed: int, n: int, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n, k))), torch.from_numpy(rng.standard_normal((m, k)))


def chunked(train: torch.Tensor, size: int):
    """A re-iterable chunk source that counts how often it is iterated."""

    def chunks():
        chunks.calls += 1
        for start in range(0, train.shape[0], size):
            yield train[start : start + size]

    chunks.calls = 0
    return chunks


def test_grad_dot_is_the_plain_inner_product():
    train, queries = features(0, 9, 4, 6)
    estimator = make_estimator("grad-dot")
    expected = [[float(np.dot(train[i].numpy(), queries[j].numpy())) for j in range(4)] for i in range(9)]
    np.testing.assert_allclose(estimator.score(train, queries).numpy(), expected, rtol=1e-13, atol=1e-13)
    assert estimator.row_scale(torch.ones(9)) is None


def test_cosine_matches_the_direct_formula_and_zero_gradients_score_zero():
    train, queries = features(1, 8, 3, 5)
    train[2] = 0.0
    queries[1] = 0.0
    estimator = make_estimator("cosine")
    expected = np.zeros((8, 3))
    for i in range(8):
        for j in range(3):
            g, q = train[i].numpy(), queries[j].numpy()
            denominator = np.linalg.norm(g) * np.linalg.norm(q)
            expected[i, j] = 0.0 if denominator == 0 else np.dot(g, q) / denominator
    got = estimator.score(train, queries)
    assert not torch.isnan(got).any()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Given norms are used as given (the feature store keeps them); they must equal the computed ones here.
    norms = torch.linalg.vector_norm(train, dim=1)
    np.testing.assert_allclose(
        estimator.score(train, queries, norms).numpy(), expected, rtol=1e-12, atol=1e-12
    )
    # ... and really used: doubling them halves the scores.
    np.testing.assert_allclose(estimator.score(train, queries, 2 * norms).numpy(), expected / 2, atol=1e-12)
    assert abs(float(estimator.score(train[:1], train[:1])[0, 0]) - 1.0) < 1e-12


def datainf_explicit(train: np.ndarray, queries: np.ndarray, damping: float) -> np.ndarray:
    """I(z_k, x_j) = (1/λ) q.g_k − (1/(nλ)) Σ_i (q.g_i)(g_i.g_k)/(λ+||g_i||²), as written in method.md."""
    n = train.shape[0]
    out = np.zeros((n, queries.shape[0]))
    for k in range(n):
        for j in range(queries.shape[0]):
            q = queries[j]
            total = 0.0
            for i in range(n):
                weight = damping + np.dot(train[i], train[i])
                total += np.dot(q, train[i]) * np.dot(train[i], train[k]) / weight
            out[k, j] = np.dot(q, train[k]) / damping - total / (n * damping)
    return out


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_datainf_matches_the_explicit_double_sum(chunk):
    train, queries = features(2, 13, 4, 6)
    train = train * torch.linspace(0.2, 3.0, 13, dtype=torch.float64).unsqueeze(1)  # varied norms
    num_params = 40
    damping = 0.1 * float(np.mean(np.sum(train.numpy() ** 2, axis=1))) / num_params
    estimator = make_estimator("datainf")
    source = chunked(train, chunk)
    estimator.fit(source, num_params)
    assert source.calls == 2  # one pass for the damping, one for the matrix
    assert estimator.damping == pytest.approx(damping, rel=1e-14)
    expected = datainf_explicit(train.numpy(), queries.numpy(), damping)
    got = estimator.score(train, queries)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_datainf_explicit_damping_state_and_self_influence():
    train, queries = features(3, 10, 5, 4)
    estimator = make_estimator("datainf", damping=0.7)
    source = chunked(train, 3)
    estimator.fit(source, num_params=1000)
    assert source.calls == 1  # a given damping needs no norm pass
    np.testing.assert_allclose(
        estimator.score(train, queries).numpy(),
        datainf_explicit(train.numpy(), queries.numpy(), 0.7),
        rtol=1e-10,
    )
    restored = DataInf()
    restored.load_state_dict(estimator.state_dict())
    assert torch.equal(restored.score(train, queries), estimator.score(train, queries))
    # M is positive definite, so a sample's influence on itself is positive (helpful).
    assert (torch.diagonal(estimator.score(train, train)) > 0).all()
    # float32 queries: transformed in float64, returned in float32.
    got32 = estimator.score(train.float(), queries.float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), estimator.score(train, queries).numpy(), rtol=1e-4, atol=1e-4)


def test_datainf_errors():
    train, queries = features(4, 5, 2, 3)
    with pytest.raises(InvalidInputError, match="not fitted"):
        make_estimator("datainf").score(train, queries)
    with pytest.raises(InvalidInputError, match="num_params"):
        make_estimator("datainf").fit(chunked(train, 2), num_params=0)
    with pytest.raises(InvalidInputError, match="damping"):
        make_estimator("datainf", damping=-1.0)
    fitted = make_estimator("datainf")
    fitted.fit(chunked(train, 2), num_params=3)
    with pytest.raises(InvalidInputError, match="shape"):
        fitted.transform_query(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="matrix"):
        DataInf().load_state_dict({"damping": torch.tensor(1.0)})


def test_datainf_of_a_layer_whose_train_gradients_are_all_zero_scores_zero():
    """A LoRA A tensor while B is still zero has zero gradients for every row (and tiny ones underflow in
    float16): every DataInf score q^T M g is then 0 whatever the damping, so the fit succeeds (M = I) instead of
    failing the index that holds the layer."""
    estimator = make_estimator("datainf")
    estimator.fit(chunked(torch.zeros(4, 3, dtype=torch.float64), 2), num_params=10)
    assert estimator.damping == 1.0
    torch.testing.assert_close(estimator.matrix, torch.eye(3, dtype=torch.float64))
    queries = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64)
    scores = estimator.score(torch.zeros(4, 3, dtype=torch.float64), queries)
    assert scores.shape == (4, 2) and bool((scores == 0).all())


def test_tracin_cp_is_the_weighted_sum_over_checkpoints():
    dims, rates = [3, 2, 4], [0.5, 2.0, -0.25]
    train, queries = features(5, 7, 3, sum(dims))
    estimator = make_estimator("tracin-cp", checkpoint_dims=dims, learning_rates=rates)
    expected = np.zeros((7, 3))
    for i in range(7):
        for j in range(3):
            start = 0
            for dim, rate in zip(dims, rates, strict=True):
                g, q = train[i, start : start + dim].numpy(), queries[j, start : start + dim].numpy()
                expected[i, j] += rate * np.dot(g, q)
                start += dim
    np.testing.assert_allclose(estimator.score(train, queries).numpy(), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(InvalidInputError, match="shape"):
        estimator.transform_query(torch.zeros(1, 8, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="learning rate"):
        make_estimator("tracin-cp", checkpoint_dims=[3, 2], learning_rates=[1.0])


def test_registry():
    assert {"grad-dot", "cosine", "datainf", "tracin-cp"} <= set(estimators.ESTIMATORS)
    with pytest.raises(InvalidInputError, match="unknown estimator"):
        make_estimator("nope")
    with pytest.raises(InvalidInputError, match="bad options"):
        make_estimator("grad-dot", damping=1.0)
    with pytest.raises(InvalidInputError, match="bad options"):
        make_estimator("tracin-cp")

    @estimators.register_estimator("test-doubled")
    class Doubled(estimators.Estimator):
        def transform_query(self, queries):
            return 2 * queries

    try:
        train, queries = features(6, 4, 2, 3)
        estimator = make_estimator("test-doubled")
        assert estimator.name == "test-doubled"
        assert estimators.estimator_names()[-1] == "test-doubled"
        assert estimators.estimator_class("test-doubled") is Doubled
        assert "test-doubled" not in estimators.fitted_estimator_names() and Doubled.statistics_nbytes(3) == 0
        np.testing.assert_allclose(estimator.score(train, queries).numpy(), 2 * (train @ queries.T).numpy())
        assert estimator.state_dict() == {}
        with pytest.raises(InvalidInputError):
            estimator.load_state_dict({"x": torch.zeros(1)})
        with pytest.raises(ValueError, match="already registered"):
            estimators.register_estimator("test-doubled")(Doubled)
    finally:
        estimators.ESTIMATORS.pop("test-doubled")
    assert "test-doubled" not in estimators.estimator_names()


def test_what_estimators_declare_they_need():
    """What the service asks instead of comparing names: who is fitted (and how large its state), who needs
    per-checkpoint features."""
    assert estimators.estimator_names()[:4] == ["grad-dot", "cosine", "datainf", "tracin-cp"]
    assert estimators.estimator_names(one_checkpoint=True)[:3] == ["grad-dot", "cosine", "datainf"]
    assert "tracin-cp" not in estimators.estimator_names(one_checkpoint=True)
    assert estimators.fitted_estimator_names() == ["datainf"]
    assert estimators.estimator_class("datainf") is DataInf and DataInf.requires_fit
    assert DataInf.statistics_nbytes(128) == 128 * 128 * 8  # M_u: k x k float64
    assert DataInf.statistics_nbytes(128, token_rows=True) == 0  # the damping and the row count only
    assert all(estimators.estimator_class(name).statistics_nbytes(128) == 0 for name in ("grad-dot", "cosine"))
    with pytest.raises(InvalidInputError, match="unknown estimator"):
        estimators.estimator_class("nope")


def test_shape_errors():
    estimator = make_estimator("grad-dot")
    with pytest.raises(InvalidInputError, match="same k"):
        estimator.score(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(InvalidInputError, match="norms"):
        make_estimator("cosine").score(torch.ones(3, 4), torch.ones(2, 4), torch.ones(2))
