"""Experiments: the paper's protocol as one job (docs/decisions/0005-workflows.md, method.md §4 and §6).

An experiment injects seeded label noise into a training dataset, fine-tunes the base model with LoRA on the
noisy rows, registers the noisy rows as a new dataset (its `noisy` column is the record of the injected noise)
and the fine-tuned checkpoint as a new model, builds an index of them, makes a layer report (NDR / AUC-NDR per
layer, aggregation and estimator against the noise it injected) and, optionally, runs the retraining check.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from app.schemas.common import UTCDateTime, finite, strict_body_config
from app.schemas.indexes import AggregationName, Dtype, EstimatorName, LayerSelector, ProjectionIn
from app.schemas.jobs import JobOut, JobStatus
from app.schemas.references import ReferenceSet
from app.workflows.report.schemas import ReportAggregations, ReportEstimators

# The stages in the order they run; `done` once the job succeeded.
STAGES = ("noise", "finetune", "register", "index", "report", "retraining")
Stage = Literal["noise", "finetune", "register", "index", "report", "retraining", "done"]
# The paper's influence units of a LoRA classifier: word embeddings, every LoRA tensor, the classification head.
PAPER_LAYERS: list[str] = ["WE", "role:lora", "head"]


class LoraIn(BaseModel):
    """LoRA hyper-parameters (paper: r=4, alpha=4, dropout 0.05 on the attention query and value)."""

    model_config = strict_body_config()

    r: int = Field(4, ge=1, le=1024, description="Rank of the LoRA matrices")
    alpha: int = Field(4, ge=1, le=65536, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input")
    targets: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Module names LoRA wraps (e.g. [query, value]); default the architecture's attention query "
        "and value projections",
    )


class ReportSettings(BaseModel):
    """The layer report the experiment makes (POST /v1/indexes/{id}/reports without reference and noisy: the
    experiment's reference set, and its injected noise as the noisy mask)."""

    model_config = strict_body_config()

    layers: LayerSelector | None = Field(None, description="Among the index's layers; default all of them")
    estimators: ReportEstimators
    aggregations: ReportAggregations = Field(
        description="Registered aggregations, each optionally with the correct-only suffix `-c`"
    )
    vote_k: float = Field(0.2, gt=0, le=1)
    cancellation_rows: int = Field(1000, ge=0, le=100_000)
    top_rows: int = Field(20, ge=1, le=1000)

    _vote_k = field_validator("vote_k")(finite)


class RetrainingIn(BaseModel):
    """The retraining check (method.md §4): remove the lowest `remove_fraction` of the training rows by
    aggregated influence, fine-tune again with the same settings and seed, and compare the best held-out
    accuracy with removing the same number of rows at random and with the oracle (the flipped rows)."""

    model_config = strict_body_config()

    enabled: bool = False
    remove_fraction: float = Field(0.3, gt=0, lt=1, description="Share of the training rows removed")
    layers: LayerSelector | None = Field(
        None, description="Layers the ranking aggregates; default the index's"
    )
    estimator: EstimatorName = "grad-dot"
    aggregation: AggregationName = "rank"
    correct_only: bool = Field(
        False, description="Only reference rows the model predicts correctly vote (-c)"
    )
    vote_k: float = Field(0.2, gt=0, le=1)

    _checked = field_validator("remove_fraction", "vote_k")(finite)


class ExperimentCreate(BaseModel):
    """Run the paper's protocol on a base model and a classification dataset of this tenant (asynchronous)."""

    model_config = strict_body_config(
        {
            "base_model_id": "3f0c...",
            "dataset_id": "9a1b...",
            "reference": {"dataset_id": "77c2...", "limit": 500},
            "noise_rate": 0.2,
            "seed": 0,
            "lora": {"r": 4, "alpha": 4, "dropout": 0.05},
            "epochs": 3,
            "learning_rate": 0.002,
            "batch_size": 32,
            "max_length": 64,
            "retraining": {"enabled": True, "remove_fraction": 0.3, "aggregation": "rank"},
            "heldout": {"dataset_id": "77c2...", "rows": [500, 501, 502]},
        }
    )

    name: str | None = Field(None, min_length=1, max_length=200, description="A label for the experiment")
    base_model_id: str = Field(min_length=1, max_length=32, description="A classification model, no adapter")
    dataset_id: str = Field(min_length=1, max_length=32, description="The clean training dataset")
    reference: ReferenceSet = Field(
        description="The reference ('test') set: the fine-tune keeps the epoch with the lowest loss on it (the "
        "paper's choice) and the report scores training rows against it"
    )
    heldout: ReferenceSet | None = Field(
        None,
        description="Held-out rows the retraining check measures accuracy on; required when retraining is "
        "enabled, and disjoint from the reference set and the training dataset",
    )
    noise_rate: float = Field(
        0.2, gt=0, lt=1, description="Share of training labels flipped (exactly round(r n))"
    )
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of the noise, the fine-tune and random removal"
    )
    lora: LoraIn = Field(default_factory=LoraIn)
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(2e-3, gt=0, le=1, description="Peak AdamW learning rate (cosine schedule)")
    batch_size: int = Field(32, ge=1, le=4096)
    max_length: int = Field(128, ge=2, le=32768, description="Token limit per example (training and index)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the steps spent warming up")
    layers: LayerSelector | None = Field(
        default_factory=lambda: list(PAPER_LAYERS),
        description="Layers of the fine-tuned model the index holds; default the paper's units (WE, every LoRA "
        "tensor, the head); null: every layer",
    )
    projection: ProjectionIn = Field(default_factory=ProjectionIn)
    dtype: Dtype = "float16"
    chunk_size: int | None = Field(None, ge=1, le=1_000_000, description="Rows per index-build chunk")
    report: ReportSettings = Field(default_factory=ReportSettings)
    retraining: RetrainingIn = Field(default_factory=RetrainingIn)

    _checked = field_validator("noise_rate", "learning_rate", "warmup_ratio")(finite)

    @model_validator(mode="after")
    def _heldout_for_retraining(self) -> ExperimentCreate:
        if self.retraining.enabled and self.heldout is None:
            raise ValueError(
                "retraining.enabled needs a `heldout` set (rows kept apart from the reference set, which picks "
                "the checkpoint and scores influence)"
            )
        return self


class EpochOut(BaseModel):
    epoch: int
    train_loss: float
    eval_loss: float | None = Field(description="Mean loss on the evaluation set (reference or held-out)")
    eval_accuracy: float | None


class FinetuneOut(BaseModel):
    best_epoch: int = Field(description="The epoch with the lowest loss on the reference set")
    epochs: list[EpochOut]
    settings_hash: str = Field(description="The fine-tune's cache key (a rerun with the same hash is reused)")
    reused: bool = Field(description="Whether a finished run with the same settings was reused")
    initial_eval_loss: float | None
    initial_eval_accuracy: float | None


class NoiseOut(BaseModel):
    rate: float
    seed: int
    rows: int = Field(description="Training rows")
    flipped: int = Field(description="Labels flipped: round(rate x rows)")
    num_classes: int


class RetrainingRun(BaseModel):
    removed: int = Field(description="Training rows removed before retraining")
    noisy_removed: int = Field(description="Of those, rows whose label was flipped")
    best_accuracy: float = Field(description="Best held-out accuracy over the epochs")
    best_loss_epoch_accuracy: float = Field(
        description="Held-out accuracy at the epoch of lowest held-out loss"
    )
    epochs: list[EpochOut]


class RetrainingOut(BaseModel):
    remove_fraction: float
    heldout_rows: int
    audit_id: str = Field(description="The audit whose ranking chose the rows removed (GET /v1/audits/{id})")
    ranking: dict[str, Any] = Field(description="Layers, estimator, aggregation of the ranking")
    influence: RetrainingRun = Field(description="The lowest-scoring rows removed")
    random: RetrainingRun = Field(description="As many rows removed at random (seeded)")
    oracle: RetrainingRun = Field(
        description="The flipped rows removed (at most as many as the others remove; never a clean row)"
    )


class ExperimentOut(BaseModel):
    """An experiment: its job, the stage it is at, and what each finished stage produced."""

    id: str = Field(description="The experiment's id (also its job's id)")
    name: str | None
    status: JobStatus
    stage: Stage | None = Field(
        description="The stage running (or the last one reached); `done` when finished"
    )
    stages_done: list[str] = Field(description="Finished stages, in order")
    params: dict[str, Any] = Field(description="What the experiment was asked for, resolved")
    job: JobOut
    model_id: str | None = Field(description="The fine-tuned model it registered (stage register)")
    dataset_id: str | None = Field(description="The noisy training dataset it registered (stage register)")
    index_id: str | None = Field(description="The index of the noisy dataset under the fine-tuned model")
    report_id: str | None = Field(description="The layer report (GET /v1/reports/{id})")
    noise: NoiseOut | None
    finetune: FinetuneOut | None
    retraining: RetrainingOut | None
    created_at: UTCDateTime
