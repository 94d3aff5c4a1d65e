"""Shared fixtures: real SST-2 rows, an offline word-level tokenizer, and tiny HF models built from configs."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SST2 = Path(__file__).resolve().parents[1] / "data" / "sst2"  # ships with the repository


@pytest.fixture(scope="session")
def sst2_train():
    from influence.data import read_labelled_tsv

    return read_labelled_tsv(SST2 / "train.tsv", limit=3000)


@pytest.fixture(scope="session")
def sst2_validation():
    from influence.data import read_labelled_tsv

    return read_labelled_tsv(SST2 / "validation.tsv")


def every_noisy_mask(n: int, noisy: int) -> Iterator[np.ndarray]:
    """Every (n,) bool mask with `noisy` rows set: the placements a random order makes equally likely."""
    for chosen in itertools.combinations(range(n), noisy):
        mask = np.zeros(n, dtype=bool)
        mask[list(chosen)] = True
        yield mask


def manifest_for(featurizer, num_rows: int, chunk_size: int, *, max_length: int = 64, **identity):
    """The manifest of a float32 classification store that `featurizer` fills. `identity` sets model_id,
    weights_hash, tokenizer_name or dataset_hash; placeholders stand for those not given."""
    # Here, not at the top: influence loads transformers, which reads the environment set above.
    from influence.featurize import store_manifest

    placeholders = {"model_id": "tiny", "weights_hash": "w", "tokenizer_name": "t", "dataset_hash": "d"}
    return store_manifest(
        featurizer,
        revision=None,
        **{**placeholders, **identity},
        num_rows=num_rows,
        task="classification",
        max_length=max_length,
        dtype="float32",
        chunk_size=chunk_size,
    )


def build_word_tokenizer(folder: Path, texts: list[str], size: int = 400):
    """A word-level fast tokenizer built offline from `texts` (the tests never download a tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    words = Counter(w for t in texts for w in t.split())
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word, _ in words.most_common(size - len(specials)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[EOS]",
    )
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, sst2_train):
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    build_word_tokenizer(folder, [e.text for e in sst2_train[:2000]])
    return folder


TINY_ARCHS = ("bert", "gpt2", "llama")


def tiny_config(arch: str, vocab_size: int, **overrides):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 4, "bos_token_id": 2}
    # BERT's and Llama's names for the sizes; GPT-2 names them its own way
    sizes = {
        "hidden_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 24,
        "max_position_embeddings": 64,
    }
    if arch == "bert":
        cfg = BertConfig(**sizes, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=16, n_layer=3, n_head=2, n_positions=64, **common)
    elif arch == "llama":
        cfg = LlamaConfig(**sizes, num_key_value_heads=1, head_dim=8, **common)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """make(arch, task) -> folder with a tiny model (safetensors) and the word tokenizer, built once per session."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    made: dict[tuple, Path] = {}

    def make(arch: str, task: str = "classification", num_labels: int = 3, **overrides) -> Path:
        key = (arch, task, num_labels, tuple(sorted(overrides.items())))
        if key in made:
            return made[key]
        folder = tmp_path_factory.mktemp(f"tiny-{arch}-{task}")
        torch.manual_seed(0)
        config = tiny_config(arch, vocab_size=400, **overrides)
        if task == "classification":
            config.num_labels = num_labels
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder, safe_serialization=True)
        for item in Path(tiny_tokenizer_dir).iterdir():
            shutil.copy(item, folder / item.name)
        made[key] = folder
        return folder

    return make


@pytest.fixture(scope="session", autouse=True)
def compiled_scoring_first():
    """The query scoring kernel (influence.kernels) compiled once, before any test: every test of this process
    scores with it whatever ran before (an API's start-up enables it for the whole process), and the inductor
    cache on disk is warm for the API and worker processes the tests start (a cold compile takes ~25 s, a warm
    one a few seconds)."""
    import torch

    from influence.kernels import COMPILED_DOTS, compiled_scoring_status, enable_compiled_scoring

    enable_compiled_scoring(warm_up=False)
    COMPILED_DOTS.serves(torch.float16, 1)
    return compiled_scoring_status()
