"""Token rows (the exact embedding unit) against brute force: random small inputs, then the real packaged MiniLM
in float64 against dense per-sample gradients (repeated tokens, padding, sentence pairs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence.data import Example, encode_examples, iter_batches, pad_token_id
from influence.errors import InvalidInputError
from influence.estimators import make_estimator
from influence.featurize import CheckpointFeaturizer, featurize_examples
from influence.gradients import Featurizer, per_sample_gradients
from influence.layers import discover_layers
from influence.loading import load_model, packaged_minilm_path
from influence.projection import ProjectionSpec
from influence.scoring import score_layer, score_tensor
from influence.tokens import TokenRows

VOCAB, WIDTH = 11, 5


def _random_rows(generator: torch.Generator, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, length), generator=generator)  # small vocabulary: many repeats
    grads = torch.randn(rows, length, WIDTH, generator=generator, dtype=torch.float64)
    grads[:, -2:] = 0  # padding positions: zero gradient
    return ids, grads


def _dense(ids: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Brute force: per row, the (vocab, width) gradient summed position by position."""
    out = torch.zeros(len(ids), VOCAB, WIDTH, dtype=torch.float64)
    for b in range(len(ids)):
        for t in range(ids.shape[1]):
            out[b, ids[b, t]] += grads[b, t]
    return out.reshape(len(ids), -1)


def test_token_rows_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    ids, grads = _random_rows(generator, 7, 9)
    q_ids, q_grads = _random_rows(generator, 3, 6)
    train = TokenRows.from_positions(ids, grads)
    queries = TokenRows.from_positions(q_ids, q_grads)
    dense, dense_q = _dense(ids, grads), _dense(q_ids, q_grads)

    assert torch.allclose(train.to_dense(VOCAB), dense, rtol=0, atol=1e-12)
    assert torch.allclose(train.dot(queries, torch.float64), dense @ dense_q.T, rtol=0, atol=1e-10)
    assert torch.allclose(train.norms().double(), dense.norm(dim=1), rtol=1e-6)
    distinct, entry_token = train.token_index()
    want_distinct, want_entry = np.unique(np.asarray(train.tokens), return_inverse=True)
    assert np.array_equal(distinct, want_distinct) and np.array_equal(entry_token, want_entry)
    positions = [5, 0, 3, 5]
    assert torch.allclose(train.select(positions).to_dense(VOCAB), dense[positions], atol=1e-12)
    assert torch.allclose(train[2:6].to_dense(VOCAB), dense[2:6], atol=1e-12)
    both = TokenRows.concat([train, queries])
    assert torch.allclose(both.to_dense(VOCAB), torch.cat([dense, dense_q]), atol=1e-12)
    assert torch.allclose(
        both.dot(queries, torch.float64), torch.cat([dense, dense_q]) @ dense_q.T, atol=1e-10
    )
    placed = TokenRows.gather([(queries, [4, 0, 2]), (train[:2], [1, 3])], 5)
    expected = torch.stack([dense_q[1], dense[0], dense_q[2], dense[1], dense_q[0]])
    assert torch.allclose(placed.to_dense(VOCAB), expected, atol=1e-12)
    doubled = train + train  # a module called twice: the two uses add up
    assert torch.allclose(doubled.to_dense(VOCAB), 2 * dense, atol=1e-12)
    # the estimators that work on token rows
    for name in ("grad-dot", "cosine"):
        got = score_layer(train, queries, make_estimator(name)).double()
        want = make_estimator(name).score(dense, dense_q)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name


def test_token_rows_refuse_unsorted_and_mismatched_input():
    with pytest.raises(InvalidInputError, match="ascending"):
        TokenRows(np.array([0, 2]), np.array([3, 1]), np.zeros((2, WIDTH)))
    with pytest.raises(InvalidInputError, match="offsets"):
        TokenRows(np.array([0, 3]), np.array([1, 2]), np.zeros((2, WIDTH)))
    rows = TokenRows(np.array([0, 1]), np.array([1]), np.ones((1, WIDTH)))
    with pytest.raises(InvalidInputError, match="width"):
        rows.dot(TokenRows(np.array([0, 1]), np.array([1]), np.ones((1, WIDTH + 1))))
    with pytest.raises(InvalidInputError, match="not fitted"):
        score_layer(rows, rows, make_estimator("datainf"))
    with pytest.raises(InvalidInputError, match="TracIn-CP"):
        score_layer(rows, rows, make_estimator("tracin-cp", checkpoint_dims=[WIDTH], learning_rates=[1.0]))


def test_datainf_on_token_rows_equals_the_dense_matrix(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    train = TokenRows.from_positions(*_random_rows(generator, 9, 7))
    queries = TokenRows.from_positions(*_random_rows(generator, 4, 5))
    dense, dense_q = train.to_dense(VOCAB), queries.to_dense(VOCAB)
    want_estimator = make_estimator("datainf")
    want_estimator.fit(lambda: [dense], VOCAB * WIDTH)
    want = want_estimator.score(dense, dense_q)
    estimator = make_estimator("datainf")
    estimator.fit_token_rows(train, VOCAB * WIDTH)
    assert estimator.damping == pytest.approx(want_estimator.damping, rel=1e-6)
    got = score_layer(train, queries, estimator).double()
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    monkeypatch.setattr("influence.estimators._TABLE_NUMBERS", 1)  # one query per token table: same scores
    assert torch.allclose(score_layer(train, queries, estimator), got.float(), rtol=1e-5, atol=1e-7)
    restored = make_estimator("datainf")
    restored.load_state_dict(estimator.state_dict())  # damping and row count: no matrix
    assert "matrix" not in estimator.state_dict()
    assert torch.equal(score_layer(train, queries, restored), score_layer(train, queries, estimator))


@pytest.fixture(scope="module")
def minilm64():
    loaded = load_model(packaged_minilm_path())
    loaded.model.double()
    return loaded


EXAMPLES = [  # sentence pairs: tokens shared across the two segments
    Example("the the the movie was the best , the best .", 1, text_pair="the best"),  # repeated tokens
    Example("bad", 0, text_pair="bad"),  # short: padded in the batch
    Example("a quiet film", 1, text_pair="a quiet , quiet audience"),
    Example("not the worst thing ever made , but close", 0, text_pair="close , but not the worst"),
]


def test_exact_embedding_unit_matches_dense_gradients_in_float64(minilm64):
    model, tokenizer = minilm64.model, minilm64.tokenizer
    layers = discover_layers(model)
    embed = next(layer for layer in layers if layer.kind == "embedding")
    spec = ProjectionSpec("factorized", 64, units={embed.name: {"kind": "tokens", "dim": embed.cols}})
    featurizer = Featurizer(model, [embed], spec)
    assert featurizer.dims[embed.name] == embed.cols
    rows = featurize_examples(featurizer, tokenizer, EXAMPLES, "classification", batch_size=4).features[
        embed.name
    ]
    assert isinstance(rows, TokenRows) and len(rows) == len(EXAMPLES)

    encoded = encode_examples(tokenizer, EXAMPLES, "classification", 128)
    (batch,) = iter_batches(encoded, pad_token_id(tokenizer), "classification", 4, sort_by_length=False)
    assert (batch.attention_mask == 0).any()  # the batch is padded
    dense = per_sample_gradients(model, batch, [embed])[embed.name].double()  # (4, vocab * width)
    ours = rows.to_dense(embed.rows).double()
    scale = dense.abs().max()
    assert float((ours - dense).abs().max() / scale) < 1e-6
    # every row's distinct non-padding tokens, and no more
    for k, example in enumerate(encoded):
        held = set(np.asarray(rows.tokens)[rows.entry_rows() == k].tolist())
        assert held <= set(example.input_ids) and len(held) >= len(set(example.input_ids)) - 1
    gram = dense @ dense.T
    got = score_layer(rows, rows, make_estimator("grad-dot")).double()
    assert float((got - gram).abs().max() / gram.abs().max()) < 1e-6
    cosine = score_tensor({"e": rows}, {"e": rows}, {"e": make_estimator("cosine")})[:, 0, :]
    norms = dense.norm(dim=1)
    assert np.allclose(cosine, (gram / torch.outer(norms, norms)).numpy(), atol=1e-5)


def test_per_token_sketch_is_a_seeded_projection_of_each_token(minilm64):
    model, tokenizer = minilm64.model, minilm64.tokenizer
    embed = next(layer for layer in discover_layers(model) if layer.kind == "embedding")
    exact = Featurizer(
        model, [embed], ProjectionSpec(units={embed.name: {"kind": "tokens", "dim": embed.cols}})
    )
    sketch = Featurizer(model, [embed], ProjectionSpec(units={embed.name: {"kind": "tokens", "dim": 32}}))
    assert sketch.dims[embed.name] == 32
    full = featurize_examples(exact, tokenizer, EXAMPLES, "classification").features[embed.name]
    small = featurize_examples(sketch, tokenizer, EXAMPLES, "classification").features[embed.name]
    np.testing.assert_array_equal(np.asarray(full.tokens), np.asarray(small.tokens))
    matrix = sketch.projectors[embed.name]._matrices[(torch.float64, "cpu")]
    np.testing.assert_allclose(
        np.asarray(small.values), np.asarray(full.values) @ matrix.numpy().T, atol=1e-6
    )
    again = featurize_examples(sketch, tokenizer, EXAMPLES, "classification").features[embed.name]
    np.testing.assert_array_equal(np.asarray(again.values), np.asarray(small.values))


def test_tracin_cp_refuses_token_rows(minilm64):
    embed = next(layer for layer in discover_layers(minilm64.model) if layer.kind == "embedding")
    spec = ProjectionSpec(units={embed.name: {"kind": "tokens", "dim": embed.cols}})
    with pytest.raises(InvalidInputError, match="tokens"):
        CheckpointFeaturizer([Featurizer(minilm64.model, [embed], spec)])
    with pytest.raises(InvalidInputError, match="embeddings"):
        linear = next(layer for layer in discover_layers(minilm64.model) if layer.kind == "linear")
        Featurizer(
            minilm64.model, [linear], ProjectionSpec(units={linear.name: {"kind": "tokens", "dim": 8}})
        )
