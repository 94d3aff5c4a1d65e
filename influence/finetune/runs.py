"""A fine-tuning run's folder (its layout: influence.finetune): per-epoch adapters, the link to the best one,
and the settings-hash cache that lets a finished run with identical settings be reused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from influence.data import Example
from influence.files import write_bytes_atomic
from influence.finetune.settings import LoraSettings, TrainSettings
from influence.loading import weights_hash

FORMAT_VERSION = 1
TRAINING_FILE = "training.json"
NOISY_MASK_FILE = "noisy_mask.npy"
TRAIN_LABELS_FILE = "train_labels.json"
BEST_LINK = "best"
_EPOCH_DIR = re.compile(r"^epoch-\d+$")


@dataclass
class EpochRecord:
    """What one epoch did. Losses are mean cross-entropy in nats; seconds are wall-clock training time."""

    epoch: int
    train_loss: float
    eval_loss: float | None
    eval_accuracy: float | None
    seconds: float
    eval_seconds: float
    learning_rate_mean: float  # mean step lr: the eta_c of TracIn-CP for this checkpoint
    adapter: str  # folder name under out_dir


@dataclass
class FinetuneResult:
    """A finished run; `model` is the in-memory PEFT model after the last epoch (None when reused)."""

    out_dir: Path
    epochs: list[EpochRecord]
    best_epoch: int
    best_adapter: Path
    settings_hash: str
    reused: bool
    initial_eval_loss: float | None = None
    initial_eval_accuracy: float | None = None
    trainable_parameters: int = 0
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    model: torch.nn.Module | None = field(default=None, repr=False)
    tokenizer: object | None = field(default=None, repr=False)

    def adapter_path(self, epoch: int) -> Path:
        """Folder of the adapter saved after `epoch` (1-based)."""
        return self.out_dir / f"epoch-{epoch}"


def _examples_hash(examples: Sequence[Example] | None) -> str | None:
    if examples is None:
        return None
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.text, e.text_pair, e.label], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _base_identity(base: str | Path) -> dict[str, str]:
    path = Path(base)
    if path.is_dir():
        # Content, not location: the cache survives moving the model and notices edited weights.
        return {"weights_sha256": weights_hash(path)}
    return {"source": str(base)}


def settings_record(
    base: str | Path,
    train: Sequence[Example],
    eval_set: Sequence[Example] | None,
    task: str,
    num_labels: int,
    lora: LoraSettings,
    train_settings: TrainSettings,
    noisy_mask: np.ndarray | None,
) -> dict:
    """What identifies a run: the base model's weights, the data, the noise, every setting but the device."""
    train_dict = dataclasses.asdict(train_settings)
    train_dict.pop("device")
    return {
        "format": FORMAT_VERSION,
        "base": _base_identity(base),
        "task": task,
        "num_labels": num_labels if task == "classification" else None,
        "lora": dataclasses.asdict(lora),
        "train": train_dict,
        "n_train": len(train),
        "train_sha256": _examples_hash(train),
        "n_eval": len(eval_set) if eval_set is not None else 0,
        "eval_sha256": _examples_hash(eval_set),
        "noisy_mask_sha256": (
            hashlib.sha256(noisy_mask.tobytes()).hexdigest() if noisy_mask is not None else None
        ),
    }


def hash_settings(record: dict) -> str:
    """The cache key of a settings_record."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """The versions a run was trained with, for its training.json."""
    # peft and transformers are imported lazily: importing influence does not pay for them.
    import peft
    import transformers  # lazily, as peft above

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }


def _has_adapter(folder: Path) -> bool:
    return (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()


def load_cached(out_dir: Path, settings_hash: str) -> FinetuneResult | None:
    """The finished run in out_dir when its hash is `settings_hash` and its adapters are all there."""
    try:
        record = json.loads((out_dir / TRAINING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings_hash") != settings_hash or not record.get("complete"):
        return None
    try:
        epochs = [EpochRecord(**e) for e in record["epochs"]]
        folders = [out_dir / e.adapter for e in epochs] + [out_dir / BEST_LINK]
        if not all(_has_adapter(folder) for folder in folders):
            return None
        return FinetuneResult(
            out_dir=out_dir,
            epochs=epochs,
            best_epoch=int(record["best_epoch"]),
            best_adapter=out_dir / BEST_LINK,
            settings_hash=settings_hash,
            reused=True,
            initial_eval_loss=record["initial"]["eval_loss"],
            initial_eval_accuracy=record["initial"]["eval_accuracy"],
            trainable_parameters=int(record["trainable_parameters"]),
            target_modules=tuple(record["resolved"]["target_modules"]),
            modules_to_save=tuple(record["resolved"]["modules_to_save"]),
        )
    except (KeyError, TypeError, ValueError):  # a record this version cannot read is treated as absent
        return None


def clear_run(out_dir: Path) -> None:
    """Remove what an earlier (different or unfinished) run left; only names a run writes."""
    (out_dir / TRAINING_FILE).unlink(missing_ok=True)  # first: a crash below must not leave a valid cache
    for entry in out_dir.iterdir():
        if entry.name == BEST_LINK or _EPOCH_DIR.match(entry.name):
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            else:
                shutil.rmtree(entry)
    for name in (NOISY_MASK_FILE, TRAIN_LABELS_FILE):
        (out_dir / name).unlink(missing_ok=True)


def link_best(out_dir: Path, epoch: int) -> Path:
    """Point `best` at the adapter of `epoch` (a copy where the filesystem has no symlinks)."""
    best = out_dir / BEST_LINK
    if best.is_symlink() or best.is_file():
        best.unlink()
    elif best.exists():
        shutil.rmtree(best)
    try:
        best.symlink_to(f"epoch-{epoch}", target_is_directory=True)  # relative: the folder stays movable
    except OSError:  # filesystems without symlinks
        shutil.copytree(out_dir / f"epoch-{epoch}", best)
    return best


def write_run_json(path: Path, payload: dict) -> None:
    """Write one of the run's JSON files atomically."""
    # Not write_json_atomic: NaN stays allowed, so a diverged run's NaN loss is recorded rather than refused.
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True).encode("utf-8"))
