"""Index routes: validation, the pending index + queued job, enqueue after commit, and a build run in-process."""

from __future__ import annotations

import numpy as np
import pytest

from app.jobs import index_build
from app.jobs.context import WorkerContext
from app.jobs.dispatch import InlineDispatcher
from app.jobs.kinds import INDEX_BUILD
from app.jobs.model_cache import ModelCache
from app.jobs.steps import run_build_inline
from app.models import Index, Job
from app.stores import index_dir
from influence.files import try_locked
from tests.app.conftest import RecordingQueue, build_api, make_settings
from tests.worker.support import assert_problem, register_dataset, register_model


@pytest.fixture
def tiny(tiny_model_dir):
    return tiny_model_dir("bert", "classification", num_labels=2)


def _create(client, model, dataset, **body):
    return client.post("/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], **body})


def test_create_records_a_pending_index_and_queues_its_job(any_api, tiny, sst2_rows):
    client = any_api.client
    model = register_model(client, tiny)
    dataset = register_dataset(client, sst2_rows[:70])
    response = _create(
        client, model, dataset, layers="position:middle", projection={"kind": "factorized", "dim": 32},
        chunk_size=32,
    )
    assert response.status_code == 202, response.text
    index = response.json()
    assert index["status"] == "pending" and index["num_rows"] == 70
    assert index["layers"] == [f"block.1.{part}" for part in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up",
                                                              "mlp.down")]
    projection = index["projection"]
    assert {key: projection[key] for key in ("kind", "dim", "seed", "exact_max_params")} == {
        "kind": "factorized", "dim": 32, "seed": 0, "exact_max_params": None,
    }
    # Every unit, as resolved before the build: factorized at 32 (about 32 numbers each).
    assert list(projection["units"]) == index["layers"]
    assert all(unit["kind"] == "factorized" and unit["dim"] == 32 and 1 <= unit["features"] <= 32
               for unit in projection["units"].values())
    assert index["feature_bytes_estimate"] == 70 * 2 * sum(u["features"] for u in projection["units"].values())
    assert index["job"]["status"] == "queued" and index["job"]["kind"] == INDEX_BUILD
    assert index["job"]["total"] == 3 and index["job"]["target_id"] == index["id"]
    assert index["feature_bytes_estimate"] > 0 and index["manifest"] is None
    # Handed to the queue once, after the commit (the job row exists for the queue to read).
    assert any_api.queue.enqueued == [index["job"]["id"]]
    assert client.get(f"/v1/indexes/{index['id']}").json()["job"]["id"] == index["job"]["id"]
    listed = client.get("/v1/indexes", params={"model_id": model["id"]}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == index["id"]
    assert client.get("/v1/indexes", params={"status": "ready"}).json()["total"] == 0


def test_create_refuses_bad_requests_with_4xx(api, tiny, sst2_rows):
    client = api.client
    model = register_model(client, tiny)
    dataset = register_dataset(client, sst2_rows[:20])
    assert_problem(_create(client, {"id": "nope"}, dataset), 404, "model")
    assert_problem(_create(client, model, {"id": "nope"}), 404, "dataset")
    assert_problem(_create(client, model, dataset, layers="block.9.attn.q"), 422, "matches no layer")
    assert_problem(_create(client, model, dataset, layers={"colour": "red"}), 422)
    assert_problem(_create(client, model, dataset, projection={"kind": "fourier"}), 422)
    assert_problem(_create(client, model, dataset, dtype="int8"), 422)
    assert_problem(_create(client, model, dataset, faiss_kind="annoy"), 422)
    assert_problem(_create(client, model, dataset, chunk_size=0), 422)
    assert_problem(_create(client, model, dataset, surprise=1), 422)
    three_classes = register_dataset(client, [("fine", 0), ("good", 1), ("meh", 2)], name="three")
    assert_problem(_create(client, model, three_classes), 422, "outside the model's 2 classes")
    assert_problem(client.get("/v1/indexes/nope"), 404)
    assert_problem(client.get("/v1/indexes", params={"status": "lost"}), 422)
    assert api.count(Index) == 0 and api.count(Job) == 0 and api.queue.enqueued == []


def test_a_refused_enqueue_is_503_and_fails_index_and_job(tmp_path, sqlite_url, default_roots, tiny, sst2_rows):
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots), queue=RecordingQueue(fail=True))
    model = register_model(built.client, tiny)
    dataset = register_dataset(built.client, sst2_rows[:20])
    assert_problem(_create(built.client, model, dataset), 503)
    index = built.client.get("/v1/indexes").json()["items"][0]
    assert index["status"] == "failed" and index["job"]["status"] == "failed"
    assert "broker unreachable" in index["job"]["error"]


def test_an_inline_build_makes_a_ready_index(api, tiny, sst2_rows):
    from influence import FeatureStore, load_store_indexes

    client = api.client
    model = register_model(client, tiny)
    dataset = register_dataset(client, sst2_rows[:50])
    index = _create(client, model, dataset, layers=["embed", "head"], chunk_size=16, dtype="float32").json()
    run_build_inline(api.settings, api.session_factory, index["job"]["id"])
    ready = client.get(f"/v1/indexes/{index['id']}").json()
    assert ready["status"] == "ready" and ready["num_rows"] == 50 and ready["size_bytes"] > 0
    job = ready["job"]
    assert job["status"] == "succeeded" and job["done"] == job["total"] == 4 and job["attempts"] == 1
    manifest = ready["manifest"]
    assert [layer["name"] for layer in manifest["layers"]] == ["embed", "head"]
    assert manifest["dataset_hash"] == dataset["content_hash"]
    assert manifest["weights_hash"] == model["weights_hash"] and manifest["dtype"] == "float32"
    store = FeatureStore.open(api.settings.resolved_artifacts_dir / f"indexes/{index['id']}/store")
    assert np.array_equal(store.row_ids(), np.arange(50))
    assert all(store.has_layer_statistics(name) for name in store.layers)
    # The embedding is stored as exact token rows (the default projection): scored by a join, no FAISS index.
    assert store.layer_spec("embed").layout == "tokens" and ready["projection"]["units"]["embed"]["kind"] == "tokens"
    assert set(load_store_indexes(store)) == {"head"}


def test_cancelling_stops_a_build_and_the_index_follows(api, tiny, sst2_rows):
    from app.db import session_scope
    client = api.client
    model = register_model(client, tiny)
    dataset = register_dataset(client, sst2_rows[:40])
    # Cancelled while queued: the plan step skips it and the index is cancelled.
    queued = _create(client, model, dataset, layers="head", chunk_size=10).json()
    assert client.post(f"/v1/jobs/{queued['job']['id']}/cancel").json()["status"] == "cancelled"
    dispatcher = InlineDispatcher()
    ctx = WorkerContext(api.settings, api.session_factory, ModelCache(), dispatcher)
    assert index_build.plan_build(ctx, queued["job"]["id"]) == "skipped"
    assert client.get(f"/v1/indexes/{queued['id']}").json()["status"] == "cancelled"
    # Cancelled while running: the next chunk step ends the job.
    running = _create(client, model, dataset, layers="head", chunk_size=10).json()
    job_id = running["job"]["id"]
    assert index_build.plan_build(ctx, job_id) == "planned"
    assert [step for step, _, _ in dispatcher.steps] == ["chunk"] * 4
    assert index_build.build_chunk(ctx, job_id, 0) == "written"
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    assert index_build.build_chunk(ctx, job_id, 1) == "cancelled"
    assert index_build.build_chunk(ctx, job_id, 2) == "skipped"
    after = client.get(f"/v1/indexes/{running['id']}").json()
    assert after["status"] == "cancelled" and after["job"]["status"] == "cancelled" and after["job"]["done"] == 1
    with session_scope(api.session_factory) as session:
        assert session.get(Job, job_id).finished_at is not None


def test_build_steps_are_idempotent(api, tiny, sst2_rows):
    client = api.client
    model = register_model(client, tiny)
    dataset = register_dataset(client, sst2_rows[:30])
    index = _create(client, model, dataset, layers="head", chunk_size=10).json()
    job_id = index["job"]["id"]
    dispatcher = InlineDispatcher()
    ctx = WorkerContext(api.settings, api.session_factory, ModelCache(), dispatcher)
    index_build.plan_build(ctx, job_id)
    assert index_build.build_chunk(ctx, job_id, 1) == "written"
    assert index_build.build_chunk(ctx, job_id, 1) == "done"  # delivered twice: nothing recomputed
    # A chunk held by another live process (its lock taken) is left to it.
    lock = index_dir(api.settings, index["id"]) / "locks" / "chunk-000000.lock"
    with try_locked(lock) as held:
        assert held
        assert index_build.build_chunk(ctx, job_id, 0) == "busy"
    # Planning again hands out only what is missing; finalize with a chunk missing re-plans it.
    dispatcher.steps.clear()
    index_build.plan_build(ctx, job_id)
    assert sorted(c for _, _, (c,) in dispatcher.steps) == [0, 2]
    dispatcher.steps.clear()
    assert index_build.finalize_build(ctx, job_id) == "replanned"
    assert sorted(c for _, _, (c,) in dispatcher.steps) == [0, 2]
    for chunk in (0, 2):
        index_build.build_chunk(ctx, job_id, chunk)
    assert dispatcher.steps[-1][0] == "finalize"
    assert index_build.finalize_build(ctx, job_id) == "finalized"
    assert index_build.finalize_build(ctx, job_id) == "skipped"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["done"] == 3 and job["attempts"] == 2
