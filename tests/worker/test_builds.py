"""Index builds by real Celery worker processes: the embedded filesystem broker with SQLite, and Redis with
PostgreSQL; two workers sharing one build; kill -9 in the middle of a build, a restart, and features identical
to an uninterrupted build; /readyz's broker and live-worker checks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.app.conftest import make_settings
from tests.worker.support import (
    WorkerProcess,
    celery_api,
    register_dataset,
    register_model,
    wait_for_job,
    wait_for_progress,
)

ROWS = 240
CHUNK = 8  # 30 chunks: long enough to kill a worker in the middle


def _wait_ready(api, timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = api.client.get("/readyz")
        if response.status_code == 200:
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"not ready after {timeout}s: {response.text}")
        time.sleep(0.5)


def _start_build(api, model, dataset) -> dict:
    response = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "chunk_size": CHUNK}
    )
    assert response.status_code == 202, response.text
    return response.json()


def _assert_same_features(settings, reference_id: str, other_id: str) -> None:
    from influence import FeatureStore

    root = settings.resolved_artifacts_dir / "indexes"
    a = FeatureStore.open(root / reference_id / "store")
    b = FeatureStore.open(root / other_id / "store")
    assert a.manifest.fingerprint() == b.manifest.fingerprint()
    assert np.array_equal(a.row_ids(), b.row_ids()) and b.num_rows == ROWS
    for name in a.layers:
        if a.layer_spec(name).layout == "tokens":  # the exact embedding: the same entries, byte for byte
            assert all(
                np.array_equal(getattr(a.layer(name), part), getattr(b.layer(name), part))
                for part in ("offsets", "tokens", "values", "order")
            ), name
        else:
            assert np.array_equal(a.layer(name), b.layer(name)), name
        assert np.array_equal(a.norms(name), b.norms(name)), name
        stats_a, stats_b = a.load_layer_statistics(name), b.load_layer_statistics(name)
        assert all(np.array_equal(stats_a[key], stats_b[key]) for key in stats_a), name


def _query(api, index_id) -> dict:
    body = {"examples": [{"text": "a moving and funny film", "label": 1}], "layers": "middle", "top_k": 3}
    response = api.client.post(f"/v1/indexes/{index_id}/query", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _interrupted_build(api, settings, model, dataset, kill, restart) -> dict:
    """Start a build, kill -9 a worker once a few chunks are done, start it again; returns the finished job."""
    index = _start_build(api, model, dataset)
    job = wait_for_progress(api.client, index["job"]["id"], at_least=4)
    assert job["status"] == "running" and job["done"] < job["total"], job
    kill()
    killed_at = api.client.get(f"/v1/jobs/{index['job']['id']}").json()
    restart()
    job = wait_for_job(api.client, index["job"]["id"], timeout=180)
    assert job["status"] == "succeeded", job
    assert job["done"] == job["total"] == ROWS // CHUNK
    return {"index": index, "job": job, "killed_at": killed_at}


def test_embedded_filesystem_broker_build_kill_and_resume(tmp_path, sqlite_url, default_roots, tiny_model_dir,
                                                          sst2_rows):
    settings = make_settings(tmp_path, sqlite_url, default_roots, chunk_size=CHUNK)
    assert settings.uses_filesystem_broker
    api = celery_api(settings)
    # No worker yet: the broker answers, the worker check does not.
    not_ready = api.client.get("/readyz")
    assert not_ready.status_code == 503
    checks = not_ready.json()["checks"]
    assert checks["broker"]["ok"] and checks["database"]["ok"] and not checks["worker"]["ok"]

    worker = WorkerProcess(settings, "fs", tmp_path / "worker-1.log").start()
    restarted = WorkerProcess(settings, "fs", tmp_path / "worker-2.log")
    try:
        assert _wait_ready(api)["checks"]["worker"]["detail"].startswith("worker fs@")
        model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
        dataset = register_dataset(api.client, sst2_rows[:ROWS])
        reference = _start_build(api, model, dataset)
        done = wait_for_job(api.client, reference["job"]["id"], timeout=180)
        assert done["status"] == "succeeded" and done["attempts"] == 1, (done, worker.output()[-3000:])

        outcome = _interrupted_build(api, settings, model, dataset, worker.kill, restarted.start)
        # The restarted worker re-planned the build (attempt 2) and did the rest.
        assert outcome["job"]["attempts"] >= 2
        assert "re-planned 1 interrupted index build" in restarted.output()
        _assert_same_features(settings, reference["id"], outcome["index"]["id"])
        a, b = _query(api, reference["id"]), _query(api, outcome["index"]["id"])
        assert a["results"] == b["results"]
    finally:
        worker.kill()
        restarted.stop()


def test_two_workers_on_redis_and_postgresql_kill_and_resume(tmp_path, pg_url, redis_url, default_roots,
                                                             tiny_model_dir, sst2_rows):
    settings = make_settings(
        tmp_path, pg_url, default_roots, broker_url=redis_url, chunk_size=CHUNK, broker_visibility_timeout=10
    )
    api = celery_api(settings)
    first = WorkerProcess(settings, "redis-a", tmp_path / "a-1.log").start()
    second = WorkerProcess(settings, "redis-b", tmp_path / "b.log").start()
    first_again = WorkerProcess(settings, "redis-a", tmp_path / "a-2.log")
    try:
        ready = _wait_ready(api)
        assert ready["checks"]["broker"]["detail"].startswith("redis")
        assert "postgresql" in ready["checks"]["database"]["detail"]
        model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
        dataset = register_dataset(api.client, sst2_rows[:ROWS])
        reference = _start_build(api, model, dataset)
        done = wait_for_job(api.client, reference["job"]["id"], timeout=180)
        assert done["status"] == "succeeded", (done, first.output()[-3000:])
        # Both workers featurized chunks of the one build.
        for worker in (first, second):
            assert worker.output().count("succeeded in") and "'written'" in worker.output(), worker.output()[-2000:]

        outcome = _interrupted_build(api, settings, model, dataset, first.kill, first_again.start)
        _assert_same_features(settings, reference["id"], outcome["index"]["id"])
        assert _query(api, reference["id"])["results"] == _query(api, outcome["index"]["id"])["results"]
    finally:
        for worker in (first, second, first_again):
            worker.kill()
        api.close()


@pytest.mark.parametrize("broker", ["filesystem", "redis"])
def test_readiness_names_the_broker_it_cannot_reach(tmp_path, sqlite_url, default_roots, broker):
    url = "redis://127.0.0.1:1/0" if broker == "redis" else None
    settings = make_settings(tmp_path, sqlite_url, default_roots, broker_url=url)
    api = celery_api(settings)
    if broker == "filesystem":
        import shutil

        shutil.rmtree(settings.broker_dir / "queue")
    checks = api.client.get("/readyz").json()["checks"]
    assert not checks["broker"]["ok"] and not checks["worker"]["ok"]
