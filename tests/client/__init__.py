"""The service the client and CLI tests talk to: the real app (tests/app/conftest.py's `build_api`) over a
freshly migrated SQLite file, reached in-process through an httpx transport, and a job queue that runs each job
through the worker's own code (`run_job_inline`) in this process."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from influence_client import InfluenceClient
from influence_client.cli import main
from tests.app.conftest import Api, RecordingQueue, build_api, make_settings
from tests.conftest import SST2

BASE_URL = "http://testserver"
log = logging.getLogger(__name__)


class AppTransport(httpx.BaseTransport):
    """Hands each request to an ASGI app in this process (Starlette's TestClient runs it); the request goes as
    the InfluenceClient built it, its Authorization header included."""

    def __init__(self, app):
        self._client = TestClient(app, base_url=BASE_URL)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # Starlette's TestClient speaks its own httpx flavour: the request crosses over as its parts (a multipart
        # upload is a stream: read whole first).
        response = self._client.request(
            request.method, str(request.url), headers=request.headers.multi_items(), content=request.read()
        )
        return httpx.Response(
            response.status_code, headers=response.headers.multi_items(), content=response.content
        )

    def close(self) -> None:
        self._client.close()


class InlineQueue:
    """A JobQueue that runs each job to its end when it is handed over (after the creating request commits),
    so a job is finished by the time its POST answers, through the code a worker runs. `hold = True` only
    records jobs instead (they stay queued: for waiting and cancelling)."""

    def __init__(self):
        self.settings = None
        self.session_factory = None
        self.hold = False
        self.enqueued: list[str] = []
        self.models = None

    def bind(self, api: Api) -> None:
        from app.jobs.model_cache import ModelCache

        self.settings, self.session_factory, self.models = api.settings, api.session_factory, ModelCache()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Jobs created meanwhile stay queued."""
        self.hold = True
        try:
            yield
        finally:
            self.hold = False

    def enqueue(self, job) -> None:
        from app.jobs.steps import run_job_inline

        self.enqueued.append(job.id)
        if self.hold:
            return
        try:
            run_job_inline(self.settings, self.session_factory, job.id, self.models)
        except Exception:  # the job is marked failed with the error: that is the answer the tests read
            log.exception("job %s failed", job.id)


def start_api(folder: Path, queue: RecordingQueue | InlineQueue | None = None, **overrides) -> Api:
    """The app over a new, migrated SQLite file in `folder`, with a tenant and its API key (`api.token`). The
    pytest temp tree (tiny models, written files) and SST-2 are allowed roots."""
    from app.migrate import upgrade

    url = f"sqlite:///{folder / 'influence.db'}"
    upgrade(url)
    settings = make_settings(folder, url, [folder.parent, SST2], **overrides)
    api = build_api(settings, queue=queue if queue is not None else RecordingQueue())
    if isinstance(queue, InlineQueue):
        queue.bind(api)
    return api


def client_for(api: Api, token: str | None = None) -> InfluenceClient:
    """An InfluenceClient on the in-process app, with the tenant's key (or `token`)."""
    return InfluenceClient(
        BASE_URL, token if token is not None else api.token, transport=AppTransport(api.app)
    )


class Cli:
    """Runs `influence --url ... --api-key KEY ARGS` in this process, on the app: (exit status, stdout, stderr)."""

    def __init__(self, api: Api):
        self.api = api

    def __call__(self, command: str, *extra: str, key: str | None = None) -> tuple[int, str, str]:
        """`command` is split as a shell would; `extra` arguments are taken as they are; `key`: another API key."""
        stdout, stderr = io.StringIO(), io.StringIO()
        argv = ["--url", "http://testserver", "--api-key", key if key is not None else self.api.token]
        argv += [*shlex.split(command), *extra]
        code = main(argv, transport=AppTransport(self.api.app), stdout=stdout, stderr=stderr)
        return code, stdout.getvalue(), stderr.getvalue()

    def json(self, command: str, *extra: str, expect: int = 0):
        code, out, err = self(command, *extra, "--json")
        assert code == expect, err
        return json.loads(out)  # exactly one document: json.loads refuses anything after it
