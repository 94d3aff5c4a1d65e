"""kill -9 of the API during an upload, with a real uvicorn process: while the body streams in, and while the
rows are being validated and written. Either way no dataset is registered, and the folder the killed request
left is removed when the API starts again."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import httpx

from app.models import Dataset
from tests.app.conftest import build_api, make_settings, tsv_bytes
from tests.worker.support import ApiProcess


def _multipart(content: bytes, token: str) -> tuple[bytes, bytes]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"text_column\"\r\n\r\nsentence\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.tsv\"\r\n"
        "Content-Type: text/tab-separated-values\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


def test_kill_9_during_an_upload_registers_nothing_and_leaves_nothing(tmp_path, sqlite_url, default_roots,
                                                                     sst2_rows):
    settings = make_settings(tmp_path, sqlite_url, default_roots, max_upload_bytes=64 * 1024 * 1024)
    api = build_api(settings)
    artifacts = settings.resolved_artifacts_dir
    content = tsv_bytes(sst2_rows * 600)  # 180,000 rows, ~8 MB: seconds of validation on this machine
    head, body = _multipart(content, api.token)
    server = ApiProcess(settings, tmp_path / "api.log")

    # 1. Killed while the body streams in.
    server.start()
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(head + body[: len(body) // 2])
        time.sleep(0.5)
        server.kill()
    assert api.count(Dataset) == 0
    assert not (artifacts / "datasets").exists() or not list((artifacts / "datasets").iterdir())

    # 2. Killed while the rows are validated and written: the staging folder is there, the row is not.
    server.start()
    sender = threading.Thread(target=_send_quietly, args=(server.port, head + body), daemon=True)
    sender.start()
    staging_root = artifacts / "tmp"
    deadline = time.monotonic() + 120
    while not (staging_root.is_dir() and any(p.name.startswith("dataset-") for p in staging_root.iterdir())):
        assert time.monotonic() < deadline, "the upload never reached the registration"
        time.sleep(0.002)
    server.kill()
    sender.join(timeout=30)
    assert api.count(Dataset) == 0
    left = [p for p in staging_root.iterdir() if p.name.startswith("dataset-")]
    assert left, "the killed request left its staging folder (the sweep's job)"
    assert not (artifacts / "datasets").exists() or not list((artifacts / "datasets").iterdir())

    # 3. The API starts again: what the killed request left is swept, and uploads work.
    server.start()
    try:
        assert not [p for p in staging_root.iterdir() if p.name.startswith("dataset-")]
        response = httpx.post(
            f"{server.url}/v1/datasets",
            files={"file": ("small.tsv", tsv_bytes(sst2_rows[:20]))},
            data={"text_column": "sentence"},
            headers={"Authorization": f"Bearer {api.token}"},
            timeout=60,
        )
        assert response.status_code == 201, response.text
        assert api.count(Dataset) == 1
        assert [p.name for p in (artifacts / "datasets").iterdir()] == [response.json()["id"]]
        assert "removed" in (tmp_path / "api.log").read_text(errors="replace")
    finally:
        server.kill()


def _send_quietly(port: int, payload: bytes) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(payload)
            connection.recv(1024)
    except OSError:
        pass  # the server was killed under it
