"""GET /metrics in Prometheus text format: HTTP requests and latencies by route template, and the job engine's
series (app/jobs/metrics.py: jobs, job run times, queue depths, live workers, store bytes).

The route exists only when INFLUENCE_METRICS_ENABLED is true. Each app has a registry of its own (tests build
many apps in one process). Requests are labelled by the route's template (`/v1/indexes/{index_id}`), never the
raw path, so no id reaches a label and the series stay few; a path no route matches is `<unmatched>`. A scrape
reads the database and the broker in a thread of its own with a deadline, one scrape at a time: /metrics never
holds the event loop, and a stuck source answers 503 instead of piling up threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import problem_response
from app.jobs.metrics import JobEngineCollector

# Seconds a scrape may take before it answers 503 (Prometheus' default scrape timeout is 10 s).
SCRAPE_DEADLINE_S = 5.0
UNMATCHED_ROUTE = "<unmatched>"
# Seconds of an HTTP request: /healthz answers in microseconds, a query in tens of milliseconds, an upload in
# seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

router = APIRouter(tags=["health"])


class ServiceMetrics:
    """One app's registry: its HTTP series and the job engine's collector."""

    def __init__(self, job_engine: JobEngineCollector):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "influence_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "influence_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_engine = job_engine
        self.registry.register(job_engine)
        # One thread: a scrape that overruns its deadline keeps it, and the next scrape is refused, not queued.
        # Made at the first scrape after each close: an app served again after its lifespan ended (a second
        # server, a test client) scrapes too.
        self._scraper: concurrent.futures.ThreadPoolExecutor | None = None
        self._scrape: concurrent.futures.Future[bytes] | None = None

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    async def scrape(self) -> bytes | None:
        """The exposition, or None when it is not ready within SCRAPE_DEADLINE_S (or an earlier one still runs)."""
        if self._scrape is not None and not self._scrape.done():
            return None
        if self._scraper is None:
            self._scraper = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._scrape = self._scraper.submit(generate_latest, self.registry)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._scrape), SCRAPE_DEADLINE_S)
        except TimeoutError:
            return None

    def close(self) -> None:
        scraper, self._scraper, self._scrape = self._scraper, None, None
        if scraper is not None:
            scraper.shutdown(wait=False, cancel_futures=True)


def route_template(scope: Scope) -> str:
    """The full template of the route that served the request, or UNMATCHED_ROUTE.

    The router leaves the matched route in the scope; an included router's route may know its template without
    the router's prefix (`/indexes/{index_id}` under `/v1`). Prefixes here are static, so the prefix is the
    request path's leading segments, as many as the path has beyond the template's."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return UNMATCHED_ROUTE
    segments = scope.get("path", "").rstrip("/").split("/")
    extra = len(segments) - len(template.rstrip("/").split("/"))
    if extra <= 0 or ":path}" in template:
        return template
    return "/".join(segments[: extra + 1]) + template


class HttpMetricsMiddleware:
    """Counts every HTTP response by method, route template and status, and times it (the outermost middleware:
    it sees the statuses that other middleware answer, 413 and 400, too)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it starts a response

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe(scope["method"], route_template(scope), status, time.perf_counter() - started)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics: requests, latencies, jobs, queues, workers, store bytes (counts and sizes only)",
    responses={503: {"description": "The sources did not answer in time"}},
)
async def metrics(request: Request) -> Response:
    body = await request.app.state.metrics.scrape()
    if body is None:
        return problem_response(
            503, "metrics-unavailable", "Metrics unavailable", "the metrics sources did not answer in time"
        )
    return Response(body, media_type=CONTENT_TYPE_LATEST)
