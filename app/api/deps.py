"""Request dependencies: settings, the unit-of-work session, the job queue and the readiness checks.

Everything comes from `request.app.state`, filled by `create_app`, so tests (and the embedded runner) build an
app with their own settings, queue and checks without touching globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.errors import Unavailable
from app.services.jobs import JobQueue


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_session(request: Request) -> Iterator[Session]:
    """The request's unit of work: commit when the route returns, roll back when anything raises.

    Used with `scope="function"`, so the commit happens before the response is sent: a failed commit becomes
    an error response, and a client that gets 201 can read what it created. Commit hooks (enqueueing a job)
    run after the commit; rollback hooks (deleting an artifact written for this request) after a rollback.
    """
    with session_scope(request.app.state.session_factory) as session:
        yield session


def get_job_queue(request: Request) -> JobQueue:
    queue = request.app.state.job_queue
    if queue is None:
        raise Unavailable("no job queue is configured: this API process cannot run jobs")
    return queue


@dataclass(frozen=True)
class ReadinessCheck:
    """One dependency of readiness: `probe` returns a short detail when healthy and raises when not."""

    name: str
    probe: Callable[[], str]


def database_check(engine: Engine) -> ReadinessCheck:
    """The database answers and its schema is migrated (an `alembic_version` row exists)."""

    def probe() -> str:
        with engine.connect() as connection:
            try:
                version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception as exc:
                raise RuntimeError("the schema is not migrated (run `python -m app.migrate`)") from exc
        if version is None:
            raise RuntimeError("the schema is not migrated (run `python -m app.migrate`)")
        return f"{engine.dialect.name}, schema revision {version}"

    return ReadinessCheck("database", probe)


def get_readiness_checks(request: Request) -> list[ReadinessCheck]:
    """The database check plus the checks the app was built with (broker, live worker: see create_app).

    An app built without `readiness_checks` has nothing that vouches for its workers, so it reports a failing
    `worker` check rather than claiming readiness it cannot know.
    """
    checks = [database_check(request.app.state.engine)]
    extra = request.app.state.readiness_checks
    if extra is None:

        def unconfigured() -> str:
            raise RuntimeError("no broker/worker readiness check is configured for this process")

        checks.append(ReadinessCheck("worker", unconfigured))
    else:
        checks.extend(extra)
    return checks


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]
ReadinessChecksDep = Annotated[list[ReadinessCheck], Depends(get_readiness_checks)]
