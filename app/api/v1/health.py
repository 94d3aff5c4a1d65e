"""Liveness and readiness. /healthz: the process answers, with the service's version (the client compares
its own with it). /readyz: its dependencies answer too.

/healthz runs on the event loop itself (no thread pool token, no database): it answers while every worker
thread is busy with heavy requests, so a liveness probe never restarts a process that is merely loaded.
/readyz tells anyone whether the process is ready; only a caller with a valid API key (of any tenant) gets the
checks' details, which name server paths, versions and failures.
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.api.deps import ReadinessChecksDep, ValidKeyDep
from app.errors import problem_response
from app.schemas.common import problems
from influence.kernels import compiled_scoring_status
from influence.threads import ONE_THREAD
from influence.version import __version__

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = "ok"
    version: str = Field(
        __version__,
        description="The influence-service version: a client of another major version refuses to go on",
    )


class CheckOut(BaseModel):
    ok: bool
    detail: str
    seconds: float


class ScoringKernel(BaseModel):
    state: str = Field(description="off | enabled | compiling | ready | failed (scoring then uses BLAS)")
    failure: str | None = Field(None, description="Why the compiled kernel is unavailable")


class SmallBatches(BaseModel):
    one_thread: bool | None = Field(
        description="Whether small batches (a query's examples) are featurized on one intra-op thread, as this "
        "process measured faster on its first small batch; null until then"
    )
    measured_ms: dict[str, float] | None = Field(
        None, description="That measurement: median milliseconds on one thread and on all threads"
    )


class Readiness(BaseModel):
    status: str = Field(description="ready")
    checks: dict[str, CheckOut] | None = Field(
        None, description="Each check's result; only with a valid API key"
    )
    compiled_scoring: ScoringKernel | None = Field(
        None,
        description="The compiled query scoring kernel of this API process (informational: never fails "
        "readiness); only with a valid API key",
    )
    small_batches: SmallBatches | None = Field(
        None,
        description="How this API process runs query gradients (informational); only with a valid API key",
    )


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=problems(503),
    summary="Readiness: database (migrated), broker and a live worker",
    description="200 `{status: ready}` or 503 (problem+json) when any check fails. With a valid API key "
    "(`Authorization: Bearer <key>` or `X-API-Key`, any tenant's) the answer also carries each check's "
    "details (`checks`, in the 503 too) and this process' scoring setup; without one, the status only.",
)
def readyz(checks: ReadinessChecksDep, with_details: ValidKeyDep):
    results: dict[str, CheckOut] = {}
    for check in checks:
        started = time.perf_counter()
        try:
            detail, ok = check.probe(), True
        except Exception as exc:  # a failing dependency is the answer, not an error of this request
            detail, ok = str(exc) or exc.__class__.__name__, False
        results[check.name] = CheckOut(ok=ok, detail=detail, seconds=round(time.perf_counter() - started, 4))
    failing = [name for name, result in results.items() if not result.ok]
    if failing:
        reasons = "; ".join(f"{name}: {results[name].detail}" for name in failing)
        if not with_details:
            # The operator still learns why from the log; the anonymous caller learns only that.
            log.warning("not ready: %s", reasons)
            return problem_response(
                503,
                "not-ready",
                "Not ready",
                "a readiness check fails (send an API key for the checks' details)",
                instance="/readyz",
            )
        return problem_response(
            503,
            "not-ready",
            "Not ready",
            reasons,
            instance="/readyz",
            checks={name: result.model_dump() for name, result in results.items()},
        )
    if not with_details:
        return JSONResponse({"status": "ready"})
    readiness = Readiness(
        status="ready",
        checks=results,
        compiled_scoring=ScoringKernel(**compiled_scoring_status()),
        small_batches=SmallBatches(**ONE_THREAD.status()),
    )
    return JSONResponse(readiness.model_dump())
