"""What the service writes is its own user's (issue 13, finding 7): `settings.umask` (default 077) is the process
umask of the API (create_app's lifespan), of the embedded runner (which creates the SQLite database and starts
the worker child) and of the Celery worker, so files are 0600 and folders 0700; with 022 they are 0644 / 0755.
Each server here starts under umask 022, what a login shell usually gives."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.app.conftest import ROOT_DIR, RecordingQueue, make_settings, make_tenant
from tests.worker.support import free_port, tsv

MODES = [("077", 0o600, 0o700), ("022", 0o644, 0o755)]


@pytest.fixture(autouse=True)
def restore_umask():
    """The test process' umask as it was, whatever a test (or the app's lifespan) set."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _tree_modes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(files, folders) under root and root itself, by path relative to root, with their permission bits."""
    files: dict[str, int] = {}
    folders = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        (folders if path.is_dir() else files)[str(path.relative_to(root))] = mode
    return files, folders


def _process_umask(pid: int) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return None


def _stop(process: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _register(client, **kwargs):
    response = client.post(
        "/v1/datasets",
        files={"file": ("rows.tsv", tsv([("a fine film", 1), ("dull", 0)]), "text/tab-separated-values")},
        data={"name": "rows", "text_column": "sentence", "label_column": "label"},
        **kwargs,
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), MODES)
def test_the_api_writes_with_the_configured_umask(tmp_path, sqlite_url, default_roots, umask, file_mode, folder_mode):
    from app.main import create_app

    os.umask(0o022)
    settings = make_settings(tmp_path, sqlite_url, default_roots, umask=umask)
    app = create_app(settings, job_queue=RecordingQueue(), readiness_checks=())
    _, token = make_tenant(app.state.session_factory)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:  # runs the lifespan
        dataset = _register(client)
    app.state.engine.dispose()
    artifacts = settings.resolved_artifacts_dir
    files, folders = _tree_modes(artifacts)
    assert any(dataset["id"] in name for name in files), files
    assert set(files.values()) == {file_mode}, files
    assert set(folders.values()) == {folder_mode}, folders
    # The lifespan puts the process' umask back when the app stops.
    assert os.umask(0o022) == 0o022


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), MODES)
def test_the_embedded_runner_creates_the_database_and_artifacts_with_the_umask(
    tmp_path, umask, file_mode, folder_mode
):
    data = tmp_path / "data"
    port = free_port()
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("INFLUENCE_")
    } | {"INFLUENCE_DATA_DIR": str(data), "INFLUENCE_UMASK": umask, "INFLUENCE_COMPILED_SCORING": "false"}
    command = [sys.executable, "-m", "app.embedded", "serve", "--no-worker", "--port", str(port)]
    process = subprocess.Popen(
        command,
        cwd=ROOT_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(0o022),
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the embedded service exited"
            assert time.monotonic() < deadline, "the embedded service did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert _process_umask(process.pid) == int(umask, 8)
        key = (data / "local-api-key").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=60) as client:
            dataset = _register(client)
    finally:
        _stop(process)
    files, folders = _tree_modes(data)
    assert stat.S_IMODE((data / "influence.db").stat().st_mode) == file_mode
    assert stat.S_IMODE((data / "local-api-key").stat().st_mode) == 0o600  # always, whatever the umask
    assert any(dataset["id"] in name for name in files), files
    assert {name: mode for name, mode in files.items() if name != "local-api-key"} == dict.fromkeys(
        set(files) - {"local-api-key"}, file_mode
    )
    assert set(folders.values()) == {folder_mode}, folders


def test_the_worker_takes_the_umask_before_it_creates_anything(tmp_path, sqlite_url):
    data = tmp_path / "data"
    env = {key: value for key, value in os.environ.items() if not key.startswith("INFLUENCE_")} | {
        "INFLUENCE_DATA_DIR": str(data),
        "INFLUENCE_DATABASE_URL": sqlite_url,
        "INFLUENCE_UMASK": "077",
        "INFLUENCE_COMPILED_SCORING": "false",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "--concurrency", "1", "--hostname", f"modes-{os.getpid()}@%h"],
        cwd=ROOT_DIR,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(0o022),
    )
    broker = data / "broker"
    try:
        deadline = time.monotonic() + 120
        while not (broker / "processed").is_dir() or _process_umask(process.pid) != 0o077:
            assert process.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, (_process_umask(process.pid), list(data.rglob("*")))
            time.sleep(0.2)
    finally:
        _stop(process, signal.SIGTERM)
    _, folders = _tree_modes(broker)
    assert set(folders.values()) == {0o700}, folders
