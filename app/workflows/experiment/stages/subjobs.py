"""The workflow jobs an experiment runs on its index (the layer report, the retraining check's audit): created
by their own service (the same checks as their POST routes), tagged with this experiment, run inside this job.

A sub-job is found again by its tag (app.jobs.run.PARENT_PARAM), so a crash between creating it and recording
it never creates it twice. It is created without the per-tenant limit of active jobs: the experiment was
admitted under it, and its sub-jobs run inside its own worker slot."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs.run import PARENT_PARAM, run_job
from app.jobs.steps import describe_error, fail_job
from app.models import Job
from app.schemas.references import ReferenceSet
from app.workflows.experiment.stages.context import StageContext, sub_settings, wait_for


def reference_set(spec: dict[str, Any]) -> ReferenceSet:
    """The ReferenceSet a resolved reference spec came from (the sub-job's service resolves it again, against
    the noisy dataset, which numbers its classes as the training dataset does)."""
    if spec.get("examples") is not None:
        return ReferenceSet(examples=spec["examples"])
    if spec.get("rows") is not None:
        return ReferenceSet(dataset_id=spec["dataset_id"], rows=spec["rows"])
    return ReferenceSet(dataset_id=spec["dataset_id"], limit=spec["limit"])


def _find_subjob(session: Session, ctx: StageContext, kind: str, target_id: str) -> str | None:
    jobs = session.scalars(
        select(Job).where(Job.tenant_id == ctx.run.tenant_id, Job.kind == kind, Job.target_id == target_id)
    ).all()
    mine = [job.id for job in jobs if (job.params or {}).get(PARENT_PARAM) == ctx.run.job_id]
    return mine[0] if mine else None


def subjob(
    ctx: StageContext, stage: str, kind: str, index_id: str, create: Callable[[Session, Settings], Job]
) -> str:
    """The stage's sub-job: found again (partial state, or by its experiment tag) or created now by its own
    service, tagged with this experiment in the same transaction."""
    job_id = ctx.state.partial.get(stage, {}).get(f"{kind}_id")
    if job_id is None:
        with ctx.run.session() as session:
            job_id = _find_subjob(session, ctx, kind, index_id)
            if job_id is None:
                job = create(session, sub_settings(ctx.settings))
                job.params = {**(job.params or {}), PARENT_PARAM: ctx.run.job_id}
                session.flush()
                job_id = job.id
        ctx.state.note(stage, **{f"{kind}_id": job_id})
    return job_id


def run_subjob(ctx: StageContext, job_id: str, what: str) -> Job:
    """Run a workflow job of this experiment inside this job (app.jobs.run.run_job) and wait for its end."""
    try:
        run_job(ctx.run.ctx, job_id)
    except Exception as exc:
        fail_job(ctx.run.ctx, job_id, describe_error(exc))
        raise
    return wait_for(ctx, job_id, what)
