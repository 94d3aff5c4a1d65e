"""The memory estimate (influence.memory): weights from safetensors headers against the tensors themselves, the
parts' arithmetic, and the whole estimate against the peak memory of real featurization runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from influence import ProjectionSpec, discover_layers
from influence.errors import UnsupportedModelError
from influence.gradients import Featurizer
from influence.memory import (
    ACT_HIDDEN,
    ACT_INTERMEDIATE,
    ACT_OUTSIDE,
    CHECKPOINT_LIVE_BLOCKS,
    HEAD_COPIES,
    batch_tokens,
    config_weight_count,
    device_memory,
    estimate_model_memory,
    format_bytes,
    header_weight_bytes,
    model_shape,
    read_config,
    read_safetensors_header,
    tap_bytes,
    weight_files,
)

ROOT = Path(__file__).resolve().parents[2]
KNOBS = {"dtype": "float32", "max_tokens": 1024, "head_chunk_tokens": 256, "checkpointing": False}


def file_tensor_bytes(folder: Path, element: int | None = None) -> int:
    """Bytes of the tensors really stored in the folder's weight files (each at `element` bytes if given)."""
    total = 0
    for path in weight_files(folder):
        for tensor in load_file(path).values():
            total += tensor.numel() * (element or tensor.element_size())
    return total


def meta_layers(folder: Path, task: str = "causal-lm"):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return discover_layers(auto.from_config(AutoConfig.from_pretrained(folder)))


# --- weights from headers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_header_bytes_are_the_stored_tensors(tiny_model_dir, arch):
    task = "classification" if arch == "bert" else "causal-lm"
    folder = tiny_model_dir(arch, task)
    assert header_weight_bytes([folder], "float32") == file_tensor_bytes(folder, 4)
    assert header_weight_bytes([folder], "bfloat16") == file_tensor_bytes(folder, 2)
    stored = load_file(weight_files(folder)[0])
    header = read_safetensors_header(weight_files(folder)[0])
    assert {name: (tuple(t.shape)) for name, t in stored.items()} == {n: s for n, (_, s) in header.items()}


def test_sharded_weights_count_each_shard_once(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    whole = tiny_model_dir("llama", "causal-lm")
    model = AutoModelForCausalLM.from_pretrained(whole)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(weight_files(sharded)) > 1
    assert header_weight_bytes([sharded], "float32") == header_weight_bytes([whole], "float32")
    # A stray copy of the weights beside the shard index is not what the loader reads.
    shutil.copy(whole / "model.safetensors", sharded / "consolidated.safetensors")
    assert header_weight_bytes([sharded], "float32") == header_weight_bytes([whole], "float32")


def test_integer_tensors_keep_their_size_and_floats_take_the_compute_dtype(tmp_path):
    tensors = {
        "w": torch.zeros(10, 20, dtype=torch.bfloat16),
        "ids": torch.zeros(7, dtype=torch.int64),
        "flag": torch.zeros(3, dtype=torch.bool),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert header_weight_bytes([tmp_path], "float32") == 200 * 4 + 7 * 8 + 3
    assert header_weight_bytes([tmp_path], "bfloat16") == 200 * 2 + 7 * 8 + 3


@pytest.mark.parametrize(
    "content",
    [
        (10**12).to_bytes(8, "little") + b"{}",  # a length beyond the file
        (5).to_bytes(8, "little") + b"nope!",  # not JSON
        (2).to_bytes(8, "little") + b"[]",  # not an object
        (40).to_bytes(8, "little") + b'{"w": {"dtype": "X9", "shape": [2, 3]}}  ',  # unknown dtype
        (39).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [-2]}}   ',  # negative size
        b"\x01",  # shorter than the length field
    ],
)
def test_a_broken_header_is_refused_by_name(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UnsupportedModelError, match=r"model\.safetensors"):
        read_safetensors_header(path)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_config_arithmetic_matches_the_headers(tiny_model_dir, arch):
    folder = tiny_model_dir(arch, "causal-lm")
    counted = config_weight_count(model_shape(read_config(folder)), "causal-lm")
    assert counted * 4 == pytest.approx(header_weight_bytes([folder], "float32"), rel=0.02)


def test_a_config_without_weights_is_estimated_by_arithmetic(tiny_model_dir):
    folder = tiny_model_dir("llama", "causal-lm")
    config = read_config(folder)
    from_config = estimate_model_memory(config, **KNOBS)
    from_folder = estimate_model_memory(folder, **KNOBS)
    assert (from_config.weights_from, from_folder.weights_from) == ("config", "safetensors")
    assert from_config.weights_bytes == pytest.approx(from_folder.weights_bytes, rel=0.02)
    assert from_config.activations_bytes == from_folder.activations_bytes
    with pytest.raises(UnsupportedModelError, match="hidden size"):
        estimate_model_memory({"vocab_size": 10}, **KNOBS)


# --- the parts ----------------------------------------------------------------------------------------------


def llm_config(**overrides) -> dict:
    """Qwen2-0.5B's sizes (a config only: nothing is built)."""
    config = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
        "tie_word_embeddings": True,
    }
    return {**config, **overrides}


def test_the_parts_follow_the_documented_model():
    estimate = estimate_model_memory(llm_config(), **{**KNOBS, "max_tokens": 8192, "head_chunk_tokens": 1024})
    hidden, inter, blocks, vocab = 896, 4864, 24, 151_936
    per_block = (ACT_HIDDEN * hidden + ACT_INTERMEDIATE * inter) * 4
    assert estimate.activations_bytes == 8192 * (blocks * per_block + ACT_OUTSIDE * hidden * 4)
    assert estimate.head_bytes == 1024 * vocab * 4 * HEAD_COPIES
    assert estimate.gradients_bytes == 0  # no units tapped
    assert estimate.total_bytes == (
        estimate.weights_bytes + estimate.activations_bytes + estimate.head_bytes + estimate.gradients_bytes
    )
    # A mixture of experts runs num_experts_per_tok MLPs per token.
    moe = estimate_model_memory(llm_config(num_experts_per_tok=2), **{**KNOBS, "max_tokens": 8192})
    assert moe.activations_bytes - estimate.activations_bytes == 8192 * blocks * ACT_INTERMEDIATE * inter * 4
    # About Qwen2-0.5B's 494M parameters in float32.
    assert 1.9e9 < estimate.weights_bytes < 2.1e9
    text = estimate.breakdown()
    assert text.startswith(f"weights {format_bytes(estimate.weights_bytes)} float32, activations ")
    assert "at 8,192 tokens per batch" in text and f"head {format_bytes(estimate.head_bytes)}" in text


def test_monotone_in_tokens_and_vocabulary():
    totals = [
        estimate_model_memory(llm_config(), **{**KNOBS, "max_tokens": tokens}).total_bytes
        for tokens in (256, 512, 1024, 4096, 8192)
    ]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    by_vocab = [estimate_model_memory(llm_config(vocab_size=v), **KNOBS) for v in (1000, 32_000, 151_936)]
    assert [e.head_bytes for e in by_vocab] == sorted(e.head_bytes for e in by_vocab)
    assert [e.weights_bytes for e in by_vocab] == sorted(e.weights_bytes for e in by_vocab)
    assert len({e.total_bytes for e in by_vocab}) == 3
    # The head never holds more tokens than a batch has.
    small = estimate_model_memory(llm_config(), **{**KNOBS, "max_tokens": 100, "head_chunk_tokens": 1024})
    assert small.head_bytes == 100 * 151_936 * 4 * HEAD_COPIES


def test_bfloat16_halves_weights_and_activations_but_not_the_head(tiny_model_dir):
    folder = tiny_model_dir("llama", "causal-lm")
    full = estimate_model_memory(folder, **KNOBS)
    half = estimate_model_memory(folder, **{**KNOBS, "dtype": "bfloat16"})
    assert half.weights_bytes * 2 == full.weights_bytes
    assert half.activations_bytes * 2 == full.activations_bytes
    assert half.head_bytes == full.head_bytes  # the loss is float32 whatever the weights are


def test_checkpointing_keeps_block_inputs_and_a_few_blocks():
    plain = estimate_model_memory(llm_config(), **KNOBS)
    checkpointed = estimate_model_memory(llm_config(), **{**KNOBS, "checkpointing": True})
    assert checkpointed.activations_bytes < plain.activations_bytes / 5
    per_block = (ACT_HIDDEN * 896 + ACT_INTERMEDIATE * 4864) * 4
    kept = 24 * 896 * 4 + CHECKPOINT_LIVE_BLOCKS * per_block + ACT_OUTSIDE * 896 * 4
    assert checkpointed.activations_bytes == 1024 * kept
    assert checkpointed.weights_bytes == plain.weights_bytes and checkpointed.head_bytes == plain.head_bytes


def test_batch_tokens_follow_rows_and_row_length():
    assert batch_tokens(8192, None, None) == 8192
    assert batch_tokens(8192, 32, 128) == 4096  # 32 rows of 128 tokens fill half the budget
    assert batch_tokens(8192, 64, 256) == 8192
    assert batch_tokens(512, 8, 1024) == 1024  # a row longer than the budget runs alone
    estimate = estimate_model_memory(llm_config(), **KNOBS, max_rows=4, row_tokens=128)
    assert estimate.tokens_per_batch == 512


def test_taps_count_captures_per_token_and_features_per_row(tiny_model_dir):
    folder = tiny_model_dir("llama", "causal-lm")
    layers = meta_layers(folder)
    spec = ProjectionSpec()
    one = tap_bytes(layers, spec, tokens=64, rows=1, row_tokens=64, element=4)
    two_rows = tap_bytes(layers, spec, tokens=64, rows=2, row_tokens=64, element=4)
    more_tokens = tap_bytes(layers, spec, tokens=128, rows=1, row_tokens=64, element=4)
    assert 0 < one < two_rows and one < more_tokens
    # A row's features are the projected dims the Featurizer reports, in float32 (token rows: per token).
    from transformers import AutoModelForCausalLM

    featurizer = Featurizer(AutoModelForCausalLM.from_pretrained(folder), layers, spec)
    per_row = sum(
        dim * (64 if featurizer.projectors[name].kind == "tokens" else 1)
        for name, dim in featurizer.dims.items()
    )
    assert two_rows - one == per_row * 4
    # Dict records (a registration's stored layers) count as the layers do.
    assert tap_bytes([layer.to_dict() for layer in layers], spec, 64, 1, 64, 4) == one
    with_units = estimate_model_memory(folder, **KNOBS, selected_units=layers)
    assert with_units.gradients_bytes > 0
    assert (
        with_units.total_bytes - estimate_model_memory(folder, **KNOBS).total_bytes
        == with_units.gradients_bytes
    )


def test_device_memory_reads_this_machine():
    total, what = device_memory("cpu")
    meminfo = Path("/proc/meminfo").read_text()
    mem_total = (
        int(next(line for line in meminfo.splitlines() if line.startswith("MemTotal:")).split()[1]) * 1024
    )
    assert what.startswith("RAM")
    assert total is not None and 0 < total <= mem_total
    if "cgroup" not in what:
        assert total == mem_total


def test_format_bytes():
    assert [format_bytes(n) for n in (900, 12_500, 310 * 10**6, 14_213_000_000)] == [
        "900 bytes",
        "12.5 kB",
        "310.0 MB",
        "14.2 GB",
    ]


# --- against measured peaks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured_models(tmp_path_factory, tiny_tokenizer_dir):
    """Small-but-not-tiny models (hidden 256, 4 blocks, vocabulary 8,000: tens of MB of weights, hundreds of MB
    per batch), saved as a worker finds them."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    root = tmp_path_factory.mktemp("measured")
    configs = {
        "llama": LlamaConfig(
            vocab_size=8000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            pad_token_id=0,
        ),
        "gpt2": GPT2Config(
            vocab_size=8000,
            n_embd=256,
            n_layer=4,
            n_head=8,
            n_positions=512,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=4,
        ),
    }
    folders = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        folder = root / name
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        for item in Path(tiny_tokenizer_dir).iterdir():
            shutil.copy(item, folder / item.name)
        folders[name] = folder
    return folders


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, chunk, checkpointing",
    [("llama", 512, False), ("llama", 512, True), ("gpt2", 2048, False)],
    ids=["llama-chunked", "llama-checkpointed", "gpt2-whole-head"],
)
def test_the_estimate_is_within_2x_of_the_measured_peak(measured_models, arch, chunk, checkpointing):
    """The module docstring's command, in a fresh process, at 8 rows x 256 tokens: estimate / measured was
    0.76-0.82, 0.88-0.94 and 0.96 in runs here (allocator slack varies by up to ~25% from run to run, hence the
    0.5x-2x band)."""
    folder = measured_models[arch]
    command = [
        sys.executable,
        "-m",
        "influence.memory",
        "measure",
        str(folder),
        "--rows",
        "8",
        "--row-tokens",
        "256",
        "--head-chunk-tokens",
        str(chunk),
        *(["--checkpointing"] if checkpointing else []),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    estimate = estimate_model_memory(
        folder,
        dtype="float32",
        max_tokens=2048,
        head_chunk_tokens=chunk,
        checkpointing=checkpointing,
        selected_units=meta_layers(folder),
        max_rows=8,
        row_tokens=256,
    )
    assert measured["tokens"] == estimate.tokens_per_batch == 2048
    peak = measured["weights_bytes"] + measured["batch_bytes"]
    # Enough signal: the peak is far above what the process' own noise could be.
    assert peak > 150 * 10**6, measured
    ratio = estimate.total_bytes / peak
    assert 0.5 <= ratio <= 2, (ratio, measured, estimate)
    assert 0.5 <= estimate.weights_bytes / measured["weights_bytes"] <= 2, (measured, estimate)
