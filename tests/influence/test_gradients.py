"""Per-sample gradients from hooks against a brute-force per-sample backward (float64, 1e-6 relative)."""

from __future__ import annotations

import pytest
import torch

from influence.data import Example, collate, encode_examples, iter_batches
from influence.gradients import Featurizer, per_sample_gradients, per_sample_losses
from influence.layers import discover_layers, layer_weight
from influence.loading import load_model
from influence.projection import ProjectionSpec
from tests.conftest import TINY_ARCHS

LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def _examples(rows, task):
    texts = [e.text for e in rows[:5]] + ["the film is good and the film is good"]
    if task == "classification":
        return [Example(t, label=i % 3) for i, t in enumerate(texts)]
    # causal LM: prompt + completion, so the prompt tokens are masked out of the loss
    return [Example(t, label="it is good" if i % 2 else "bad") for i, t in enumerate(texts)]


def _model(tiny_model_dir, arch, task, lora):
    loaded = load_model(tiny_model_dir(arch, task), task=task, num_labels=3, dtype=torch.float64)
    model = loaded.model
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=2,
            lora_alpha=4,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS[arch],
            init_lora_weights=False,
            fan_in_fan_out=arch == "gpt2",
        )
        model = get_peft_model(model, config).double().eval()
    return model, loaded.tokenizer


def _reference_loss(model, encoded, task):
    """One sample's loss, unpadded, written out from the definition (independent of per_sample_losses).

    (transformers' own causal-LM .loss upcasts to float32, so it cannot be the float64 reference.)
    """
    logits = model(input_ids=torch.tensor([encoded.input_ids])).logits[0]
    if task == "classification":
        return -torch.log_softmax(logits, dim=-1)[encoded.label]
    terms = [
        -torch.log_softmax(logits[t], dim=-1)[encoded.token_labels[t + 1]]
        for t in range(len(encoded.input_ids) - 1)
        if encoded.token_labels[t + 1] != -100
    ]
    assert 0 < len(terms) < len(encoded.input_ids) - 1, "the prompt must be masked, the completion kept"
    return sum(terms) / len(terms)


def _brute_force(model, encoded, task, params):
    """Per-sample gradients of the given parameters by one backward per sample, no padding: {id: (n, numel)}."""
    for p in model.parameters():
        p.requires_grad_(True)
    rows: dict[int, list] = {id(p): [] for p in params}
    for enc in encoded:
        model.zero_grad(set_to_none=True)
        _reference_loss(model, enc, task).backward()
        for p in params:
            rows[id(p)].append(p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()).double())
    return {key: torch.stack(value) for key, value in rows.items()}


def _split_by_parameter(model, layers, ours):
    """Our unit gradients regrouped per parameter tensor: units sharing a tensor (tied weights) add up."""
    out: dict[int, torch.Tensor] = {}
    params: dict[int, torch.Tensor] = {}
    names: dict[int, list] = {}
    for layer in layers:
        weight, bias = layer_weight(model, layer)
        g = ours[layer.name]
        parts = [(weight, g[:, : weight.numel()])]
        if bias is not None:
            parts.append((bias, g[:, weight.numel() :]))
        for param, grad in parts:
            out[id(param)] = out[id(param)] + grad if id(param) in out else grad
            params[id(param)] = param
            names.setdefault(id(param), []).append(layer.name)
    return out, list(params.values()), names


def _relative_error(got, want):
    return float((got - want).norm() / want.norm().clamp(min=1e-300))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_per_sample_gradients_match_brute_force(tiny_model_dir, sst2_train, arch, task, lora):
    model, tokenizer = _model(tiny_model_dir, arch, task, lora)
    layers = discover_layers(model)
    kinds = {layer.kind for layer in layers}
    assert "embedding" in kinds and ({"linear", "conv1d"} & kinds)
    if lora:
        assert any(layer.is_lora for layer in layers)
    encoded = encode_examples(tokenizer, _examples(sst2_train, task), task, max_length=32)
    lengths = {len(e.input_ids) for e in encoded}
    assert len(lengths) > 2, "the batch must mix lengths so that padding is exercised"
    batch = collate(encoded, tokenizer.pad_token_id, task, range(len(encoded)))

    ours, params, names = _split_by_parameter(model, layers, per_sample_gradients(model, batch, layers))
    want = _brute_force(model, encoded, task, params)
    # Compare per unit (weight and bias together; a key bias alone has an exactly-zero gradient, i.e. noise),
    # with units that share a tensor (tied weights) compared as one group.
    groups: dict[str, list[int]] = {}
    for key, members in names.items():
        groups.setdefault(" + ".join(sorted(set(members))), []).append(key)
    checked = 0
    for label, keys in groups.items():
        got = torch.cat([ours[k] for k in keys], dim=1)
        expected = torch.cat([want[k] for k in keys], dim=1)
        if float(expected.norm()) == 0.0:
            assert float(got.norm()) == 0.0, label
            continue
        for i in range(len(encoded)):
            err = _relative_error(got[i], expected[i])
            assert err < 1e-6, f"{label} sample {i}: relative error {err:.2e}"
        checked += 1
    assert checked >= len(groups) - 2, "almost every unit must carry a gradient"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_head_in_chunks_matches_brute_force(tiny_model_dir, sst2_train, arch):
    """The head and the loss run over chunks of 2 positions (each chunk's backward stops at the trunk's output,
    the trunk's runs once): every unit's per-sample gradient is still that of the sample's own mean loss."""
    model, tokenizer = _model(tiny_model_dir, arch, "causal-lm", lora=True)
    layers = discover_layers(model)
    assert "head" in {layer.name for layer in layers}
    encoded = encode_examples(tokenizer, _examples(sst2_train, "causal-lm"), "causal-lm", max_length=32)
    batch = collate(encoded, tokenizer.pad_token_id, "causal-lm", range(len(encoded)))
    # The identity projection is the exact gradient (test_projected_features_equal_projection_of_exact_gradient).
    featurizer = Featurizer(model, layers, ProjectionSpec("identity"))
    chunked = featurizer.featurize(batch, head_chunk_tokens=2 * len(encoded))
    assert chunked.logits is None, "the head ran chunk by chunk"
    ours, params, names = _split_by_parameter(model, layers, chunked.features)
    want = _brute_force(model, encoded, "causal-lm", params)
    for key, members in names.items():
        if float(want[key].norm()) == 0.0:
            continue
        for i in range(len(encoded)):
            err = _relative_error(ours[key][i], want[key][i])
            assert err < 1e-6, f"{members} sample {i}: relative error {err:.2e}"


def test_tied_gpt2_embedding_and_head_are_separate_units(tiny_model_dir):
    model, _ = _model(tiny_model_dir, "gpt2", "causal-lm", lora=False)
    layers = {layer.name: layer for layer in discover_layers(model)}
    assert layer_weight(model, layers["embed"])[0] is layer_weight(model, layers["head"])[0]


@pytest.mark.parametrize("kind", ["identity", "factorized", "gaussian", "rademacher"])
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_projected_features_equal_projection_of_exact_gradient(tiny_model_dir, sst2_train, arch, kind):
    """Hook-time projection == P applied to the exact gradient (factorized: P_out G P_in^T, never forming G)."""
    model, tokenizer = _model(tiny_model_dir, arch, "classification", lora=True)
    layers = discover_layers(model)
    encoded = encode_examples(tokenizer, _examples(sst2_train, "classification"), "classification", 32)
    batch = collate(encoded, tokenizer.pad_token_id, "classification", range(len(encoded)))
    exact = per_sample_gradients(model, batch, layers)
    featurizer = Featurizer(model, layers, ProjectionSpec(kind=kind, dim=24, seed=7))
    features = featurizer.featurize(batch).features
    for layer in layers:
        projector = featurizer.projectors[layer.name]
        g = exact[layer.name]
        if kind == "identity":
            want = g
        elif kind in ("gaussian", "rademacher"):
            want = g @ projector._columns(torch.arange(layer.num_params), g.dtype).T
        else:
            want = _explicit_factorized(layer, projector, g)
        assert features[layer.name].shape == (len(batch), projector.dim)
        assert torch.allclose(features[layer.name], want, rtol=1e-9, atol=1e-12), layer.name


def _explicit_factorized(layer, projector, g):
    """P_out G_aug P_in^T from the exact flat gradient, G_aug = [weight grad (out, in) | bias grad]."""
    n = g.shape[0]
    if layer.kind == "embedding":
        g_aug = g.reshape(n, layer.rows, layer.cols).transpose(1, 2)  # (dim, vocab): out = dim, in = vocab
    else:
        weight = g[:, : layer.rows * layer.cols].reshape(n, layer.rows, layer.cols)
        if layer.kind == "conv1d":
            weight = weight.transpose(1, 2)
        g_aug = (
            torch.cat([weight, g[:, layer.rows * layer.cols :, None]], dim=2) if layer.has_bias else weight
        )
    p_out, p_in = projector.matrices(g.dtype, g.device)
    if p_out is not None:
        g_aug = p_out @ g_aug
    if p_in is not None:
        g_aug = g_aug @ p_in.T
    return g_aug.reshape(n, -1)


def test_per_sample_losses_match_model_loss(tiny_model_dir, sst2_train):
    model, tokenizer = _model(tiny_model_dir, "llama", "causal-lm", lora=False)
    encoded = encode_examples(tokenizer, _examples(sst2_train, "causal-lm"), "causal-lm", 32)
    batch = collate(encoded, tokenizer.pad_token_id, "causal-lm", range(len(encoded)))
    with torch.no_grad():
        losses, _ = per_sample_losses(model, batch)
        singles = [float(_reference_loss(model, e, "causal-lm")) for e in encoded]
    assert torch.allclose(losses, torch.tensor(singles, dtype=losses.dtype), rtol=1e-10)


def test_featurize_is_independent_of_batching(tiny_model_dir, sst2_train):
    """Row i's features do not depend on which rows share its batch or on padding."""
    model, tokenizer = _model(tiny_model_dir, "bert", "classification", lora=True)
    layers = discover_layers(model)
    examples = [Example(e.text, e.label) for e in sst2_train[:12]]
    encoded = encode_examples(tokenizer, examples, "classification", 32)
    featurizer = Featurizer(model, layers, ProjectionSpec("factorized", 16, 3))
    by_batch = {}
    for size in (1, 5, 12):
        rows = {}
        for batch in iter_batches(encoded, tokenizer.pad_token_id, "classification", size):
            feats = featurizer.featurize(batch).features
            for j, row in enumerate(batch.row_ids.tolist()):
                rows[row] = torch.cat([feats[layer.name][j] for layer in layers])
        by_batch[size] = torch.stack([rows[i] for i in range(len(examples))])
    assert torch.allclose(by_batch[1], by_batch[5], rtol=1e-9, atol=1e-12)
    assert torch.allclose(by_batch[1], by_batch[12], rtol=1e-9, atol=1e-12)


def test_hooks_are_removed_and_model_unchanged(tiny_model_dir, sst2_train):
    model, tokenizer = _model(tiny_model_dir, "gpt2", "classification", lora=False)
    layers = discover_layers(model)
    encoded = encode_examples(
        tokenizer, [Example(e.text, e.label) for e in sst2_train[:4]], "classification", 32
    )
    batch = collate(encoded, tokenizer.pad_token_id, "classification", range(4))
    with torch.no_grad():
        before = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    Featurizer(model, layers, ProjectionSpec()).featurize(batch)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters()), "featurizing must not accumulate parameter grads"
    with torch.no_grad():
        after = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(before, after)
