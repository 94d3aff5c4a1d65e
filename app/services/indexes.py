"""Index registration: validate the request against the registered model and dataset, record the index and its
build job, and hand the job to the queue once both rows are committed.

Everything checked here is cheap (no weights are loaded): the model's layers come from its registration, the
feature dimensions from the projectors, which need only layer shapes. The build itself runs in the workers
(app/jobs/index_build.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

import influence
from app.config import Settings
from app.db import after_commit
from app.errors import Conflict, Invalid
from app.jobs import state as job_state
from app.jobs.kinds import INDEX_BUILD, INDEX_COMPACT
from app.models import Dataset, Index, Job, RegisteredModel, new_id, utcnow
from app.schemas.indexes import IndexCreate
from app.services.datasets import get_dataset
from app.services.models import get_model, refuse_over_budget, registered_estimate, require_worker_capacity
from app.services.tenancy import owned
from app.stores import index_dir, open_store
from influence.errors import InvalidInputError
from influence.estimators import estimator_class, fitted_estimator_names
from influence.files import remove_tree

log = logging.getLogger(__name__)


def layer_from_dict(data: dict[str, Any]):
    """An influence.Layer from the registration's Layer.to_dict() record."""
    fields = set(influence.Layer.__dataclass_fields__)
    values = {key: value for key, value in data.items() if key in fields}
    values["groups"] = tuple(values.get("groups") or ())
    return influence.Layer(**values)


def registered_layers(model) -> list:
    return [layer_from_dict(record) for record in model.layers]


def index_sources(session: Session, index: Index) -> tuple[RegisteredModel, Dataset]:
    """The model and dataset an index was built from (409 if either was removed since)."""
    model = session.get(RegisteredModel, index.model_id)
    dataset = session.get(Dataset, index.dataset_id)
    if model is None or dataset is None:
        raise Conflict(f"index {index.id!r} names a model or dataset that no longer exists")
    return model, dataset


def projection_of(index: Index) -> dict[str, Any]:
    """The projection an index row asks for, as influence.ProjectionSpec.from_dict takes it: kind, dim, seed,
    the `auto` threshold and the request's per-unit overrides. Rows from before per-unit projections (and any
    non-auto projection without overrides) give the old {kind, dim, seed}. The one place an Index row becomes
    a projection: builds, estimates and answers all go through it."""
    out: dict[str, Any] = {
        "kind": index.projection_kind,
        "dim": int(index.projection_dim),
        "seed": int(index.projection_seed),
    }
    if index.exact_max_params is not None:
        out["exact_max_params"] = int(index.exact_max_params)
    if index.projection_units:
        out["units"] = {str(name): dict(unit) for name, unit in index.projection_units.items()}
    return out


def projection_spec(projection: dict[str, Any]):
    """influence.ProjectionSpec of a projection mapping (InvalidInputError -> 422 naming `projection`)."""
    try:
        return influence.ProjectionSpec.from_dict(projection)
    except InvalidInputError as exc:
        message = str(exc)
        raise Invalid(message if message.startswith("projection") else f"projection: {message}") from exc


def feature_dims(layers: Sequence, projection: dict[str, Any]) -> dict[str, int]:
    """Feature size per layer under a projection, per-unit overrides included (InvalidInputError for impossible
    combinations, e.g. an identity projection too large)."""
    spec = projection_spec(projection)
    return {layer.name: influence.make_projector(spec, layer).dim for layer in layers}


def unit_projections(index: Index, model) -> dict[str, dict[str, Any]]:
    """Per layer unit of the index: {kind, dim, features} actually used. From the manifest once the build has
    planned the store (its projection names every unit of an `auto` spec, its layers their dims); before
    that, resolved from the row's projection and the model's registered layers."""

    manifest = index.manifest or {}
    built = bool(manifest.get("projection") and manifest.get("layers"))
    projection = manifest["projection"] if built else projection_of(index)
    spec = projection_spec(projection)
    layers = _chosen_layers(model, index.layers)
    if built:
        features = {str(layer["name"]): int(layer["dim"]) for layer in manifest["layers"]}
    else:
        features = feature_dims(layers, projection)
    return {
        layer.name: {**spec.for_layer(layer).to_dict(), "features": features[layer.name]}
        for layer in layers
        if layer.name in features
    }


def _chosen_layers(model, names: Sequence[str]) -> list:
    wanted = set(names)
    return [layer for layer in registered_layers(model) if layer.name in wanted] if model is not None else []


def projection_out(index: Index, model) -> dict[str, Any]:
    """The index's projection as IndexOut shows it: kind, dim, seed, the auto threshold and every unit's
    projection (unit_projections)."""
    spec = projection_spec(projection_of(index))
    return {
        "kind": spec.kind,
        "dim": spec.dim,
        "seed": spec.seed,
        "exact_max_params": spec.exact_max_params if spec.kind == "auto" else None,
        "units": unit_projections(index, model),
    }


def get_index(session: Session, index_id: str, tenant_id: str) -> Index:
    """An index of this tenant (NotFound for another tenant's, as for an unknown id)."""
    return owned(session, Index, index_id, tenant_id, "index")


def index_job(session: Session, index: Index) -> Job | None:
    return session.get(Job, index.job_id) if index.job_id else None


def feature_bytes_estimate(index: Index, model) -> int:
    """Bytes of the stored features: rows x (sum of the layers' dims) x the dtype's size. A token-row layer (the
    exact embedding) holds one vector per distinct token of a row, so it counts here as one token per row: the
    index's size_bytes says what is on disk."""
    if index.manifest:
        dims = sum(int(layer["dim"]) for layer in index.manifest["layers"])
    else:
        dims = sum(feature_dims(_chosen_layers(model, index.layers), projection_of(index)).values())
    rows = index.num_rows or 0
    return rows * dims * (2 if index.dtype == "float16" else 4)


def create_index(
    session: Session, settings: Settings, queue: job_state.JobQueue, body: IndexCreate, tenant_id: str
) -> Index:
    """Record an index (pending) and its build job (queued); the job is enqueued after the commit. The model
    and the dataset must be the tenant's own; the tenant may have at most max_active_jobs_per_tenant jobs."""
    model = get_model(session, body.model_id, tenant_id)
    dataset = get_dataset(session, body.dataset_id, tenant_id)
    if model.task != dataset.task:
        raise Invalid(
            f"model {model.id!r} is a {model.task} model but dataset {dataset.id!r} holds {dataset.task} data"
        )
    if dataset.row_count < 1:
        raise Invalid(f"dataset {dataset.id!r} has no rows")
    if model.task == "classification":
        classes = int(model.num_labels or 2)
        bad = [label for label in dataset.labels if not isinstance(label, int) or not 0 <= label < classes]
        if bad:
            raise Invalid(
                f"dataset {dataset.id!r} has labels {bad[:5]} outside the model's {classes} classes [0, {classes})"
            )
    layers = influence.select_layers(registered_layers(model), body.layers)  # UnknownLayerError -> 422
    chunk_size = body.chunk_size or settings.chunk_size
    max_length = body.max_length or settings.max_length
    spec, dims = fitting_projection(settings, body, layers, max_length)
    # The settings may have changed since the model was registered: its estimate is held to today's budget.
    estimate = registered_estimate(settings, model, layers, projection=spec, max_length=max_length)
    refuse_over_budget(settings, model.name, estimate)
    num_chunks = math.ceil(dataset.row_count / chunk_size)

    index_id = new_id()
    index = Index(
        id=index_id,
        tenant_id=tenant_id,
        model_id=model.id,
        dataset_id=dataset.id,
        layer_selector=body.layers,
        layers=[layer.name for layer in layers],
        projection_kind=spec.kind,
        projection_dim=spec.dim,
        projection_seed=spec.seed,
        projection_units={name: unit.to_dict() for name, unit in spec.units.items()} or None,
        exact_max_params=spec.exact_max_params if spec.kind == "auto" else None,
        dtype=body.dtype,
        faiss_kind=body.faiss_kind,
        status="pending",
        store_path=f"indexes/{index_id}/store",
        num_rows=dataset.row_count,
        size_bytes=0,
    )
    session.add(index)
    session.flush()
    job = job_state.submit_job(
        session,
        settings,
        _FailIndexOnRefusal(queue, session, index_id),
        INDEX_BUILD,
        tenant_id=tenant_id,
        target_id=index_id,
        params={
            "chunk_size": chunk_size,
            "max_length": max_length,
            "batch_size": settings.batch_size,
            # How the chunks featurize: memory bounds, and the dtype the features are computed in (queries
            # featurize in the same one, from the store's manifest).
            "max_tokens_per_batch": settings.max_tokens_per_batch,
            "head_chunk_tokens": settings.head_chunk_tokens,
            "compute_dtype": settings.compute_dtype,
            "activation_checkpointing": settings.activation_checkpointing,
            "num_layers": len(layers),
            "feature_dim_total": sum(dims.values()),
        },
        total=num_chunks,
    )
    index.job_id = job.id
    session.flush()
    return index


def fitting_projection(
    settings: Settings, body: IndexCreate, layers: Sequence, max_length: int
) -> tuple[Any, dict[str, int]]:
    """(the projection spec, feature size per layer) of a request, checked against the budgets (422 naming
    `projection`). An `auto` projection whose exact_max_params the request left at its default makes fewer units
    exact, the largest first, until the feature and statistics budgets hold: the default must build on a
    billion-parameter model (docs/benchmarks.md, item 14). The index records the threshold it got."""
    spec = projection_spec(body.projection.spec_dict())
    check_projection_units(spec, layers)
    # InvalidInputError -> 422 (e.g. an identity projection too large)
    dims = feature_dims(layers, spec.to_dict())
    try:
        check_feature_budget(settings, spec, layers, dims, body.dtype, max_length)
        return spec, dims
    except Invalid as refusal:
        if spec.kind != "auto" or "exact_max_params" in body.projection.model_fields_set:
            raise
        # The units the threshold makes exact (a per-unit override is the caller's, and stays).
        exact_sizes = {
            layer.num_params
            for layer in layers
            if layer.name not in spec.units and spec.for_layer(layer).kind == "identity"
        }
        for largest in sorted(exact_sizes, reverse=True):
            lowered = replace(spec, exact_max_params=largest - 1)
            dims = feature_dims(layers, lowered.to_dict())
            try:
                check_feature_budget(settings, lowered, layers, dims, body.dtype, max_length)
            except Invalid:
                continue
            log.info("auto projection: exact_max_params lowered to %d to fit the budgets", largest - 1)
            return lowered, dims
        raise refusal from None


def check_projection_units(spec, layers: Sequence) -> None:
    """Per-unit overrides must name units among the index's selected layers (422 naming projection.units)."""
    names = [layer.name for layer in layers]
    try:
        spec.check_units(names)
    except InvalidInputError as exc:
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        raise Invalid(f"{exc}; the index's layers are: {shown}") from exc


def unit_row_bytes(kind: str, dim: int, dtype: str, max_length: int) -> int:
    """Most bytes one row's features of a unit take: dim numbers; token rows (`tokens`), per distinct token
    (at most max_length) its dim numbers, an int32 id and an int64 order entry."""
    size = 2 if dtype == "float16" else 4
    return max_length * (dim * size + 12) if kind == "tokens" else dim * size


def check_feature_budget(
    settings: Settings, spec, layers: Sequence, dims: dict[str, int], dtype: str, max_length: int
) -> None:
    """Refuse (422 naming `projection`) a projection whose features can take more than
    max_feature_bytes_per_row bytes per row, all units together, at the index's dtype, or whose fitted
    estimators' statistics (DataInf's, fitted at build time) take more than max_statistics_bytes: exact units
    the budgets cannot hold."""
    by_name = {layer.name: layer for layer in layers}
    sizes = {
        name: unit_row_bytes(spec.for_layer(by_name[name]).kind, dim, dtype, max_length)
        for name, dim in dims.items()
    }
    per_row = sum(sizes.values())
    limit = settings.max_feature_bytes_per_row
    if per_row > limit:
        _refuse_row_bytes(spec, by_name, sizes, per_row, limit, dtype)
    # The statistics every fitted estimator (DataInf: a k x k float64 matrix per dense unit) keeps per unit.
    fitted = [estimator_class(name) for name in fitted_estimator_names()]
    statistics = {
        name: sum(
            cls.statistics_nbytes(dim, spec.for_layer(by_name[name]).kind == "tokens") for cls in fitted
        )
        for name, dim in dims.items()
    }
    if sum(statistics.values()) > settings.max_statistics_bytes:
        largest = sorted(statistics.items(), key=lambda item: (-item[1], item[0]))[:3]
        shown = ", ".join(f"{name} ({dims[name]} features, {size} bytes)" for name, size in largest)
        raise Invalid(
            f"projection: the statistics of {', '.join(cls.name for cls in fitted)} for this choice take "
            f"{sum(statistics.values())} bytes (fitted at build time per unit of k features, DataInf's a k x k "
            f"float64 matrix), above max_statistics_bytes = {settings.max_statistics_bytes}; "
            f"largest units: {shown}. Project them (projection.units) or lower projection.exact_max_params"
        )


def _refuse_row_bytes(
    spec, by_name: dict, sizes: dict[str, int], per_row: int, limit: int, dtype: str
) -> None:
    largest = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))[:3]
    shown = ", ".join(
        f"{name} ({spec.for_layer(by_name[name]).kind}, {size} bytes)" for name, size in largest
    )
    raise Invalid(
        f"projection: this choice takes up to {per_row} bytes of features per row (in {dtype}), above "
        f"max_feature_bytes_per_row = {limit}; largest units: {shown}. Project them (projection.units), lower "
        "projection.exact_max_params or projection.dim, or select fewer layers"
    )


class _FailIndexOnRefusal:
    """Enqueues through `queue`; if the broker refuses the job, the index is marked failed too (the job
    helper marks the job failed and the request answers 503)."""

    def __init__(self, queue: job_state.JobQueue, session: Session, index_id: str):
        self.queue, self.bind, self.index_id = queue, session.get_bind(), index_id

    def enqueue(self, job: Job) -> None:
        try:
            self.queue.enqueue(job)
        except Exception:
            with Session(bind=self.bind) as own:
                own.execute(update(Index).where(Index.id == self.index_id).values(status="failed"))
                own.commit()
            raise


# --- deletion --------------------------------------------------------------------------------------------


def active_jobs(session: Session, index_id: str) -> Sequence[Job]:
    """The index's jobs that are queued or running (its build, a compaction)."""
    return session.scalars(
        select(Job).where(Job.target_id == index_id, Job.status.in_(job_state.ACTIVE))
    ).all()


def delete_index(
    session: Session, settings: Settings, index_id: str, tenant_id: str, on_deleted=None
) -> None:
    """Delete an index: its active jobs end (cancelled), the row goes, and once that commits its artifacts
    (feature store, statistics, FAISS indexes) are removed. A worker step still running on it finds the index
    gone at its next check and cleans up after itself (index_build._gone)."""
    index = get_index(session, index_id, tenant_id)
    for job in active_jobs(session, index.id):
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_(job_state.ACTIVE))
            .values(
                status="cancelled", cancel_requested=True, finished_at=utcnow(), error="its index was deleted"
            )
            .execution_options(synchronize_session=False)
        )
    session.delete(index)
    session.flush()
    folder = index_dir(settings, index.id)

    def remove() -> None:
        remove_tree(folder)
        if on_deleted is not None:
            on_deleted(index.id)

    after_commit(session, remove)


def require_ready(index: Index) -> None:
    if index.status != "ready":
        raise Conflict(
            f"index {index.id!r} is not ready (status {index.status}); "
            + (
                f"follow its build job {index.job_id!r}"
                if index.status in ("pending", "building")
                else "rebuild it"
            )
        )


def index_layer_records(model: RegisteredModel, index: Index) -> list[dict[str, Any]]:
    """The registration's records of the index's layers: the most a query or a job of the index featurizes."""
    held = set(index.layers)
    return [record for record in model.layers if record["name"] in held]


def require_index_capacity(settings: Settings, model: RegisteredModel, index: Index) -> None:
    """503 when no worker can hold the model with the index's layers under today's settings (they may have
    changed since the build passed the same check): a query, audit, check or report would only fail there."""
    require_worker_capacity(settings, model, index_layer_records(model, index))


def delete_rows(
    session: Session, settings: Settings, index_id: str, row_ids: Sequence[int], tenant_id: str
) -> dict[str, Any]:
    """Delete rows (dataset row ids) from a ready index: recorded as a tombstone in its store at once, so no
    later answer includes them; their features stay on disk until a compaction. Ids deleted before are
    counted as `already_deleted`; an id the index does not hold is 422, and so is deleting every row."""
    index = get_index(session, index_id, tenant_id)
    require_ready(index)
    wanted = np.unique(np.asarray(list(row_ids), dtype=np.int64))
    store = open_store(settings, index)
    known = np.isin(wanted, store.row_ids())
    if not known.all():
        raise Invalid(f"row ids {wanted[~known][:5].tolist()} are not rows of index {index.id!r}")
    already = int(np.isin(wanted, store.deleted_row_ids()).sum())
    if len(np.union1d(store.deleted_row_ids(), wanted)) >= store.num_rows:
        raise Invalid(
            f"deleting these rows would leave index {index.id!r} without rows; delete the index instead"
        )
    deleted = store.delete_rows(wanted)
    store.refresh()
    live, pending = store.num_live_rows, int(store.deleted_row_ids().size)
    index.num_rows = live
    index.deleted_rows = pending
    session.flush()
    return {
        "index_id": index.id,
        "deleted": deleted,
        "already_deleted": already,
        "num_rows": live,
        "deleted_rows": pending,
    }


def create_compaction(
    session: Session, settings: Settings, queue: job_state.JobQueue, index_id: str, tenant_id: str
) -> Job:
    """Queue a compaction of a ready index (one at a time per index: 409 while one is queued or running)."""
    index = get_index(session, index_id, tenant_id)
    require_ready(index)
    running = [job for job in active_jobs(session, index.id) if job.kind == INDEX_COMPACT]
    if running:
        raise Conflict(f"index {index.id!r} is already being compacted by job {running[0].id!r}")
    return job_state.submit_job(
        session,
        settings,
        queue,
        INDEX_COMPACT,
        tenant_id=tenant_id,
        target_id=index.id,
        params={"deleted_rows": index.deleted_rows},
        total=1,
    )
