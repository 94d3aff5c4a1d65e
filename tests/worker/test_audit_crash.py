"""An audit run by a real Celery worker process (filesystem broker, SQLite) survives kill -9 in the middle: the
restarted worker runs it again from the start, and it ends with exactly the result of an uninterrupted audit;
meanwhile, nothing of it is served, and nothing half-written is left behind."""

from __future__ import annotations

import json

import numpy as np

from app.jobs.steps import run_build_inline
from tests.app.conftest import make_settings
from tests.worker.support import (
    WorkerProcess,
    assert_problem,
    celery_api,
    register_dataset,
    register_model,
    wait_for_job,
    wait_for_progress,
)

TRAIN_ROWS = 60
# The reference set is what makes the audit last: featurizing it is most of the work, reported batch by batch.
REFERENCE_ROWS = 1500
BATCH = 16


def _outcome(api, audit_id) -> tuple[dict, list, dict]:
    from safetensors.numpy import load

    audit = api.client.get(f"/v1/audits/{audit_id}").json()
    rows = api.client.get(f"/v1/audits/{audit_id}/rows", params={"format": "jsonl"})
    assert rows.status_code == 200, rows.text
    scores = api.client.get(f"/v1/audits/{audit_id}/scores")
    assert scores.status_code == 200, scores.text
    return audit, [json.loads(line) for line in rows.text.splitlines()], load(scores.content)


def test_an_audit_killed_mid_run_is_run_again_to_the_same_result(
    tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows, sst2_train
):
    settings = make_settings(tmp_path, sqlite_url, default_roots, batch_size=BATCH)
    assert settings.uses_filesystem_broker
    api = celery_api(settings)
    worker = WorkerProcess(settings, "audit", tmp_path / "worker-1.log")
    restarted = WorkerProcess(settings, "audit", tmp_path / "worker-2.log")
    try:
        model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
        dataset = register_dataset(
            api.client, sst2_rows[:TRAIN_ROWS], noisy=[i % 5 == 0 for i in range(TRAIN_ROWS)]
        )
        reference_rows = [(e.text, e.label) for e in sst2_train[1000 : 1000 + REFERENCE_ROWS]]
        reference = register_dataset(api.client, reference_rows, name="reference")
        index = api.client.post(
            "/v1/indexes",
            json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": ["block.1.attn.v", "head"]},
        ).json()
        # The index is built here (the build's own crash tests are in test_builds.py); the worker, once
        # started, finds its message and skips the finished build.
        run_build_inline(settings, api.session_factory, index["job"]["id"])
        assert api.client.get(f"/v1/indexes/{index['id']}").json()["status"] == "ready"
        worker.start()

        body = {"reference": {"dataset_id": reference["id"]}, "aggregation": "vote", "correct_only": True}
        # The first audit runs undisturbed (the same worker code, the same single-threaded maths), the second
        # is the one interrupted; the worker takes them in turn.
        uninterrupted = api.client.post(f"/v1/indexes/{index['id']}/audits", json=body).json()
        interrupted = api.client.post(f"/v1/indexes/{index['id']}/audits", json=body).json()
        done = wait_for_job(api.client, uninterrupted["id"], timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1, (done, worker.output()[-3000:])

        job = wait_for_progress(api.client, interrupted["id"], at_least=REFERENCE_ROWS // 3)
        assert job["status"] == "running" and job["done"] < job["total"], job
        worker.kill()
        killed = api.client.get(f"/v1/jobs/{interrupted['id']}").json()
        assert killed["status"] == "running" and killed["attempts"] == 1
        # Nothing of an unfinished audit is served.
        assert_problem(api.client.get(f"/v1/audits/{interrupted['id']}/rows"), 409, "running")
        assert_problem(api.client.get(f"/v1/audits/{interrupted['id']}/scores"), 409, "running")

        restarted.start()
        finished = wait_for_job(api.client, interrupted["id"], timeout=120)
        assert finished["status"] == "succeeded", (finished, restarted.output()[-3000:])
        assert finished["attempts"] == 2 and finished["done"] == finished["total"]
        assert "restarted 1 other interrupted job" in restarted.output()

        first, first_rows, first_scores = _outcome(api, uninterrupted["id"])
        second, second_rows, second_scores = _outcome(api, interrupted["id"])
        for summary in (first["summary"], second["summary"]):
            summary.pop("seconds")
        assert second["summary"] == first["summary"]
        assert (
            second["summary"]["num_reference"] == REFERENCE_ROWS
            and second["summary"]["num_rows"] == TRAIN_ROWS
        )
        assert second_rows == first_rows and len(second_rows) == TRAIN_ROWS
        assert set(second_scores) == {"scores", "row_ids", "reference_correct"}
        for name, tensor in first_scores.items():
            assert np.array_equal(second_scores[name], tensor), name
        folder = settings.resolved_artifacts_dir / "jobs" / interrupted["id"]
        # The killed attempt's temporary files are gone; only the finished artifacts (and the lock) remain.
        assert sorted(p.name for p in folder.iterdir()) == ["ranking.npy", "run.lock", "scores.safetensors"]
    finally:
        worker.kill()
        restarted.stop()
