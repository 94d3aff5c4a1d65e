"""The base model as an experiment fine-tunes it: its weights folder, the LoRA settings, and the layer units the
fine-tuned model's index will hold, found from the config alone (no weights) so that a request is checked cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.errors import Invalid
from app.models import RegisteredModel
from app.services.models import resolve_source
from influence import Layer, select_layers
from influence.errors import UnknownLayerError, UnsupportedModelError

if TYPE_CHECKING:
    from influence.finetune import LoraSettings


def config_positions(folder: Path) -> int | None:
    """The model's position limit from its config.json (None when it names none)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def base_folder(settings: Settings, model: RegisteredModel) -> Path:
    """The base model's weights folder: a local source as registered, a hub id's pinned snapshot."""
    if model.source.startswith("/"):
        return Path(model.source)
    folder, _ = resolve_source(settings, model.source, model.revision)
    return folder


def lora_settings(params: dict[str, Any]) -> LoraSettings:
    """The fine-tune's LoRA settings."""
    # Here: influence.finetune imports torch, and this runs on a worker or in a request process, never the API.
    from influence.finetune import LoraSettings

    lora = params["lora"]
    targets = lora.get("targets")
    return LoraSettings(
        r=int(lora["r"]),
        alpha=int(lora["alpha"]),
        dropout=float(lora["dropout"]),
        target_modules=tuple(targets) if targets else None,
    )


def planned_layers(folder: Path, num_labels: int, params: dict[str, Any]) -> list[Layer]:
    """The layer units the index of the fine-tuned model will hold, found without weights: the architecture
    built on torch's meta device, wrapped with the LoRA settings, its layers selected.
    Refuses (422) LoRA targets the model lacks and layer selectors that match nothing. Run in a request process
    (app/services/isolation.py), as registration inspects folders: the API itself imports no torch."""
    # torch, transformers and peft take seconds to import and only this needs them here: the request processes
    # start without them.
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification  # slow too, as peft

    from influence import discover_layers
    from influence.finetune import resolve_lora_targets

    lora = lora_settings(params)
    try:
        config = AutoConfig.from_pretrained(
            folder, num_labels=num_labels, trust_remote_code=False
        )
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise UnsupportedModelError(f"cannot read the config of {folder}: {exc}") from None
    with torch.device("meta"):
        try:
            network = AutoModelForSequenceClassification.from_config(config, trust_remote_code=False)
        except (ValueError, KeyError, TypeError) as exc:
            raise UnsupportedModelError(f"cannot build {folder} as a classifier: {exc}") from None
        targets, saved = resolve_lora_targets(network, "classification", lora)
        wrapped = get_peft_model(
            network,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(targets),
                modules_to_save=list(saved) or None,
            ),
        )
    return select_layers(discover_layers(wrapped), params["layers"])


def pick_among(layers: Sequence[Layer], selector: Any, name: str) -> list[Layer]:
    """What a selector of the report or the ranking picks among the index's layers (422 when it picks none
    of them: `name` says which selector)."""
    try:
        return select_layers(layers, selector)
    except UnknownLayerError as exc:
        raise Invalid(f"{name}: {exc}; it must pick among the index's layers") from None
