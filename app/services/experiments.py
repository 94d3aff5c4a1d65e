"""Experiments: the paper's protocol (method.md §4, §6) as one `experiment` job, stage after stage.

    noise       read the training rows, flip exactly round(rate n) labels with the seed (inject_label_noise)
    finetune    LoRA fine-tune of the base model on the noisy rows, an adapter per epoch, the epoch with the
                lowest loss on the reference set kept (the paper's checkpoint); artifacts/jobs/<id>/finetune,
                cached on its settings hash (a restarted job reuses a finished run)
    register    the noisy rows as a NEW dataset of the tenant (its `noisy` column records the injected noise)
                and the fine-tuned checkpoint as a NEW model (the base's source + the best epoch's adapter)
    index       an index of that dataset under that model, built inside this job (the pipeline's steps run
                inline: with one worker process, enqueueing the build and waiting for it would deadlock)
    report      a `layer_report` job on the index, run inline: NDR / AUC-NDR against the injected noise
    retraining  (optional) an `audit` job ranks the training rows; the lowest `remove_fraction` are removed
                and the model fine-tuned again with the same settings and seed; the best held-out accuracy is
                compared with removing as many rows at random (seeded) and with the oracle (flipped rows only)

Every stage is idempotent. Finished stages and their outputs are recorded in artifacts/jobs/<id>/state.json
(written atomically), so a job restarted after a crash continues with the first unfinished stage. A resource a
stage creates is also found again by what identifies it (the dataset's name and content hash, the model's
adapter folder, the index of that model, the report or audit job tagged with this experiment's id), so a
crash between creating it and recording it never creates it twice. `stage` in state.json is the live stage
(GET /v1/experiments/{id} reads it); job progress is stage-weighted over PROGRESS_TOTAL units.

The sub-jobs (index build, report, audit) are created without the per-tenant limit of active jobs: the
experiment was admitted under it, and its sub-jobs run inside its own worker slot. The fine-tuned adapter is
copied to artifacts/adapters/<experiment id>/ before the model is registered: the registered model owns it (a
DELETE of the model removes it), so it must outlive the experiment's own folder (DELETE /v1/experiments/{id}
removes that folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, Invalid
from app.models import Dataset, Index, Job, RegisteredModel
from app.schemas.experiments import STAGES, ExperimentCreate
from app.schemas.indexes import IndexCreate
from app.schemas.models import ModelCreate
from app.services import jobs as job_service
from app.services.datasets import ColumnSpec, DatasetSpec, get_dataset, iter_rows, register_upload
from app.services.models import check_before_load, get_model
from app.services.references import load_reference, resolve_reference
from app.services.reports import check_aggregations
from app.services.runners import (
    PARENT_PARAM,
    JobCancelled,
    JobRun,
    atomic_path,
    delete_job_resource,
    get_workflow_job,
    job_dir,
    job_runner,
    run_job,
)

log = logging.getLogger(__name__)

KIND = "experiment"
STATE_FILE = "state.json"
NOISY_ROWS_FILE = "noisy.jsonl"
NOISE_FILE = "noise.json"
REMOVALS_FILE = "retraining.json"
FINETUNE_DIR = "finetune"
RETRAINING_DIR = "retraining"
ADAPTERS_DIR = "adapters"
# Job progress: PROGRESS_TOTAL units shared among the stages that run, by these weights (rough shares of time).
PROGRESS_TOTAL = 1000
STAGE_WEIGHTS = {"noise": 1, "finetune": 40, "register": 3, "index": 20, "report": 15, "retraining": 100}
# Least seconds between two progress writes from inside a fine-tune (a write per step would be one per batch).
PROGRESS_INTERVAL_S = 1.0
# Seconds between checks while another process finishes a sub-job this experiment waits for.
WAIT_POLL_S = 0.5
RETRAINING_RUNS = ("influence", "random", "oracle")
# Share of the retraining stage the ranking (the audit) takes; the three fine-tunes share the rest.
RANKING_SHARE = 0.1


# ============================================================================================== in the API


def _config_positions(folder: Path) -> int | None:
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
    from app.services.models import resolve_source

    folder, _ = resolve_source(settings, model.source, model.revision)
    return folder


def lora_settings(params: dict[str, Any]):
    from influence import LoraSettings

    lora = params["lora"]
    targets = lora.get("targets")
    return LoraSettings(
        r=int(lora["r"]),
        alpha=int(lora["alpha"]),
        dropout=float(lora["dropout"]),
        target_modules=tuple(targets) if targets else None,
    )


def planned_layers(folder: Path, model: RegisteredModel, params: dict[str, Any]) -> list:
    """The layer units (influence.Layer) the index of the fine-tuned model will hold, found without weights:
    the architecture built on torch's meta device, wrapped with the LoRA settings, its layers selected.
    Refuses (422) LoRA targets the model lacks and layer selectors that match nothing."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from influence import discover_layers, select_layers
    from influence.errors import UnsupportedModelError
    from influence.finetune import resolve_lora_targets

    lora = lora_settings(params)
    try:
        config = AutoConfig.from_pretrained(
            folder, num_labels=int(model.num_labels or 2), trust_remote_code=False
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


def _reference_rows(spec: dict[str, Any]) -> set[int] | None:
    if spec.get("dataset_id") is None:
        return None
    return set(spec["rows"]) if spec.get("rows") is not None else set(range(int(spec["limit"])))


def _check_heldout(reference: dict[str, Any], heldout: dict[str, Any], training_id: str) -> None:
    """The held-out set must share no row with the training data or the reference set."""
    if heldout.get("dataset_id") == training_id:
        raise Invalid("heldout: rows of the training dataset cannot be held out; use another dataset")
    if heldout.get("dataset_id") is not None and heldout["dataset_id"] == reference.get("dataset_id"):
        shared = (_reference_rows(heldout) or set()) & (_reference_rows(reference) or set())
        if shared:
            raise Invalid(
                f"heldout shares {len(shared)} rows with the reference set (e.g. row {min(shared)}); the reference "
                "set picks the checkpoint and scores influence, so held-out rows must be other rows"
            )
    if heldout.get("examples") is not None and reference.get("examples") is not None:
        texts = {(e["text"], e.get("text_pair")) for e in reference["examples"]}
        if any((e["text"], e.get("text_pair")) in texts for e in heldout["examples"]):
            raise Invalid(
                "heldout repeats examples of the reference set; held-out examples must be other examples"
            )


def create_experiment(
    session: Session, settings: Settings, queue: job_service.JobQueue, body: ExperimentCreate, tenant_id: str
) -> Job:
    """Check the request cheaply (no weights loaded) and record the experiment's job, enqueued after commit."""
    base = get_model(session, body.base_model_id, tenant_id)
    dataset = get_dataset(session, body.dataset_id, tenant_id)
    if base.task != "classification":
        raise Invalid(
            f"model {base.id!r} is a {base.task} model; experiments inject label noise and measure how well "
            "influence finds it, which needs class labels (classification models only)"
        )
    if base.adapter is not None or base.checkpoints:
        raise Invalid(
            f"model {base.id!r} has an adapter or checkpoints; an experiment fine-tunes the base weights with a new "
            "LoRA adapter: register the base model without one"
        )
    if dataset.task != "classification":
        raise Invalid(
            f"dataset {dataset.id!r} holds {dataset.task} data; experiments need classification rows"
        )
    if dataset.row_count < 2:
        raise Invalid(
            f"dataset {dataset.id!r} has {dataset.row_count} row(s); an experiment needs at least 2"
        )
    classes = int(base.num_labels or 2)
    num_classes = len(dataset.label_names) if dataset.label_names else classes
    if num_classes < 2 or num_classes > classes:
        raise Invalid(
            f"dataset {dataset.id!r} has {num_classes} label names but model {base.id!r} has {classes} classes"
        )
    bad = [label for label in dataset.labels if not isinstance(label, int) or not 0 <= label < num_classes]
    if bad:
        raise Invalid(
            f"dataset {dataset.id!r} has labels {bad[:5]} outside the model's classes [0, {num_classes})"
        )
    flipped = round(body.noise_rate * dataset.row_count)
    if flipped < 1:
        raise Invalid(
            f"noise_rate {body.noise_rate:g} of {dataset.row_count} rows flips no label; raise it or use more rows"
        )
    removed = round(body.retraining.remove_fraction * dataset.row_count)
    if body.retraining.enabled and not 1 <= removed < dataset.row_count:
        raise Invalid(
            f"retraining.remove_fraction {body.retraining.remove_fraction:g} of {dataset.row_count} rows removes "
            f"{removed}; it must remove at least one row and keep at least one"
        )

    reference = resolve_reference(
        session, settings, body.reference, tenant_id=tenant_id, model=base, trained=dataset
    )
    heldout = None
    if body.heldout is not None:
        heldout = resolve_reference(
            session, settings, body.heldout, tenant_id=tenant_id, model=base, trained=dataset
        )
        _check_heldout(reference, heldout, dataset.id)

    params: dict[str, Any] = body.model_dump(mode="json", exclude={"reference", "heldout"})
    params.update(
        {
            "reference": reference,
            "heldout": heldout,
            "num_classes": num_classes,
            "training_rows": dataset.row_count,
            "training_hash": dataset.content_hash,
        }
    )
    folder = base_folder(settings, base)
    positions = _config_positions(folder)
    if positions is not None and body.max_length > positions:
        raise Invalid(f"max_length {body.max_length} exceeds the model's {positions} positions")
    layers = planned_layers(folder, base, params)  # UnknownLayerError / UnsupportedModelError -> 422
    params["planned_layers"] = [layer.name for layer in layers]
    for name, selector in (
        ("report.layers", body.report.layers),
        ("retraining.layers", body.retraining.layers),
    ):
        if selector is not None:
            _check_among(layers, selector, name)
    check_aggregations(body.report.aggregations)
    if body.retraining.enabled:
        _check_ranking_size(layers, body, dataset.row_count, reference, settings.max_score_tensor_bytes)

    job = job_service.create_job(
        session,
        KIND,
        tenant_id=tenant_id,
        params=params,
        total=PROGRESS_TOTAL,
        max_active=settings.max_active_jobs_per_tenant,
    )
    job_service.enqueue_after_commit(session, queue, job)
    return job


def _check_among(layers: Sequence, selector: Any, name: str) -> None:
    """A selector of the report or the ranking must pick layers the index will hold (422 otherwise)."""
    from influence import select_layers
    from influence.errors import UnknownLayerError

    try:
        select_layers(layers, selector)
    except UnknownLayerError as exc:
        raise Invalid(f"{name}: {exc}; it must pick among the index's layers") from None


def _check_ranking_size(
    layers: Sequence, body: ExperimentCreate, rows: int, reference: dict[str, Any], limit: int
) -> None:
    """The retraining check's audit writes the whole score tensor: refuse now what the audit would refuse."""
    from influence import select_layers

    chosen = select_layers(layers, body.retraining.layers) if body.retraining.layers is not None else layers
    m = (
        len(reference["examples"])
        if reference.get("examples") is not None
        else len(_reference_rows(reference) or ())
    )
    size = rows * len(chosen) * m * 4
    if size > limit:
        raise Invalid(
            f"the retraining check's ranking would score {rows} rows x {len(chosen)} layers x {m} reference rows "
            f"({size:,} bytes, over max_score_tensor_bytes = {limit:,}): choose fewer retraining.layers or "
            "reference rows"
        )


def get_experiment(session: Session, experiment_id: str, tenant_id: str) -> Job:
    return get_workflow_job(session, experiment_id, tenant_id, KIND)


def list_experiments(
    session: Session, *, tenant_id: str, offset: int = 0, limit: int = 50
) -> tuple[Sequence[Job], int]:
    return job_service.list_jobs(session, tenant_id=tenant_id, kind=KIND, offset=offset, limit=limit)


def delete_experiment(session: Session, settings: Settings, experiment_id: str, tenant_id: str) -> None:
    """Remove a finished experiment and its folder. What it registered (model, dataset, index, report, audit)
    are resources of their own and stay; the model's adapter lives outside the folder."""
    delete_job_resource(session, settings, get_experiment(session, experiment_id, tenant_id))


def read_state(settings: Settings, job: Job) -> dict[str, Any]:
    """The experiment's live state (stage, finished stages and their outputs, ids made by the running stage);
    {} before it starts or when the file cannot be read (it is replaced whole at every change)."""
    if job.status == "succeeded" and job.result:
        return job.result
    with contextlib.suppress(OSError, ValueError):
        state = json.loads((job_dir(settings, job.id) / STATE_FILE).read_text(encoding="utf-8"))
        if isinstance(state, dict):
            return state
    return {}


def describe(settings: Settings, job: Job) -> dict[str, Any]:
    """What GET /v1/experiments/{id} shows besides the job: the stage and what the stages made so far (an id
    appears as soon as its resource exists, e.g. the index while it is being built)."""
    state = read_state(settings, job)
    outputs = state.get("outputs") or {}
    partial = state.get("partial") or {}

    def made(stage: str, key: str, partial_key: str | None = None) -> str | None:
        return (outputs.get(stage) or {}).get(key) or (partial.get(stage) or {}).get(partial_key or key)

    return {
        "stage": state.get("stage"),
        "stages_done": list(state.get("stages_done") or []),
        "model_id": made("register", "model_id"),
        "dataset_id": made("register", "dataset_id"),
        "index_id": made("index", "index_id"),
        "report_id": made("report", "report_id", "layer_report_id"),
        "noise": outputs.get("noise"),
        "finetune": outputs.get("finetune"),
        "retraining": outputs.get("retraining"),
    }


# ============================================================================================= in workers


@dataclass
class _State:
    """state.json: the live stage, the finished stages with their outputs, what a stage has made so far
    (`partial`, so a resumed stage does not make it again) and the artifacts written (name -> sha256)."""

    path: Path
    stage: str | None = None
    stages_done: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    partial: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _State:
        state = cls(path)
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            state.stage = data.get("stage")
            state.stages_done = list(data.get("stages_done") or [])
            state.outputs = dict(data.get("outputs") or {})
            state.partial = dict(data.get("partial") or {})
            state.artifacts = dict(data.get("artifacts") or {})
        return state

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stages_done": self.stages_done,
            "outputs": self.outputs,
            "partial": self.partial,
            "artifacts": self.artifacts,
        }

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), allow_nan=False), encoding="utf-8")

    def note(self, stage: str, **values: Any) -> None:
        """Record part of a stage's work (an id it created) before the stage finishes."""
        self.partial.setdefault(stage, {}).update(values)
        self.save()

    def finish(self, stage: str, output: dict[str, Any]) -> None:
        self.outputs[stage] = output
        if stage not in self.stages_done:
            self.stages_done.append(stage)
        self.partial.pop(stage, None)
        self.save()


class _Progress:
    """Stage-weighted job progress: finished stages count whole, the running one by its fraction. Every
    write checks for cancellation (JobCancelled)."""

    def __init__(self, run: JobRun, stages: Sequence[str]):
        self.run = run
        self.weights = {stage: STAGE_WEIGHTS[stage] for stage in stages}
        self.total = sum(self.weights.values())
        self.last_write = 0.0

    def at(self, stage: str, fraction: float, done: Sequence[str], *, throttle: bool = False) -> None:
        now = time.monotonic()
        if throttle and now - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.last_write = now
        units = sum(self.weights[s] for s in done if s in self.weights)
        units += self.weights[stage] * min(1.0, max(0.0, fraction))
        self.run.progress(int(PROGRESS_TOTAL * units / self.total), PROGRESS_TOTAL)


@dataclass
class _Context:
    run: JobRun
    state: _State
    progress: _Progress

    @property
    def params(self) -> dict[str, Any]:
        return self.run.params

    @property
    def settings(self) -> Settings:
        return self.run.settings

    def at(self, fraction: float, *, throttle: bool = False) -> None:
        self.progress.at(self.state.stage or "noise", fraction, self.state.stages_done, throttle=throttle)

    def write_json(self, name: str, value: Any) -> None:
        self.run.write_json(name, value)
        self.state.artifacts[name] = self.run.artifacts[name]


def _sub_settings(settings: Settings, *extra_roots: Path) -> Settings:
    """The settings sub-jobs are created with: no second admission check (the experiment was admitted and
    its sub-jobs run in its own slot), and the folders this experiment wrote allowed for registration."""
    return settings.model_copy(
        update={
            "max_active_jobs_per_tenant": None,
            "allowed_roots": [*settings.allowed_roots, *extra_roots],
        }
    )


@job_runner(KIND)
def run_experiment(run: JobRun) -> dict[str, Any]:
    stages = [s for s in STAGES if s != "retraining" or run.params["retraining"]["enabled"]]
    state = _State.load(run.directory / STATE_FILE)
    ctx = _Context(run, state, _Progress(run, stages))
    for stage in stages:
        if stage in state.stages_done:
            continue
        state.stage = stage
        state.save()
        ctx.at(0.0)
        log.info("experiment %s: stage %s", run.job_id, stage)
        state.finish(stage, STAGE_RUNNERS[stage](ctx))
    state.stage = "done"
    state.save()
    outputs = state.outputs
    return {
        "stage": "done",
        "stages_done": state.stages_done,
        "outputs": outputs,
        "artifacts": dict(state.artifacts),
    }


# --- noise -------------------------------------------------------------------------------------------------


def _training_dataset(session: Session, params: dict[str, Any]) -> Dataset:
    dataset = session.get(Dataset, params["dataset_id"])
    if dataset is None:
        raise Conflict(f"the training dataset {params['dataset_id']!r} was deleted")
    # A batch check may append rows without changing the content hash (it hashes the registered file).
    if dataset.content_hash != params["training_hash"] or dataset.row_count != params["training_rows"]:
        raise Conflict(f"the training dataset {dataset.id!r} changed since the experiment was created")
    session.expunge(dataset)
    return dataset


def _stage_noise(ctx: _Context) -> dict[str, Any]:
    from influence import inject_label_noise

    params = ctx.params
    with ctx.run.session() as session:
        dataset = _training_dataset(session, params)
    rows = list(iter_rows(ctx.settings, dataset))
    labels = [int(row["label"]) for row in rows]
    noisy, mask = inject_label_noise(
        labels, float(params["noise_rate"]), int(params["seed"]), int(params["num_classes"])
    )
    names = dataset.label_names
    with ctx.run.write_file(NOISY_ROWS_FILE) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for row, label, flipped in zip(rows, noisy.tolist(), mask.tolist(), strict=True):
            record = {
                "text": row["text"],
                "text_pair": row.get("text_pair"),
                # Names stay names, so the new dataset numbers its classes as the training dataset does.
                "label": names[label] if names else label,
                "noisy": bool(flipped),
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    ctx.state.artifacts[NOISY_ROWS_FILE] = ctx.run.artifacts[NOISY_ROWS_FILE]
    ctx.write_json(
        NOISE_FILE,
        {
            "rate": params["noise_rate"],
            "seed": params["seed"],
            "num_classes": params["num_classes"],
            "flipped_rows": np.flatnonzero(mask).tolist(),
            "clean_labels": labels,
            "noisy_labels": noisy.tolist(),
        },
    )
    return {
        "rate": params["noise_rate"],
        "seed": params["seed"],
        "rows": len(rows),
        "flipped": int(mask.sum()),
        "num_classes": params["num_classes"],
    }


def _noise(ctx: _Context) -> tuple[list, np.ndarray]:
    """The noisy training examples (class indices) and the flipped mask, from the noise stage's artifacts."""
    from influence.data import Example

    noise = json.loads((ctx.run.directory / NOISE_FILE).read_text(encoding="utf-8"))
    examples = []
    with open(ctx.run.directory / NOISY_ROWS_FILE, encoding="utf-8") as handle:
        for line, label in zip(handle, noise["noisy_labels"], strict=True):
            row = json.loads(line)
            examples.append(Example(text=row["text"], label=int(label), text_pair=row.get("text_pair")))
    mask = np.zeros(len(examples), dtype=bool)
    mask[noise["flipped_rows"]] = True
    return examples, mask


# --- fine-tuning ------------------------------------------------------------------------------------------


def _base(ctx: _Context) -> RegisteredModel:
    with ctx.run.session() as session:
        base = session.get(RegisteredModel, ctx.params["base_model_id"])
        if base is None:
            raise Conflict(f"the base model {ctx.params['base_model_id']!r} no longer exists")
        session.expunge(base)
    return base


def _reference(ctx: _Context, key: str) -> list:
    with ctx.run.session() as session:
        return load_reference(ctx.settings, session, ctx.params[key])


def _finetune(
    ctx: _Context,
    base: RegisteredModel,
    train: Sequence,
    mask: np.ndarray,
    eval_set: Sequence,
    out_dir: Path,
    report: Callable[[float], None],
):
    """One LoRA fine-tune with the experiment's settings (cached on its settings hash)."""
    from influence import TrainSettings, finetune_lora

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


def _epochs(result) -> list[dict[str, Any]]:
    return [
        {
            "epoch": e.epoch,
            "train_loss": e.train_loss,
            "eval_loss": e.eval_loss,
            "eval_accuracy": e.eval_accuracy,
        }
        for e in result.epochs
    ]


def _stage_finetune(ctx: _Context) -> dict[str, Any]:
    base = _base(ctx)
    train, mask = _noise(ctx)
    reference = _reference(ctx, "reference")
    result = _finetune(
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
        "epochs": _epochs(result),
        "settings_hash": result.settings_hash,
        "reused": result.reused,
        "initial_eval_loss": result.initial_eval_loss,
        "initial_eval_accuracy": result.initial_eval_accuracy,
    }


# --- registration -----------------------------------------------------------------------------------------


def adapter_home(settings: Settings, experiment_id: str) -> Path:
    """Where the registered model's adapter lives: outside the experiment's folder, which DELETE removes."""
    return settings.resolved_artifacts_dir / ADAPTERS_DIR / experiment_id


def _copy_adapter(source: Path, target: Path) -> None:
    """Copy an adapter folder whole-or-not-at-all (a temporary copy renamed into place)."""
    if (target / "adapter_config.json").is_file() and (target / "adapter_model.safetensors").is_file():
        return
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source.resolve(), tmp)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, target)


def _noisy_dataset_name(ctx: _Context, training: Dataset) -> str:
    params = ctx.params
    return (
        f"experiment {ctx.run.job_id}: {training.name} with {params['noise_rate']:g} label noise "
        f"(seed {params['seed']})"
    )[:200]


def _register_dataset(ctx: _Context) -> str:
    from app.services.datasets import sha256_file

    path = ctx.run.directory / NOISY_ROWS_FILE
    digest = sha256_file(path)
    with ctx.run.session() as session:
        training = _training_dataset(session, ctx.params)
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


def _register_model(ctx: _Context, base: RegisteredModel) -> str:
    from app.services.models import register_model

    best = int(ctx.state.outputs["finetune"]["best_epoch"])
    home = adapter_home(ctx.settings, ctx.run.job_id)
    _copy_adapter(ctx.run.directory / FINETUNE_DIR / f"epoch-{best}", home)
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
            _sub_settings(ctx.settings, *roots),
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


def _stage_register(ctx: _Context) -> dict[str, Any]:
    partial = ctx.state.partial.get("register", {})
    dataset_id = partial.get("dataset_id") or _register_dataset(ctx)
    ctx.state.note("register", dataset_id=dataset_id)
    ctx.at(0.5)
    model_id = partial.get("model_id") or _register_model(ctx, _base(ctx))
    ctx.state.note("register", model_id=model_id)
    return {
        "dataset_id": dataset_id,
        "model_id": model_id,
        "adapter": str(adapter_home(ctx.settings, ctx.run.job_id)),
    }


# --- index ------------------------------------------------------------------------------------------------


class _NoQueue:
    """The index's build job is run inside this job (below), never handed to the workers."""

    def enqueue(self, job: Job) -> None:
        return None


def _create_index(ctx: _Context) -> str:
    from app.services.indexes import create_index

    registered = ctx.state.outputs["register"]
    params = ctx.params
    with ctx.run.session() as session:
        found = session.scalar(
            select(Index.id).where(
                Index.tenant_id == ctx.run.tenant_id,
                Index.model_id == registered["model_id"],
                Index.dataset_id == registered["dataset_id"],
            )
        )
        if found is not None:
            return found
        body = IndexCreate(
            model_id=registered["model_id"],
            dataset_id=registered["dataset_id"],
            layers=params["layers"],
            projection=params["projection"],
            dtype=params["dtype"],
            chunk_size=params.get("chunk_size"),
            max_length=params["max_length"],
        )
        return create_index(session, _sub_settings(ctx.settings), _NoQueue(), body, ctx.run.tenant_id).id


def _stop_build(ctx: _Context, build_job_id: str, index_id: str) -> None:
    """The experiment was cancelled mid-build: its build job ends (cancelled) and so does the index."""
    with ctx.run.session() as session:
        job_service.mark_cancelled(session, build_job_id)
        session.execute(
            update(Index)
            .where(Index.id == index_id, Index.status.in_(("pending", "building")))
            .values(status="cancelled")
        )


def _build_index(ctx: _Context, index_id: str, build_job_id: str) -> None:
    """The index build's pipeline steps (plan, every chunk, finalize) run here, one after another, with this
    job's progress (and cancellation check) between them."""
    from app.services import pipelines

    try:
        pipelines.run_build_inline(
            ctx.settings,
            ctx.run.ctx.session_factory,
            build_job_id,
            models=ctx.run.ctx.models,
            after_step=lambda done, known: ctx.at(done / max(1, known)),
        )
        _wait_for(ctx, build_job_id, "index build")
    except JobCancelled:
        _stop_build(ctx, build_job_id, index_id)
        raise


def _wait_for(ctx: _Context, job_id: str, what: str) -> Job:
    """The sub-job once it has finished (another live process may still be running it: wait, checking this
    experiment's cancellation); Conflict unless it succeeded."""
    while True:
        with ctx.run.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise Conflict(f"the {what} job {job_id!r} was deleted")
            session.expunge(job)
        if job.status not in job_service.ACTIVE:
            break
        ctx.at(1.0, throttle=True)
        time.sleep(WAIT_POLL_S)
    if job.status == "cancelled":
        ctx.at(1.0)  # cancelled because this experiment was: end the experiment as cancelled, not failed
    if job.status != "succeeded":
        raise Conflict(
            f"the {what} job {job_id!r} ended {job.status}" + (f": {job.error}" if job.error else "")
        )
    return job


def _stage_index(ctx: _Context) -> dict[str, Any]:
    index_id = ctx.state.partial.get("index", {}).get("index_id") or _create_index(ctx)
    ctx.state.note("index", index_id=index_id)
    with ctx.run.session() as session:
        index = session.get(Index, index_id)
        if index is None:
            raise Conflict(f"the experiment's index {index_id!r} was deleted")
        build_job_id, status = index.job_id, index.status
    if status != "ready":
        _build_index(ctx, index_id, build_job_id)
    with ctx.run.session() as session:
        index = session.get(Index, index_id)
        if index is None or index.status != "ready":
            raise Conflict(f"the experiment's index {index_id!r} is {index.status if index else 'deleted'}")
        return {"index_id": index_id, "layers": list(index.layers), "build_job_id": build_job_id}


# --- sub-jobs: report, audit ------------------------------------------------------------------------------


def _reference_set(spec: dict[str, Any]):
    """The ReferenceSet a resolved reference spec came from (the sub-job's service resolves it again, against
    the noisy dataset, which numbers its classes as the training dataset does)."""
    from app.schemas.references import ReferenceSet

    if spec.get("examples") is not None:
        return ReferenceSet(examples=spec["examples"])
    if spec.get("rows") is not None:
        return ReferenceSet(dataset_id=spec["dataset_id"], rows=spec["rows"])
    return ReferenceSet(dataset_id=spec["dataset_id"], limit=spec["limit"])


def _find_subjob(session: Session, ctx: _Context, kind: str, target_id: str) -> str | None:
    jobs = session.scalars(
        select(Job).where(Job.tenant_id == ctx.run.tenant_id, Job.kind == kind, Job.target_id == target_id)
    ).all()
    mine = [job.id for job in jobs if (job.params or {}).get(PARENT_PARAM) == ctx.run.job_id]
    return mine[0] if mine else None


def _subjob(
    ctx: _Context, stage: str, kind: str, index_id: str, create: Callable[[Session, Settings], Job]
) -> str:
    """The stage's sub-job: found again (partial state, or by its experiment tag) or created now by its own
    service (the same checks as its POST route), tagged with this experiment in the same transaction."""
    job_id = ctx.state.partial.get(stage, {}).get(f"{kind}_id")
    if job_id is None:
        with ctx.run.session() as session:
            job_id = _find_subjob(session, ctx, kind, index_id)
            if job_id is None:
                job = create(session, _sub_settings(ctx.settings))
                job.params = {**(job.params or {}), PARENT_PARAM: ctx.run.job_id}
                session.flush()
                job_id = job.id
        ctx.state.note(stage, **{f"{kind}_id": job_id})
    return job_id


def _run_subjob(ctx: _Context, job_id: str, what: str) -> Job:
    """Run a workflow job of this experiment inside this job (runners.run_job) and wait for its end."""
    from app.services.pipelines import describe_error, fail_job

    try:
        run_job(ctx.run.ctx, job_id)
    except Exception as exc:
        fail_job(ctx.run.ctx, job_id, describe_error(exc))
        raise
    return _wait_for(ctx, job_id, what)


def _stage_report(ctx: _Context) -> dict[str, Any]:
    from app.schemas.reports import ReportCreate
    from app.services.reports import LAYER_REPORT, create_report

    index_id = ctx.state.outputs["index"]["index_id"]
    body = ReportCreate(
        reference=_reference_set(ctx.params["reference"]), noisy="dataset", **ctx.params["report"]
    )

    def create(session: Session, settings: Settings) -> Job:
        return create_report(session, settings, _NoQueue(), index_id, body, ctx.run.tenant_id)

    report_id = _subjob(ctx, "report", LAYER_REPORT, index_id, create)
    job = _run_subjob(ctx, report_id, "layer report")
    return {"report_id": report_id, "summary": (job.result or {}).get("summary")}


def _ranking(ctx: _Context, index_id: str) -> tuple[str, np.ndarray]:
    """The audit job's ranking of the training rows: (audit id, row ids, most detrimental first)."""
    from app.schemas.audits import AuditCreate
    from app.services.audits import AUDIT, RANKING_FILE, create_audit
    from app.services.runners import artifact_path

    retraining = ctx.params["retraining"]
    body = AuditCreate(
        reference=_reference_set(ctx.params["reference"]),
        layers=retraining["layers"],
        estimator=retraining["estimator"],
        aggregation=retraining["aggregation"],
        correct_only=retraining["correct_only"],
        vote_k=retraining["vote_k"],
    )

    def create(session: Session, settings: Settings) -> Job:
        return create_audit(session, settings, _NoQueue(), index_id, body, ctx.run.tenant_id)

    audit_id = _subjob(ctx, "retraining", AUDIT, index_id, create)
    job = _run_subjob(ctx, audit_id, "audit")
    ranking = np.load(artifact_path(ctx.settings, job, RANKING_FILE), allow_pickle=False)
    return audit_id, np.asarray(ranking["row"], dtype=np.int64)


# --- retraining -------------------------------------------------------------------------------------------


def removal_sets(ranked: np.ndarray, mask: np.ndarray, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The training rows each retraining run removes (sorted row ids).

    ranked: (n,) row ids, most detrimental first; mask: (n,) bool, the flipped rows. k = round(fraction n).
    influence: the first k ranked; random: k rows drawn with the seed; oracle: the flipped rows, at most k
    (a seeded draw of k of them when there are more): the oracle never removes a clean row.
    """
    n = mask.shape[0]
    k = round(fraction * n)
    rng = np.random.default_rng(seed)
    flipped = np.flatnonzero(mask)
    oracle = flipped if flipped.size <= k else rng.choice(flipped, size=k, replace=False)
    return {
        "influence": np.sort(np.asarray(ranked[:k], dtype=np.int64)),
        "random": np.sort(rng.choice(n, size=k, replace=False)),
        "oracle": np.sort(np.asarray(oracle, dtype=np.int64)),
    }


def _stage_retraining(ctx: _Context) -> dict[str, Any]:
    retraining = ctx.params["retraining"]
    index_id = ctx.state.outputs["index"]["index_id"]
    audit_id, ranked = _ranking(ctx, index_id)
    ctx.at(RANKING_SHARE)
    train, mask = _noise(ctx)
    if ranked.shape[0] != len(train) or set(ranked.tolist()) != set(range(len(train))):
        raise Conflict(
            f"the audit {audit_id!r} ranks {ranked.shape[0]} rows, not the {len(train)} training rows "
            "(were rows deleted from the experiment's index?)"
        )
    removals = removal_sets(ranked, mask, float(retraining["remove_fraction"]), int(ctx.params["seed"]))
    if REMOVALS_FILE not in ctx.state.artifacts:
        ctx.write_json(REMOVALS_FILE, {name: rows.tolist() for name, rows in removals.items()})
        ctx.state.save()
    base = _base(ctx)
    heldout = _reference(ctx, "heldout")
    runs: dict[str, Any] = dict(ctx.state.partial.get("retraining", {}).get("runs", {}))
    share = (1.0 - RANKING_SHARE) / len(RETRAINING_RUNS)
    for i, name in enumerate(RETRAINING_RUNS):
        if name in runs:
            continue
        removed = removals[name]
        keep = np.setdiff1d(np.arange(len(train)), removed)
        start = RANKING_SHARE + i * share
        result = _finetune(
            ctx,
            base,
            [train[j] for j in keep],
            mask[keep],
            heldout,
            ctx.run.directory / RETRAINING_DIR / name,
            lambda fraction, start=start: ctx.at(start + share * fraction, throttle=True),
        )
        accuracies = [float(e.eval_accuracy) for e in result.epochs]
        runs[name] = {
            "removed": int(removed.size),
            "noisy_removed": int(mask[removed].sum()),
            "best_accuracy": max(accuracies),
            "best_loss_epoch_accuracy": accuracies[result.best_epoch - 1],
            "epochs": _epochs(result),
        }
        ctx.state.note("retraining", runs=runs)
    return {
        "remove_fraction": retraining["remove_fraction"],
        "heldout_rows": len(heldout),
        "audit_id": audit_id,
        "ranking": {
            "layers": retraining["layers"],
            "estimator": retraining["estimator"],
            "aggregation": retraining["aggregation"],
            "correct_only": retraining["correct_only"],
        },
        **runs,
    }


STAGE_RUNNERS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "noise": _stage_noise,
    "finetune": _stage_finetune,
    "register": _stage_register,
    "index": _stage_index,
    "report": _stage_report,
    "retraining": _stage_retraining,
}
