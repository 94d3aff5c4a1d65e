"""Queries over Celery: the API sends a payload (app/services/queries/payload.py) to the `query` queue and waits
for the answer; a query worker computes it (app/jobs/query_worker.py) and sends back either the answer or the
problem it raised.

What a caller gets, and when:
- no query worker alive (its heartbeat, app/jobs/query_heartbeat.py): 503 at once, saying how to start one;
- MAX_WAITING queries of this process waiting already: 503 at once (the workers are that far behind);
- no answer within `query_timeout_s`: 504 then. The message expires at that moment too, so a worker that takes
  it later drops it instead of computing an answer nobody reads;
- a refusal on the worker (a ServiceError, or a library error the API maps): the same status, type, title,
  detail and extension members as the API itself would have answered;
- anything else that fails on the worker: 500, logged on both sides.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeout
from fastapi.encoders import jsonable_encoder
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from app.config import Settings
from app.errors import LIBRARY_ERRORS, ServiceError, Unavailable
from app.jobs.celery_app import QUERY_QUEUE, QUERY_TASK
from app.jobs.query_heartbeat import HEARTBEAT_TTL_S, Heartbeat, heartbeat_for
from app.jobs.readiness import ReadinessCheck
from influence.errors import InfluenceError

log = logging.getLogger(__name__)

# Queries one API process waits on at once. Each holds one of the server's request threads while it waits
# (anyio's pool has 40): past this many, the workers are too far behind and the next one is refused at once.
MAX_WAITING = 32
NO_WORKER = "no query worker is running: start one with `python -m worker --queues query`"


class QueryTimeout(ServiceError, status=504, type="gateway-timeout", title="Gateway timeout"): ...


class ForwardedProblem(ServiceError):
    """A problem a query worker answered with, raised again as the API would have raised it."""

    def __init__(self, problem: dict[str, Any]):
        super().__init__(str(problem.get("detail") or ""), **dict(problem.get("extensions") or {}))
        self.status = int(problem["status"])
        self.type = str(problem["type"])
        self.title = str(problem["title"])


def problem_of(exc: BaseException) -> dict[str, Any] | None:
    """The problem the API answers for `exc` (app/errors.py), as a plain dict; None for an unexpected error."""
    if isinstance(exc, ServiceError):
        return {
            "status": exc.status,
            "type": exc.type,
            "title": exc.title,
            "detail": exc.detail,
            # As the API's problem responses encode them (dates, paths...): the reply travels as JSON.
            "extensions": jsonable_encoder(exc.extensions),
        }
    if isinstance(exc, InfluenceError):
        status, type_, title = next(LIBRARY_ERRORS[cls] for cls in type(exc).__mro__ if cls in LIBRARY_ERRORS)
        return {"status": status, "type": type_, "title": title, "detail": str(exc), "extensions": {}}
    return None


def unwrap(reply: Any) -> dict[str, Any]:
    """The answer of a worker's reply ({"answer": ...} or {"problem": ...}), or its problem raised."""
    if isinstance(reply, dict) and isinstance(reply.get("answer"), dict):
        return reply["answer"]
    if isinstance(reply, dict) and isinstance(reply.get("problem"), dict):
        raise ForwardedProblem(reply["problem"])
    raise RuntimeError(f"a query worker sent a reply of an unknown form ({type(reply).__name__})")


class CeleryQueryTransport:
    """app.services.queries.request.QueryTransport over Celery (one per API process)."""

    def __init__(self, app: Celery, settings: Settings, heartbeat: Heartbeat | None = None):
        heartbeat = heartbeat or heartbeat_for(settings)
        if not app.conf.result_backend or heartbeat is None:
            raise ValueError(
                f"queries on workers need a Redis or filesystem broker, not {settings.resolved_broker_url!r}; "
                "set INFLUENCE_QUERY_ON_WORKERS=false to answer them in the API process"
            )
        self.app = app
        self.settings = settings
        self.heartbeat = heartbeat
        self._waiting = threading.BoundedSemaphore(MAX_WAITING)

    def live_worker(self) -> str:
        """The name of a live query worker; 503 when there is none (or the broker cannot tell)."""
        try:
            name = self.heartbeat.alive()
        except (RedisError, OSError) as exc:
            raise Unavailable(
                f"the broker does not answer, so no query can be sent ({type(exc).__name__})"
            ) from None
        if name is None:
            raise Unavailable(NO_WORKER)
        return name

    def ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        self.live_worker()
        if not self._waiting.acquire(blocking=False):
            raise Unavailable(
                f"the query workers are busy: {MAX_WAITING} queries of this API process are waiting already; try "
                "again shortly, or run more query workers"
            )
        try:
            return self._ask(payload)
        finally:
            self._waiting.release()

    def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        timeout = self.settings.query_timeout_s
        try:
            result = self.app.send_task(
                QUERY_TASK,
                args=[payload],
                queue=QUERY_QUEUE,
                expires=timeout,
                ignore_result=False,
                # What Celery shows of the arguments (events, logs): not the examples' texts.
                argsrepr=f"[query of index {payload.get('index_id')}]",
                kwargsrepr="{}",
            )
        except (OperationalError, RedisError, OSError) as exc:
            raise Unavailable(f"the broker did not take the query ({type(exc).__name__})") from None
        try:
            reply = result.get(
                timeout=timeout, interval=self.settings.query_polling_interval_s, propagate=False
            )
            state = result.state
        except CeleryTimeout:
            raise QueryTimeout(
                f"no query worker answered within {timeout:g}s (query_timeout_s): they are busy or stalled; the "
                "query has expired, and a worker that had not started it drops it"
            ) from None
        except (OperationalError, RedisError, OSError) as exc:
            raise Unavailable(
                f"the answer could not be read from the broker ({type(exc).__name__})"
            ) from None
        finally:
            # Read once: the answer goes now, not when it expires.
            with contextlib.suppress(Exception):
                result.forget()
        if state == states.SUCCESS:
            return unwrap(reply)
        if state == states.REVOKED:
            raise QueryTimeout(
                f"the query expired before a query worker took it (query_timeout_s {timeout:g}s; if this is "
                "at once, the API's and the workers' clocks disagree)"
            )
        log.error("query %s failed on the worker: %s %r", result.id, state, reply)
        raise RuntimeError(f"the query failed on the worker ({state})")


def query_worker_check(transport: CeleryQueryTransport) -> ReadinessCheck:
    """A query worker's heartbeat is fresh (a process that sends its queries to workers is not ready without)."""

    def probe() -> str:
        try:
            return f"{transport.live_worker()} beat within {HEARTBEAT_TTL_S:g}s"
        except Unavailable as exc:
            raise RuntimeError(exc.detail) from None

    return ReadinessCheck("query_worker", probe)
