"""Index routes: build an index (an asynchronous job), list and read indexes, query one."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response
from sqlalchemy.orm import Session

from app.api.deps import JobQueueDep, PageWindowDep, SessionDep, SettingsDep, TenantDep
from app.api.v1.jobs import job_out
from app.config import Settings
from app.models import Index, RegisteredModel
from app.schemas.common import Page, Problem, problems
from app.schemas.indexes import (
    IndexCreate,
    IndexOut,
    IndexSettingsOut,
    IndexSettingsUpdate,
    IndexStatus,
    ProjectionOut,
    QueryRequest,
    QueryResponse,
    RowsDelete,
    RowsDeleted,
)
from app.schemas.jobs import JobOut
from app.services import index_settings
from app.services import indexes as service
from app.services.queries import request as query_service

router = APIRouter(prefix="/indexes", tags=["indexes"])
_runtime_lock = threading.Lock()
# What a query may answer besides 404, 409 and 422: no query worker alive, or none answering in time.
QUERY_PROBLEMS = {
    **problems(404, 409, 422, 503),
    504: {"model": Problem, "description": "No query worker answered within query_timeout_s"},
}


def query_runtime(app: FastAPI):
    """The app's loaded models and opened stores, for the queries it computes itself: made on first use."""
    # The compute side imports torch: only an app without a query transport ever loads it.
    from app.services.queries.compute import QueryRuntime

    runtime = getattr(app.state, "query_runtime", None)
    if runtime is None:
        with _runtime_lock:
            runtime = getattr(app.state, "query_runtime", None)
            if runtime is None:
                runtime = app.state.query_runtime = QueryRuntime()
    return runtime


def in_process(app: FastAPI, settings: Settings) -> query_service.InProcess:
    """The answer of a payload computed in this process, on the app's runtime."""

    def compute(session: Session, payload: dict[str, Any]) -> dict[str, Any]:
        # As above: torch only where the API computes queries itself.
        from app.services.queries.compute import run_query

        return run_query(session, settings, query_runtime(app), payload)

    return compute


def evict_store(app: FastAPI, index_id: str) -> None:
    """Forget a deleted index's opened store, if this app has opened it (query workers notice on their own)."""
    runtime = getattr(app.state, "query_runtime", None)
    if runtime is not None:
        runtime.stores.evict(index_id)


def index_out(session: Session, index: Index) -> IndexOut:
    job = service.index_job(session, index)
    model = session.get(RegisteredModel, index.model_id)
    return IndexOut(
        id=index.id,
        model_id=index.model_id,
        dataset_id=index.dataset_id,
        status=index.status,  # type: ignore[arg-type]
        layer_selector=index.layer_selector,
        layers=list(index.layers),
        projection=ProjectionOut(**service.projection_out(index, model)),
        dtype=index.dtype,
        faiss_kind=index.faiss_kind,
        num_rows=index.num_rows,
        deleted_rows=index.deleted_rows or 0,
        size_bytes=index.size_bytes,
        feature_bytes_estimate=service.feature_bytes_estimate(index, model),
        manifest=index.manifest,
        job=job_out(job) if job is not None else None,
        fidelity=index.fidelity,
        created_at=index.created_at,
    )


@router.post(
    "",
    status_code=202,
    response_model=IndexOut,
    responses=problems(404, 422, 429, 503),
    summary="Build an index (asynchronous)",
    description=(
        "Records the index (status `pending`) and its build job (`queued`), then hands the job to the workers "
        "once both are committed. Follow `job` (GET /v1/jobs/{id} or GET /v1/indexes/{id}): progress is chunks "
        "done / total. The build featurizes every row of the dataset for every selected layer (projected "
        "per-sample gradients), fits DataInf statistics and builds one FAISS index per layer."
    ),
)
def create_index(
    body: IndexCreate, session: SessionDep, settings: SettingsDep, queue: JobQueueDep, tenant: TenantDep
) -> IndexOut:
    return index_out(session, service.create_index(session, settings, queue, body, tenant.id))


@router.get("", response_model=Page[IndexOut], responses=problems(422), summary="List indexes, newest first")
def list_indexes(
    session: SessionDep,
    tenant: TenantDep,
    window: PageWindowDep,
    model_id: Annotated[str | None, Query(max_length=32)] = None,
    dataset_id: Annotated[str | None, Query(max_length=32)] = None,
    status: Annotated[IndexStatus | None, Query()] = None,
) -> Page[IndexOut]:
    return window.page_of(
        session,
        Index,
        tenant.id,
        lambda index: index_out(session, index),
        model_id=model_id,
        dataset_id=dataset_id,
        status=status,
    )


@router.get("/{index_id}", response_model=IndexOut, responses=problems(404), summary="Read an index")
def get_index(index_id: str, session: SessionDep, tenant: TenantDep) -> IndexOut:
    return index_out(session, service.get_index(session, index_id, tenant.id))


@router.get(
    "/{index_id}/settings",
    response_model=IndexSettingsOut,
    responses=problems(404, 409),
    summary="Which settings the index's queries, audits and checks use",
    description=(
        "The mode (latest-report, pinned-report or defaults), the pinned report, and the settings an audit or "
        "check that names no layers, estimator or aggregation uses now, each field with its source. 409 when the "
        "pinned report's document cannot be read."
    ),
)
def get_index_settings(
    index_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> IndexSettingsOut:
    index = service.get_index(session, index_id, tenant.id)
    return IndexSettingsOut.model_validate(index_settings.settings_view(session, settings, index))


@router.put(
    "/{index_id}/settings",
    response_model=IndexSettingsOut,
    responses=problems(404, 409, 422),
    summary="Follow the latest layer report, pin one, or use the defaults",
    description=(
        "Queries, audits and checks take what they do not name (layers, estimator, aggregation, vote_k, "
        "correct_only) from the index's layer report's recommendation: the newest succeeded one "
        "(`latest-report`, the default) or the one pinned (`pinned-report` with `report_id`); `defaults` ignores "
        "reports. A report without a recommendation (a model near chance, nothing clearly above random) means "
        "the defaults, and answers say why. 422 when report_id is missing for pinned-report or given for another "
        "mode; 404 for an unknown report; 409 for a report that has not succeeded, is of another index or whose "
        "document fails its checksum."
    ),
)
def put_index_settings(
    index_id: str, body: IndexSettingsUpdate, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> IndexSettingsOut:
    index = service.get_index(session, index_id, tenant.id)
    index_settings.update_settings(session, index, body.mode, body.report_id)
    return IndexSettingsOut.model_validate(index_settings.settings_view(session, settings, index))


@router.post(
    "/{index_id}/query",
    response_model=QueryResponse,
    responses=QUERY_PROBLEMS,
    summary="Which training rows most helped / harmed each example",
    description=(
        "Featurizes the examples with the index's projection, scores every row per layer with the estimator, "
        "aggregates over the chosen layers per example and returns the top-k helpful and/or harmful rows with "
        "the per-layer scores and ranks behind each. Exact unless `approximate` is true. Layers, estimator, "
        "aggregation and vote_k not sent come from the index's settings (GET /v1/indexes/{id}/settings); "
        "`settings_source` and `settings` say what was used and where it came from. 409 when the index is "
        "not ready or no longer matches its model; 422 for layers the index does not hold. Computed by a query "
        "worker where the service runs them (INFLUENCE_QUERY_ON_WORKERS): 503 at once when none is alive or no "
        "worker can hold the index's model, 504 when none answers within query_timeout_s."
    ),
)
def query_index(
    index_id: str,
    body: QueryRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> QueryResponse:
    answer = query_service.query_index(
        session,
        settings,
        index_id,
        body,
        tenant.id,
        transport=getattr(request.app.state, "query_transport", None),
        in_process=in_process(request.app, settings),
    )
    return QueryResponse.model_validate(answer)


@router.delete(
    "/{index_id}",
    status_code=204,
    responses=problems(404),
    summary="Delete an index and its artifacts",
    description=(
        "Ends its build or compaction job (cancelled), deletes the index and removes its feature store, "
        "statistics and FAISS indexes from disk. The model and dataset stay."
    ),
)
def delete_index(
    index_id: str, request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    service.delete_index(
        session, settings, index_id, tenant.id, on_deleted=lambda deleted: evict_store(request.app, deleted)
    )
    return Response(status_code=204)


@router.post(
    "/{index_id}/rows/delete",
    response_model=RowsDeleted,
    responses=problems(404, 409, 422),
    summary="Delete rows from an index (tombstones)",
    description=(
        "Records the rows (dataset row positions) as deleted in the index's store at once: no later answer "
        "includes them, exact or approximate, and they count in no rank or aggregation. Their features stay on "
        "disk (and DataInf statistics still include them) until a compaction (POST /v1/indexes/{id}/compact) "
        "removes them for good. Deleting a row twice is harmless; every row at once is refused (delete the "
        "index)."
    ),
)
def delete_rows(
    index_id: str, body: RowsDelete, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> RowsDeleted:
    return RowsDeleted.model_validate(
        service.delete_rows(session, settings, index_id, body.row_ids, tenant.id)
    )


@router.post(
    "/{index_id}/compact",
    status_code=202,
    response_model=JobOut,
    responses=problems(404, 409, 429, 503),
    summary="Remove deleted rows for good (asynchronous)",
    description=(
        "Queues a compaction job: the store is rewritten without its deleted rows, DataInf statistics are "
        "refitted and FAISS indexes rebuilt. Queries keep being answered meanwhile (deleted rows already "
        "excluded). One compaction per index at a time (409 while one runs)."
    ),
)
def compact_index(
    index_id: str, session: SessionDep, settings: SettingsDep, queue: JobQueueDep, tenant: TenantDep
) -> JobOut:
    return job_out(service.create_compaction(session, settings, queue, index_id, tenant.id))
