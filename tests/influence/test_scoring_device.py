"""score_layer_streamed, the scoring path of queries on a GPU, run on the CPU (no GPU here): the same staging
buffers, chunking and dtype handling, against float64 brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import influence.scoring as scoring
from influence.errors import InvalidInputError
from influence.estimators import make_estimator
from influence.scoring import score_layer, score_layer_streamed
from influence.tokens import TokenRows


def brute_force(train: np.ndarray, queries: np.ndarray, name: str) -> np.ndarray:
    train64, queries64 = np.asarray(train, dtype=np.float64), np.asarray(queries, dtype=np.float64)
    exact = train64 @ queries64.T
    if name == "cosine":
        row = np.linalg.norm(train64, axis=1, keepdims=True)
        col = np.linalg.norm(queries64, axis=1)
        exact = np.divide(exact, row * col, out=np.zeros_like(exact), where=row * col > 0)
    return exact


def memmap(tmp_path, name: str, matrix: np.ndarray) -> np.memmap:
    """A (n, k) matrix as the feature store holds it: a .npy file reopened read-only."""
    path = tmp_path / f"{name}.npy"
    np.save(path, matrix)
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("name", ["grad-dot", "cosine"])
def test_streamed_scores_of_a_store_memmap_match_brute_force(tmp_path, monkeypatch, dtype, name):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((203, 6)).astype(dtype)
    train[4] = 0  # a zero row: cosine gives 0, not NaN
    queries = torch.from_numpy(rng.standard_normal((3, 6)).astype(np.float32))
    stored = memmap(tmp_path, "layer", train)
    stored_norms = memmap(tmp_path, "norms", np.linalg.norm(train.astype(np.float32), axis=1))
    exact = brute_force(train, queries.numpy(), name)
    estimator = make_estimator(name)
    # Chunks of 5 rows at most: 41 chunks through the two staging buffers, each refilled many times.
    monkeypatch.setattr(scoring, "DEVICE_BLOCK_ELEMENTS", 30)
    for chunk_rows in (1, 4, 65536):
        for norms in (None, stored_norms):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a read-only memmap is read as it is
                got = score_layer_streamed(stored, queries, estimator, norms, chunk_rows, device="cpu")
            assert got.dtype == torch.float32 and got.device.type == "cpu" and tuple(got.shape) == (203, 3)
            np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        score_layer_streamed(stored, queries, estimator).numpy(),
        score_layer(stored, queries, estimator).numpy(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_every_host_row_source_is_sent(monkeypatch):
    """float64 and other dtypes are sent as float32; strided, reversed and byte-swapped views and tensors
    (float16, bfloat16) are read as they are."""
    rng = np.random.default_rng(1)
    base = rng.standard_normal((60, 5))
    queries = rng.standard_normal((2, 5)).astype(np.float32)
    estimator = make_estimator("grad-dot")
    monkeypatch.setattr(scoring, "DEVICE_BLOCK_ELEMENTS", 40)
    sources = {
        "float64": base,
        "strided": base.astype(np.float32)[::2],
        "reversed": base.astype(np.float16)[::-1],
        "big-endian": base.astype(">f4"),
        "fortran": np.asfortranarray(base.astype(np.float32)),
        "tensor float16": torch.from_numpy(base.astype(np.float16)),
        "tensor bfloat16": torch.from_numpy(base).to(torch.bfloat16),
    }
    for label, train in sources.items():
        values = train.float().numpy() if isinstance(train, torch.Tensor) else np.asarray(train, np.float64)
        got = score_layer_streamed(train, queries, estimator, device="cpu")
        exact = brute_force(values, queries, "grad-dot")
        np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=1e-5, err_msg=label)


def test_streamed_edges():
    estimator = make_estimator("grad-dot")
    queries = torch.ones((2, 3))
    empty = score_layer_streamed(np.zeros((0, 3), np.float16), queries, estimator, device="cpu")
    assert tuple(empty.shape) == (0, 2) and empty.dtype == torch.float32
    with pytest.raises(InvalidInputError, match=r"shape \(m, 4\)"):
        score_layer_streamed(np.zeros((5, 4), np.float16), queries, estimator, device="cpu")
    with pytest.raises(InvalidInputError, match="chunk_rows"):
        score_layer_streamed(np.zeros((5, 3), np.float16), queries, estimator, chunk_rows=0)
    rows = TokenRows(np.array([0, 1]), np.array([3], np.int32), np.ones((1, 3), np.float32))
    with pytest.raises(InvalidInputError, match="token-row"):
        score_layer_streamed(rows, rows, estimator)
