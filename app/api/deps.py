"""Request dependencies: settings, the unit-of-work session, the tenant, the job queue and the readiness checks.

Everything comes from `request.app.state`, filled by `create_app`, so tests (and the embedded runner) build an
app with their own settings, queue and checks without touching globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.errors import Unauthorized, Unavailable
from app.models import Tenant
from app.services import tenancy
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


# Declared as security schemes, so the OpenAPI document says how to authenticate; either header works.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <API key>`")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <API key>`")


def get_tenant(
    session: Annotated[Session, Depends(get_session, scope="function")],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
) -> Tenant:
    """The tenant of the request's API key (401 without a valid one). Every /v1 route depends on it, and every
    service call is given its id: nothing of another tenant is ever read, listed, changed or confirmed."""
    token = bearer.credentials if bearer is not None else api_key
    if not token:
        raise Unauthorized("an API key is required: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    tenant = tenancy.authenticate(session, token.strip())
    if tenant is None:
        raise Unauthorized("the API key is not valid (unknown, malformed or revoked)")
    return tenant


def presents_valid_key(request: Request) -> bool:
    """Whether the request carries a valid API key of any tenant, for the routes that stay open but say more
    to a tenant (/readyz). Never raises: a missing, wrong or uncheckable key (the database down or not
    migrated) is just no key."""
    authorization = request.headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    token = credentials if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
    if not token.strip():
        return False
    try:
        with session_scope(request.app.state.session_factory) as session:
            return tenancy.authenticate(session, token.strip()) is not None
    except SQLAlchemyError:
        return False


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
TenantDep = Annotated[Tenant, Depends(get_tenant)]
JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]
ReadinessChecksDep = Annotated[list[ReadinessCheck], Depends(get_readiness_checks)]
ValidKeyDep = Annotated[bool, Depends(presents_valid_key)]
