"""Request work in processes beside the API (app/services/isolation.py): uploads are parsed and model folders
inspected in a pool process once the app's lifespan has started it; errors come back unchanged; a pool process
killed mid-request is a 503 that leaves nothing behind, and the next request is served by a new one; a pool
process leaves when the API process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.services import isolation
from tests.app.conftest import build_api, make_settings, tsv_bytes

ROOT = Path(__file__).resolve().parents[2]
FORM = {"text_column": "sentence"}


@pytest.fixture
def pooled(tmp_path, sqlite_url, default_roots):
    """An API whose lifespan ran: its request pool (one process) is started."""
    settings = make_settings(
        tmp_path, sqlite_url, default_roots, compiled_scoring=False, max_upload_bytes=64 * 1024 * 1024
    )
    api = build_api(settings)
    with TestClient(api.app, headers={"Authorization": f"Bearer {api.token}"}) as client:
        api.client = client
        assert isolation.started()
        yield api
    assert not isolation.started()
    api.app.state.engine.dispose()


def _pool_pids() -> set[int]:
    pool = isolation._pool
    assert pool is not None
    return set(pool._processes)  # the pool's own record of its live processes


def test_work_runs_in_a_pool_process_and_errors_come_back_unchanged(pooled, sst2_rows, tmp_path, sqlite_url,
                                                                   default_roots):
    assert isolation.run(os.getpid) in _pool_pids()
    assert isolation.run(os.getpid) != os.getpid()

    good = pooled.client.post("/v1/datasets", files={"file": ("d.tsv", tsv_bytes(sst2_rows[:50]))}, data=FORM)
    assert good.status_code == 201, good.text
    assert good.json()["row_count"] == 50
    bad_file = b"sentence\tlabel\na fine line\t1\nan odd line\t" + b"9" * 5000 + b"\n"
    pooled_answer = pooled.client.post("/v1/datasets", files={"file": ("bad.tsv", bad_file)}, data=FORM)

    inline = build_api(make_settings(tmp_path / "inline", sqlite_url, default_roots))
    inline_answer = inline.client.post("/v1/datasets", files={"file": ("bad.tsv", bad_file)}, data=FORM)
    assert pooled_answer.status_code == inline_answer.status_code == 422
    assert pooled_answer.json()["detail"] == inline_answer.json()["detail"]
    assert "line 3" in pooled_answer.json()["detail"]
    inline.client.close()
    inline.app.state.engine.dispose()


def test_a_pool_process_killed_mid_upload_is_a_503_that_leaves_nothing(pooled, sst2_rows):
    rows = [(f"{text} {i}", label) for i in range(300) for text, label in sst2_rows[:200]]  # 60,000 rows, ~3 MB
    body = tsv_bytes(rows)
    answer: dict = {}

    def upload() -> None:
        answer["response"] = pooled.client.post("/v1/datasets", files={"file": ("big.tsv", body)}, data=FORM)

    victims = _pool_pids()
    thread = threading.Thread(target=upload)
    thread.start()
    staging = pooled.settings.resolved_artifacts_dir / "tmp"
    deadline = time.monotonic() + 60
    while not any(staging.glob("*/rows.jsonl")):  # the pool process has begun writing the rows
        assert time.monotonic() < deadline, "the upload never reached the pool process"
        time.sleep(0.005)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    thread.join(60)
    response = answer["response"]
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "died" in response.json()["detail"]
    pooled.assert_nothing_left()

    again = pooled.client.post(
        "/v1/datasets", files={"file": ("small.tsv", tsv_bytes(sst2_rows[:20]))}, data=FORM
    )
    assert again.status_code == 201, again.text
    assert not _pool_pids() & victims


def test_model_folders_are_inspected_in_the_pool(pooled, tiny_model_dir):
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    created = pooled.client.post("/v1/models", json={"name": "m", "source": str(folder), "num_labels": 2})
    assert created.status_code == 201, created.text
    assert created.json()["num_layers"] > 0
    bad = pooled.client.post("/v1/models", json={"name": "m", "source": str(folder), "num_labels": 100_000})
    assert bad.status_code == 422
    assert "max_num_labels" in bad.json()["detail"]


CHILD = """
import os, sys
from app.services import isolation
isolation.start(1)
print(isolation.run(os.getpid), flush=True)
sys.stdin.read()
"""


def test_pool_processes_leave_when_the_api_process_dies():
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # alive
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and _state(child) != "Z":
            assert time.monotonic() < deadline, "the pool process outlived the API process"
            time.sleep(0.05)
    finally:
        parent.kill()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "gone"
