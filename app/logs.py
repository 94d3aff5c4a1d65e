"""Log lines that say which request they belong to: a request id in a context variable, put on every log record,
and an optional JSON format (INFLUENCE_LOG_FORMAT=json).

RequestIdMiddleware (wired in app/main.py) sets the id for one request; a job created by that request stores it
(Job.request_id), and the worker sets it again around each of the job's steps (app/jobs/steps.py), so one id
follows a piece of work from the HTTP call to its last step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
# What a caller may choose as its own request id: short, printable, nothing a log reader could mistake for
# structure. Anything else is replaced by a new id (the response says which).
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The request id of the request (or the job step) this code runs for; None outside one."""
    return _request_id.get()


@contextlib.contextmanager
def request_id_context(request_id: str | None) -> Iterator[None]:
    """Every log record written inside carries `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def accepted_request_id(sent: str | None) -> str:
    """The caller's id when it is sane, else a new one."""
    if sent is not None and SANE_REQUEST_ID.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives each HTTP request an id (the caller's X-Request-ID when sane, else a new one), sets it for the
    request's log records and jobs, and echoes it in the response's X-Request-ID header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode())
        request_id = accepted_request_id(sent.decode("latin-1") if sent is not None else None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with request_id_context(request_id):
            await self.app(scope, receive, send_with_id)


def _with_request_id(factory):
    def make_record(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request_id = _request_id.get()
        return record

    make_record.adds_request_id = True  # type: ignore[attr-defined]
    return make_record


def install_request_id_records() -> None:
    """Every log record of this process gets a `request_id` attribute (None outside a request), whatever
    logger writes it and whatever handler formats it. Installing twice has no effect."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "adds_request_id", False):
        logging.setLogRecordFactory(_with_request_id(factory))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, and the exception's
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "process": record.process,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


# The loggers that uvicorn and Celery give handlers of their own (they do not propagate to the root).
OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task")


def use_json_format(loggers: tuple[str, ...] = OWN_HANDLER_LOGGERS) -> None:
    """Format every handler of the root logger and of `loggers` as JSON; give the root a stderr handler when it
    has none (under uvicorn, the service's own loggers would otherwise print warnings only)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    formatter = JsonFormatter()
    for logger in (root, *(logging.getLogger(name) for name in loggers)):
        for handler in logger.handlers:
            handler.setFormatter(formatter)


def configure_logging(log_format: str) -> None:
    """The request id on every record; JSON lines when `log_format` is json (text keeps each server's format)."""
    install_request_id_records()
    if log_format == "json":
        use_json_format()
