"""Stage `index`: an index of the noisy dataset under the fine-tuned model, built inside this job: the build's
pipeline steps run inline (with one worker process, enqueueing the build and waiting for it would deadlock).
The index is found again as the one of that model and dataset, so a restarted stage resumes its build."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from app.errors import Conflict
from app.jobs import state as job_state
from app.jobs.run import JobCancelled
from app.jobs.steps import run_build_inline
from app.models import Index
from app.schemas.indexes import IndexCreate
from app.services.indexes import create_index
from app.workflows.experiment.stages.context import NoQueue, StageContext, sub_settings, wait_for


def _create_index(ctx: StageContext) -> str:
    registered = ctx.state.outputs["register"]
    params = ctx.params
    with ctx.run.session() as session:
        found = session.scalar(
            select(Index.id).where(
                Index.tenant_id == ctx.run.tenant_id,
                Index.model_id == registered["model_id"],
                Index.dataset_id == registered["dataset_id"],
            )
        )
        if found is not None:
            return found
        body = IndexCreate(
            model_id=registered["model_id"],
            dataset_id=registered["dataset_id"],
            layers=params["layers"],
            projection=params["projection"],
            dtype=params["dtype"],
            chunk_size=params.get("chunk_size"),
            max_length=params["max_length"],
        )
        return create_index(session, sub_settings(ctx.settings), NoQueue(), body, ctx.run.tenant_id).id


def _stop_build(ctx: StageContext, build_job_id: str, index_id: str) -> None:
    """The experiment was cancelled mid-build: its build job ends (cancelled) and so does the index."""
    with ctx.run.session() as session:
        job_state.mark_cancelled(session, build_job_id)
        session.execute(
            update(Index)
            .where(Index.id == index_id, Index.status.in_(("pending", "building")))
            .values(status="cancelled")
        )


def _build_index(ctx: StageContext, index_id: str, build_job_id: str) -> None:
    """The index build's pipeline steps (plan, every chunk, finalize) run here, one after another, with this
    job's progress (and cancellation check) between them."""
    try:
        run_build_inline(
            ctx.settings,
            ctx.run.ctx.session_factory,
            build_job_id,
            models=ctx.run.ctx.models,
            after_step=lambda done, known: ctx.at(done / max(1, known)),
        )
        wait_for(ctx, build_job_id, "index build")
    except JobCancelled:
        _stop_build(ctx, build_job_id, index_id)
        raise


def run(ctx: StageContext) -> dict[str, Any]:
    index_id = ctx.state.partial.get("index", {}).get("index_id") or _create_index(ctx)
    ctx.state.note("index", index_id=index_id)
    with ctx.run.session() as session:
        index = session.get(Index, index_id)
        if index is None:
            raise Conflict(f"the experiment's index {index_id!r} was deleted")
        build_job_id, status = index.job_id, index.status
    if status != "ready":
        _build_index(ctx, index_id, build_job_id)
    with ctx.run.session() as session:
        index = session.get(Index, index_id)
        if index is None or index.status != "ready":
            raise Conflict(f"the experiment's index {index_id!r} is {index.status if index else 'deleted'}")
        return {"index_id": index_id, "layers": list(index.layers), "build_job_id": build_job_id}
