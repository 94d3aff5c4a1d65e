"""Model registration against hostile and careless folders: every file the loader may open resolves inside the
allowed roots (or the hub cache), checked at registration and again before a worker loads the model; config
values are type- and range-checked before anything is built; tokenizer files are required; numbers are strict."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from app.models import Job, RegisteredModel
from influence.errors import UnsupportedModelError
from tests.app.conftest import build_api, make_settings
from tests.app.test_datasets import assert_problem
from tests.worker.support import register_dataset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def register(api, folder, **body):
    body = {"name": "m", "source": str(folder), **body}
    return api.client.post("/v1/models", json=body)


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def tiny_bert(tiny_model_dir) -> Path:
    return tiny_model_dir("bert", "classification", num_labels=2)


@pytest.fixture
def narrow(tmp_path, sqlite_url):
    """An API whose one allowed root is `root`; `outside` is a folder next to it, outside every root."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    built = build_api(make_settings(tmp_path, sqlite_url, [root]))
    yield built, root, outside
    built.close()


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = tiny_model_dir("bert", "classification", num_labels=2)
    folder = tmp_path_factory.mktemp("safety-adapter") / "lora"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    get_peft_model(model, LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")).save_pretrained(folder)
    return folder


# --- files that escape the roots ---------------------------------------------------------------------------


def test_a_tokenizer_file_linked_to_etc_passwd_is_refused(narrow, tiny_bert):
    api, root, _ = narrow
    folder = copy_model(tiny_bert, root / "m")
    (folder / "vocab.txt").symlink_to("/etc/passwd")
    body = assert_problem(register(api, folder), 422, "vocab.txt", "outside the allowed roots")
    assert "/etc/passwd" not in body["detail"]  # where the link points is not echoed
    assert api.count(RegisteredModel) == 0


def test_weights_linked_outside_the_roots_are_refused(narrow, tiny_bert):
    api, root, outside = narrow
    folder = copy_model(tiny_bert, root / "m")
    os.replace(folder / "model.safetensors", outside / "model.safetensors")
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    assert_problem(register(api, folder), 422, "model.safetensors", "outside the allowed roots")
    assert api.count(RegisteredModel) == 0


@pytest.mark.parametrize("shard", ["absolute", "../outside.safetensors", "sub/x.safetensors"])
def test_a_shard_index_naming_weights_outside_the_folder_is_refused(narrow, tiny_bert, shard):
    """transformers joins each weight_map file name onto the folder: an absolute path or `..` loaded weights from
    outside the roots while only a dummy file in the folder was checked and hashed."""
    from safetensors.torch import load_file, save_file

    from influence import load_model

    api, root, outside = narrow
    folder = copy_model(tiny_bert, root / "m")
    tensors = load_file(folder / "model.safetensors")
    os.replace(folder / "model.safetensors", outside / "real.safetensors")
    save_file({"dummy": tensors[next(iter(tensors))][:1].clone()}, folder / "dummy.safetensors")
    target = str(outside / "real.safetensors") if shard == "absolute" else shard
    index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, target)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_problem(register(api, folder), 422, "model.safetensors.index.json", "not a .safetensors file")
    assert api.count(RegisteredModel) == 0
    with pytest.raises(UnsupportedModelError, match=r"not a \.safetensors file of the folder"):
        load_model(folder, num_labels=2)  # the worker's load refuses it too


def test_a_nested_link_or_a_linked_subfolder_outside_the_roots_is_refused(narrow, tiny_bert):
    api, root, outside = narrow
    folder = copy_model(tiny_bert, root / "m")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").symlink_to(outside)
    assert_problem(register(api, folder), 422, "1_Pooling/config.json")
    (folder / "1_Pooling" / "config.json").unlink()
    (folder / "extra").symlink_to(outside, target_is_directory=True)
    assert_problem(register(api, folder), 422, "'extra'")
    assert api.count(RegisteredModel) == 0


def test_links_that_stay_inside_the_roots_are_accepted(narrow, tiny_bert):
    api, root, _ = narrow
    folder = copy_model(tiny_bert, root / "m")
    blobs = root / "blobs"
    blobs.mkdir()
    os.replace(folder / "model.safetensors", blobs / "weights")
    (folder / "model.safetensors").symlink_to(Path("..") / "blobs" / "weights")
    response = register(api, folder)
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("where", ["adapter", "checkpoint"])
def test_adapter_files_linked_outside_the_roots_are_refused(narrow, tiny_bert, lora_adapter, where):
    api, root, outside = narrow
    folder = copy_model(tiny_bert, root / "m")
    adapter = copy_model(lora_adapter, root / "lora")
    os.replace(adapter / "adapter_model.safetensors", outside / "adapter.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(outside / "adapter.safetensors")
    body = (
        {"adapter": str(adapter)}
        if where == "adapter"
        else {"checkpoints": [{"adapter": str(adapter), "learning_rate": 0.1}]}
    )
    assert_problem(register(api, folder, **body), 422, "adapter_model.safetensors", "outside the allowed roots")
    assert api.count(RegisteredModel) == 0


@pytest.fixture
def linked_hub(tmp_path, tiny_model_dir, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it: snapshot files are links into the repo's blobs."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--linked"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in tiny_model_dir("gpt2", "causal-lm").iterdir():
        blob = repo / "blobs" / f"blob-{item.name}"
        shutil.copy(item, blob)
        (snapshot / item.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return snapshot


def test_hub_snapshots_may_link_into_the_cache_only(api, linked_hub, tmp_path):
    response = api.client.post("/v1/models", json={"name": "h", "source": "acme/linked", "task": "causal-lm"})
    assert response.status_code == 201, response.text
    # A file elsewhere is refused even inside an allowed root: a hub id's files belong to the hub cache.
    elsewhere = tmp_path / "elsewhere.json"
    shutil.copy(linked_hub / "tokenizer_config.json", elsewhere)
    (linked_hub / "tokenizer_config.json").unlink()
    (linked_hub / "tokenizer_config.json").symlink_to(elsewhere)
    refused = api.client.post("/v1/models", json={"name": "h", "source": "acme/linked", "task": "causal-lm"})
    assert_problem(refused, 422, "tokenizer_config.json", "outside the hub cache")


def test_a_link_swapped_in_after_registration_fails_the_build(api, tiny_bert, tmp_path, sst2_rows):
    from app.errors import Invalid
    from app.jobs import index_build
    from app.jobs.context import WorkerContext
    from app.jobs.dispatch import InlineDispatcher
    from app.jobs.model_cache import ModelCache
    from app.jobs.steps import describe_error, fail_job

    folder = copy_model(tiny_bert, tmp_path / "m")
    model = register(api, folder, num_labels=2).json()
    dataset = register_dataset(api.client, sst2_rows[:20])
    index = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": ["head"]}
    ).json()
    job_id = index["job"]["id"]
    # The same bytes, but now read through a link to a folder outside every root.
    outside = Path(tempfile.mkdtemp(prefix="outside-roots-"))
    try:
        os.replace(folder / "tokenizer.json", outside / "tokenizer.json")
        (folder / "tokenizer.json").symlink_to(outside / "tokenizer.json")
        ctx = WorkerContext(
            api.settings, api.session_factory, ModelCache(), InlineDispatcher()
        )
        # As the worker's task runs a step: what it raises fails the job with its message.
        with pytest.raises(Invalid, match=r"'tokenizer\.json' resolves outside the allowed roots") as raised:
            index_build.plan_build(ctx, job_id)
        fail_job(ctx, job_id, describe_error(raised.value))
    finally:
        shutil.rmtree(outside)
    job = api.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed", job
    assert "'tokenizer.json' resolves outside the allowed roots" in job["error"]
    assert api.client.get(f"/v1/indexes/{index['id']}").json()["status"] == "failed"


# --- config values, checked before anything is built -------------------------------------------------------


BAD_CONFIGS = [
    ("hidden-size-string", {"hidden_size": "384"}, "hidden_size", "max_model_width"),
    ("hidden-size-bool", {"hidden_size": True}, "hidden_size", "max_model_width"),
    ("hidden-size-float", {"hidden_size": 16.0}, "hidden_size", "max_model_width"),
    ("hidden-size-zero", {"hidden_size": 0}, "hidden_size", "max_model_width"),
    ("intermediate-too-wide", {"intermediate_size": 10**7}, "intermediate_size", "max_model_width"),
    ("twenty-thousand-blocks", {"num_hidden_layers": 20_000}, "num_hidden_layers", "max_model_blocks"),
    ("blocks-negative", {"num_hidden_layers": -3}, "num_hidden_layers", "max_model_blocks"),
    ("gpt2-n-layer", {"n_layer": 20_000}, "n_layer", "max_model_blocks"),
    ("nested-text-config", {"text_config": {"num_hidden_layers": 20_000}}, "text_config.num_hidden_layers",
     "max_model_blocks"),
    ("vocab-too-large", {"vocab_size": 10**9}, "vocab_size", "max_model_vocab"),
    ("config-num-labels", {"num_labels": 100_000}, "num_labels", "max_num_labels"),
    ("config-id2label", {"id2label": {str(i): f"c{i}" for i in range(10_001)}}, "id2label", "max_num_labels"),
    ("heads-string", {"num_attention_heads": "2"}, "num_attention_heads", "max_model_width"),
]


@pytest.mark.parametrize(
    ("changes", "field", "setting"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_values_are_refused_before_anything_is_built(api, tiny_bert, tmp_path, changes, field, setting):
    folder = copy_model(tiny_bert, tmp_path / "m")
    edit_config(folder, **changes)
    assert_problem(register(api, folder), 422, f"config.json: {field}", f"({setting})")
    assert api.count(RegisteredModel) == 0


def test_twenty_thousand_blocks_are_refused_in_well_under_a_second(api, tiny_bert, tmp_path):
    folder = copy_model(tiny_bert, tmp_path / "m")
    edit_config(folder, num_hidden_layers=20_000)
    started = time.perf_counter()
    response = register(api, folder)
    elapsed = time.perf_counter() - started
    assert_problem(response, 422, "num_hidden_layers", "max_model_blocks")
    assert elapsed < 1.0, elapsed


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"model_type": "bert", "hidden_size": ' + "9" * 5000 + "}", "not readable JSON"),
        ("[" * 100_000 + "]" * 100_000, "not readable JSON"),
        ('{"model_type": "bert", "hidden_size": 1e400}', "hidden_size"),
    ],
    ids=["huge-integer", "nested-100000-deep", "infinite-float"],
)
def test_malformed_config_json_is_422(api, tiny_bert, tmp_path, text, fragment):
    folder = copy_model(tiny_bert, tmp_path / "m")
    (folder / "config.json").write_text(text)
    assert_problem(register(api, folder), 422, fragment)


def test_too_many_labels_requested_is_refused(api, tiny_bert):
    assert_problem(register(api, tiny_bert, num_labels=100_000), 422, "num_labels", "max_num_labels")
    assert api.count(RegisteredModel) == 0


def test_the_layer_unit_count_is_bounded(tmp_path, sqlite_url, default_roots, tiny_bert):
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots, max_model_layer_units=10))
    try:
        assert_problem(register(built, tiny_bert), 422, "layer units", "max_model_layer_units")
        assert built.count(RegisteredModel) == 0
    finally:
        built.close()


# --- tokenizer files --------------------------------------------------------------------------------------


def test_a_folder_without_tokenizer_files_is_refused(api, tiny_bert, tmp_path):
    folder = copy_model(tiny_bert, tmp_path / "m")
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    assert not any(p.name.startswith(("tokenizer", "vocab")) for p in folder.iterdir())
    assert_problem(register(api, folder), 422, "no tokenizer files", "tokenizer.json", "vocab.txt", "merges.txt")
    assert api.count(RegisteredModel) == 0


def test_a_slow_tokenizer_folder_is_accepted(api, minilm_copy):
    response = register(api, minilm_copy)
    assert response.status_code == 201, response.text


@pytest.fixture
def minilm_copy(tmp_path) -> Path:
    """The packaged MiniLM with its tokenizer as vocab.txt only (BERT's slow tokenizer files)."""
    from influence import packaged_minilm_path

    folder = copy_model(packaged_minilm_path(), tmp_path / "minilm")
    (folder / "tokenizer.json").unlink()
    return folder


# --- strict numbers ------------------------------------------------------------------------------------------


STRICT_BODIES = [
    ("num-labels-string", {"num_labels": "2"}, "num_labels"),
    ("num-labels-true", {"num_labels": True}, "num_labels"),
    ("num-labels-float", {"num_labels": 2.0}, "num_labels"),
    ("learning-rate-string", {"checkpoints": [{"adapter": "/x", "learning_rate": "0.1"}]}, "learning_rate"),
    ("learning-rate-true", {"checkpoints": [{"adapter": "/x", "learning_rate": True}]}, "learning_rate"),
    ("name-number", {"name": 5}, "name"),
]


@pytest.mark.parametrize(("body", "fragment"), [c[1:] for c in STRICT_BODIES], ids=[c[0] for c in STRICT_BODIES])
def test_numbers_and_booleans_are_strict(api, tiny_bert, body, fragment):
    response = register(api, tiny_bert, **body)
    assert_problem(response, 422, fragment)
    assert api.count(RegisteredModel) == 0 and api.count(Job) == 0
