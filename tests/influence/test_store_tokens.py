"""A feature store with a `tokens` layer (the exact embedding): chunks out of order, finalize, checksums,
append, deletion and compaction, all against the same rows held in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from influence.errors import InvalidInputError, StoreCorruptedError
from influence.estimators import make_estimator
from influence.scoring import score_layer
from influence.store import FeatureStore, LayerSpec, StoreManifest
from influence.tokens import TokenRows

VOCAB, WIDTH, ROWS = 40, 6, 30


def token_rows(start: int, stop: int) -> TokenRows:
    """Deterministic token rows for rows [start, stop): 0-6 distinct tokens each (some rows empty)."""
    rng = np.random.default_rng(start)
    ids = torch.from_numpy(rng.integers(0, VOCAB, size=(stop - start, 6)))
    grads = torch.from_numpy(rng.normal(size=(stop - start, 6, WIDTH)))
    grads[rng.random((stop - start, 6)) < 0.2] = 0  # padding-like positions
    grads[0] = 0 if start == 8 else grads[0]  # a row with no token at all
    return TokenRows.from_positions(ids, grads)


def manifest(dtype: str = "float32", rows: int = ROWS) -> StoreManifest:
    return StoreManifest(
        model_id="m",
        revision="",
        weights_hash="w",
        tokenizer="t",
        dataset_hash="d",
        layers=[LayerSpec("embed", WIDTH, VOCAB * WIDTH, "tokens"), LayerSpec("head", 3, 3)],
        projection={"kind": "auto", "dim": 8, "seed": 0},
        dtype=dtype,
        num_rows=rows,
        chunk_size=8,
    )


def features(start: int, stop: int) -> dict:
    rng = np.random.default_rng(100 + start)
    return {"embed": token_rows(start, stop), "head": rng.normal(size=(stop - start, 3))}


def build(path: Path, dtype: str = "float32") -> FeatureStore:
    store = FeatureStore.create(path, manifest(dtype))
    for chunk in reversed(range(store.num_chunks)):  # any order
        start, stop = store.chunk_ranges()[chunk]
        store.write_chunk(chunk, np.arange(start, stop), features(start, stop))
    store.finalize()
    return store


def dense(rows: TokenRows) -> np.ndarray:
    return rows.to_dense(VOCAB).double().numpy()


def test_tokens_layer_round_trip_and_scores(tmp_path: Path) -> None:
    store = FeatureStore.open(build(tmp_path / "s").path)  # reopened: every checksum verified
    want = TokenRows.concat([features(a, b)["embed"] for a, b in store.chunk_ranges()])
    got = store.layer("embed")
    assert isinstance(got, TokenRows) and got.shape == (ROWS, WIDTH)
    np.testing.assert_allclose(dense(got), dense(want), atol=1e-6)
    np.testing.assert_allclose(store.norms("embed"), np.linalg.norm(dense(want), axis=1), rtol=1e-5)
    queries = token_rows(100, 104)
    scores = score_layer(got, queries, make_estimator("grad-dot")).double().numpy()
    np.testing.assert_allclose(scores, dense(want) @ dense(queries).T, atol=1e-4)
    chunks = list(store.iter_layer_chunks("embed", 7))
    np.testing.assert_allclose(np.concatenate([dense(c) for _, c in chunks]), dense(want), atol=1e-6)
    assert [start for start, _ in chunks] == [0, 7, 14, 21, 28]


def test_tokens_layer_append_delete_compact(tmp_path: Path) -> None:
    store = build(tmp_path / "s", dtype="float16")
    assert store.layer("embed") is store.layer("embed")  # one object per state: its token order is derived once
    before = dense(store.layer("embed"))
    extra = features(200, 205)
    store.append(np.arange(500, 505), extra)
    both = store.layer("embed")
    np.testing.assert_allclose(dense(both), np.concatenate([before, dense(extra["embed"])]), atol=2e-2)
    store.delete_rows([3, 501])
    assert store.compact() == 2
    reopened = FeatureStore.open(store.path)
    keep = [i for i in range(ROWS + 5) if i not in (3, ROWS + 1)]
    np.testing.assert_allclose(dense(reopened.layer("embed")), dense(both)[keep], atol=1e-6)
    assert reopened.row_ids().tolist() == [i for i in range(ROWS) if i != 3] + [500, 502, 503, 504]


def test_tokens_layer_bad_input_and_corruption(tmp_path: Path) -> None:
    store = FeatureStore.create(tmp_path / "s", manifest())
    good = features(0, 8)
    with pytest.raises(InvalidInputError, match="TokenRows"):
        store.write_chunk(0, np.arange(8), {**good, "embed": np.zeros((8, WIDTH))})
    with pytest.raises(InvalidInputError, match="shape"):
        store.write_chunk(0, np.arange(8), {**good, "embed": token_rows(0, 7)})
    assert store.pending_chunks() == list(range(store.num_chunks))  # nothing half-written
    built = build(tmp_path / "b")
    tokens_file = next((built.path / "segments").rglob("*.tokens.npy"))
    data = bytearray(tokens_file.read_bytes())
    data[-2] ^= 1
    tokens_file.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptedError):
        FeatureStore.open(built.path)


def test_dense_manifests_keep_their_fingerprint() -> None:
    spec = LayerSpec("head", 3, 3)
    assert spec.to_dict() == {"name": "head", "dim": 3, "num_params": 3}
    assert LayerSpec("embed", 6, 240, "tokens").to_dict()["layout"] == "tokens"
    with pytest.raises(InvalidInputError, match="layout"):
        manifest().from_dict(
            {**manifest().to_dict(), "layers": [{"name": "e", "dim": 1, "num_params": 1, "layout": "x"}]}
        )
