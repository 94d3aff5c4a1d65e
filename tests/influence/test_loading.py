"""Loading: safetensors only, no remote code, PEFT adapters, the real packaged model, tiny models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from influence.data import Example, encode_examples, iter_batches
from influence.errors import UnsupportedModelError
from influence.loading import load_model, packaged_minilm_path, weights_hash
from tests.conftest import tiny_config


def _logits(loaded, texts):
    encoded = encode_examples(loaded.tokenizer, [Example(t, 0) for t in texts], "classification", 32)
    batch = next(
        iter_batches(encoded, loaded.tokenizer.pad_token_id, "classification", 64, sort_by_length=False)
    )
    with torch.no_grad():
        return loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.mark.parametrize(
    ("arch", "task"),
    [("bert", "classification"), ("gpt2", "causal-lm"), ("llama", "classification"), ("llama", "causal-lm")],
)
def test_tiny_models_load_from_folder(tiny_model_dir, arch, task):
    loaded = load_model(tiny_model_dir(arch, task), task=task, num_labels=3)
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token_id is not None and loaded.model.config.pad_token_id is not None
    assert len(loaded.weights_hash) == 64


def test_packaged_minilm_loads_offline_with_a_seeded_head():
    first = load_model(packaged_minilm_path(), seed=3)
    second = load_model(packaged_minilm_path(), seed=3)
    other = load_model(packaged_minilm_path(), seed=4)
    texts = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés"]
    assert first.model.config.model_type == "bert" and first.model.config.num_hidden_layers == 6
    assert torch.equal(_logits(first, texts), _logits(second, texts))
    assert not torch.equal(_logits(first, texts), _logits(other, texts))
    assert first.weights_hash == second.weights_hash


def test_pickle_only_weights_are_refused(tmp_path, tiny_tokenizer_dir):
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", 400))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the pickle format we must refuse
    assert (tmp_path / "pytorch_model.bin").exists() and not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_model(tmp_path)


def test_remote_code_is_never_run(tmp_path, tiny_model_dir):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_model_dir("bert"), folder)
    marker = tmp_path / "remote-code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil-custom"
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError):
        load_model(folder)
    assert not marker.exists()


def test_unknown_hub_id_is_refused_offline():
    with pytest.raises(UnsupportedModelError, match="not available"):
        load_model("nobody-here/no-such-model-xyz")


def test_adapter_round_trip(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    folder = tiny_model_dir("bert")
    base = load_model(folder, num_labels=3)
    peft_model = get_peft_model(
        base.model,
        LoraConfig(
            r=2, target_modules=["query", "value"], init_lora_weights=False, modules_to_save=["classifier"]
        ),
    )
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    texts = ["a fine film", "not good at all , really"]
    want = _logits(type(base)(**{**base.__dict__, "model": peft_model.eval()}), texts)
    loaded = load_model(folder, num_labels=3, adapter=tmp_path / "adapter")
    assert torch.allclose(_logits(loaded, texts), want, atol=1e-6)
    assert loaded.weights_hash != base.weights_hash == weights_hash(folder)
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError):
        load_model(folder, num_labels=3, adapter=tmp_path / "adapter")


def test_hub_id_and_revision_resolve_from_the_local_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A hub id (+ revision) loads offline from a HuggingFace cache laid out as the hub client writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-bert"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_model_dir("bert"), snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    by_branch = load_model("acme/tiny-bert", revision="main", num_labels=3)
    by_commit = load_model("acme/tiny-bert", revision=commit, num_labels=3)
    assert by_branch.weights_hash == by_commit.weights_hash == weights_hash(tiny_model_dir("bert"))
    with pytest.raises(UnsupportedModelError):
        load_model("acme/tiny-bert", revision="no-such-branch", num_labels=3)
