"""Jobs: their life cycle in the database (the source of truth) and the queue they are handed to.

    queued --mark_running--> running --mark_succeeded--> succeeded
       |                        |------mark_failed-----> failed
       |                        '------mark_cancelled--> cancelled   (the worker saw cancel_requested)
       '--request_cancel--> cancelled                               (never started)

State changes are conditional UPDATEs (`... WHERE status IN (...)`), so an API cancelling a queued job and a
worker claiming it cannot both win, on SQLite and PostgreSQL alike. Every helper works on the caller's
session and never commits: the caller's unit of work does (a worker: one short `session_scope` per step).
A job is handed to the queue only after the transaction that created it commits (`enqueue_after_commit`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit
from app.errors import Conflict, NotFound, TooManyRequests, Unavailable
from app.logs import current_request_id
from app.models import Job, Tenant, utcnow

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
MAX_ERROR_CHARS = 4000


class JobQueue(Protocol):
    """Hands a committed job to the workers (the Celery implementation: app/jobs/dispatch.py)."""

    def enqueue(self, job: Job) -> None: ...


FinishHook = Callable[[Session, Job], None]
_FINISH_HOOKS: dict[str, list[FinishHook]] = {}


def register_finish_hook(kind: str, hook: FinishHook) -> None:
    """Run `hook(session, job)` whenever a job of `kind` reaches a final state through these helpers, in the
    same transaction: e.g. the index of a build job cancelled while queued (it never reaches a worker) or
    refused by the broker gets its status from here. Registering the same hook twice has no effect."""
    hooks = _FINISH_HOOKS.setdefault(kind, [])
    if hook not in hooks:
        hooks.append(hook)


def _finished(session: Session, job_id: str) -> None:
    job = session.get(Job, job_id)
    if job is not None:
        for hook in _FINISH_HOOKS.get(job.kind, ()):
            hook(session, job)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every stored moment is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def duration_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Seconds from start to finish (to now while running); None before the start."""
    started = as_utc(job.started_at)
    if started is None:
        return None
    end = as_utc(job.finished_at) or (now or utcnow())
    return max(0.0, (end - started).total_seconds())


def create_job(
    session: Session,
    kind: str,
    *,
    tenant_id: str,
    target_id: str | None = None,
    params: dict[str, Any] | None = None,
    total: int = 0,
    max_active: int | None = None,
) -> Job:
    """A queued job of `tenant_id`, flushed (its id is known); enqueue it with `enqueue_after_commit`.

    With `max_active`, the tenant may have at most that many jobs queued or running: one more is refused with
    TooManyRequests (429). The check is atomic: the tenant's row is written first, which serialises job
    creation per tenant (a row lock on PostgreSQL, the write lock on SQLite) until the transaction ends.
    The job carries the id of the request that creates it (app/logs.py), for the worker's log lines.
    """
    if max_active is not None:
        session.execute(
            update(Tenant)
            .where(Tenant.id == tenant_id)
            .values(name=Tenant.name)
            .execution_options(synchronize_session=False)
        )
        active = session.scalar(
            select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
        )
        if (active or 0) >= max_active:
            raise TooManyRequests(
                f"this tenant has {active} jobs queued or running, the most it may have at once "
                f"(max_active_jobs_per_tenant = {max_active}); wait for one to finish or cancel one"
            )
    job = Job(
        kind=kind,
        tenant_id=tenant_id,
        status="queued",
        target_id=target_id,
        params=params or {},
        total=total,
        done=0,
        request_id=current_request_id(),
    )
    session.add(job)
    session.flush()
    return job


def enqueue_after_commit(session: Session, queue: JobQueue, job: Job) -> None:
    """Hand `job` to the queue once the current unit of work commits (never a job whose row may vanish).

    If the broker refuses it, the job is marked failed in its own transaction (so it does not sit `queued`
    forever) and Unavailable (503) is raised: the rows stay committed, the job says why it never ran.
    """

    def enqueue() -> None:
        try:
            queue.enqueue(job)
        except Exception as exc:
            log.exception("could not enqueue job %s", job.id)
            _fail_unqueued(session, job.id, f"could not enqueue the job: {exc}")
            raise Unavailable(
                f"job {job.id} was recorded but could not be queued (it is marked failed): {exc}"
            ) from exc

    after_commit(session, enqueue)


def submit_job(
    session: Session, settings: Settings, queue: JobQueue, kind: str, *, tenant_id: str, **fields: Any
) -> Job:
    """create_job under the tenant's limit of active jobs (settings.max_active_jobs_per_tenant), handed to the
    queue once the request commits. fields: target_id, params, total."""
    job = create_job(
        session, kind, tenant_id=tenant_id, max_active=settings.max_active_jobs_per_tenant, **fields
    )
    enqueue_after_commit(session, queue, job)
    return job


def _fail_unqueued(session: Session, job_id: str, error: str) -> None:
    bind = session.get_bind()
    with Session(bind=bind) as own:
        mark_failed(own, job_id, error)
        own.commit()


def _job(session: Session, job_id: str) -> Job:
    """A job by id, whoever owns it (workers and the helpers below; the API uses get_job)."""
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id!r} does not exist")
    return job


def get_job(session: Session, job_id: str, tenant_id: str) -> Job:
    """A job of this tenant (NotFound for another tenant's job, as for an unknown id)."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id!r} does not exist")
    return job


def _transition(session: Session, job_id: str, allowed: Sequence[str], **values: Any) -> bool:
    """UPDATE the job WHERE its status is one of `allowed`; True if it changed."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(allowed))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    changed = bool(result.rowcount)
    if changed:
        job = session.get(Job, job_id)
        if job is not None:
            session.refresh(job)
    return changed


def mark_running(session: Session, job_id: str) -> Job | None:
    """Claim a job for a worker: queued -> running, or a redelivered running job (attempts + 1).

    Returns None when the job is finished or cancelled (the worker then skips it); raises NotFound for an
    unknown id. `started_at` is the first start: a redelivery keeps it.
    """
    job = _job(session, job_id)
    now = utcnow()
    if _transition(session, job_id, ("queued",), status="running", started_at=now, attempts=Job.attempts + 1):
        return session.get(Job, job_id)
    if _transition(session, job_id, ("running",), attempts=Job.attempts + 1):
        return session.get(Job, job_id)
    session.refresh(job)
    return None


def update_progress(session: Session, job_id: str, done: int, total: int | None = None) -> bool:
    """Record progress of a running job; returns True when cancellation was requested (stop soon)."""
    values: dict[str, Any] = {"done": int(done)}
    if total is not None:
        values["total"] = int(total)
    _transition(session, job_id, ("running",), **values)
    return is_cancel_requested(session, job_id)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    row = session.execute(select(Job.status, Job.cancel_requested).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise NotFound(f"job {job_id!r} does not exist")
    status, requested = row
    return bool(requested) or status == "cancelled"


def mark_succeeded(session: Session, job_id: str, result: dict[str, Any] | None = None) -> bool:
    """running -> succeeded with its result; done is set to total. False if the job was not running."""
    job = _job(session, job_id)
    changed = _transition(
        session,
        job_id,
        ("running",),
        status="succeeded",
        result=result,
        done=max(job.done, job.total),
        finished_at=utcnow(),
    )
    if changed:
        _finished(session, job_id)
    return changed


def mark_failed(session: Session, job_id: str, error: str) -> bool:
    """queued|running -> failed with a message (trimmed). False if the job had already finished."""
    _job(session, job_id)
    message = error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."
    changed = _transition(session, job_id, ACTIVE, status="failed", error=message, finished_at=utcnow())
    if changed:
        _finished(session, job_id)
    return changed


def mark_cancelled(session: Session, job_id: str) -> bool:
    """queued|running -> cancelled (a worker honouring a request). False if the job had already finished."""
    _job(session, job_id)
    changed = _transition(
        session, job_id, ACTIVE, status="cancelled", cancel_requested=True, finished_at=utcnow()
    )
    if changed:
        _finished(session, job_id)
    return changed


def request_cancel(session: Session, job_id: str, tenant_id: str) -> Job:
    """Cancel a job of this tenant: a queued one is cancelled at once, a running one is asked to stop (its
    worker checks `cancel_requested` between chunks). A finished job cannot be cancelled (Conflict)."""
    job = get_job(session, job_id, tenant_id)
    if _transition(
        session, job_id, ("queued",), status="cancelled", cancel_requested=True, finished_at=utcnow()
    ):
        _finished(session, job_id)
        return job
    if _transition(session, job_id, ("running",), cancel_requested=True):
        return job
    session.refresh(job)
    raise Conflict(f"job {job_id!r} has already finished ({job.status}); there is nothing to cancel")
