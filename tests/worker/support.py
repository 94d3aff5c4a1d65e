"""Helpers shared by the worker and index/query tests: register over HTTP, wait for jobs, run a real worker or
a real API process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.jobs.dispatch import CeleryJobQueue
from app.jobs.readiness import readiness_checks
from tests.app.conftest import build_api

ROOT = Path(__file__).resolve().parents[2]


def tsv(rows, noisy=None) -> bytes:
    header = ["sentence", "label"] + (["noisy"] if noisy is not None else [])
    lines = ["\t".join(header)]
    for i, (text, label) in enumerate(rows):
        cells = [text, str(label)] + ([str(bool(noisy[i])).lower()] if noisy is not None else [])
        lines.append("\t".join(cells))
    return ("\n".join(lines) + "\n").encode("utf-8")


def register_model(client, folder, *, name="tiny-bert", num_labels=2, adapter=None) -> dict:
    body = {"name": name, "source": str(folder), "task": "classification", "num_labels": num_labels}
    if adapter is not None:
        body["adapter"] = str(adapter)
    response = client.post("/v1/models", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def register_dataset(client, rows, *, name="sst2", noisy=None) -> dict:
    data = {"name": name, "text_column": "sentence", "label_column": "label"}
    if noisy is not None:
        data["noisy_column"] = "noisy"
    response = client.post(
        "/v1/datasets", files={"file": (f"{name}.tsv", tsv(rows, noisy), "text/tab-separated-values")}, data=data
    )
    assert response.status_code == 201, response.text
    return response.json()


def built_index(
    api, model_folder, rows, *, models=None, dataset_name="train", **index_fields
) -> tuple[dict, dict, dict]:
    """(model, dataset, index): `model_folder` and the SST-2 `rows` registered through `api` (a tests.app Api) and
    an index over them built in this process, ready."""
    from app.jobs.steps import run_build_inline

    model = register_model(api.client, model_folder)
    dataset = register_dataset(api.client, rows, name=dataset_name)
    body = {"model_id": model["id"], "dataset_id": dataset["id"], **index_fields}
    created = api.client.post("/v1/indexes", json=body)
    assert created.status_code == 202, created.text
    run_build_inline(api.settings, api.session_factory, created.json()["job"]["id"], models=models)
    index = api.client.get(f"/v1/indexes/{created.json()['id']}").json()
    assert index["status"] == "ready", index
    return model, dataset, index


def wait_for_job(client, job_id: str, timeout: float = 120.0, until=("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
        time.sleep(0.2)


def wait_for_progress(client, job_id: str, at_least: int, timeout: float = 120.0) -> dict:
    """The job once it has done `at_least` steps (or stopped running): where a test kills its worker."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["done"] >= at_least or job["status"] not in ("queued", "running"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} made no progress in {timeout}s: {job}")
        time.sleep(0.05)


def celery_api(settings):
    """A tests.app Api whose jobs go to real Celery workers through the broker of `settings`, with the
    broker and live-worker checks at /readyz: the service as deployed."""
    queue = CeleryJobQueue(settings)
    return build_api(settings, queue=queue, readiness_checks=readiness_checks(queue.app, settings))


def worker_env(settings, **extra) -> dict[str, str]:
    """The environment of a worker process for `settings` (the INFLUENCE_* variables it reads)."""
    env = dict(os.environ)
    env.update(
        {
            "INFLUENCE_DATA_DIR": str(settings.data_dir),
            "INFLUENCE_DATABASE_URL": settings.resolved_database_url,
            "INFLUENCE_ARTIFACTS_DIR": str(settings.resolved_artifacts_dir),
            "INFLUENCE_DEVICE": "cpu",
            "INFLUENCE_CHUNK_SIZE": str(settings.chunk_size),
            "INFLUENCE_BATCH_SIZE": str(settings.batch_size),
            "INFLUENCE_BROKER_VISIBILITY_TIMEOUT": str(settings.broker_visibility_timeout),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    if settings.broker_url:
        env["INFLUENCE_BROKER_URL"] = settings.broker_url
    else:
        env.pop("INFLUENCE_BROKER_URL", None)
    env.update(extra)
    return env


class WorkerProcess:
    """A real `celery worker` process (its own process group, so kill -9 takes its pool with it)."""

    def __init__(self, settings, name: str, log: Path, concurrency: int = 1, **env):
        self.command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--loglevel",
            "info",
            "--concurrency",
            str(concurrency),
            "--queues",
            "cpu,gpu",
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        self.env = worker_env(settings, **env)
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        handle = open(self.log, "ab")  # noqa: SIM115 - the child owns it until it exits
        self.process = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()
        return self

    def kill(self) -> None:
        """kill -9 the worker and its pool processes."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # warm shutdown: the main process stops its pool
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def assert_problem(response, status: int, *fragments: str) -> dict:
    """A problem+json error with this status whose detail contains every fragment."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ApiProcess:
    """`uvicorn --factory app.main:create_app` on 127.0.0.1 over the test's database and artifacts."""

    def __init__(self, settings, log_path, factory: str = "app.main:create_app", **env):
        self.factory = factory  # app.embedded:create_service_app: with the Celery job queue
        self.port = free_port()
        self.env = {
            **os.environ,
            "INFLUENCE_DATA_DIR": str(settings.data_dir),
            "INFLUENCE_DATABASE_URL": settings.resolved_database_url,
            "INFLUENCE_ARTIFACTS_DIR": str(settings.resolved_artifacts_dir),
            "INFLUENCE_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server owns it until it exits
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", self.factory, "--port", str(self.port)],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, self.log_path.read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (a graceful stop), then SIGKILL if it does not end."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """kill -9, as an OOM killer or a power cut would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
