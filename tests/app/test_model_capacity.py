"""A model a worker cannot hold is refused with the estimate and the budget: at registration (422), at build
start under lowered settings (422), and where a query would load it (503, require_worker_capacity). The model
answer shows the estimate under the current settings."""

from __future__ import annotations

import json
import shutil

import pytest

from app.errors import Invalid, Unavailable
from app.models import Index, Job, RegisteredModel
from app.services import models as service
from influence.memory import default_budget, estimate_model_memory, format_bytes
from tests.app.test_datasets import assert_problem, tsv_bytes, upload


def expected_estimate(settings, folder, task="causal-lm", layers=None, **build):
    """What influence.memory says for the folder at the settings' knobs, every layer unit tapped unless
    `layers` (the registered ones, as the service stores them)."""
    from influence import discover_layers, load_model

    units = layers if layers is not None else discover_layers(load_model(folder, task=task).model)
    return estimate_model_memory(
        folder,
        dtype=settings.compute_dtype,
        max_tokens=settings.max_tokens_per_batch,
        head_chunk_tokens=settings.head_chunk_tokens,
        checkpointing=settings.activation_checkpointing,
        selected_units=units,
        projection=build.get("projection"),
        task=task,
        max_rows=settings.batch_size,
        row_tokens=build.get("max_length") or settings.max_length,
    )


def register(api, folder, name="lm"):
    return api.client.post("/v1/models", json={"name": name, "source": str(folder), "task": "causal-lm"})


@pytest.fixture
def lm_folder(tiny_model_dir):
    return tiny_model_dir("llama", "causal-lm")


def test_registration_is_refused_over_the_budget_with_the_estimate_and_the_limit(api, lm_folder, monkeypatch):
    estimate = expected_estimate(api.settings, lm_folder)
    monkeypatch.setattr(api.settings, "worker_memory_bytes", estimate.total_bytes - 1)
    body = assert_problem(
        register(api, lm_folder, name="big"),
        422,
        f"model 'big' needs about {format_bytes(estimate.total_bytes)} in a worker (",
        f"weights {format_bytes(estimate.weights_bytes)} float32, activations "
        f"{format_bytes(estimate.activations_bytes)} at {estimate.tokens_per_batch:,} tokens per batch, head "
        f"{format_bytes(estimate.head_bytes)}",
        f"the worker budget is {format_bytes(estimate.total_bytes - 1)} (INFLUENCE_WORKER_MEMORY_BYTES)",
        "lower INFLUENCE_MAX_TOKENS_PER_BATCH",
        "use INFLUENCE_COMPUTE_DTYPE=bfloat16",
        "set INFLUENCE_ACTIVATION_CHECKPOINTING=true",
        "or give the workers more memory",
    )
    assert body["memory_estimate"] == estimate.to_dict()
    assert body["worker_memory_bytes"] == estimate.total_bytes - 1
    assert api.count(RegisteredModel) == 0
    # At the budget exactly, it fits.
    monkeypatch.setattr(api.settings, "worker_memory_bytes", estimate.total_bytes)
    response = register(api, lm_folder, name="big")
    assert response.status_code == 201, response.text
    assert response.json()["memory_estimate"]["fits"] is True


def test_bfloat16_and_checkpointing_are_no_longer_advised_once_set(api, lm_folder, monkeypatch):
    monkeypatch.setattr(api.settings, "compute_dtype", "bfloat16")
    monkeypatch.setattr(api.settings, "activation_checkpointing", True)
    monkeypatch.setattr(api.settings, "worker_memory_bytes", 1000)
    estimate = expected_estimate(api.settings, lm_folder)
    body = assert_problem(
        register(api, lm_folder),
        422,
        f"weights {format_bytes(estimate.weights_bytes)} bfloat16",
        "the worker budget is 1.0 kB",
        "lower INFLUENCE_HEAD_CHUNK_TOKENS",
    )
    assert "COMPUTE_DTYPE" not in body["detail"] and "CHECKPOINTING" not in body["detail"]
    assert body["memory_estimate"]["dtype"] == "bfloat16"
    assert body["memory_estimate"]["total_bytes"] == estimate.total_bytes


def test_an_accepted_model_shows_its_estimate_and_the_default_budget(api, lm_folder):
    estimate = expected_estimate(api.settings, lm_folder)
    budget, _ = default_budget(api.settings.device)
    assert budget is not None and api.settings.worker_memory_bytes is None
    response = register(api, lm_folder)
    assert response.status_code == 201, response.text
    shown = response.json()["memory_estimate"]
    assert shown == {**estimate.to_dict(), "worker_memory_bytes": budget, "fits": True}
    assert shown["weights_from"] == "safetensors" and shown["gradients_bytes"] > 0
    model_id = response.json()["id"]
    assert api.client.get(f"/v1/models/{model_id}").json()["memory_estimate"] == shown
    assert api.client.get("/v1/models").json()["items"][0]["memory_estimate"] == shown


def test_the_answer_follows_the_current_settings_and_a_missing_folder_shows_none(
    api, lm_folder, allowed_root, monkeypatch
):
    folder = allowed_root / "moving-lm"
    shutil.copytree(lm_folder, folder)
    model = register(api, folder).json()
    monkeypatch.setattr(api.settings, "worker_memory_bytes", 1000)
    monkeypatch.setattr(api.settings, "max_tokens_per_batch", 64)
    shown = api.client.get(f"/v1/models/{model['id']}").json()["memory_estimate"]
    assert shown["fits"] is False and shown["worker_memory_bytes"] == 1000
    assert shown["total_bytes"] == expected_estimate(api.settings, folder).total_bytes
    assert shown["tokens_per_batch"] == 128  # a row of max_length (128) tokens runs alone
    shutil.rmtree(folder)
    assert api.client.get(f"/v1/models/{model['id']}").json()["memory_estimate"] is None
    with api.session_factory() as session:
        row = session.get(RegisteredModel, model["id"])
        service.require_worker_capacity(api.settings, row)  # nothing to estimate: the load reports it


def lm_dataset(api, sst2_rows):
    response = upload(api, "lm.tsv", tsv_bytes(sst2_rows[:8]), task="causal-lm", text_column="sentence")
    assert response.status_code == 201, response.text
    return response.json()


def test_a_build_is_refused_when_the_budget_was_lowered_after_registration(
    api, lm_folder, sst2_rows, monkeypatch
):
    model = register(api, lm_folder).json()
    dataset = lm_dataset(api, sst2_rows)
    jobs, indexes = api.count(Job), api.count(Index)
    request = {"model_id": model["id"], "dataset_id": dataset["id"], "layers": "role:mlp", "max_length": 32}
    with api.session_factory() as session:
        row = session.get(RegisteredModel, model["id"])
        units = [unit for unit in row.layers if unit["role"] == "mlp"]
    from influence import ProjectionSpec

    estimate = expected_estimate(
        api.settings, lm_folder, layers=units, projection=ProjectionSpec(), max_length=32
    )
    # The build's own units and row length: less than the registration's estimate over every unit.
    assert estimate.total_bytes < model["memory_estimate"]["total_bytes"]
    monkeypatch.setattr(api.settings, "worker_memory_bytes", estimate.total_bytes - 1)
    body = assert_problem(
        api.client.post("/v1/indexes", json=request),
        422,
        f"model 'lm' needs about {format_bytes(estimate.total_bytes)} in a worker",
        f"the worker budget is {format_bytes(estimate.total_bytes - 1)} (INFLUENCE_WORKER_MEMORY_BYTES)",
    )
    assert body["memory_estimate"] == estimate.to_dict()
    assert (api.count(Job), api.count(Index)) == (jobs, indexes)
    # Within the budget the same request builds.
    monkeypatch.setattr(api.settings, "worker_memory_bytes", estimate.total_bytes)
    response = api.client.post("/v1/indexes", json=request)
    assert response.status_code == 202, response.text
    assert (api.count(Job), api.count(Index)) == (jobs + 1, indexes + 1)


def test_require_worker_capacity_answers_503_with_why(api, lm_folder, monkeypatch):
    model = register(api, lm_folder).json()
    with api.session_factory() as session:
        row = session.get(RegisteredModel, model["id"])
        service.require_worker_capacity(api.settings, row)  # the default budget holds a tiny model
        estimate = expected_estimate(api.settings, lm_folder, layers=row.layers)
        monkeypatch.setattr(api.settings, "worker_memory_bytes", estimate.total_bytes - 1)
        with pytest.raises(Unavailable) as refused:
            service.require_worker_capacity(api.settings, row)
        # A query's own units: the head alone takes less, and fits the same budget.
        service.require_worker_capacity(
            api.settings, row, [unit for unit in row.layers if unit["role"] == "head"]
        )
    error = refused.value
    assert error.status == 503 and not isinstance(error, Invalid)
    assert error.detail.startswith(
        f"no worker can hold model 'lm': it needs about {format_bytes(estimate.total_bytes)} in a worker ("
    )
    assert f"and the budget is {format_bytes(estimate.total_bytes - 1)} (INFLUENCE_WORKER_MEMORY_BYTES)" in (
        error.detail
    )
    assert error.extensions == {
        "memory_estimate": estimate.to_dict(),
        "worker_memory_bytes": estimate.total_bytes - 1,
    }


def test_audits_reports_and_checks_are_refused_503_when_the_budget_was_lowered_after_the_build(
    api, lm_folder, sst2_rows, monkeypatch
):
    """The jobs that featurize with an index's model meet the check a query meets, before anything is queued:
    settings changed since the build would only make them fail on a worker."""
    from app.jobs.steps import run_build_inline

    model = register(api, lm_folder).json()
    dataset = lm_dataset(api, sst2_rows)
    request = {"model_id": model["id"], "dataset_id": dataset["id"], "layers": "role:mlp", "max_length": 32}
    created = api.client.post("/v1/indexes", json=request)
    assert created.status_code == 202, created.text
    run_build_inline(api.settings, api.session_factory, created.json()["job"]["id"])
    index_id = created.json()["id"]
    reference = {"dataset_id": dataset["id"], "limit": 2}
    monkeypatch.setattr(api.settings, "worker_memory_bytes", 1024)
    jobs = api.count(Job)
    for response in (
        api.client.post(f"/v1/indexes/{index_id}/audits", json={"reference": reference}),
        api.client.post(f"/v1/indexes/{index_id}/reports", json={"reference": reference}),
        api.client.post(
            f"/v1/indexes/{index_id}/checks",
            files={"file": ("batch.tsv", tsv_bytes(sst2_rows[8:10]))},
            data={"text_column": "sentence", "reference": json.dumps(reference)},
        ),
    ):
        body = assert_problem(response, 503, "no worker can hold model 'lm'", "(INFLUENCE_WORKER_MEMORY_BYTES)")
        assert body["worker_memory_bytes"] == 1024
    assert api.count(Job) == jobs
    # Within the budget again, the same audit is queued.
    monkeypatch.setattr(api.settings, "worker_memory_bytes", None)
    response = api.client.post(f"/v1/indexes/{index_id}/audits", json={"reference": reference})
    assert response.status_code == 202, response.text
