"""Stage `register`: the noisy rows as a NEW dataset of the tenant (its `noisy` column records the injected
noise) and the fine-tuned checkpoint as a NEW model (the base's source + the best epoch's adapter).

Each is found again by what identifies it (the dataset's name and content hash, the model's adapter folder),
so a crash between creating it and recording it never creates it twice. The adapter is copied to
artifacts/adapters/<experiment id>/ first: the registered model owns it (a DELETE of the model removes it), so
it must outlive the experiment's own folder (DELETE /v1/experiments/{id} removes that folder)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.errors import Conflict
from app.models import Dataset, RegisteredModel
from app.schemas.models import ModelCreate
from app.services.datasets import ColumnSpec, DatasetSpec, register_upload
from app.services.models import register_model
from app.workflows.experiment.stages.context import StageContext, base_model, sub_settings, training_dataset
from app.workflows.experiment.stages.finetune import FINETUNE_DIR
from app.workflows.experiment.stages.noise import NOISY_ROWS_FILE
from app.workflows.experiment.state import adapter_home
from influence.files import fsync_path, remove_tree, sha256_file

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def copy_adapter(source: Path, target: Path) -> None:
    """Copy an adapter folder whole-or-not-at-all (a temporary copy renamed into place)."""
    if all((target / name).is_file() for name in ADAPTER_FILES):
        return
    tmp = target.with_name(f".{target.name}.tmp")
    remove_tree(tmp)
    remove_tree(target)
    shutil.copytree(source.resolve(), tmp)
    for name in ADAPTER_FILES:
        fsync_path(tmp / name)
    os.replace(tmp, target)


def _noisy_dataset_name(ctx: StageContext, training: Dataset) -> str:
    params = ctx.params
    return (
        f"experiment {ctx.run.job_id}: {training.name} with {params['noise_rate']:g} label noise "
        f"(seed {params['seed']})"
    )[:200]


def _register_dataset(ctx: StageContext) -> str:
    path = ctx.run.directory / NOISY_ROWS_FILE
    digest = sha256_file(path)
    with ctx.run.session() as session:
        training = training_dataset(session, ctx.params)
        name = _noisy_dataset_name(ctx, training)
        found = session.scalar(
            select(Dataset.id).where(
                Dataset.tenant_id == ctx.run.tenant_id, Dataset.name == name, Dataset.content_hash == digest
            )
        )
        if found is not None:
            return found
        has_pair = training.columns.get("text_pair") is not None
        spec = DatasetSpec(
            columns=ColumnSpec(
                text="text", text_pair="text_pair" if has_pair else None, label="label", noisy="noisy"
            ),
            task="classification",
            name=name,
            format="jsonl",
        )
        with open(path, "rb") as handle:
            dataset = register_upload(session, ctx.settings, spec, handle, NOISY_ROWS_FILE, ctx.run.tenant_id)
        if (dataset.label_names or None) != (training.label_names or None):
            raise Conflict(
                "the noisy rows name their classes differently from the training dataset (a class vanished?): "
                f"{dataset.label_names} vs {training.label_names}"
            )
        return dataset.id


def _register_model(ctx: StageContext, base: RegisteredModel) -> str:
    best = int(ctx.state.outputs["finetune"]["best_epoch"])
    home = adapter_home(ctx.settings, ctx.run.job_id)
    copy_adapter(ctx.run.directory / FINETUNE_DIR / f"epoch-{best}", home)
    with ctx.run.session() as session:
        found = session.scalar(
            select(RegisteredModel.id).where(
                RegisteredModel.tenant_id == ctx.run.tenant_id, RegisteredModel.adapter == str(home)
            )
        )
        if found is not None:
            return found
        roots = [home] + ([Path(base.source)] if base.source.startswith("/") else [])
        model = register_model(
            session,
            sub_settings(ctx.settings, *roots),
            ModelCreate(
                name=f"experiment {ctx.run.job_id}: {base.name} + LoRA (epoch {best})"[:200],
                source=base.source,
                revision=base.revision,
                task="classification",
                num_labels=base.num_labels,
                adapter=str(home),
            ),
            ctx.run.tenant_id,
        )
        return model.id


def run(ctx: StageContext) -> dict[str, Any]:
    partial = ctx.state.partial.get("register", {})
    dataset_id = partial.get("dataset_id") or _register_dataset(ctx)
    ctx.state.note("register", dataset_id=dataset_id)
    ctx.at(0.5)
    model_id = partial.get("model_id") or _register_model(ctx, base_model(ctx))
    ctx.state.note("register", model_id=model_id)
    return {
        "dataset_id": dataset_id,
        "model_id": model_id,
        "adapter": str(adapter_home(ctx.settings, ctx.run.job_id)),
    }
