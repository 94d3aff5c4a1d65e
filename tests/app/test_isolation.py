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

from app.models import Dataset
from app.services import isolation
from tests.app.conftest import build_api, make_settings, tsv_bytes
from tests.app.test_upload_limits import MALFORMED

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


def test_work_runs_in_a_pool_process_and_errors_come_back_unchanged(pooled, sst2_rows):
    assert isolation.run(os.getpid) in _pool_pids()
    assert isolation.run(os.getpid) != os.getpid()

    good = pooled.client.post("/v1/datasets", files={"file": ("d.tsv", tsv_bytes(sst2_rows[:50]))}, data=FORM)
    assert good.status_code == 201, good.text
    assert good.json()["row_count"] == 50
    cases = [("d.tsv", b"text\tlabel\na fine line\t1\n"), *((name, content) for _, name, content, _ in MALFORMED)]
    from_pool = [_answer(pooled, name, content) for name, content in cases]
    isolation.stop()  # the same requests again, read in this process
    in_place = [_answer(pooled, name, content) for name, content in cases]
    assert from_pool == in_place
    assert from_pool[0][0] == 201 and all(status == 422 for status, _ in from_pool[1:])
    assert pooled.count(Dataset) == 3
    assert not list((pooled.settings.resolved_artifacts_dir / "tmp").iterdir())


def _answer(api, name: str, content: bytes) -> tuple[int, str]:
    response = api.client.post("/v1/datasets", files={"file": (name, content)})
    return response.status_code, response.json().get("detail", "") if response.status_code != 201 else ""


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
from app.models import Dataset
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


def test_more_requests_than_the_pool_holds_are_a_503_at_once():
    from app.errors import Unavailable

    isolation.start(1)
    try:
        isolation.run(os.getpid)  # the process is up
        holders = [
            threading.Thread(target=isolation.run, args=(time.sleep, 1.5))
            for _ in range(isolation.WAITING_PER_PROCESS)
        ]
        for holder in holders:
            holder.start()
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="busy"):
            isolation.run(os.getpid)
        assert time.monotonic() - started < 0.5  # refused, not queued
        for holder in holders:
            holder.join(30)
        assert isolation.run(os.getpid) != os.getpid()  # served again once the others are done
    finally:
        isolation.stop()
