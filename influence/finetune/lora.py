"""Where LoRA goes on a model: the attention query and value projections per architecture (as in the paper),
the classification head trained fully, and the PEFT wrapping itself."""

from __future__ import annotations

import torch

from influence.data import check_task
from influence.errors import UnsupportedModelError
from influence.finetune.settings import LoraSettings

# LoRA targets per architecture (HF config.model_type): the attention query and value projections, as in the
# paper. GPT-2 style models fuse q, k and v into one Conv1D, so LoRA goes on the fused projection.
_TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "camembert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "phi": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
}
# Tried in order for architectures not in the table: the first set whose names all exist in the model wins.
_TARGET_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("c_attn",),
    ("q_lin", "v_lin"),
    ("query_key_value",),
    ("query_proj", "value_proj"),
)
# Attribute names of the classification head on HF *ForSequenceClassification models (encoders, decoders).
_HEAD_NAMES = ("classifier", "score")


def _leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def resolve_lora_targets(
    model: torch.nn.Module, task: str, lora: LoraSettings
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The (target_modules, modules_to_save) LoRA should use on this model, checked against its modules."""
    check_task(task)
    leaves = _leaf_names(model)
    if lora.target_modules is not None:
        targets = lora.target_modules
        missing = [t for t in targets if t not in leaves]
        if missing:
            raise UnsupportedModelError(f"LoRA target modules {missing} do not exist in this model")
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = _TARGETS_BY_MODEL_TYPE.get(str(model_type), ())
        if not targets or not set(targets) <= leaves:
            found = [c for c in _TARGET_CANDIDATES if set(c) <= leaves]
            if not found:
                raise UnsupportedModelError(
                    f"no default LoRA targets for model type {model_type!r}; pass LoraSettings.target_modules"
                )
            targets = found[0]

    if lora.modules_to_save is not None:
        saved = lora.modules_to_save
        missing = [m for m in saved if m not in leaves]
        if missing:
            raise UnsupportedModelError(f"modules_to_save {missing} do not exist in this model")
    elif task == "classification":
        heads = [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)]
        if not heads:
            raise UnsupportedModelError(
                "cannot find the classification head (classifier / score); pass LoraSettings.modules_to_save"
            )
        saved = (heads[0],)
    else:
        saved = ()
    return tuple(targets), tuple(saved)


def wrap_with_lora(
    model: torch.nn.Module, task: str, lora: LoraSettings
) -> tuple[torch.nn.Module, tuple[str, ...], tuple[str, ...]]:
    """The model with LoRA on its targets (modules_to_save trained fully), and the two resolved."""
    # peft and transformers are imported lazily: importing influence does not pay for them.
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D  # lazily, as peft above

    targets, saved = resolve_lora_targets(model, task, lora)
    # GPT-2's Conv1D stores weights as (in, out): peft must be told, or the LoRA update is transposed.
    fan_in_fan_out = any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, module in model.named_modules()
    )
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(targets),
        modules_to_save=list(saved) or None,
        fan_in_fan_out=fan_in_fan_out,
    )
    return get_peft_model(model, config), targets, saved
