"""The embedded runner (`python -m app.embedded serve`, what `make serve` runs): it migrates its SQLite file,
makes a local API key (mode 0600, path printed), starts a real worker child on the filesystem broker, restarts
that child when it dies, and stops it on exit. Its API process builds an index and answers a query through the
worker children without ever loading torch."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.worker.support import ROOT, free_port, tsv, wait_for_job

# Shared libraries whose presence in a process's memory map means torch (or faiss) was loaded into it.
HEAVY_LIBRARIES = ("libtorch", "torch/_C", "_swigfaiss")


def _worker_children(pid: int, query: bool = False) -> list[int]:
    """The `python -m worker` children of `pid` that serve jobs, or (query=True) the one that serves queries
    (`--queues query`); not the C++ compiler that torch.compile may run for a few seconds."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                int(stat.rsplit(")", 1)[1].split()[1]) == pid
                and b"worker" in argv[1:3]
                and (b"query" in argv) == query
            ):
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_ready(client: httpx.Client, timeout: float, key_file: Path) -> dict:
    """The full readiness answer, asked with the local key (made at start) once it exists."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            key = key_file.read_text().strip() if key_file.exists() else ""
            response = client.get("/readyz", headers={"X-API-Key": key} if key else {})
            if response.status_code == 200 and key:
                return response.json()
            last = response.text
        except httpx.TransportError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout}s: {last}")


def _heavy_libraries(pid: int) -> set[str]:
    maps = (Path("/proc") / str(pid) / "maps").read_text()
    return {library for library in HEAVY_LIBRARIES if library in maps}


def _query_through_the_workers(client: httpx.Client, model_folder: Path, rows) -> dict:
    """Register the model and rows, build an index on the worker child, query it on the query child (`client`
    sends the API key)."""
    body = {"name": "tiny-bert", "source": str(model_folder), "task": "classification", "num_labels": 2}
    model = client.post("/v1/models", json=body)
    assert model.status_code == 201, model.text
    dataset = client.post(
        "/v1/datasets",
        files={"file": ("rows.tsv", tsv(rows), "text/tab-separated-values")},
        data={"name": "rows", "text_column": "sentence", "label_column": "label"},
    )
    assert dataset.status_code == 201, dataset.text
    created = client.post(
        "/v1/indexes",
        json={"model_id": model.json()["id"], "dataset_id": dataset.json()["id"], "chunk_size": 16},
    )
    assert created.status_code == 202, created.text
    job = wait_for_job(client, created.json()["job"]["id"], timeout=180)
    assert job["status"] == "succeeded", job
    query = {"examples": [{"text": rows[0][0], "label": rows[0][1]}], "top_k": 3}
    answer = client.post(f"/v1/indexes/{created.json()['id']}/query", json=query)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_serve_migrates_runs_a_worker_restarts_it_and_stops_it(tmp_path, tiny_model_dir, sst2_rows):
    port = free_port()
    data_dir = tmp_path / "var"
    model_folder = tiny_model_dir("bert", "classification", num_labels=2)
    env = {
        **os.environ,
        "INFLUENCE_DATA_DIR": str(data_dir),
        "INFLUENCE_ALLOWED_ROOTS": json.dumps([str(tmp_path), str(model_folder.parent)]),
        "INFLUENCE_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    for variable in ("INFLUENCE_DATABASE_URL", "INFLUENCE_BROKER_URL", "INFLUENCE_ARTIFACTS_DIR"):
        env.pop(variable, None)
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    runner = subprocess.Popen(
        [sys.executable, "-m", "app.embedded", "serve", "--port", str(port)],
        cwd=tmp_path,  # the data dir is resolved once, whatever the working directory of the worker child
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            checks = _wait_ready(client, timeout=120, key_file=data_dir / "local-api-key")["checks"]
            assert checks["database"]["detail"].startswith("sqlite")
            assert checks["broker"]["detail"] == f"filesystem broker at {data_dir / 'broker'}"
            assert checks["worker"]["detail"].startswith("worker embedded@")
            assert checks["query_worker"]["detail"].startswith("embedded-query@")
            assert (data_dir / "influence.db").is_file()
            assert {p.name for p in (data_dir / "broker").iterdir()} >= {"queue", "control", "processed"}
            # The local API key: made on first start, readable by its owner only, its path printed.
            key_file = data_dir / "local-api-key"
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            assert f"created at {key_file}" in (tmp_path / "serve.log").read_text(errors="replace")
            assert client.get("/v1/models").status_code == 401
            headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
            assert client.get("/v1/models", headers=headers).json()["total"] == 0

            # The API validates and forwards; the worker children compute: torch never enters its process.
            client.headers.update(headers)
            answer = _query_through_the_workers(client, model_folder, sst2_rows[:40])
            (result,) = answer["results"]
            assert result["candidates"] == 40 and len(result["helpful"]) == 3, answer
            assert client.get("/healthz").status_code == 200
            assert _heavy_libraries(runner.pid) == set()

            (worker,) = _worker_children(runner.pid)
            (query_worker,) = _worker_children(runner.pid, query=True)
            os.kill(worker, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not [
                p for p in _worker_children(runner.pid) if p != worker
            ]:
                time.sleep(0.2)
            (restarted,) = [p for p in _worker_children(runner.pid) if p != worker]
            _wait_ready(client, timeout=120, key_file=data_dir / "local-api-key")
        runner.send_signal(signal.SIGINT)
        assert runner.wait(timeout=90) == 0
        assert not _alive(restarted)
        assert not _alive(query_worker)
        text = (tmp_path / "serve.log").read_text(errors="replace")
        assert "starting it again" in text and "worker stopped" in text
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
        log.close()
