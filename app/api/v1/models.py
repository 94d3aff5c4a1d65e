"""Model routes: register a model, list and read registrations, list a model's layer units."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import SessionDep, SettingsDep, TenantDep
from app.models import RegisteredModel
from app.schemas.common import MAX_OFFSET, Page, problems
from app.schemas.models import LayerOut, ModelCreate, ModelLayers, ModelOut
from app.services import models as service

router = APIRouter(prefix="/models", tags=["models"])


def _out(model: RegisteredModel) -> ModelOut:
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
        created_at=model.created_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses=problems(403, 422),
    summary="Register a model",
    description=(
        "Validates the source (an absolute folder under an allowed root, or a hub id already in the local "
        "cache: the service never downloads), lists its layer units from the config without loading weights, "
        "and records the sha256 of its safetensors. Remote code is never run."
    ),
)
def create_model(body: ModelCreate, session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> ModelOut:
    return _out(service.register_model(session, settings, body, tenant.id))


@router.get("", response_model=Page[ModelOut], summary="List models, newest first")
def list_models(
    session: SessionDep,
    tenant: TenantDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Page[ModelOut]:
    rows, total = service.list_models(session, tenant_id=tenant.id, offset=offset, limit=limit)
    return Page[ModelOut](items=[_out(m) for m in rows], total=total, offset=offset, limit=limit)


@router.get("/{model_id}", response_model=ModelOut, responses=problems(404), summary="Read a model")
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelOut:
    return _out(service.get_model(session, model_id, tenant.id))


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
