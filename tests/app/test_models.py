"""Model registration over HTTP: the packaged MiniLM, a tiny GPT-2 causal LM, LoRA adapters and checkpoints, a
hub id from a local cache; layers listed without weights must equal what loading the model gives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.models import RegisteredModel
from tests.app.test_datasets import assert_problem


def register(api, **body):
    body.setdefault("name", "m")
    return api.client.post("/v1/models", json=body)


def loaded_layers(folder, **kwargs) -> list[dict]:
    from influence import discover_layers, load_model

    return [layer.to_dict() for layer in discover_layers(load_model(folder, **kwargs).model)]


@pytest.fixture(scope="module")
def minilm() -> Path:
    from influence import packaged_minilm_path

    return packaged_minilm_path()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """LoRA adapters of the tiny BERT classifier: two checkpoints with one layout, one with another."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = tiny_model_dir("bert")
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, targets, seed in (
        ("ckpt-1", ["query", "value"], 1),
        ("ckpt-2", ["query", "value"], 2),
        ("other", ["key"], 3),
    ):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, task_type="SEQ_CLS"))
        peft_model.save_pretrained(root / name)
        out[name] = root / name
    return base, out


def test_register_the_packaged_minilm(any_api, minilm):
    from influence.loading import weights_hash

    response = register(any_api, name="minilm", source=str(minilm), task="classification", num_labels=2)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["source"] == str(minilm.resolve())
    assert body["weights_hash"] == weights_hash(minilm)
    assert body["num_labels"] == 2 and body["num_blocks"] == 6 and body["revision"] is None

    layers = any_api.client.get(f"/v1/models/{body['id']}/layers").json()
    assert layers["layers"] == loaded_layers(minilm, num_labels=2)  # from the config == from the weights
    assert body["num_layers"] == len(layers["layers"])
    assert layers["groups"]["WE"] == ["embed"] and layers["groups"]["CL"] == ["pooler", "head"]
    assert {layer["role"] for layer in layers["layers"]} == {"embedding", "attention", "mlp", "head"}
    assert sorted({layer["block"] for layer in layers["layers"] if layer["block"] is not None}) == list(
        range(6)
    )
    assert len(layers["groups"]["total"]) == len(layers["layers"])

    assert any_api.client.get(f"/v1/models/{body['id']}").json() == body
    listed = any_api.client.get("/v1/models").json()
    assert listed["total"] == 1 and listed["items"] == [body]


def test_layers_come_from_the_config_without_loading_weights(api, minilm, monkeypatch):
    import influence

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(influence, "load_model", refuse)
    response = register(api, source=str(minilm))
    assert response.status_code == 201, response.text


def test_register_a_tiny_gpt2_causal_lm(any_api, tiny_model_dir):
    folder = tiny_model_dir("gpt2", "causal-lm")
    response = register(any_api, name="gpt2", source=str(folder), task="causal-lm")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["task"] == "causal-lm" and body["num_labels"] is None and body["num_blocks"] == 3
    layers = any_api.client.get(f"/v1/models/{body['id']}/layers").json()
    assert layers["layers"] == loaded_layers(folder, task="causal-lm")
    assert {layer["kind"] for layer in layers["layers"]} >= {"conv1d", "embedding"}


def test_adapter_and_checkpoints(any_api, adapters):
    from influence.loading import weights_hash

    base, made = adapters
    response = register(
        any_api,
        source=str(base),
        adapter=str(made["ckpt-2"]),
        checkpoints=[
            {"adapter": str(made["ckpt-1"]), "learning_rate": 2e-3},
            {"adapter": str(made["ckpt-2"]), "learning_rate": 1e-3, "name": "last"},
        ],
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["num_labels"] == 3  # the config's
    assert body["adapter"] == str(made["ckpt-2"])
    assert body["weights_hash"] == weights_hash(base, made["ckpt-2"])
    assert body["checkpoints"] == [
        {
            "name": "ckpt-1",
            "adapter": str(made["ckpt-1"]),
            "learning_rate": 2e-3,
            "weights_hash": weights_hash(base, made["ckpt-1"]),
        },
        {
            "name": "last",
            "adapter": str(made["ckpt-2"]),
            "learning_rate": 1e-3,
            "weights_hash": weights_hash(base, made["ckpt-2"]),
        },
    ]
    layers = any_api.client.get(f"/v1/models/{body['id']}/layers").json()["layers"]
    assert layers == loaded_layers(base, num_labels=3, adapter=made["ckpt-2"])
    assert {layer["name"] for layer in layers if layer["is_lora"]} >= {
        "block.0.attn.q.lora_A",
        "block.2.attn.v.lora_B",
    }


def test_checkpoints_alone_list_the_layers_of_their_adapter(api, adapters):
    base, made = adapters
    response = register(
        api, source=str(base), checkpoints=[{"adapter": str(made["ckpt-1"]), "learning_rate": 0.1}]
    )
    assert response.status_code == 201, response.text
    layers = api.client.get(f"/v1/models/{response.json()['id']}/layers").json()["layers"]
    assert any(layer["is_lora"] for layer in layers)


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A local hub cache holding `acme/tiny-gpt2` at one commit, laid out as huggingface_hub writes it."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-gpt2"
    shutil.copytree(tiny_model_dir("gpt2", "causal-lm"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return commit


def test_hub_id_resolved_from_the_local_cache_only(api, hub_cache):
    response = register(api, source="acme/tiny-gpt2", task="causal-lm")
    assert response.status_code == 201, response.text
    assert response.json()["revision"] == hub_cache  # pinned to the commit
    assert response.json()["source"] == "acme/tiny-gpt2"
    assert_problem(register(api, source="acme/absent", task="causal-lm"), 422, "not in the local hub cache")
    assert_problem(
        register(api, source="acme/tiny-gpt2", revision="v9", task="causal-lm"),
        422,
        "not in the local hub cache",
    )


# --- bad sources ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-models")
    (root / "no-config").mkdir()
    (root / "no-config" / "model.safetensors").write_bytes(b"")
    pickled = root / "pickle-only"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    custom = root / "remote-code"
    custom.mkdir()
    (custom / "config.json").write_text(
        json.dumps({"model_type": "acme-custom", "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig"}})
    )
    (custom / "configuration_acme.py").write_text(
        f"open({str(root / 'EXECUTED')!r}, 'w').write('remote code ran')\n"
    )
    (custom / "model.safetensors").write_bytes(b"")
    (root / "empty-adapter").mkdir()
    unknown = root / "unknown-arch"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "acme-unknown"}))
    (unknown / "model.safetensors").write_bytes(b"")
    (unknown / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (root / "bad-json").mkdir()
    (root / "bad-json" / "config.json").write_text("{not json")
    return root


BAD_BODIES = [
    ("outside-roots", {"source": "/etc"}, 403, "outside the allowed roots"),
    ("dotdot-escape", {"source": "{root}/../../../../etc"}, 403, "outside the allowed roots"),
    ("missing-folder", {"source": "{root}/absent"}, 422, "not an existing folder"),
    ("no-config", {"source": "{root}/no-config"}, 422, "no config.json"),
    ("pickle-only", {"source": "{root}/pickle-only"}, 422, "pickle formats are refused"),
    ("remote-code", {"source": "{root}/remote-code"}, 422, "never runs remote code"),
    ("unknown-architecture", {"source": "{root}/unknown-arch"}, 422, "cannot read the config"),
    ("config-not-json", {"source": "{root}/bad-json"}, 422, "not readable JSON"),
    ("not-a-hub-id", {"source": "../models/x"}, 422, "neither an absolute folder path nor a hub id"),
    ("relative-path-is-hub-id", {"source": "models/x"}, 422, "not in the local hub cache"),
    ("revision-on-folder", {"source": "{minilm}", "revision": "main"}, 422, "hub ids only"),
    (
        "causal-with-labels",
        {"source": "{minilm}", "task": "causal-lm", "num_labels": 2},
        422,
        "classification",
    ),
    (
        "adapter-not-peft",
        {"source": "{minilm}", "adapter": "{root}/empty-adapter"},
        422,
        "adapter_config.json",
    ),
    ("adapter-outside", {"source": "{minilm}", "adapter": "/etc"}, 403, "outside the allowed roots"),
    (
        "checkpoint-not-peft",
        {"source": "{minilm}", "checkpoints": [{"adapter": "{root}/empty-adapter", "learning_rate": 0.1}]},
        422,
        "checkpoints[0].adapter",
    ),
    ("unknown-task", {"source": "{minilm}", "task": "regression"}, 422, "task"),
    (
        "zero-learning-rate",
        {"source": "{minilm}", "checkpoints": [{"adapter": "/x", "learning_rate": 0}]},
        422,
        "learning_rate",
    ),
    ("extra-field", {"source": "{minilm}", "trust_remote_code": True}, 422, "trust_remote_code"),
    ("empty-name", {"source": "{minilm}", "name": ""}, 422, "name"),
]


@pytest.mark.parametrize(
    ("body", "status", "fragment"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
def test_bad_model_registration(api, bad_folders, minilm, body, status, fragment):
    filled = json.loads(json.dumps(body).replace("{root}", str(bad_folders)).replace("{minilm}", str(minilm)))
    assert_problem(register(api, **filled), status, fragment)
    assert api.count(RegisteredModel) == 0
    assert not (bad_folders / "EXECUTED").exists()


def test_checkpoints_with_another_layout_are_refused(api, adapters):
    base, made = adapters
    for checkpoints, fragment in (
        ((("ckpt-1", 0.1), ("other", 0.1)), "checkpoint 'other' exposes different layer units"),
        ((("ckpt-1", 0.1), ("ckpt-1", 0.2)), "used twice"),
    ):
        body = [{"adapter": str(made[name]), "learning_rate": rate} for name, rate in checkpoints]
        assert_problem(register(api, source=str(base), checkpoints=body), 422, fragment)
    assert api.count(RegisteredModel) == 0


def test_unknown_model_ids_are_404(any_api):
    assert_problem(any_api.client.get("/v1/models/nope"), 404, "'nope'")
    assert_problem(any_api.client.get("/v1/models/nope/layers"), 404, "'nope'")


# --- deletion -----------------------------------------------------------------------------------------------


def test_delete_a_model_keeps_its_folders(api, adapters):
    base, made = adapters
    body = register(api, source=str(base), adapter=str(made["ckpt-1"])).json()
    response = api.client.delete(f"/v1/models/{body['id']}")
    assert response.status_code == 204, response.text
    assert_problem(api.client.get(f"/v1/models/{body['id']}"), 404)
    assert api.client.get("/v1/models").json()["total"] == 0
    assert_problem(api.client.delete(f"/v1/models/{body['id']}"), 404)
    # The user's folders under the allowed roots are never touched.
    assert (base / "model.safetensors").is_file() and (made["ckpt-1"] / "adapter_model.safetensors").is_file()


def test_delete_an_unknown_or_another_tenants_model_is_404(any_api, tiny_model_dir):
    body = register(any_api, source=str(tiny_model_dir("bert", "classification", num_labels=2))).json()
    assert_problem(any_api.client.delete("/v1/models/nope"), 404, "'nope'")
    assert_problem(any_api.other_client().delete(f"/v1/models/{body['id']}"), 404, "does not exist")
    assert any_api.client.get(f"/v1/models/{body['id']}").status_code == 200


def test_delete_while_an_index_uses_the_model_is_409(api, tiny_model_dir, sst2_rows):
    from tests.worker.support import register_dataset

    model = register(api, source=str(tiny_model_dir("bert", "classification", num_labels=2))).json()
    dataset = register_dataset(api.client, sst2_rows[:20])
    index = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": ["head"]}
    ).json()
    refused = assert_problem(api.client.delete(f"/v1/models/{model['id']}"), 409, index["id"], "delete them first")
    assert refused["indexes"] == [index["id"]]
    assert api.count(RegisteredModel) == 1
    assert api.client.delete(f"/v1/indexes/{index['id']}").status_code == 204
    assert api.client.delete(f"/v1/models/{model['id']}").status_code == 204


def test_delete_while_an_experiment_uses_the_model_is_409(api, tiny_model_dir, sst2_rows):
    from tests.worker.support import register_dataset

    names = ("negative", "positive")
    model = register(api, source=str(tiny_model_dir("bert", "classification", num_labels=2))).json()
    train = register_dataset(api.client, [(t, names[y]) for t, y in sst2_rows[:20]], name="train")
    reference = register_dataset(api.client, [(t, names[y]) for t, y in sst2_rows[100:120]], name="reference")
    experiment = api.client.post(
        "/v1/experiments",
        json={
            "name": "x",
            "base_model_id": model["id"],
            "dataset_id": train["id"],
            "reference": {"dataset_id": reference["id"], "rows": list(range(10))},
            "heldout": {"dataset_id": reference["id"], "rows": list(range(10, 20))},
            "noise_rate": 0.2,
            "max_length": 32,
            "retraining": {"enabled": False},
        },
    )
    assert experiment.status_code == 202, experiment.text
    job_id = experiment.json()["id"]
    refused = assert_problem(api.client.delete(f"/v1/models/{model['id']}"), 409, job_id, "experiment")
    assert refused["experiments"] == [job_id]
    assert api.client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert api.client.delete(f"/v1/models/{model['id']}").status_code == 204


def test_delete_removes_the_adapter_the_service_wrote_for_the_model(api, adapters):
    from app.workflows.experiment.state import ADAPTERS_DIR

    base, made = adapters
    home = api.settings.resolved_artifacts_dir / ADAPTERS_DIR
    shared, own = home / "experiment-a", home / "experiment-b"
    shutil.copytree(made["ckpt-1"], shared)
    shutil.copytree(made["ckpt-2"], own)
    first = register(api, name="a", source=str(base), adapter=str(shared)).json()
    second = register(
        api, name="b", source=str(base), checkpoints=[{"adapter": str(shared), "learning_rate": 0.1}]
    ).json()
    third = register(api, name="c", source=str(base), adapter=str(own)).json()

    assert api.client.delete(f"/v1/models/{third['id']}").status_code == 204
    assert not own.exists()  # the service's copy, named by no other model
    assert api.client.delete(f"/v1/models/{first['id']}").status_code == 204
    assert shared.is_dir()  # still the adapter of a checkpoint of another model
    assert api.client.delete(f"/v1/models/{second['id']}").status_code == 204
    assert not shared.exists()
    assert (base / "model.safetensors").is_file() and made["ckpt-1"].is_dir() and made["ckpt-2"].is_dir()


def test_delete_drops_the_model_from_the_apis_model_cache(api, tiny_model_dir):
    from app.jobs.model_cache import ModelSpec
    from app.services.queries import QueryRuntime

    body = register(api, source=str(tiny_model_dir("bert", "classification", num_labels=2))).json()
    runtime = api.app.state.query_runtime = QueryRuntime()
    with api.session_factory() as session:
        runtime.models.get(ModelSpec.of(session.get(RegisteredModel, body["id"])), "cpu")
    assert [key[0] for key in runtime.models._items] == [body["id"]]
    assert api.client.delete(f"/v1/models/{body['id']}").status_code == 204
    assert list(runtime.models._items) == []
