"""Job routes: read a job's state and progress, list jobs, cancel one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import PageWindowDep, SessionDep, TenantDep
from app.jobs import state as service
from app.models import Job
from app.schemas.common import Page, problems
from app.schemas.jobs import JobOut, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,  # type: ignore[arg-type]
        target_id=job.target_id,
        done=job.done,
        total=job.total,
        progress=min(1.0, job.done / job.total) if job.total else None,
        cancel_requested=job.cancel_requested,
        attempts=job.attempts,
        params=job.params or {},
        result=job.result,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        duration_s=service.duration_seconds(job),
    )


@router.get("", response_model=Page[JobOut], responses=problems(422), summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    window: PageWindowDep,
    status: Annotated[JobStatus | None, Query()] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    target_id: Annotated[str | None, Query(max_length=32)] = None,
) -> Page[JobOut]:
    return window.page_of(session, Job, tenant.id, job_out, status=status, kind=kind, target_id=target_id)


@router.get("/{job_id}", response_model=JobOut, responses=problems(404), summary="Read a job")
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return job_out(service.get_job(session, job_id, tenant.id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    responses=problems(404, 409),
    summary="Cancel a job",
    description=(
        "A queued job is cancelled at once. A running job is asked to stop: `cancel_requested` becomes true "
        "and its worker ends it (status `cancelled`) at its next checkpoint. A finished job answers 409."
    ),
)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobOut:
    return job_out(service.request_cancel(session, job_id, tenant.id))
