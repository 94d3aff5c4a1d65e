"""Experiment routes: the paper's protocol as one job (docs/decisions/0005-workflows.md)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from app.api.deps import JobQueueDep, SessionDep, SettingsDep, TenantDep
from app.api.v1.jobs import job_out
from app.config import Settings
from app.models import Job
from app.schemas.common import problems
from app.workflows.experiment import service
from app.workflows.experiment.schemas import ExperimentCreate, ExperimentOut
from app.workflows.experiment.state import KIND, describe
from app.workflows.resources import WorkflowResource, add_list_and_delete

router = APIRouter(tags=["experiments"])


def experiment_out(settings: Settings, job: Job) -> ExperimentOut:
    return ExperimentOut(
        id=job.id,
        name=(job.params or {}).get("name"),
        status=job.status,  # type: ignore[arg-type]
        params=job.params or {},
        job=job_out(job),
        created_at=job.created_at,
        **describe(settings, job),
    )


def _listed(job: Job, session: Session, settings: Settings) -> ExperimentOut:
    return experiment_out(settings, job)


EXPERIMENTS = WorkflowResource(
    kind=KIND,
    name="experiment",
    plural="experiments",
    item=ExperimentOut,
    summary=_listed,
    targets_index=False,
    delete_note="The model, dataset, index, report and audit it registered are resources of their own and stay.",
)


@router.post(
    "/experiments",
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


add_list_and_delete(router, EXPERIMENTS)


@router.get(
    "/experiments/{experiment_id}",
    response_model=ExperimentOut,
    responses=problems(404),
    summary="Read an experiment",
)
def get_experiment(
    experiment_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> ExperimentOut:
    return experiment_out(settings, EXPERIMENTS.find(session, experiment_id, tenant.id))
