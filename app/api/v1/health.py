"""Liveness and readiness. /healthz: the process answers. /readyz: its dependencies answer too."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.api.deps import ReadinessChecksDep
from app.errors import problem_response
from app.schemas.common import problems

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = "ok"


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
    checks: dict[str, CheckOut]
    compiled_scoring: ScoringKernel = Field(
        description="The compiled query scoring kernel of this API process (informational: never fails readiness)"
    )
    small_batches: SmallBatches = Field(description="How this API process runs query gradients (informational)")


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=problems(503),
    summary="Readiness: database (migrated), broker and a live worker",
    description="503 (problem+json, with the same `checks` member) when any check fails.",
)
def readyz(checks: ReadinessChecksDep):
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
        return problem_response(
            503,
            "not-ready",
            "Not ready",
            "; ".join(f"{name}: {results[name].detail}" for name in failing),
            instance="/readyz",
            checks={name: result.model_dump() for name, result in results.items()},
        )
    from influence.kernels import compiled_scoring_status
    from influence.threads import ONE_THREAD

    readiness = Readiness(
        status="ready",
        checks=results,
        compiled_scoring=ScoringKernel(**compiled_scoring_status()),
        small_batches=SmallBatches(**ONE_THREAD.status()),
    )
    return JSONResponse(readiness.model_dump())
