"""Model registration: validate the source cheaply, list the layer units without loading weights, record it.

Order of work, cheapest first, so a bad request fails fast and nothing heavy runs for it:
  1. the source: an absolute folder under an allowed root, or a hub id present in the local cache (the
     service never downloads); it must hold config.json and .safetensors weights (pickle is refused);
  2. the adapter and checkpoint folders (adapter_config.json + adapter_model.safetensors);
  3. config and tokenizer load (no remote code, ever);
  4. layers: the architecture is instantiated from its config on torch's meta device (no memory, no
     weights), the PEFT adapter config applied, then `influence.discover_layers`; only if that fails is the
     model loaded for real with `influence.load_model`;
  5. weights hashes (sha256 over the safetensors), then the row.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Invalid
from app.models import RegisteredModel
from app.schemas.models import ModelCreate
from app.services.paths import resolve_allowed_path
from app.services.tenancy import owned
from influence.errors import InfluenceError, UnsupportedModelError

log = logging.getLogger(__name__)

# `name` or `org/name`, as the hub spells repository ids.
HUB_ID = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)?$"
)


def get_model(session: Session, model_id: str, tenant_id: str) -> RegisteredModel:
    """A model of this tenant (NotFound for another tenant's, as for an unknown id)."""
    return owned(session, RegisteredModel, model_id, tenant_id, "model")


def list_models(
    session: Session, *, tenant_id: str, offset: int = 0, limit: int = 50
) -> tuple[Sequence[RegisteredModel], int]:
    mine = RegisteredModel.tenant_id == tenant_id
    total = session.scalar(select(func.count()).select_from(RegisteredModel).where(mine)) or 0
    rows = session.scalars(
        select(RegisteredModel)
        .where(mine)
        .order_by(RegisteredModel.created_at.desc(), RegisteredModel.id)
        .offset(offset)
        .limit(limit)
    ).all()
    return rows, total


def num_blocks(model: RegisteredModel) -> int:
    blocks = [layer["block"] for layer in model.layers if layer.get("block") is not None]
    return max(blocks) + 1 if blocks else 0


# --- validation of what the caller names ------------------------------------------------------------------


def resolve_source(settings: Settings, source: str, revision: str | None) -> tuple[Path, str | None]:
    """The model folder and the revision to record (a hub id's resolved commit)."""
    if source.startswith("/"):
        if revision is not None:
            raise Invalid("revision applies to hub ids only; a local folder is used as it is")
        folder = resolve_allowed_path(settings, source, "model source")
        if not folder.is_dir():
            raise Invalid(f"model source {source!r} is not an existing folder")
        return folder, None
    if not HUB_ID.match(source) or ".." in source:
        raise Invalid(
            f"model source {source!r} is neither an absolute folder path nor a hub id like 'org/name'"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises many types; all mean "not in the local cache"
        raise Invalid(
            f"model {source!r} (revision {revision or 'main'}) is not in the local hub cache; the service "
            f"does not download models ({exc.__class__.__name__})"
        ) from None
    # snapshots/<commit>: record the commit, so the registration stays pinned when the cache moves on.
    return folder, folder.name


def check_model_folder(folder: Path, what: str) -> None:
    from influence.loading import check_safetensors_only

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise Invalid(f"{what} {folder} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Invalid(f"{what} {folder}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise Invalid(f"{what} {folder}: config.json is not a JSON object")
    if "auto_map" in config:
        raise UnsupportedModelError(
            f"{what} {folder} needs custom code (config.json has auto_map); the service never runs remote code"
        )
    check_safetensors_only(folder)  # UnsupportedModelError (422) names pickle-only folders


def check_adapter_folder(settings: Settings, raw: str, what: str) -> Path:
    folder = resolve_allowed_path(settings, raw, what)
    if not folder.is_dir():
        raise Invalid(f"{what} {raw!r} is not an existing folder")
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / required).is_file():
            raise Invalid(f"{what} {raw!r} has no {required} (a PEFT adapter folder saved with safetensors)")
    return folder


# --- layers without weights -------------------------------------------------------------------------------


def _load_config(folder: Path, task: str, num_labels: int | None):
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if task == "classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        return AutoConfig.from_pretrained(folder, **kwargs)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise UnsupportedModelError(f"cannot read the config of {folder}: {exc}") from None


def _meta_layers(config, task: str, adapter: Path | None):
    """Layer units of the architecture built on the meta device: shapes only, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from influence import discover_layers

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=False)
        if adapter is not None:
            from peft import PeftConfig, get_peft_model

            model = get_peft_model(model, PeftConfig.from_pretrained(str(adapter)))
    return discover_layers(model)


def _loaded_layers(folder: Path, task: str, num_labels: int | None, adapter: Path | None):
    from influence import discover_layers, load_model

    try:
        loaded = load_model(folder, task=task, num_labels=num_labels or 2, adapter=adapter)
    except InfluenceError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(f"cannot load {folder} as a {task} model: {exc}") from None
    return discover_layers(loaded.model)


def describe_layers(folder: Path, config, task: str, num_labels: int | None, adapter: Path | None):
    """influence.Layer list of the model (with its adapter), from the config when possible."""
    try:
        return _meta_layers(config, task, adapter)
    except InfluenceError:
        raise
    except Exception as exc:  # an architecture that cannot be built on meta: pay for a real load
        log.info("meta-device layer listing failed for %s (%s); loading the model", folder, exc)
        return _loaded_layers(folder, task, num_labels, adapter)


# --- registration -----------------------------------------------------------------------------------------


def register_model(session: Session, settings: Settings, spec: ModelCreate, tenant_id: str) -> RegisteredModel:
    """Validate, describe and record a model; the row is flushed, the caller's unit of work commits it."""
    from influence import layer_groups, load_tokenizer
    from influence.loading import weights_hash

    if spec.task == "causal-lm" and spec.num_labels is not None:
        raise Invalid("num_labels applies to classification models only")
    folder, revision = resolve_source(settings, spec.source, spec.revision)
    check_model_folder(folder, "model source")
    adapter = check_adapter_folder(settings, spec.adapter, "adapter") if spec.adapter else None
    checkpoints = []
    names: set[str] = set()
    for i, checkpoint in enumerate(spec.checkpoints):
        ckpt_folder = check_adapter_folder(settings, checkpoint.adapter, f"checkpoints[{i}].adapter")
        name = checkpoint.name or ckpt_folder.name
        if name in names:
            raise Invalid(f"checkpoints[{i}]: the name {name!r} is used twice; give each checkpoint a name")
        names.add(name)
        checkpoints.append((name, ckpt_folder, checkpoint.learning_rate))

    config = _load_config(folder, spec.task, spec.num_labels)
    num_labels = None if spec.task == "causal-lm" else int(spec.num_labels or config.num_labels)
    load_tokenizer(folder)  # the worker needs it: a model without a usable tokenizer is refused now

    # The layers a featurizer sees: with the adapter, else with the first checkpoint's adapter.
    listing_adapter = adapter or (checkpoints[0][1] if checkpoints else None)
    layers = describe_layers(folder, config, spec.task, num_labels, listing_adapter)
    names_listed = [layer.name for layer in layers]
    for name, ckpt_folder, _ in checkpoints:
        if ckpt_folder == listing_adapter:
            continue
        other = [layer.name for layer in describe_layers(folder, config, spec.task, num_labels, ckpt_folder)]
        if other != names_listed:
            raise Invalid(
                f"checkpoint {name!r} exposes different layer units than the model "
                f"({len(other)} vs {len(names_listed)}); every checkpoint must share one adapter layout"
            )

    model = RegisteredModel(
        tenant_id=tenant_id,
        name=spec.name,
        source=str(folder) if spec.source.startswith("/") else spec.source,
        revision=revision,
        task=spec.task,
        num_labels=num_labels,
        adapter=str(adapter) if adapter else None,
        checkpoints=[
            {
                "name": name,
                "adapter": str(ckpt_folder),
                "learning_rate": rate,
                "weights_hash": weights_hash(folder, ckpt_folder),
            }
            for name, ckpt_folder, rate in checkpoints
        ],
        weights_hash=weights_hash(folder, adapter) if adapter else weights_hash(folder),
        layers=[layer.to_dict() for layer in layers],
        groups=layer_groups(layers),
    )
    session.add(model)
    session.flush()
    return model
