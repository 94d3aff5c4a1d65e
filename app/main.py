"""The FastAPI application factory. Building an app opens no connection and never migrates the database.

    create_app(settings, job_queue=CeleryJobQueue(settings), readiness_checks=[broker, worker])

Run: `uvicorn --factory app.main:create_app` (or `app.main:app`, built on first access); migrate first with
`python -m app.migrate`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from fastapi import Depends, FastAPI, HTTPException
from fastapi.openapi.utils import get_openapi
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import get_tenant
from app.api.v1 import datasets, health, indexes, jobs, models
from app.config import Settings, get_settings
from app.db import make_engine, make_session_factory
from app.errors import PROBLEM_MEDIA_TYPE, install_error_handlers, problem_response
from app.jobs.context import configure_compute
from app.jobs.dispatch import CeleryJobQueue
from app.jobs.metrics import JobEngineCollector, LiveWorkers
from app.jobs.readiness import ReadinessCheck
from app.jobs.state import JobQueue
from app.logs import RequestIdMiddleware, configure_logging
from app.metrics import HttpMetricsMiddleware, ServiceMetrics
from app.metrics import router as metrics_router
from app.schemas.common import Problem, problems
from app.services import isolation
from app.services.artifacts import sweep_orphans
from app.workflows.audit import routes as audits
from app.workflows.check import routes as checks
from app.workflows.experiment import routes as experiments
from app.workflows.report import routes as reports
from influence import __version__

log = logging.getLogger(__name__)

# Room for the multipart framing and the small form fields around an upload of max_upload_bytes.
FORM_OVERHEAD_BYTES = 1 << 20


# Routes that take a file upload (multipart): their bodies may reach the upload limit; every other body is
# held to max_request_bytes. A dataset registration, and a batch check's new rows.
UPLOAD_ROUTES = (("POST", re.compile(r"/v1/datasets")), ("POST", re.compile(r"/v1/indexes/[^/]+/checks")))


class BodyLimitMiddleware:
    """Refuses request bodies over the limit with 413: early from Content-Length, else while streaming.

    Uploads (UPLOAD_ROUTES) may reach `max_upload_bytes` (the exact upload limit is applied to the file itself
    by the dataset service; this guard keeps a huge body from being spooled to disk at all); every other
    body (JSON) is held to `max_bytes`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_upload_bytes: int | None = None):
        self.app = app
        self.max_json_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes if max_upload_bytes is not None else max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method"), scope.get("path", "").rstrip("/")
        upload = any(method == verb and pattern.fullmatch(path) for verb, pattern in UPLOAD_ROUTES)
        await self._limited(scope, receive, send, self.max_upload_bytes if upload else self.max_json_bytes)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                await problem_response(400, "bad-request", "Bad request", "invalid Content-Length")(
                    scope, receive, send
                )
                return
            if length > max_bytes:
                await problem_response(
                    413,
                    "payload-too-large",
                    "Payload too large",
                    f"the request body ({length} bytes) exceeds the limit of {max_bytes} bytes",
                    instance=scope.get("path"),
                )(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    # FastAPI re-raises its HTTPException from body parsing; the handler renders problem+json.
                    raise HTTPException(413, f"the request body exceeds the limit of {max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


# Query parameters whose values are secrets by their name (api_key, token, client_secret, password, ...).
SECRET_PARAMETER = re.compile(r"key|token|secret|passw|pwd|credential|auth", re.IGNORECASE)
REDACTED = "[redacted]"
# Every response that sets no policy of its own: nothing may be loaded by it, and nothing may frame it.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'"


def secret_parameters(query_string: str) -> list[str]:
    """The names of the query string's parameters that look like they carry a secret, in order, once each."""
    names = [name for name, _ in parse_qsl(query_string, keep_blank_values=True)]
    return list(dict.fromkeys(name for name in names if SECRET_PARAMETER.search(name)))


def redact_query(target: str) -> str:
    """A request target (path?query) with the value of every secret-looking parameter replaced."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    parts = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        parts.append(f"{name}={REDACTED}" if equals and SECRET_PARAMETER.search(unquote_plus(name)) else part)
    return f"{path}?{'&'.join(parts)}"


class AccessLogRedaction(logging.Filter):
    """Rewrites uvicorn's access-log records, whose third argument is the full request target (with the query
    string), so a secret sent in the query string never reaches a log line, whatever handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def install_access_log_redaction() -> None:
    """Puts AccessLogRedaction on the `uvicorn.access` logger, once (logging configuration keeps it)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(existing, AccessLogRedaction) for existing in logger.filters):
        logger.addFilter(AccessLogRedaction())


class SecurityHeadersMiddleware:
    """Refuses API keys in the query string (400: they go in headers only, since URLs are logged and kept in
    histories), and sends `X-Content-Type-Options: nosniff` on every response and DEFAULT_CSP on every response
    that sets no Content-Security-Policy of its own, except the interactive docs pages (`open_paths`: Swagger
    UI and ReDoc load their scripts and styles from a CDN)."""

    def __init__(self, app: ASGIApp, open_paths: Sequence[str] = ()):
        self.app = app
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = scope.get("path") not in self.open_paths

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if csp and "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = DEFAULT_CSP
            await send(message)

        secrets = secret_parameters(scope.get("query_string", b"").decode("latin-1"))
        if secrets:
            names = ", ".join(repr(name) for name in secrets)
            await problem_response(
                400,
                "bad-request",
                "Bad request",
                f"query parameter {names} looks like a secret: send API keys in a header only "
                "(`Authorization: Bearer <key>` or `X-API-Key: <key>`), never in the URL, which is logged",
                instance=scope.get("path"),
            )(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


def create_app(
    settings: Settings | None = None,
    *,
    job_queue: JobQueue | None = None,
    readiness_checks: Sequence[ReadinessCheck] | None = None,
) -> FastAPI:
    """The API. `job_queue` hands committed jobs to workers (without one, job-creating routes answer 503);
    `readiness_checks` join the database check at /readyz (None: a failing `worker` check says so)."""
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url)

    @asynccontextmanager
    async def lifespan(started: FastAPI) -> AsyncIterator[None]:
        # Everything the API writes (datasets, job artifacts, a SQLite database) is its user's alone by default.
        previous_umask = os.umask(int(settings.umask, 8))
        # Again here: a server configures logging after building the app.
        install_access_log_redaction()
        configure_logging(settings.log_format)
        # What a killed process left (a half-registered dataset, a deleted index's files) goes at start.
        try:
            sweep_orphans(settings, started.state.session_factory)
        except Exception:  # an unmigrated database, say: /readyz reports it; serving goes on
            log.exception("could not sweep the artifacts directory")
        if getattr(started.state, "query_transport", None) is None:
            # This process scores queries itself: the kernel compiles in the background and queries wait for it.
            # An API that forwards queries to workers never scores, and loads no compute.
            configure_compute(settings, compile_now=True)
        isolation.start(settings.request_processes)  # spawned from this thread, after the umask is set
        yield
        isolation.stop()
        if started.state.metrics is not None:
            started.state.metrics.close()
        engine.dispose()
        os.umask(previous_umask)

    app = FastAPI(
        title="Influence service",
        version=__version__,
        summary="Which training rows drove this prediction? Layer-wise training-data influence over HTTP.",
        description=(
            "Register a model and a dataset, build an index (an asynchronous job), then query it. "
            "Errors are application/problem+json (RFC 9457)."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.job_queue = job_queue
    app.state.readiness_checks = list(readiness_checks) if readiness_checks is not None else None
    app.state.metrics = _service_metrics(settings, app.state.session_factory, job_queue)

    app.openapi = lambda: _openapi_with_problems(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
    )
    app.add_middleware(
        SecurityHeadersMiddleware,
        open_paths=[url for url in (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if url],
    )
    app.add_middleware(RequestIdMiddleware)
    if app.state.metrics is not None:
        # Added last, so outermost: it counts the answers of every other middleware too.
        app.add_middleware(HttpMetricsMiddleware, metrics=app.state.metrics)
        app.include_router(metrics_router)
    install_access_log_redaction()
    configure_logging(settings.log_format)
    app.include_router(health.router)
    for module in (models, datasets, indexes, jobs, audits, reports, checks, experiments):
        # Every /v1 route authenticates (its own TenantDep resolves to the same, cached, dependency).
        app.include_router(module.router, prefix="/v1", dependencies=[Depends(get_tenant)])
    return app


def _service_metrics(
    settings: Settings, session_factory: sessionmaker[Session], job_queue: JobQueue | None
) -> ServiceMetrics | None:
    """The app's metrics (None when disabled); live workers are counted when jobs go over Celery."""
    if not settings.metrics_enabled:
        return None
    workers = LiveWorkers(job_queue.app) if isinstance(job_queue, CeleryJobQueue) else None
    return ServiceMetrics(JobEngineCollector(settings, session_factory, workers))


def _openapi_with_problems(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with every error response declared as application/problem+json (Problem)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            # What every authenticated route and every route with a body may answer, declared once here.
            if path.startswith("/v1/"):
                responses.setdefault("401", {"description": problems(401)[401]["description"]})
            if "requestBody" in operation:
                responses.setdefault(
                    "400", {"description": "Malformed body (not JSON, not multipart, not UTF-8)"}
                )
                responses.setdefault("413", {"description": "Request body over the limit"})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": problem}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    # FastAPI names a form body after its route; give the dataset form a name a reader can use.
    generated = "Body_create_dataset_v1_datasets_post"
    if generated in components:
        components["DatasetRegistrationForm"] = components.pop(generated)
        form = schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]
        form["schema"] = {"$ref": "#/components/schemas/DatasetRegistrationForm"}
    app.openapi_schema = schema
    return schema


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app` without building an app (and reading settings) at import time.
    if name == "app":
        return create_app()
    raise AttributeError(name)
