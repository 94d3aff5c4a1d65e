"""An experiment run by a real Celery worker process (filesystem broker, SQLite), the worker killed with -9 in
the middle of the experiment's index build, a new worker started: the experiment resumes from its first
unfinished stage and succeeds, having made exactly one noisy dataset, one model, one index and one report."""

from __future__ import annotations

import time

from sqlalchemy import func, select

from app.models import Dataset, Index, Job, RegisteredModel
from tests.app.conftest import make_settings
from tests.worker.support import WorkerProcess, celery_api, register_dataset, register_model

ROWS = 240
CHUNK = 4  # 60 chunks: the build lasts long enough to kill the worker in the middle of it


def _count(api, model, *where) -> int:
    with api.session_factory() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def _wait(api, experiment_id: str, until, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        experiment = api.client.get(f"/v1/experiments/{experiment_id}").json()
        if until(experiment):
            return experiment
        if time.monotonic() > deadline:
            raise AssertionError(f"experiment {experiment_id} did not get there in {timeout}s: {experiment}")
        time.sleep(0.01)


def _building(api, experiment: dict) -> bool:
    """The experiment is in its index stage and its build has written a few chunks (or went past it)."""
    if experiment["status"] not in ("queued", "running"):
        return True
    if experiment["stage"] != "index" or experiment["index_id"] is None:
        return experiment["stage"] in ("report", "done")
    index = api.client.get(f"/v1/indexes/{experiment['index_id']}").json()
    return index["job"]["done"] >= 3


def test_a_killed_worker_resumes_the_experiment_without_duplicates(
    tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows
):
    settings = make_settings(tmp_path, sqlite_url, default_roots)
    assert settings.uses_filesystem_broker
    api = celery_api(settings)
    first = WorkerProcess(settings, "experiment", tmp_path / "worker-1.log").start()
    second = WorkerProcess(settings, "experiment", tmp_path / "worker-2.log")
    try:
        base = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
        train = register_dataset(api.client, sst2_rows[:ROWS], name="train")
        reference = register_dataset(api.client, sst2_rows[250:290], name="reference")
        body = {
            "base_model_id": base["id"],
            "dataset_id": train["id"],
            "reference": {"dataset_id": reference["id"]},
            "noise_rate": 0.2,
            "seed": 1,
            "epochs": 1,
            "batch_size": 16,
            "learning_rate": 0.01,
            "max_length": 48,
            "chunk_size": CHUNK,
            "projection": {"kind": "factorized", "dim": 16, "seed": 0},
            "report": {"estimators": ["grad-dot"], "aggregations": ["rank"], "cancellation_rows": 10},
        }
        response = api.client.post("/v1/experiments", json=body)
        assert response.status_code == 202, response.text
        experiment_id = response.json()["id"]

        killed_at = _wait(api, experiment_id, lambda e: _building(api, e))
        first.kill()
        assert killed_at["status"] == "running", (killed_at, first.output()[-3000:])
        assert killed_at["stage"] == "index" and killed_at["stages_done"] == ["noise", "finetune", "register"]
        index = api.client.get(f"/v1/indexes/{killed_at['index_id']}").json()
        assert index["status"] == "building" and 3 <= index["job"]["done"] < index["job"]["total"], index

        second.start()
        done = _wait(api, experiment_id, lambda e: e["status"] not in ("queued", "running"), timeout=180)
        assert done["status"] == "succeeded", (done["job"]["error"], second.output()[-3000:])
        assert done["job"]["attempts"] == 2 and done["stage"] == "done"
        assert done["stages_done"] == ["noise", "finetune", "register", "index", "report"]
        # The finished stages were not redone: the same resources, made once.
        assert (done["model_id"], done["dataset_id"], done["index_id"]) == (
            killed_at["model_id"],
            killed_at["dataset_id"],
            killed_at["index_id"],
        )
        assert _count(api, RegisteredModel) == 2  # the base and the fine-tuned model
        assert _count(api, Dataset) == 3  # train, reference and the noisy rows
        assert _count(api, Index) == 1
        assert _count(api, Job, Job.kind == "index_build") == 1
        assert _count(api, Job, Job.kind == "layer_report") == 1
        index = api.client.get(f"/v1/indexes/{done['index_id']}").json()
        assert index["status"] == "ready" and index["num_rows"] == ROWS
        assert (
            index["job"]["attempts"] >= 2 and index["job"]["done"] == index["job"]["total"] == ROWS // CHUNK
        )
        # The new worker began at the index stage: noise, fine-tune and registration were not run again.
        resumed = second.output()
        assert f"experiment {experiment_id}: stage index" in resumed, resumed[-3000:]
        assert not any(
            f"experiment {experiment_id}: stage {stage}" in resumed
            for stage in ("noise", "finetune", "register")
        )
        report = api.client.get(f"/v1/reports/{done['report_id']}").json()
        assert report["status"] == "succeeded" and report["report"]["n_noisy"] == round(0.2 * ROWS)
    finally:
        first.kill()
        second.stop()
        api.close()
