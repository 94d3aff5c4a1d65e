"""Request dependencies: settings, the unit-of-work session, the tenant, the job queue, the readiness checks and
the page of a list a request asks for.

Everything comes from `request.app.state`, filled by `create_app`, so tests (and the embedded runner) build an
app with their own settings, queue and checks without touching globals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.errors import Unauthorized, Unavailable
from app.jobs.readiness import ReadinessCheck, database_check, unconfigured_worker_check
from app.jobs.state import JobQueue
from app.models import Tenant
from app.schemas.common import MAX_OFFSET, Page
from app.services import tenancy

T = TypeVar("T")


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


def get_readiness_checks(request: Request) -> list[ReadinessCheck]:
    """The database check plus the checks the app was built with (broker, live worker: see create_app).

    An app built without `readiness_checks` has nothing that vouches for its workers, so it reports a failing
    `worker` check rather than claiming readiness it cannot know.
    """
    extra = request.app.state.readiness_checks
    if extra is None:
        extra = [unconfigured_worker_check()]
    return [database_check(request.app.state.engine), *extra]


@dataclass(frozen=True)
class PageWindow:
    """The part of a list a request asks for: at most `limit` items from `offset`."""

    offset: int
    limit: int

    def page(self, items: Sequence[Any], total: int) -> Page[Any]:
        """The page of these items (the route's response model checks their type), out of `total`."""
        return Page(items=list(items), total=total, offset=self.offset, limit=self.limit)

    def page_of(
        self, session: Session, model: type[T], tenant_id: str, show: Callable[[T], Any], **equal: Any
    ) -> Page[Any]:
        """This window of the tenant's objects of `model`, newest first, each as `show` shows it; a keyword
        keeps the objects whose column of that name holds its value (None: no filter)."""
        rows, total = tenancy.owned_page(
            session, model, tenant_id, offset=self.offset, limit=self.limit, **equal
        )
        return self.page([show(row) for row in rows], total)


def page_window(
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> PageWindow:
    return PageWindow(offset=offset, limit=limit)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
TenantDep = Annotated[Tenant, Depends(get_tenant)]
JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]
ReadinessChecksDep = Annotated[list[ReadinessCheck], Depends(get_readiness_checks)]
ValidKeyDep = Annotated[bool, Depends(presents_valid_key)]
PageWindowDep = Annotated[PageWindow, Depends(page_window)]
