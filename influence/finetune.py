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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from influence.data import (
    IGNORE_INDEX,
    Batch,
    EncodedExample,
    Example,
    check_task,
    collate,
    encode_examples,
    iter_batches,
    pad_token_id,
)
from influence.errors import InvalidInputError, UnsupportedModelError
from influence.loading import LoadedModel, load_model, weights_hash

FORMAT_VERSION = 1
TRAINING_FILE = "training.json"
NOISY_MASK_FILE = "noisy_mask.npy"
TRAIN_LABELS_FILE = "train_labels.json"
BEST_LINK = "best"
_EPOCH_DIR = re.compile(r"^epoch-\d+$")
# Rows are shuffled, then sorted by length inside windows of this many batches: padding drops while batch
# composition still changes from epoch to epoch (sorting the whole set would freeze it).
_BUCKET_BATCHES = 4

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


# --------------------------------------------------------------------------------------------- label noise


def inject_label_noise(
    labels: Sequence[int] | np.ndarray, rate: float, seed: int, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly round(rate * n) labels chosen uniformly at random with a seed.

    labels: (n,) class indices in [0, num_classes). Binary: y -> 1 - y; multi-class: a class drawn uniformly
    among the other num_classes - 1. num_classes defaults to max(2, max(labels) + 1).
    Returns (noisy_labels (n,) int64, noisy_mask (n,) bool); the input is not modified.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate):
        raise InvalidInputError(f"noise rate must be a number in [0, 1], got {rate!r}")
    if not 0.0 <= rate <= 1.0:
        raise InvalidInputError(f"noise rate must be in [0, 1], got {rate}")
    array = np.asarray(labels)
    if array.ndim != 1:
        raise InvalidInputError(f"labels must be one-dimensional, got shape {array.shape}")
    whole = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array)))
    )
    if array.size and not whole:
        raise InvalidInputError("labels must be integer class indices")
    clean = array.astype(np.int64)
    n = clean.shape[0]
    if n and clean.min() < 0:
        raise InvalidInputError("labels must be non-negative class indices")
    observed = int(clean.max()) + 1 if n else 0
    if num_classes is None:
        num_classes = max(2, observed)
    if num_classes < 2:
        raise InvalidInputError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    if observed > num_classes:
        raise InvalidInputError(f"label {observed - 1} is out of range for num_classes={num_classes}")

    rng = np.random.default_rng(seed)
    count = round(rate * n)
    flipped = rng.choice(n, size=count, replace=False)
    noisy = clean.copy()
    if num_classes == 2:
        noisy[flipped] = 1 - clean[flipped]
    else:
        # An offset in 1..C-1 added modulo C is uniform over the other classes and never the original one.
        offsets = rng.integers(1, num_classes, size=count)
        noisy[flipped] = (clean[flipped] + offsets) % num_classes
    mask = np.zeros(n, dtype=bool)
    mask[flipped] = True
    return noisy, mask


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (paper: r=4, alpha=4, dropout 0.05 on query and value).

    target_modules None: the architecture's query and value projections (BERT "query"/"value",
    Llama/Mistral/Qwen "q_proj"/"v_proj", GPT-2 "c_attn"). modules_to_save None: the classification head
    ("classifier" or "score"), trained fully; nothing for causal LM.
    """

    r: int = 4
    alpha: int = 4
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InvalidInputError(f"LoRA rank must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise InvalidInputError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise InvalidInputError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        # Lists from JSON become tuples so settings stay hashable and hash the same either way.
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not value:
                    raise InvalidInputError(f"{name} must be a non-empty sequence of module names")
                object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings: AdamW, cosine schedule with linear warm-up, gradient clipping.

    lr: peak learning rate; warmup_ratio: share of all steps spent warming up; max_length: tokens per example.
    device None: CUDA when available, else CPU (not part of the cache key: a run is reusable across devices).
    """

    epochs: int = 3
    lr: float = 2e-3
    batch_size: int = 32
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    seed: int = 0
    max_grad_norm: float | None = 1.0
    device: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidInputError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise InvalidInputError(f"max_length must be >= 2, got {self.max_length}")
        if self.weight_decay < 0:
            raise InvalidInputError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidInputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise InvalidInputError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise InvalidInputError(f"unknown device {self.device!r}") from exc


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


# ------------------------------------------------------------------------------------------ architecture


def _leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def resolve_lora_targets(model: torch.nn.Module, task: str, lora: LoraSettings) -> tuple[tuple[str, ...],
                                                                                          tuple[str, ...]]:
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


def _wrap_with_lora(model: torch.nn.Module, task: str, lora: LoraSettings) -> tuple[torch.nn.Module,
                                                                                     tuple[str, ...],
                                                                                     tuple[str, ...]]:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

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


# ---------------------------------------------------------------------------------------------- batching


def shuffled_length_buckets(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Row indices grouped into batches of similar length, in a random order.

    lengths: (n,) token counts. Returns a list of index arrays of size <= batch_size covering 0..n-1 once.
    """
    lengths_array = np.asarray(lengths)
    order = rng.permutation(len(lengths_array))
    window = batch_size * _BUCKET_BATCHES
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths_array[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def _iter_train_batches(
    encoded: Sequence[EncodedExample], pad_id: int, task: str, batch_size: int, rng: np.random.Generator
) -> Iterator[Batch]:
    for idx in shuffled_length_buckets([len(e.input_ids) for e in encoded], batch_size, rng):
        rows = idx.tolist()
        yield collate([encoded[i] for i in rows], pad_id, task, rows)


# -------------------------------------------------------------------------------------------------- losses


def _classification_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _causal_token_losses(
    model: torch.nn.Module, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token losses (B, T-1), the mask of tokens that count, and where the argmax was right (B, T-1)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    correct = (logits.argmax(-1) == targets) & keep
    return losses, keep, correct


def _train_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    if batch.task == "classification":
        return F.cross_entropy(_classification_logits(model, batch).float(), batch.labels)
    losses, keep, _ = _causal_token_losses(model, batch)
    return (losses * keep).sum() / keep.sum().clamp(min=1)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _classify(
    model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    encoded = encode_examples(tokenizer, examples, "classification", max_length)
    predictions = np.zeros(len(encoded), dtype=np.int64)
    losses = np.zeros(len(encoded), dtype=np.float32)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iter_batches(encoded, pad_token_id(tokenizer), "classification", batch_size):
                on_device = batch.to(device)
                logits = _classification_logits(model, on_device).float()
                if int(on_device.labels.max()) >= logits.shape[-1]:
                    raise InvalidInputError(f"a label is out of range for a {logits.shape[-1]}-class head")
                rows = batch.row_ids.numpy()
                predictions[rows] = logits.argmax(-1).cpu().numpy()
                losses[rows] = F.cross_entropy(logits, on_device.labels, reduction="none").cpu().numpy()
    finally:
        model.train(was_training)
    return predictions, losses


def predict(
    loaded_model: LoadedModel, examples: Sequence[Example], batch_size: int = 32, max_length: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes and per-sample cross-entropy of a classifier, without gradients.

    Returns (predicted labels (n,) int64, loss (n,) float32 in nats), in the order of `examples`.
    """
    if loaded_model.task != "classification":
        raise InvalidInputError(f"predict is for classification models, not {loaded_model.task!r}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    return _classify(loaded_model.model, loaded_model.tokenizer, examples, batch_size, max_length)


def _evaluate(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    task: str,
    batch_size: int,
    max_length: int,
) -> tuple[float, float]:
    """(mean loss, accuracy): per example for classification, per completion token for causal LM."""
    if task == "classification":
        predictions, losses = _classify(model, tokenizer, examples, batch_size, max_length)
        labels = np.array([int(e.label) for e in examples])  # type: ignore[arg-type]
        return float(losses.mean()), float((predictions == labels).mean())
    encoded = encode_examples(tokenizer, examples, task, max_length)
    device = _model_device(model)
    total_loss = total_correct = total_tokens = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in iter_batches(encoded, pad_token_id(tokenizer), task, batch_size):
                losses, keep, correct = _causal_token_losses(model, batch.to(device))
                total_loss += float((losses * keep).sum())
                total_correct += float(correct.sum())
                total_tokens += float(keep.sum())
    finally:
        model.train(was_training)
    return total_loss / max(total_tokens, 1.0), total_correct / max(total_tokens, 1.0)


# --------------------------------------------------------------------------------------------- the cache


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


def _settings_record(
    base: str | Path,
    train: Sequence[Example],
    eval_set: Sequence[Example] | None,
    task: str,
    num_labels: int,
    lora: LoraSettings,
    train_settings: TrainSettings,
    noisy_mask: np.ndarray | None,
) -> dict:
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


def _settings_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode()).hexdigest()


def _library_versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
    }


def _has_adapter(folder: Path) -> bool:
    return (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()


def _load_cached(out_dir: Path, settings_hash: str) -> FinetuneResult | None:
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


def _clear_run(out_dir: Path) -> None:
    """Remove what an earlier (different or unfinished) run left; only names this module writes."""
    (out_dir / TRAINING_FILE).unlink(missing_ok=True)  # first: a crash below must not leave a valid cache
    for entry in out_dir.iterdir():
        if entry.name == BEST_LINK or _EPOCH_DIR.match(entry.name):
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            else:
                shutil.rmtree(entry)
    for name in (NOISY_MASK_FILE, TRAIN_LABELS_FILE):
        (out_dir / name).unlink(missing_ok=True)


def _link_best(out_dir: Path, epoch: int) -> Path:
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


def _write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ training


def _validate_inputs(
    train: Sequence[Example],
    eval_set: Sequence[Example] | None,
    task: str,
    num_labels: int,
    noisy_mask: np.ndarray | None,
) -> np.ndarray | None:
    check_task(task)
    if not train:
        raise InvalidInputError("the training set is empty")
    if eval_set is not None and not eval_set:
        raise InvalidInputError("the eval set is empty; pass None for no evaluation")
    if task == "classification":
        if num_labels < 2:
            raise InvalidInputError(f"num_labels must be >= 2, got {num_labels}")
        for name, examples in (("train", train), ("eval", eval_set or ())):
            for e in examples:
                if not isinstance(e.label, (int, np.integer)) or isinstance(e.label, bool):
                    raise InvalidInputError(f"{name} example needs an integer label, got {e.label!r}")
                if not 0 <= int(e.label) < num_labels:
                    raise InvalidInputError(
                        f"{name} label {e.label} is out of range for num_labels={num_labels}"
                    )
    if noisy_mask is None:
        return None
    mask = np.asarray(noisy_mask)
    if mask.shape != (len(train),):
        raise InvalidInputError(f"noisy_mask has shape {mask.shape}, expected ({len(train)},)")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise InvalidInputError("noisy_mask must be boolean")
        mask = mask.astype(bool)
    return mask


def finetune_lora(
    base: str | Path,
    train: Sequence[Example],
    out_dir: Path,
    *,
    eval_set: Sequence[Example] | None,
    task: str = "classification",
    num_labels: int = 2,
    lora: LoraSettings | None = None,
    train_settings: TrainSettings | None = None,
    noisy_mask: np.ndarray | None = None,
    progress: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `base` with LoRA, saving an adapter per epoch; reuse a finished run with identical settings.

    The best epoch is the one with the lowest eval loss (the paper's checkpoint choice), else the last epoch
    when there is no eval set. `progress` gets {"epoch", "step", "total_steps", "loss"} after every step.
    A folder holding a different or unfinished run has its run files replaced.
    """
    lora = lora or LoraSettings()
    train_settings = train_settings or TrainSettings()
    mask = _validate_inputs(train, eval_set, task, num_labels, noisy_mask)
    out_dir = Path(out_dir)

    settings = _settings_record(base, train, eval_set, task, num_labels, lora, train_settings, mask)
    settings_hash = _settings_hash(settings)
    if out_dir.is_dir():
        cached = _load_cached(out_dir, settings_hash)
        if cached is not None:
            return cached
        _clear_run(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ts = train_settings
    device = torch.device(ts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rng_devices: list[int] = []
    if device.type == "cuda":
        rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    started = time.perf_counter()
    # Seed inside a forked RNG: runs are reproducible and the caller's random state is left untouched.
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(ts.seed)
        loaded = load_model(base, task=task, num_labels=num_labels, device=device, seed=ts.seed)
        model, targets, saved = _wrap_with_lora(loaded.model, task, lora)
        model.to(device)
        tokenizer = loaded.tokenizer
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        trainable_count = sum(p.numel() for _, p in trainable)

        if mask is not None:
            np.save(out_dir / NOISY_MASK_FILE, mask, allow_pickle=False)
        _write_json_atomically(
            out_dir / TRAIN_LABELS_FILE,
            {"task": task, "num_labels": settings["num_labels"], "labels": [e.label for e in train]},
        )

        encoded = encode_examples(tokenizer, train, task, ts.max_length)
        pad_id = pad_token_id(tokenizer)
        steps_per_epoch = math.ceil(len(encoded) / ts.batch_size)
        total_steps = steps_per_epoch * ts.epochs
        optimizer = torch.optim.AdamW(
            [
                # Biases are not decayed (the usual convention); LoRA matrices and head weights are.
                {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": ts.weight_decay},
                {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=ts.lr,
        )
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(
            optimizer, math.ceil(ts.warmup_ratio * total_steps), total_steps
        )

        initial_loss = initial_accuracy = None
        if eval_set is not None:
            initial_loss, initial_accuracy = _evaluate(
                model, tokenizer, eval_set, task, ts.batch_size, ts.max_length
            )

        shuffler = np.random.default_rng(ts.seed)
        records: list[EpochRecord] = []
        step = 0
        for epoch in range(1, ts.epochs + 1):
            model.train()
            epoch_start = time.perf_counter()
            loss_sum = 0.0
            rows = 0
            lr_sum = 0.0
            for batch in _iter_train_batches(encoded, pad_id, task, ts.batch_size, shuffler):
                batch = batch.to(device)
                loss = _train_loss(model, batch)
                loss.backward()
                if ts.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for _, p in trainable], ts.max_grad_norm)
                lr_sum += optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                value = float(loss.detach())
                loss_sum += value * len(batch)
                rows += len(batch)
                if progress is not None:
                    progress({"epoch": epoch, "step": step, "total_steps": total_steps, "loss": value})
            seconds = time.perf_counter() - epoch_start

            eval_start = time.perf_counter()
            eval_loss = eval_accuracy = None
            if eval_set is not None:
                eval_loss, eval_accuracy = _evaluate(
                    model, tokenizer, eval_set, task, ts.batch_size, ts.max_length
                )
            eval_seconds = time.perf_counter() - eval_start

            adapter_dir = out_dir / f"epoch-{epoch}"
            model.save_pretrained(str(adapter_dir), safe_serialization=True)
            records.append(
                EpochRecord(
                    epoch=epoch,
                    train_loss=loss_sum / rows,
                    eval_loss=eval_loss,
                    eval_accuracy=eval_accuracy,
                    seconds=seconds,
                    eval_seconds=eval_seconds,
                    learning_rate_mean=lr_sum / steps_per_epoch,
                    adapter=adapter_dir.name,
                )
            )
    model.eval()

    # Lowest eval loss, ties to the earlier epoch; without an eval set, the last epoch.
    ranked = [(r.eval_loss if r.eval_loss is not None else 0.0, r.epoch) for r in records]
    best_epoch = min(ranked)[1] if eval_set is not None else records[-1].epoch
    best = _link_best(out_dir, best_epoch)

    _write_json_atomically(
        out_dir / TRAINING_FILE,
        {
            "complete": True,
            "settings_hash": settings_hash,
            "settings": settings,
            "source": str(base),
            "base_weights_sha256": loaded.weights_hash,
            "resolved": {"target_modules": list(targets), "modules_to_save": list(saved)},
            "trainable_parameters": trainable_count,
            "trainable_parameter_names": [name for name, _ in trainable],
            "steps_per_epoch": steps_per_epoch,
            "initial": {"eval_loss": initial_loss, "eval_accuracy": initial_accuracy},
            "epochs": [dataclasses.asdict(r) for r in records],
            "best_epoch": best_epoch,
            "best_adapter": BEST_LINK,
            "device": str(device),
            "total_seconds": time.perf_counter() - started,
            "versions": _library_versions(),
        },
    )
    return FinetuneResult(
        out_dir=out_dir,
        epochs=records,
        best_epoch=best_epoch,
        best_adapter=best,
        settings_hash=settings_hash,
        reused=False,
        initial_eval_loss=initial_loss,
        initial_eval_accuracy=initial_accuracy,
        trainable_parameters=trainable_count,
        target_modules=targets,
        modules_to_save=saved,
        model=model,
        tokenizer=tokenizer,
    )
