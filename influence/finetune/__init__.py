"""LoRA fine-tuning with label noise, per-epoch checkpoints and a settings-hash cache (method.md §1, §4, §6).

The paper's setup: LoRA (r=4, alpha=4, dropout 0.05) on the attention query and value projections, the
classification head trained fully, AdamW with a cosine schedule and 10% warm-up, a checkpoint per epoch and
the epoch with the lowest held-out loss as the one influence is computed at. `inject_label_noise` produces the
flipped labels and the ground-truth mask the noise-detection evaluation needs.

Layout of a run folder:
    epoch-{k}/          PEFT adapter after epoch k (adapter_config.json + adapter_model.safetensors)
    best/               symlink to (or copy of) the epoch with the lowest eval loss
    noisy_mask.npy      (n,) bool, which training labels were flipped (when given)
    train_labels.json   the labels the model was trained on (noisy ones included)
    training.json       settings, their hash, per-epoch records, best epoch, library versions; written last,
                        so its presence with a matching hash means a finished run that can be reused

The package: noise.py (label noise), settings.py (LoRA and optimisation settings), lora.py (where LoRA goes on
an architecture), training.py (`finetune_lora`, `predict`), runs.py (the run folder above and its cache).
"""

from __future__ import annotations

from influence.lazy import lazy_package

# Public names resolved on first access (PEP 562): importing the package, or one of its modules, loads no
# other module of it than those imported above (torch and faiss come with the modules that use them).
_LAZY: dict[str, str] = {
    "resolve_lora_targets": "influence.finetune.lora",
    "inject_label_noise": "influence.finetune.noise",
    "BEST_LINK": "influence.finetune.runs",
    "EpochRecord": "influence.finetune.runs",
    "FinetuneResult": "influence.finetune.runs",
    "FORMAT_VERSION": "influence.finetune.runs",
    "NOISY_MASK_FILE": "influence.finetune.runs",
    "TRAIN_LABELS_FILE": "influence.finetune.runs",
    "TRAINING_FILE": "influence.finetune.runs",
    "LoraSettings": "influence.finetune.settings",
    "TrainSettings": "influence.finetune.settings",
    "finetune_lora": "influence.finetune.training",
    "predict": "influence.finetune.training",
    "shuffled_length_buckets": "influence.finetune.training",
}

__all__ = [
    "BEST_LINK",
    "FORMAT_VERSION",
    "NOISY_MASK_FILE",
    "TRAINING_FILE",
    "TRAIN_LABELS_FILE",
    "EpochRecord",
    "FinetuneResult",
    "LoraSettings",
    "TrainSettings",
    "finetune_lora",
    "inject_label_noise",
    "predict",
    "resolve_lora_targets",
    "shuffled_length_buckets",
]


__getattr__, __dir__ = lazy_package(__name__, _LAZY, globals())
