"""Experiment routes: the paper's protocol as one job (docs/decisions/0005-workflows.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import JobQueueDep, SessionDep, SettingsDep, TenantDep
from app.api.v1.jobs import job_out
from app.config import Settings
from app.models import Job
from app.schemas.common import MAX_OFFSET, Page, problems
from app.schemas.experiments import ExperimentCreate, ExperimentOut
from app.services import experiments as service

router = APIRouter(prefix="/experiments", tags=["experiments"])


def experiment_out(settings: Settings, job: Job) -> ExperimentOut:
    return ExperimentOut(
        id=job.id,
        name=(job.params or {}).get("name"),
        status=job.status,  # type: ignore[arg-type]
        params=job.params or {},
        job=job_out(job),
        created_at=job.created_at,
        **service.describe(settings, job),
    )


@router.post(
    "",
    status_code=202,
    response_model=ExperimentOut,
    responses=problems(404, 422, 429, 503),
    summary="Run the paper's protocol: noise, LoRA fine-tune, index, layer report, retraining (asynchronous)",
    description=(
        "Flips exactly round(noise_rate x n) training labels with the seed, fine-tunes the base model with LoRA "
        "on the noisy rows (keeping the epoch with the lowest loss on the reference set), registers the noisy "
        "rows as a new dataset (its noisy column records the flipped rows) and the checkpoint as a new model, "
        "builds their index, makes a layer report against the injected noise and, when `retraining.enabled`, "
        "removes the lowest-ranked rows, retrains and compares the held-out accuracy with random removal and "
        "the oracle. Follow `stage` and `job.progress` on GET /v1/experiments/{id}; a restarted worker resumes "
        "from the first unfinished stage."
    ),
)
def create_experiment(
    body: ExperimentCreate, session: SessionDep, settings: SettingsDep, queue: JobQueueDep, tenant: TenantDep
) -> ExperimentOut:
    return experiment_out(settings, service.create_experiment(session, settings, queue, body, tenant.id))


@router.get(
    "", response_model=Page[ExperimentOut], responses=problems(422), summary="List experiments, newest first"
)
def list_experiments(
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[ExperimentOut]:
    rows, total = service.list_experiments(session, tenant_id=tenant.id, offset=offset, limit=limit)
    return Page[ExperimentOut](
        items=[experiment_out(settings, job) for job in rows], total=total, offset=offset, limit=limit
    )


@router.get(
    "/{experiment_id}", response_model=ExperimentOut, responses=problems(404), summary="Read an experiment"
)
def get_experiment(
    experiment_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> ExperimentOut:
    return experiment_out(settings, service.get_experiment(session, experiment_id, tenant.id))


@router.delete(
    "/{experiment_id}",
    status_code=204,
    responses=problems(404, 409),
    summary="Delete an experiment and its folder",
    description=(
        "409 while it is queued or running (cancel it first: POST /v1/jobs/{id}/cancel). The model, dataset, "
        "index, report and audit it registered are resources of their own and stay."
    ),
)
def delete_experiment(
    experiment_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    service.delete_experiment(session, settings, experiment_id, tenant.id)
    return Response(status_code=204)
