"""Experiments, the API side: check a request cheaply (no weights loaded) and record its job, enqueued after
commit. The job runs the paper's protocol stage after stage (app/workflows/experiment/runner.py); what it has
made so far is read from its state (app/workflows/experiment/state.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Invalid
from app.jobs import state as job_state
from app.models import Dataset, Job, RegisteredModel
from app.services import isolation
from app.services.datasets import get_dataset
from app.services.models import get_model
from app.services.references import resolve_reference
from app.workflows.experiment.plan import base_folder, config_positions, pick_among, planned_layers
from app.workflows.experiment.schemas import ExperimentCreate
from app.workflows.experiment.state import KIND, PROGRESS_TOTAL
from app.workflows.report.service import check_aggregations


def _check_sources(base: RegisteredModel, dataset: Dataset, body: ExperimentCreate) -> int:
    """The base model and the training rows must suit the protocol; returns the dataset's number of classes."""
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
    return num_classes


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


def _check_ranking_size(
    layers: Sequence, body: ExperimentCreate, rows: int, reference: dict[str, Any], limit: int
) -> None:
    """The retraining check's audit writes the whole score tensor: refuse now what the audit would refuse."""
    from app.workflows.experiment.plan import pick_among  # torch: see create_experiment

    chosen = (
        pick_among(layers, body.retraining.layers, "retraining.layers")
        if body.retraining.layers is not None
        else layers
    )
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


def create_experiment(
    session: Session, settings: Settings, queue: job_state.JobQueue, body: ExperimentCreate, tenant_id: str
) -> Job:
    """Check the request cheaply (no weights loaded) and record the experiment's job, enqueued after commit."""
    base = get_model(session, body.base_model_id, tenant_id)
    dataset = get_dataset(session, body.dataset_id, tenant_id)
    num_classes = _check_sources(base, dataset, body)

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
    positions = config_positions(folder)
    if positions is not None and body.max_length > positions:
        raise Invalid(f"max_length {body.max_length} exceeds the model's {positions} positions")
    # The architecture on torch's meta device, in a request process: UnknownLayerError / UnsupportedModelError
    # come back from it as 422.
    layers = isolation.run(planned_layers, folder, int(base.num_labels or 2), params)
    params["planned_layers"] = [layer.name for layer in layers]
    for name, selector in (
        ("report.layers", body.report.layers),
        ("retraining.layers", body.retraining.layers),
    ):
        if selector is not None:
            pick_among(layers, selector, name)
    check_aggregations(body.report.aggregations)
    if body.retraining.enabled:
        _check_ranking_size(layers, body, dataset.row_count, reference, settings.max_score_tensor_bytes)

    return job_state.submit_job(
        session, settings, queue, KIND, tenant_id=tenant_id, params=params, total=PROGRESS_TOTAL
    )
