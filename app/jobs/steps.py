"""The worker side of the job engine: a step's name -> its function, one step run with its failure recorded,
the restart of interrupted jobs, and whole jobs run inline (tests, scripts, benchmarks: no broker, no worker).

A step is idempotent (see app/jobs/index_build.py and app/jobs/run.py), so a message delivered twice, or a job
restarted by a worker that starts, does no harm. A step that raises fails its job (and a build's index); the
Celery task then ends normally, so the message is acknowledged and not retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import session_scope
from app.jobs import index_build, run
from app.jobs import state as job_state
from app.jobs.context import WorkerContext
from app.jobs.dispatch import InlineDispatcher, start_job
from app.jobs.kinds import INDEX_BUILD, KINDS, kind_of
from app.jobs.model_cache import ModelCache
from app.logs import request_id_context
from app.models import Index, Job

log = logging.getLogger(__name__)

StepFunction = Callable[..., str]

STEP_FUNCTIONS: dict[str, StepFunction] = {
    "plan": index_build.plan_build,
    "chunk": index_build.build_chunk,
    "finalize": index_build.finalize_build,
    "compact": index_build.compact_index,
    "run": run.run_job,
}


def describe_error(exc: BaseException) -> str:
    """What a failed job reports: the error's class and message (never a traceback)."""
    detail = getattr(exc, "detail", None) or str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {detail}"


def fail_job(ctx: WorkerContext, job_id: str, error: str) -> None:
    """Mark a job failed (no-op for one that already finished); a kind that `fails_target` fails its index too."""
    with session_scope(ctx.session_factory) as session:
        job = session.get(Job, job_id)
        if job is None:
            return
        if job_state.mark_failed(session, job_id, error) and job.target_id and kind_of(job.kind).fails_target:
            session.execute(update(Index).where(Index.id == job.target_id).values(status="failed"))


def job_request_id(ctx: WorkerContext, job_id: str) -> str | None:
    """The id of the request that created the job (None for a job created outside a request)."""
    with ctx.session_factory() as session:
        return session.scalar(select(Job.request_id).where(Job.id == job_id))


def run_step(ctx: WorkerContext, step: str, job_id: str, *args: Any) -> str:
    """Run one step; an error fails the job (recorded, logged) and the outcome is "failed". Every log line of
    the step carries the request id of the job."""
    with request_id_context(job_request_id(ctx, job_id)):
        try:
            return STEP_FUNCTIONS[step](ctx, job_id, *args)
        except Exception as exc:
            log.exception("job %s failed in step %s", job_id, step)
            fail_job(ctx, job_id, describe_error(exc))
            return "failed"


def recover_interrupted(ctx: WorkerContext) -> list[str]:
    """Start again every job that is queued or running: a worker that starts cannot tell whether the messages
    of those jobs died with a worker, and every step is idempotent. Returns the job ids."""
    with ctx.session_factory() as session:
        jobs = list(
            session.execute(select(Job.id, Job.kind).where(Job.kind.in_(KINDS), Job.status.in_(job_state.ACTIVE)))
        )
    for job_id, kind in jobs:
        start_job(ctx.dispatcher, kind, job_id)
    builds = sum(1 for _, kind in jobs if kind == INDEX_BUILD)
    if builds:
        log.info("re-planned %d interrupted index build(s)", builds)
    if len(jobs) > builds:
        log.info("restarted %d other interrupted job(s)", len(jobs) - builds)
    return [job_id for job_id, _ in jobs]


# ------------------------------------------------------------------------------------ without Celery


def inline_context(
    settings: Settings, session_factory: sessionmaker[Session], models: ModelCache | None = None
) -> WorkerContext:
    """A context whose dispatcher collects steps for `run_inline`."""
    return WorkerContext(settings, session_factory, models or ModelCache(), InlineDispatcher())


def run_build_inline(
    settings: Settings,
    session_factory: sessionmaker[Session],
    job_id: str,
    models: ModelCache | None = None,
    after_step: Callable[[int, int], None] | None = None,
) -> None:
    """Run a whole index build in this process (no broker, no worker): plan, every chunk, finalize.

    after_step(chunks_done, steps_known) is called between steps (a caller's progress and cancellation
    point: what it raises ends the run without failing the build)."""
    ctx = inline_context(settings, session_factory, models)
    ctx.dispatcher.send("plan", job_id)
    run_inline(ctx, job_id, after_step)


def run_job_inline(
    settings: Settings, session_factory: sessionmaker[Session], job_id: str, models: ModelCache | None = None
) -> None:
    """Run any job (build, compaction, workflow) in this process, step after step, without Celery."""
    ctx = inline_context(settings, session_factory, models)
    with session_factory() as session:
        job = session.get(Job, job_id)
        kind = job.kind if job is not None else INDEX_BUILD
    start_job(ctx.dispatcher, kind, job_id)
    run_inline(ctx, job_id)


def run_inline(
    ctx: WorkerContext, job_id: str, after_step: Callable[[int, int], None] | None = None
) -> None:
    """Run the steps ctx's InlineDispatcher holds, and those they send, in order; a step that raises fails the
    job and the error propagates (a caller sees it, unlike a worker's task)."""
    dispatcher = ctx.dispatcher
    assert isinstance(dispatcher, InlineDispatcher)
    chunks_done = 0
    while dispatcher.steps:
        step, step_job, args = dispatcher.steps.pop(0)
        with request_id_context(job_request_id(ctx, step_job)):
            try:
                STEP_FUNCTIONS[step](ctx, step_job, *args)
            except Exception as exc:
                fail_job(ctx, job_id, describe_error(exc))
                raise
        if after_step is not None:
            chunks_done += step == "chunk"
            pending = sum(1 for queued in dispatcher.steps if queued[0] == "chunk")
            after_step(chunks_done, chunks_done + pending + 1)
