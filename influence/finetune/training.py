"""LoRA fine-tuning and evaluation: AdamW with a cosine schedule and warm-up, length-bucketed batches, an
adapter saved per epoch, and the epoch with the lowest held-out loss as the best (method.md §6)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
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
from influence.errors import InvalidInputError
from influence.finetune.lora import wrap_with_lora
from influence.finetune.runs import (
    BEST_LINK,
    NOISY_MASK_FILE,
    TRAIN_LABELS_FILE,
    TRAINING_FILE,
    EpochRecord,
    FinetuneResult,
    clear_run,
    hash_settings,
    library_versions,
    link_best,
    load_cached,
    settings_record,
    write_run_json,
)
from influence.finetune.settings import LoraSettings, TrainSettings
from influence.loading import LoadedModel, load_model

# Rows are shuffled, then sorted by length inside windows of this many batches: padding drops while batch
# composition still changes from epoch to epoch (sorting the whole set would freeze it).
_BUCKET_BATCHES = 4


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

    settings = settings_record(base, train, eval_set, task, num_labels, lora, train_settings, mask)
    settings_hash = hash_settings(settings)
    if out_dir.is_dir():
        cached = load_cached(out_dir, settings_hash)
        if cached is not None:
            return cached
        clear_run(out_dir)
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
        model, targets, saved = wrap_with_lora(loaded.model, task, lora)
        model.to(device)
        tokenizer = loaded.tokenizer
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        trainable_count = sum(p.numel() for _, p in trainable)

        if mask is not None:
            np.save(out_dir / NOISY_MASK_FILE, mask, allow_pickle=False)
        write_run_json(
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
        # transformers is imported lazily: importing influence does not pay for it.
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
    best = link_best(out_dir, best_epoch)

    write_run_json(
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
            "versions": library_versions(),
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
