"""Projection fidelity (influence.fidelity): the exact kernels against dense per-sample gradients (float64, 1e-9
relative), Spearman 1 for an identity projection and lower for a tiny factorized one, and refused inputs."""

from __future__ import annotations

import pytest
import torch

from influence.data import Example, encode_examples, iter_batches, pad_token_id
from influence.errors import InvalidInputError
from influence.fidelity import _Capture, _pass, exact_scores, measure_fidelity
from influence.gradients import _padding_idx, per_sample_gradients
from influence.layers import discover_layers
from influence.loading import load_model
from influence.projection import ProjectionSpec, make_projector


def _model(tiny_model_dir, arch):
    loaded = load_model(
        tiny_model_dir(arch, "classification", num_labels=2), num_labels=2, dtype=torch.float64
    )
    return loaded.model, loaded.tokenizer, {layer.name: layer for layer in discover_layers(loaded.model)}


def _rows(sst2_train, start, count, pair=False):
    rows = sst2_train[start : start + count]
    out = []
    for i, e in enumerate(rows):
        text = e.text if i % 3 else f"{e.text} the film is good and the film is good"  # repeated tokens
        out.append(Example(text, label=e.label, text_pair=rows[(i + 1) % len(rows)].text if pair else None))
    return out


def _tokens_and_dense(model, tokenizer, layer, examples):
    """(kept tokens of every row, in order; dense per-sample gradients (n, p)) over batches of mixed lengths."""
    encoded = encode_examples(tokenizer, examples, "classification", 64)
    pad = pad_token_id(tokenizer)
    handler = _Capture(
        layer,
        make_projector(ProjectionSpec("identity"), layer, _padding_idx(model, layer)),
        _padding_idx(model, layer),
    )
    parts, dense, offset, padded = [], [], 0, False
    for batch in iter_batches(encoded, pad, "classification", 4, sort_by_length=False):
        padded |= bool((batch.attention_mask == 0).any())
        kept, _ = _pass(model, [layer], {layer.name: handler}, batch)
        tokens = kept[layer.name]
        parts.append((tokens.inputs, tokens.grads, tokens.rows + offset))
        dense.append(per_sample_gradients(model, batch, [layer])[layer.name].double())
        offset += len(batch)
    assert padded, "the batches must hold padding"
    from influence.fidelity import _Tokens

    merged = _Tokens(*(torch.cat([p[i] for p in parts]) for i in range(3)))
    return merged, torch.cat(dense)


@pytest.mark.parametrize(
    ("arch", "unit", "pair"),
    [
        ("bert", "block.0.attn.q", False),  # Linear with bias
        ("llama", "block.1.mlp.down", False),  # Linear without bias
        ("bert", "embed", False),  # embedding: repeated tokens, padding
        ("bert", "block.1.attn.v", True),  # a bert-style pair input (token types)
        ("bert", "embed", True),
    ],
)
def test_exact_scores_equal_dense_gradient_products(tiny_model_dir, sst2_train, arch, unit, pair):
    model, tokenizer, layers = _model(tiny_model_dir, arch)
    layer = layers[unit]
    if unit == "block.0.attn.q":
        assert layer.has_bias
    if arch == "llama":
        assert not layer.has_bias
    train, queries = _rows(sst2_train, 0, 9, pair), _rows(sst2_train, 40, 5, pair)
    left, dense_left = _tokens_and_dense(model, tokenizer, layer, train)
    right, dense_right = _tokens_and_dense(model, tokenizer, layer, queries)
    if layer.kind == "embedding":
        ids = left.inputs.long()
        assert len(ids) > len(set(ids.tolist())), "some token must repeat"
    exact = exact_scores(layer, left, right, len(train), len(queries))
    dense = dense_left @ dense_right.T
    assert dense.abs().max() > 0
    assert (exact - dense).abs().max() <= 1e-9 * dense.abs().max()


def test_identity_projection_keeps_the_ranking_and_a_tiny_factorized_one_does_not(tiny_model_dir, sst2_train):
    model, tokenizer, layers = _model(tiny_model_dir, "bert")
    units = list(layers.values())
    train, queries = _rows(sst2_train, 0, 24), _rows(sst2_train, 100, 6)
    identity = measure_fidelity(
        model, tokenizer, units, ProjectionSpec("identity"), train, queries, "classification", dtype="float32"
    )
    assert set(identity) == set(layers)
    for name, numbers in identity.items():
        assert numbers.spearman > 0.9999, (name, numbers)
        assert numbers.rel_error < 1e-5 and numbers.top10_overlap == 1.0, (name, numbers)
    def factorized_4():
        return measure_fidelity(
            model, tokenizer, units, ProjectionSpec("factorized", 4), train, queries, "classification", dtype="float32"
        )

    tiny = factorized_4()
    big = [layer.name for layer in units if layer.num_params >= 272]
    assert min(tiny[name].spearman for name in big) < 0.99
    assert all(tiny[name].spearman <= identity[name].spearman + 1e-9 for name in layers)
    # The same sample measured again gives the same numbers (no randomness but the projection's seed).
    assert factorized_4() == tiny


def test_bad_input_is_refused(tiny_model_dir, sst2_train):
    model, tokenizer, layers = _model(tiny_model_dir, "bert")
    units = [layers["head"]]
    rows = _rows(sst2_train, 0, 4)
    spec = ProjectionSpec("identity")
    with pytest.raises(InvalidInputError):
        measure_fidelity(model, tokenizer, units, spec, rows[:1], rows[1:], "classification")
    with pytest.raises(InvalidInputError):
        measure_fidelity(model, tokenizer, units, spec, rows, [], "classification")
    with pytest.raises(InvalidInputError):
        measure_fidelity(model, tokenizer, units, spec, rows[:3], rows[3:], "classification", dtype="int8")
