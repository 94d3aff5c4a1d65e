"""Featurization at LLM scale: token-budget batches, the causal-LM head chunk by chunk, bfloat16 weights with
float32 features, activation checkpointing in eval mode. Each switch must leave the features as they were."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from influence.data import EncodedExample, Example, collate, encode_examples, iter_batches
from influence.errors import InvalidInputError
from influence.featurize import featurize_examples
from influence.gradients import (
    Featurizer,
    HookedModel,
    causal_lm_parts,
    layer_cancellation,
)
from influence.layers import discover_layers, find_blocks, get_module
from influence.loading import compute_dtype, load_model
from influence.metrics import cancellation
from influence.projection import IdentityProjector, ProjectionSpec
from influence.tokens import TokenRows

# --------------------------------------------------------------------------------------------------- batches


def _encoded(lengths):
    return [EncodedExample(list(range(1, n + 1)), label=0) for n in lengths]


@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "input-order"])
@pytest.mark.parametrize(("batch_size", "max_tokens"), [(4, 40), (32, 64), (3, None), (50, 7), (1, 1000)])
def test_token_budget_batches_hold_every_row_once_within_both_budgets(sort, batch_size, max_tokens):
    lengths = [*np.random.default_rng(3).integers(1, 30, size=57).tolist(), 45, 2, 2]
    encoded = _encoded(lengths)
    batches = list(iter_batches(encoded, 0, "classification", batch_size, sort, max_tokens=max_tokens))
    seen = [row for batch in batches for row in batch.row_ids.tolist()]
    assert sorted(seen) == list(range(len(encoded))), "every row exactly once"
    position = 0
    order = np.argsort(lengths, kind="stable").tolist() if sort else list(range(len(encoded)))
    for batch in batches:
        rows = batch.row_ids.tolist()
        assert rows == order[position : position + len(rows)], "batches cut the (sorted) order into runs"
        position += len(rows)
        width = max(lengths[r] for r in rows)
        assert batch.input_ids.shape == (len(rows), width)
        assert len(rows) <= batch_size
        if max_tokens is not None and len(rows) > 1:
            assert len(rows) * width <= max_tokens
        # Greedy: the next row would have broken a budget (or there is none).
        if position < len(order):
            wider = max(width, lengths[order[position]])
            assert len(rows) == batch_size or (
                max_tokens is not None and (len(rows) + 1) * wider > max_tokens
            )
        # Order restorable: row j of the batch is input row row_ids[j], unpadded.
        for j, row in enumerate(rows):
            assert batch.input_ids[j, : lengths[row]].tolist() == encoded[row].input_ids
            assert int(batch.attention_mask[j].sum()) == lengths[row]


def test_a_row_longer_than_the_budget_runs_alone():
    encoded = _encoded([3, 3, 20, 3])
    batches = list(iter_batches(encoded, 0, "classification", 8, sort_by_length=False, max_tokens=10))
    assert [b.row_ids.tolist() for b in batches] == [[0, 1], [2], [3]]


def test_batch_budgets_must_be_positive():
    for kwargs in ({"batch_size": 0}, {"batch_size": 2, "max_tokens": 0}):
        with pytest.raises(InvalidInputError):
            list(iter_batches(_encoded([2, 3]), 0, "classification", **kwargs))


# --------------------------------------------------------------------------------------------------- models

LORA_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def causal_dirs(tmp_path_factory, tiny_tokenizer_dir):
    """Tiny causal LMs in Qwen2's shape (tied head) and Llama's (untied), saved with the word tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = {
        "vocab_size": 512,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 4,
    }
    configs = {
        "qwen2-tied": Qwen2Config(**common, tie_word_embeddings=True),
        "llama-untied": LlamaConfig(**common, tie_word_embeddings=False),
    }
    folders = {}
    for name, config in configs.items():
        folder = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
        for item in tiny_tokenizer_dir.iterdir():
            shutil.copy(item, folder / item.name)
        folders[name] = folder
    return folders


def _load(folder, dtype=torch.float32, lora=True):
    loaded = load_model(folder, task="causal-lm", dtype=dtype)
    model = loaded.model
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False
        )
        torch.manual_seed(1)  # the same LoRA weights in every load of the same folder
        model = get_peft_model(model, config).to(dtype).eval()
    return model, loaded.tokenizer


def _examples(rows, n=7):
    # Long prompts and short completions: most head chunks hold prompt tokens only.
    return [
        Example(" ".join(e.text.split()[:18]), label="it is good" if i % 2 else "bad")
        for i, e in enumerate(rows[:n])
    ]


def _batch(tokenizer, examples):
    encoded = encode_examples(tokenizer, examples, "causal-lm", max_length=48)
    assert len({len(e.input_ids) for e in encoded}) > 2, "mixed lengths: padding must be exercised"
    return collate(encoded, tokenizer.pad_token_id, "causal-lm", range(len(encoded)))


def _selection(layers, which):
    lora = [layer for layer in layers if layer.is_lora]
    head = [layer for layer in layers if layer.name == "head"]
    assert lora and len(head) == 1
    if which == "lora+head":
        return lora + head
    if which == "lora":
        return lora
    if which == "head":
        return head
    return layers  # every unit: embedding, attention, MLP, LoRA, head


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-30))


# ----------------------------------------------------------------------------------------------- the head


def test_trunk_and_head_are_found_through_peft_and_give_the_models_logits(causal_dirs):
    for folder in causal_dirs.values():
        model, _ = _load(folder)
        trunk, head = causal_lm_parts(model)
        base = model.get_base_model()
        assert head is base.get_output_embeddings() and trunk is base.model
        ids = torch.tensor([[5, 9, 17, 33, 2]])
        with torch.no_grad():
            assert torch.equal(head(trunk(input_ids=ids)[0]), model(input_ids=ids).logits)


@pytest.mark.parametrize("which", ["lora+head", "lora", "head", "all"])
@pytest.mark.parametrize("arch", ["qwen2-tied", "llama-untied"])
def test_head_in_chunks_gives_the_unchunked_features(causal_dirs, sst2_train, arch, which):
    model, tokenizer = _load(causal_dirs[arch])
    layers = _selection(discover_layers(model), which)
    batch = _batch(tokenizer, _examples(sst2_train))
    rows, width = batch.input_ids.shape
    featurizer = Featurizer(model, layers, ProjectionSpec("auto", dim=64, seed=5))
    whole = featurizer.featurize(batch, head_chunk_tokens=None)
    assert whole.logits is not None and whole.logits.shape[:2] == (rows, width)

    head = get_module(model, next(layer for layer in discover_layers(model) if layer.name == "head"))
    # The split's probe (a few tokens, once per model object) runs here, before the head's calls are counted.
    assert causal_lm_parts(model) is not None
    calls: list[tuple[int, ...]] = []
    probe = head.register_forward_hook(lambda module, args, output: calls.append(tuple(output.shape)))
    try:
        chunk = 3 * rows  # three positions per chunk
        chunked = featurizer.featurize(batch, head_chunk_tokens=chunk)
    finally:
        probe.remove()
    assert chunked.logits is None, "the whole batch's logits are never kept"
    assert calls and all(shape[0] * shape[1] <= chunk for shape in calls), calls
    # One call per chunk of three positions that holds a completion token; prompt-only chunks are skipped.
    targets = batch.labels[:, 1:]
    wanted = sum(bool((targets[:, s : s + 3] != -100).any()) for s in range(0, width - 1, 3))
    assert len(calls) == wanted < -(-(width - 1) // 3)

    torch.testing.assert_close(chunked.losses, whole.losses, rtol=1e-5, atol=1e-6)
    for layer in layers:
        got, want = chunked.features[layer.name], whole.features[layer.name]
        if isinstance(want, TokenRows):  # the embedding's exact token rows: the same tokens, close vectors
            assert torch.equal(torch.as_tensor(got.offsets), torch.as_tensor(want.offsets))
            assert torch.equal(torch.as_tensor(got.tokens), torch.as_tensor(want.tokens))
            got, want = torch.as_tensor(got.values), torch.as_tensor(want.values)
        assert got.dtype == torch.float32
        scale = float(want.abs().max())
        assert scale > 0, layer.name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale, msg=layer.name)


def test_cancellation_takes_the_norm_of_the_whole_head_gradient(causal_dirs, sst2_train):
    """A head run in chunks is handed to the cancellation as the sum of its chunks: L1 norms of that sum."""
    model, tokenizer = _load(causal_dirs["llama-untied"])
    layers = _selection(discover_layers(model), "lora+head")
    batch = _batch(tokenizer, _examples(sst2_train))
    chunked = layer_cancellation(model, layers, [batch], head_chunk_tokens=2 * len(batch))
    exact = Featurizer(model, layers, ProjectionSpec("identity")).featurize(batch, head_chunk_tokens=None)
    want = cancellation(exact.features)
    for layer in layers:
        got = chunked[layer.name]
        assert got.num_samples == len(batch)
        assert got.l1_over_l1 == pytest.approx(want[layer.name].l1_over_l1, rel=1e-4), layer.name
        assert got.l1_over_l2 == pytest.approx(want[layer.name].l1_over_l2, rel=1e-4), layer.name


# ---------------------------------------------------------------------------------------------- bfloat16


def test_bfloat16_weights_give_float32_features_close_to_float32_weights(causal_dirs, sst2_train):
    examples = _examples(sst2_train)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = _load(causal_dirs["qwen2-tied"], compute_dtype(dtype))
        assert next(model.parameters()).dtype == compute_dtype(dtype)
        layers = _selection(discover_layers(model), "all")
        featurizer = Featurizer(model, layers, ProjectionSpec("auto", dim=64, seed=5))
        batch = _batch(tokenizer, examples)
        direct = featurizer.featurize(batch, head_chunk_tokens=4 * len(batch))
        assert all(value.dtype == torch.float32 for name, value in direct.features.items() if name != "embed")
        assert direct.features["embed"].values.dtype == torch.float32
        assert direct.losses.dtype == torch.float32
        results[dtype] = featurize_examples(
            featurizer, tokenizer, examples, "causal-lm", max_length=48, head_chunk_tokens=4 * len(batch)
        )
    low, high = results["bfloat16"], results["float32"]
    np.testing.assert_allclose(low.losses, high.losses, rtol=2e-2)
    for name, want in high.features.items():
        got = low.features[name]
        if name == "embed":  # token rows: compare each row's Gram with the float32 one
            got_gram, want_gram = got.dot(got, torch.float64), want.dot(want, torch.float64)
            assert _cosine(got_gram.flatten(), want_gram.flatten()) > 0.99
            continue
        assert got.dtype == np.float32, name
        assert _cosine(torch.from_numpy(got), torch.from_numpy(want)) > 0.99, name
        rows = [_cosine(torch.from_numpy(g), torch.from_numpy(w)) for g, w in zip(got, want, strict=True)]
        assert min(rows) > 0.98, (name, min(rows))


def test_compute_dtype_names():
    assert compute_dtype("bfloat16") is torch.bfloat16 and compute_dtype("float32") is torch.float32
    with pytest.raises(InvalidInputError):
        compute_dtype("float8")


# ----------------------------------------------------------------------------------- activation checkpointing


class _Counting(IdentityProjector):
    def __init__(self, layer):
        super().__init__(layer, 0, 0)
        self.prepared = self.combined = 0

    def prepare(self, inputs):
        self.prepared += 1
        return super().prepare(inputs)

    def combine(self, prepared, grad_out):
        self.combined += 1
        return super().combine(prepared, grad_out)


@pytest.mark.parametrize("head_chunk_tokens", [None, 8], ids=["whole-head", "head-in-chunks"])
def test_checkpointing_recomputes_blocks_and_keeps_features(causal_dirs, sst2_train, head_chunk_tokens):
    model, tokenizer = _load(causal_dirs["qwen2-tied"])
    layers = _selection(discover_layers(model), "all")
    batch = _batch(tokenizer, _examples(sst2_train))
    watched = next(layer for layer in layers if layer.name == "block.0.mlp.up")
    assert causal_lm_parts(model) is not None  # its probe runs the model once, before the counts
    outcomes = {}
    for checkpointing in (False, True):
        handlers = {layer.name: _Counting(layer) for layer in layers}
        runs: list[int] = []
        watch = get_module(model, watched).register_forward_hook(lambda *_, runs=runs: runs.append(1))
        try:
            with HookedModel(
                model, layers, handlers, head_chunk_tokens=head_chunk_tokens, checkpointing=checkpointing
            ) as hooked:
                results, losses, _ = hooked.backward_per_sample(batch)
        finally:
            watch.remove()
        outcomes[checkpointing] = (results, losses, handlers, len(runs))
    plain, checkpointed = outcomes[False], outcomes[True]
    assert plain[3] == 1 and checkpointed[3] == 2, "the block ran again in the backward pass"
    for name, handler in checkpointed[2].items():
        # The recomputation is neither captured nor tapped: every unit records what it records without it.
        assert (handler.prepared, handler.combined) == (plain[2][name].prepared, plain[2][name].combined), (
            name
        )
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=1e-6, atol=1e-7)
    for layer in layers:
        torch.testing.assert_close(checkpointed[0][layer.name], plain[0][layer.name], rtol=1e-5, atol=1e-7)
    _, blocks = find_blocks(model)
    assert all("forward" not in vars(block) for block in blocks), "the blocks are restored on exit"


def test_featurize_examples_with_every_switch_gives_the_plain_features(causal_dirs, sst2_train):
    model, tokenizer = _load(causal_dirs["llama-untied"])
    layers = _selection(discover_layers(model), "lora+head")
    featurizer = Featurizer(model, layers, ProjectionSpec("auto", dim=64, seed=5))
    examples = _examples(sst2_train, 9)
    plain = featurize_examples(
        featurizer, tokenizer, examples, "causal-lm", batch_size=9, max_length=48, head_chunk_tokens=None
    )
    lean = featurize_examples(
        featurizer,
        tokenizer,
        examples,
        "causal-lm",
        batch_size=9,
        max_length=48,
        max_tokens=50,
        head_chunk_tokens=6,
        checkpointing=True,
    )
    np.testing.assert_allclose(lean.losses, plain.losses, rtol=1e-5)
    for name, want in plain.features.items():
        np.testing.assert_allclose(lean.features[name], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
