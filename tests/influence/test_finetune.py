"""LoRA fine-tuning: label noise, real MiniLM on SST-2, tiny GPT-2 and Llama, adapter round trips, cache."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from influence.data import Example, collate, encode_examples, pad_token_id, stratified_subsample
from influence.errors import InvalidInputError, UnsupportedModelError
from influence.finetune import (
    LoraSettings,
    TrainSettings,
    finetune_lora,
    inject_label_noise,
    predict,
    resolve_lora_targets,
    shuffled_length_buckets,
)
from influence.loading import load_model, packaged_minilm_path
from tests.influence.conftest import MINILM_SETTINGS

# ----------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize(("n", "rate"), [(100, 0.2), (101, 0.2), (7, 0.5), (10, 0.0), (10, 1.0), (4500, 0.2)])
def test_noise_flips_exactly_round_rate_n(n, rate):
    labels = np.arange(n) % 2
    noisy, mask = inject_label_noise(labels, rate, seed=3)
    assert mask.dtype == np.bool_ and mask.shape == (n,)
    assert mask.sum() == round(rate * n)
    assert np.array_equal(noisy != labels, mask)


def test_noise_is_deterministic_per_seed_and_leaves_input_alone():
    labels = np.array([0, 1] * 50)
    kept = labels.copy()
    a = inject_label_noise(labels, 0.2, seed=7)
    b = inject_label_noise(list(labels), 0.2, seed=7)
    c = inject_label_noise(labels, 0.2, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert np.array_equal(labels, kept)


def test_binary_noise_is_one_minus_y():
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1] * 10)
    noisy, mask = inject_label_noise(labels, 0.3, seed=0)
    assert np.array_equal(noisy[mask], 1 - labels[mask])
    assert np.array_equal(noisy[~mask], labels[~mask])
    assert set(np.unique(noisy)) <= {0, 1}


def test_multiclass_noise_never_keeps_the_class_and_covers_the_others():
    labels = np.arange(3000) % 4
    noisy, mask = inject_label_noise(labels, 0.5, seed=1, num_classes=4)
    assert mask.sum() == 1500
    assert np.all(noisy[mask] != labels[mask])
    assert noisy.min() >= 0 and noisy.max() <= 3
    # Uniform among the other 3 classes: each (from, to) pair, from != to, occurs about 1500/12 = 125 times.
    pairs = np.zeros((4, 4), dtype=int)
    np.add.at(pairs, (labels[mask], noisy[mask]), 1)
    off_diagonal = pairs[~np.eye(4, dtype=bool)]
    assert np.all(np.diag(pairs) == 0)
    assert off_diagonal.min() > 80 and off_diagonal.max() < 170


def test_multiclass_inferred_from_labels_when_num_classes_is_omitted():
    labels = np.array([0, 1, 2] * 20)
    noisy, mask = inject_label_noise(labels, 1.0, seed=0)
    assert mask.all() and np.all(noisy != labels) and noisy.max() <= 2


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), float("inf"), "0.2", None, True])
def test_bad_noise_rate_is_refused(rate):
    with pytest.raises(InvalidInputError):
        inject_label_noise([0, 1, 0, 1], rate, seed=0)


def test_bad_labels_are_refused():
    with pytest.raises(InvalidInputError):
        inject_label_noise([0, 1, 5], 0.2, seed=0, num_classes=2)
    with pytest.raises(InvalidInputError):
        inject_label_noise([0, -1], 0.2, seed=0)
    with pytest.raises(InvalidInputError):
        inject_label_noise([0.5, 1.0], 0.2, seed=0)


# -------------------------------------------------------------------------------------------- batching


def test_length_buckets_cover_every_row_once_and_group_similar_lengths():
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    batches = shuffled_length_buckets(lengths, 32, np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(1000))
    assert all(len(b) <= 32 for b in batches)
    # Bucketing pays: padded tokens are well below those of plain random batches of the same size.
    def padded(groups):
        return sum(len(g) * lengths[g].max() for g in groups)

    random_batches = np.array_split(np.random.default_rng(2).permutation(1000), len(batches))
    assert padded(batches) < 0.8 * padded(random_batches)
    again = shuffled_length_buckets(lengths, 32, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    other = shuffled_length_buckets(lengths, 32, np.random.default_rng(5))
    assert not np.array_equal(np.concatenate(other), flat)


# ------------------------------------------------------------------------------------ settings checks


def test_settings_refuse_nonsense():
    with pytest.raises(InvalidInputError):
        TrainSettings(epochs=0)
    with pytest.raises(InvalidInputError):
        TrainSettings(warmup_ratio=1.0)
    with pytest.raises(InvalidInputError):
        LoraSettings(r=0)
    with pytest.raises(InvalidInputError):
        LoraSettings(target_modules="query")
    assert LoraSettings(target_modules=["query", "value"]).target_modules == ("query", "value")


def test_finetune_refuses_bad_inputs_before_loading(tmp_path):
    rows = [Example("good", 1), Example("bad", 0)]
    with pytest.raises(InvalidInputError):
        finetune_lora("/nonexistent", rows, tmp_path, eval_set=None, noisy_mask=np.zeros(3, bool))
    with pytest.raises(InvalidInputError):
        finetune_lora("/nonexistent", [Example("x", 2)], tmp_path, eval_set=None, num_labels=2)
    with pytest.raises(InvalidInputError):
        finetune_lora("/nonexistent", [], tmp_path, eval_set=None)


# ---------------------------------------------------------------------------------- the real MiniLM run
# minilm_run (the fine-tune itself) is tests/influence/conftest.py's: test_real_model.py scores its adapter.

@pytest.fixture(scope="module")
def minilm_base():
    """The packaged MiniLM with the same seeded fresh head the fine-tune started from."""
    return load_model(packaged_minilm_path(), seed=MINILM_SETTINGS.seed)


@pytest.fixture(scope="module")
def minilm_tuned(minilm_run):
    """The epoch-2 adapter loaded back from disk."""
    return load_model(packaged_minilm_path(), adapter=minilm_run["result"].adapter_path(2))


@pytest.mark.slow
def test_minilm_training_loss_goes_down(minilm_run, minilm_base, minilm_tuned):
    result, train = minilm_run["result"], minilm_run["train"]
    _, before = predict(minilm_base, train, batch_size=128, max_length=32)
    predicted, after = predict(minilm_tuned, train, batch_size=128, max_length=32)
    labels = np.array([e.label for e in train])
    p = labels.mean()
    prior_entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p))  # the best a constant prediction can do
    assert before.shape == after.shape == (256,) and after.dtype == np.float32
    assert after.mean() < before.mean() - 0.03
    assert after.mean() < prior_entropy - 0.03  # learned more than the label prior
    assert (predicted == labels).mean() > max(p, 1 - p)
    assert result.epochs[1].train_loss < result.epochs[0].train_loss
    assert result.initial_eval_loss is not None and result.initial_eval_accuracy is not None


@pytest.mark.slow
def test_minilm_run_writes_its_files(minilm_run):
    result, steps = minilm_run["result"], minilm_run["steps"]
    out = result.out_dir
    for k in (1, 2):
        assert (out / f"epoch-{k}" / "adapter_model.safetensors").is_file()
        assert (out / f"epoch-{k}" / "adapter_config.json").is_file()
        assert not list((out / f"epoch-{k}").glob("*.bin"))
    assert np.array_equal(np.load(out / "noisy_mask.npy", allow_pickle=False), minilm_run["mask"])
    labels = json.loads((out / "train_labels.json").read_text())["labels"]
    assert labels == [e.label for e in minilm_run["train"]]

    record = json.loads((out / "training.json").read_text())
    assert record["complete"] and record["settings_hash"] == result.settings_hash
    assert [e["epoch"] for e in record["epochs"]] == [1, 2]
    for e in record["epochs"]:
        assert e["train_loss"] > 0 and e["eval_loss"] > 0 and e["seconds"] > 0
        assert 0 <= e["eval_accuracy"] <= 1
    eval_losses = [e["eval_loss"] for e in record["epochs"]]
    assert record["best_epoch"] == result.best_epoch == 1 + int(np.argmin(eval_losses))
    assert {"torch", "transformers", "peft", "numpy"} <= set(record["versions"])
    assert record["settings"]["train"]["lr"] == MINILM_SETTINGS.lr

    best = out / "best"
    assert best.resolve() == (out / f"epoch-{result.best_epoch}").resolve() or (
        (best / "adapter_model.safetensors").read_bytes()
        == (out / f"epoch-{result.best_epoch}" / "adapter_model.safetensors").read_bytes()
    )
    steps_per_epoch = 256 // 16
    assert [s["step"] for s in steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert all(s["total_steps"] == 2 * steps_per_epoch for s in steps)
    assert [s["epoch"] for s in steps] == [1] * steps_per_epoch + [2] * steps_per_epoch
    assert all(np.isfinite(s["loss"]) for s in steps)


@pytest.mark.slow
def test_minilm_only_lora_and_head_are_trainable(minilm_run, minilm_base):
    result = minilm_run["result"]
    model = result.model
    config = model.config
    hidden, blocks, r = config.hidden_size, config.num_hidden_layers, 4
    # query and value in every block: lora_A (r x hidden) + lora_B (hidden x r); head: Linear(hidden, 2).
    expected = blocks * 2 * (r * hidden + hidden * r) + (hidden * 2 + 2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == expected == result.trainable_parameters == 37634
    lora = [n for n in names if "lora_" in n]
    head = [n for n in names if "classifier" in n]
    assert len(lora) == blocks * 2 * 2
    assert all(".query." in n or ".value." in n for n in lora)
    assert len(head) == 2 and all("modules_to_save" in n for n in head)
    assert set(lora) | set(head) == set(names)
    assert result.target_modules == ("query", "value") and result.modules_to_save == ("classifier",)

    # The frozen base really stayed frozen: the word embeddings equal the packaged ones.
    base = minilm_base.model
    tuned_embeddings = model.get_input_embeddings().weight
    assert torch.equal(tuned_embeddings, base.get_input_embeddings().weight)


def _logits(model, tokenizer, examples, max_length):
    encoded = encode_examples(tokenizer, examples, "classification", max_length)
    batch = collate(encoded, pad_token_id(tokenizer), "classification", range(len(encoded)))
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.mark.slow
def test_minilm_adapter_reloads_with_identical_logits(minilm_run, minilm_tuned):
    result, eval_set = minilm_run["result"], minilm_run["eval"]
    in_memory = _logits(result.model, result.tokenizer, eval_set[:32], 32)
    reloaded = minilm_tuned
    again = _logits(reloaded.model, reloaded.tokenizer, eval_set[:32], 32)
    assert in_memory.shape == (32, 2)
    torch.testing.assert_close(again, in_memory, rtol=1e-5, atol=1e-5)
    # A different checkpoint gives different logits: the comparison above can fail.
    first = load_model(packaged_minilm_path(), adapter=result.adapter_path(1))
    assert not torch.allclose(_logits(first.model, first.tokenizer, eval_set[:32], 32), in_memory, atol=1e-4)
    # predict() agrees with the raw logits.
    predicted, _ = predict(reloaded, eval_set[:32], batch_size=8, max_length=32)
    assert np.array_equal(predicted, in_memory.argmax(-1).numpy())


@pytest.mark.slow
def test_minilm_identical_settings_reuse_the_cache(minilm_run):
    first = minilm_run["result"]
    calls: list[dict] = []
    started = time.perf_counter()
    again = finetune_lora(
        packaged_minilm_path(), minilm_run["train"], first.out_dir, eval_set=minilm_run["eval"],
        train_settings=MINILM_SETTINGS, noisy_mask=minilm_run["mask"], progress=calls.append,
    )
    elapsed = time.perf_counter() - started
    assert calls == []
    assert again.reused and not first.reused and again.model is None
    assert again.settings_hash == first.settings_hash
    assert again.best_epoch == first.best_epoch and again.epochs == first.epochs
    assert elapsed < minilm_run["seconds"] / 2


# ------------------------------------------------------------------------------------- architectures


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 2-block GPT-2 (width 32) from a config, saved as safetensors with the offline word tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=400, pad_token_id=0,
                        eos_token_id=4, bos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    for item in tiny_tokenizer_dir.iterdir():
        shutil.copy(item, folder / item.name)
    return folder


GPT2_SETTINGS = TrainSettings(epochs=3, lr=1e-2, batch_size=16, max_length=32, seed=1)


def test_gpt2_lora_targets_c_attn_and_trains_the_score_head(
    tiny_gpt2_dir, tmp_path, sst2_train, sst2_validation
):
    train = stratified_subsample(sst2_train, 96, seed=1)
    steps: list[dict] = []
    result = finetune_lora(tiny_gpt2_dir, train, tmp_path / "run", eval_set=sst2_validation[:32],
                           train_settings=GPT2_SETTINGS, progress=steps.append)
    assert result.target_modules == ("c_attn",) and result.modules_to_save == ("score",)
    names = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert names and all(("c_attn" in n and "lora_" in n) or ("score" in n and "modules_to_save" in n)
                         for n in names)
    # Conv1D c_attn maps 32 -> 96 (fused q, k, v): lora_A (4 x 32) + lora_B (96 x 4) per block; score: 32 x 2.
    assert result.trainable_parameters == 2 * (4 * 32 + 96 * 4) + 32 * 2
    assert len(steps) == 3 * 6
    assert result.epochs[-1].train_loss < result.epochs[0].train_loss

    in_memory = _logits(result.model, result.tokenizer, sst2_validation[:16], 32)
    reloaded = load_model(tiny_gpt2_dir, adapter=result.adapter_path(3))
    again = _logits(reloaded.model, reloaded.tokenizer, sst2_validation[:16], 32)
    torch.testing.assert_close(again, in_memory, rtol=1e-5, atol=1e-5)
    assert (result.best_adapter / "adapter_model.safetensors").is_file()


def test_gpt2_runs_are_seeded_and_the_cache_tracks_settings(tiny_gpt2_dir, tmp_path, sst2_train):
    train = stratified_subsample(sst2_train, 48, seed=2)
    settings = TrainSettings(epochs=1, lr=1e-2, batch_size=16, max_length=32, seed=3)
    a = finetune_lora(tiny_gpt2_dir, train, tmp_path / "a", eval_set=None, train_settings=settings)
    b = finetune_lora(tiny_gpt2_dir, train, tmp_path / "b", eval_set=None, train_settings=settings)
    weights_a = load_file(a.adapter_path(1) / "adapter_model.safetensors")
    weights_b = load_file(b.adapter_path(1) / "adapter_model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert a.best_epoch == 1 and a.epochs[0].eval_loss is None

    # A changed setting retrains in place; a run without training.json (interrupted) is not reused.
    calls: list[dict] = []
    lower_lr = TrainSettings(epochs=1, lr=5e-3, batch_size=16, max_length=32, seed=3)
    changed = finetune_lora(tiny_gpt2_dir, train, tmp_path / "a", eval_set=None, progress=calls.append,
                            train_settings=lower_lr)
    assert not changed.reused and calls and changed.settings_hash != a.settings_hash
    os.remove(tmp_path / "b" / "training.json")
    calls.clear()
    rerun = finetune_lora(tiny_gpt2_dir, train, tmp_path / "b", eval_set=None, progress=calls.append,
                          train_settings=settings)
    assert not rerun.reused and calls and rerun.settings_hash == b.settings_hash
    other_seed = TrainSettings(epochs=1, lr=1e-2, batch_size=16, max_length=32, seed=4)
    c = finetune_lora(tiny_gpt2_dir, train, tmp_path / "c", eval_set=None, train_settings=other_seed)
    weights_c = load_file(c.adapter_path(1) / "adapter_model.safetensors")
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


def test_llama_defaults_are_q_and_v_proj_with_the_score_head(tiny_model_dir):
    loaded = load_model(tiny_model_dir("llama", "classification", num_labels=2), num_labels=2)
    assert resolve_lora_targets(loaded.model, "classification", LoraSettings()) == (("q_proj", "v_proj"),
                                                                                    ("score",))
    causal = load_model(tiny_model_dir("llama", "causal-lm"), task="causal-lm")
    assert resolve_lora_targets(causal.model, "causal-lm", LoraSettings()) == (("q_proj", "v_proj"), ())
    with pytest.raises(UnsupportedModelError):
        resolve_lora_targets(loaded.model, "classification", LoraSettings(target_modules=("query",)))


def test_causal_lm_fine_tune_runs_and_predict_refuses_it(tiny_model_dir, tmp_path):
    rows = [Example(f"review {i} :", label="good" if i % 2 else "bad") for i in range(32)]
    settings = TrainSettings(epochs=2, lr=1e-2, batch_size=8, max_length=16, seed=0)
    result = finetune_lora(tiny_model_dir("llama", "causal-lm"), rows, tmp_path, eval_set=rows[:8],
                           task="causal-lm", train_settings=settings)
    assert result.modules_to_save == () and result.target_modules == ("q_proj", "v_proj")
    assert result.epochs[-1].eval_loss < result.initial_eval_loss
    loaded = load_model(tiny_model_dir("llama", "causal-lm"), task="causal-lm", adapter=result.best_adapter)
    with pytest.raises(InvalidInputError):
        predict(loaded, rows, batch_size=8, max_length=16)
