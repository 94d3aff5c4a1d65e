"""A query worker's side of a query (worker/queries.py runs it as the `influence.query` task): what its process
keeps warm between queries, and one payload answered with the answer or the problem it raised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import make_engine, make_session_factory
from app.jobs.query_transport import problem_of
from app.logs import request_id_context
from app.models import RegisteredModel
from app.services.queries.compute import QueryRuntime, run_query


@dataclass
class QueryWorkerContext:
    """One per worker process: settings, a database, and the loaded models and opened stores queries share."""

    settings: Settings
    session_factory: sessionmaker[Session]
    runtime: QueryRuntime = field(default_factory=QueryRuntime)

    @classmethod
    def create(cls, settings: Settings) -> QueryWorkerContext:
        return cls(settings, make_session_factory(make_engine(settings.resolved_database_url)))


def serve_query(ctx: QueryWorkerContext, payload: dict[str, Any]) -> dict[str, Any]:
    """{"answer": the QueryResponse dict} or {"problem": what the API answers for the error raised}; an
    unexpected error is raised (the task fails, the API answers 500)."""
    request_id = payload.get("request_id") if isinstance(payload, dict) else None
    with request_id_context(request_id):
        ctx.runtime.stores.evict_removed()
        try:
            # Reads only: the session is rolled back and closed on the way out.
            with ctx.session_factory() as session:
                drop_deleted_models(session, ctx.runtime.models)
                return {"answer": run_query(session, ctx.settings, ctx.runtime, payload)}
        except Exception as exc:
            problem = problem_of(exc)
            if problem is None:
                raise
            return {"problem": problem}


def drop_deleted_models(session: Session, models) -> None:
    """Unload the models deleted since they were loaded: the API that deleted one cannot reach this process, and
    an LLM's weights are too large to keep until the cache pushes them out."""
    held = models.model_ids()
    if not held:
        return
    alive = set(session.scalars(select(RegisteredModel.id).where(RegisteredModel.id.in_(held))))
    for model_id in held - alive:
        models.drop(model_id)
