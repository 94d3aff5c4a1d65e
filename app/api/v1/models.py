"""Model routes: register a model, list and read registrations, list a model's layer units, delete a model."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.deps import PageWindowDep, SessionDep, SettingsDep, TenantDep
from app.config import Settings
from app.models import RegisteredModel
from app.schemas.common import Page, problems
from app.schemas.models import LayerOut, MemoryEstimateOut, ModelCreate, ModelLayers, ModelOut
from app.services import models as service

router = APIRouter(prefix="/models", tags=["models"])


def _out(model: RegisteredModel, settings: Settings) -> ModelOut:
    return ModelOut(
        id=model.id,
        name=model.name,
        source=model.source,
        revision=model.revision,
        task=model.task,  # type: ignore[arg-type]
        num_labels=model.num_labels,
        adapter=model.adapter,
        checkpoints=model.checkpoints,  # type: ignore[arg-type]
        weights_hash=model.weights_hash,
        num_layers=len(model.layers),
        num_blocks=service.num_blocks(model),
        memory_estimate=memory_out(settings, model),
        created_at=model.created_at,
    )


def memory_out(settings: Settings, model: RegisteredModel) -> MemoryEstimateOut | None:
    estimate, (budget, _) = service.registered_estimate(settings, model), service.worker_budget(settings)
    if estimate is None:
        return None
    fits = budget is None or estimate.total_bytes <= budget
    return MemoryEstimateOut(**estimate.to_dict(), worker_memory_bytes=budget, fits=fits)


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses=problems(403, 422),
    summary="Register a model",
    description=(
        "Validates the source (an absolute folder under an allowed root, or a hub id already in the local "
        "cache: the service never downloads), lists its layer units from the config without loading weights, "
        "and records the sha256 of its safetensors. Remote code is never run. Every file of the folders (links "
        "followed) must lie inside the allowed roots (a hub id's: inside the hub cache); tokenizer files are "
        "required; the config's sizes are bounded by max_model_blocks, max_model_width, max_model_vocab and "
        "max_num_labels, its layer units by max_model_layer_units. A model a worker cannot hold (the estimate "
        "of `memory_estimate` over worker_memory_bytes, by default 80% of the worker device's memory) is refused "
        "with the estimate, the budget and what would lower it."
    ),
)
def create_model(
    body: ModelCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> ModelOut:
    return _out(service.register_model(session, settings, body, tenant.id), settings)


@router.get("", response_model=Page[ModelOut], summary="List models, newest first")
def list_models(
    session: SessionDep, settings: SettingsDep, tenant: TenantDep, window: PageWindowDep
) -> Page[ModelOut]:
    return window.page_of(session, RegisteredModel, tenant.id, lambda model: _out(model, settings))


@router.get("/{model_id}", response_model=ModelOut, responses=problems(404), summary="Read a model")
def get_model(model_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelOut:
    return _out(service.get_model(session, model_id, tenant.id), settings)


@router.get(
    "/{model_id}/layers",
    response_model=ModelLayers,
    responses=problems(404),
    summary="The model's layer units: names, roles, blocks and groups",
)
def get_layers(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelLayers:
    model = service.get_model(session, model_id, tenant.id)
    return ModelLayers(
        model_id=model.id,
        num_blocks=service.num_blocks(model),
        layers=[LayerOut.model_validate(layer) for layer in model.layers],
        groups=model.groups,
    )


@router.delete(
    "/{model_id}",
    status_code=204,
    responses=problems(404, 409),
    summary="Delete a model",
    description="409 while an index or a queued or running experiment uses the model: delete those indexes, or "
    "let the experiments finish, first. The model's folders on the server are never touched; an adapter the "
    "service wrote for it (an experiment's fine-tune) is removed.",
)
def delete_model(
    model_id: str, request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    def drop_loaded(deleted_id: str) -> None:
        runtime = getattr(request.app.state, "query_runtime", None)
        if runtime is not None:
            runtime.models.drop(deleted_id)

    service.delete_model(session, settings, model_id, tenant.id, on_deleted=drop_loaded)
    return Response(status_code=204)
