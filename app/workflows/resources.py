"""The routes every workflow resource shares: list (newest first, with filters), delete. A workflow's job row
is the resource; its id is the job's id and its files live under artifacts/jobs/<id>/."""

# No `from __future__ import annotations` here: FastAPI resolves a route's annotations from its module's
# globals, and the routes made below annotate with add_list_and_delete's locals (the filters, the id's alias).
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.api.deps import PageWindowDep, SessionDep, SettingsDep, TenantDep
from app.api.v1.jobs import job_out
from app.config import Settings
from app.jobs.resources import delete_job_resource, get_workflow_job
from app.models import Job
from app.schemas.common import Page, problems
from app.schemas.jobs import JobStatus


@dataclass(frozen=True)
class ListFilters:
    index_id: str | None = None
    status: str | None = None


def by_status(status: Annotated[JobStatus | None, Query()] = None) -> ListFilters:
    return ListFilters(status=status)


def by_index_and_status(
    index_id: Annotated[str | None, Query(max_length=32)] = None,
    status: Annotated[JobStatus | None, Query()] = None,
) -> ListFilters:
    return ListFilters(index_id=index_id, status=status)


@dataclass(frozen=True)
class WorkflowResource:
    """How a workflow's jobs appear over HTTP."""

    kind: str  # Job.kind
    name: str  # "audit": in summaries, and its path parameter is `<name>_id`
    plural: str  # "audits": the collection's path
    item: type[BaseModel]  # the response model of one resource
    #: The resource as a list shows it.
    summary: Callable[[Job, Session, Settings], Any]
    #: Whether its jobs target an index (the list then filters by index_id).
    targets_index: bool = True
    #: What DELETE removes besides the row and its folder, or keeps, said in its description.
    delete_note: str = ""
    #: How summaries name it, when not `name` (e.g. "layer report" for the report whose id is `report_id`).
    title: str = ""
    #: What refuses a deletion (a Conflict) before the row goes, e.g. a layer report an index pins.
    before_delete: Callable[[Session, Job], None] | None = None

    def find(self, session: Session, resource_id: str, tenant_id: str) -> Job:
        """The resource of this tenant (404 for another tenant's, another kind's or an unknown id)."""
        return get_workflow_job(session, resource_id, tenant_id, self.kind)


def job_fields(job: Job) -> dict[str, Any]:
    """The fields every workflow resource shows of its job: id, index_id, status, params, job, created_at."""
    return {
        "id": job.id,
        "index_id": job.target_id,
        "status": job.status,
        "params": job.params or {},
        "job": job_out(job),
        "created_at": job.created_at,
    }


def add_list_and_delete(router: APIRouter, resource: WorkflowResource, prefix: str = "") -> None:
    """GET {prefix}/{plural} (a page, newest first) and DELETE {prefix}/{plural}/{<name>_id}."""
    page_model = Page[resource.item]  # type: ignore[name-defined]
    filters = by_index_and_status if resource.targets_index else by_status
    id_param = f"{resource.name.replace(' ', '_')}_id"

    def list_resources(
        session: SessionDep,
        settings: SettingsDep,
        tenant: TenantDep,
        where: Annotated[ListFilters, Depends(filters)],
        window: PageWindowDep,
    ):
        return window.page_of(
            session,
            Job,
            tenant.id,
            lambda job: resource.summary(job, session, settings),
            kind=resource.kind,
            target_id=where.index_id,
            status=where.status,
        )

    def delete_resource(
        resource_id: Annotated[str, Path(alias=id_param)],
        session: SessionDep,
        settings: SettingsDep,
        tenant: TenantDep,
    ) -> Response:
        job = resource.find(session, resource_id, tenant.id)
        if resource.before_delete is not None:
            resource.before_delete(session, job)
        delete_job_resource(session, settings, job)
        return Response(status_code=204)

    router.add_api_route(
        f"{prefix}/{resource.plural}",
        list_resources,
        methods=["GET"],
        response_model=page_model,
        responses=problems(422),
        summary=f"List {resource.title or resource.name}s, newest first",
        name=f"list_{resource.plural}",
    )
    router.add_api_route(
        f"{prefix}/{resource.plural}/{{{id_param}}}",
        delete_resource,
        methods=["DELETE"],
        status_code=204,
        responses=problems(404, 409),
        summary=f"Delete {'an' if resource.name[0] in 'aeiou' else 'a'} {resource.name} and its files",
        description="409 while it is queued or running: cancel it first (POST /v1/jobs/{id}/cancel)."
        + (f" {resource.delete_note}" if resource.delete_note else ""),
        name=f"delete_{resource.name.replace(' ', '_')}",
    )
