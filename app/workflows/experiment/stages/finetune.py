"""Stage `finetune`: a LoRA fine-tune of the base model on the noisy rows, an adapter per epoch, the epoch with
the lowest loss on the reference set kept (the paper's checkpoint). The run lives in artifacts/jobs/<id>/finetune,
cached on its settings hash, so a restarted job reuses a finished run. The retraining stage fine-tunes the same
way (`finetune`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import Conflict
from app.models import RegisteredModel
from app.services.models import check_before_load
from app.workflows.experiment.plan import base_folder, lora_settings
from app.workflows.experiment.stages.context import StageContext, base_model, reference_examples
from app.workflows.experiment.stages.noise import noisy_training
from influence import TrainSettings, finetune_lora
from influence.finetune import FinetuneResult

FINETUNE_DIR = "finetune"


def finetune(
    ctx: StageContext,
    base: RegisteredModel,
    train: Sequence,
    mask: np.ndarray,
    eval_set: Sequence,
    out_dir: Path,
    report: Callable[[float], None],
) -> FinetuneResult:
    """One LoRA fine-tune with the experiment's settings (cached on its settings hash); `report(fraction)`
    follows its steps."""
    params = ctx.params
    check_before_load(base.source, base.revision, [])  # the base folder may have changed since registration

    def on_step(info: dict) -> None:
        report(info["step"] / max(1, info["total_steps"]))

    result = finetune_lora(
        base_folder(ctx.settings, base),
        list(train),
        out_dir,
        eval_set=list(eval_set),
        task="classification",
        num_labels=int(base.num_labels or 2),
        lora=lora_settings(params),
        train_settings=TrainSettings(
            epochs=int(params["epochs"]),
            lr=float(params["learning_rate"]),
            batch_size=int(params["batch_size"]),
            max_length=int(params["max_length"]),
            warmup_ratio=float(params["warmup_ratio"]),
            seed=int(params["seed"]),
            device=ctx.run.ctx.device or None,
        ),
        noisy_mask=mask,
        progress=on_step,
    )
    result.model = result.tokenizer = None  # the trained network is not needed past this point
    record = json.loads((out_dir / "training.json").read_text(encoding="utf-8"))
    if record.get("base_weights_sha256") != base.weights_hash:
        raise Conflict(
            f"the weights of base model {base.id!r} changed since it was registered; register it again"
        )
    return result


def epochs(result: FinetuneResult) -> list[dict[str, Any]]:
    """Each epoch's losses and held-out accuracy, as the job's result shows them."""
    return [
        {
            "epoch": e.epoch,
            "train_loss": e.train_loss,
            "eval_loss": e.eval_loss,
            "eval_accuracy": e.eval_accuracy,
        }
        for e in result.epochs
    ]


def run(ctx: StageContext) -> dict[str, Any]:
    base = base_model(ctx)
    train, mask = noisy_training(ctx)
    reference = reference_examples(ctx, "reference")
    result = finetune(
        ctx,
        base,
        train,
        mask,
        reference,
        ctx.run.directory / FINETUNE_DIR,
        lambda fraction: ctx.at(fraction, throttle=True),
    )
    return {
        "best_epoch": result.best_epoch,
        "epochs": epochs(result),
        "settings_hash": result.settings_hash,
        "reused": result.reused,
        "initial_eval_loss": result.initial_eval_loss,
        "initial_eval_accuracy": result.initial_eval_accuracy,
    }
