"""Model registration: what a caller sends and what the service answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.common import UTCDateTime, finite, strict_body_config

Task = Literal["classification", "causal-lm"]


class CheckpointIn(BaseModel):
    """One training checkpoint (a PEFT adapter folder on the server) and the learning rate it was taken at."""

    model_config = strict_body_config()

    adapter: str = Field(min_length=1, max_length=1000, description="Absolute path of a PEFT adapter folder")
    learning_rate: float = Field(gt=0, description="TracIn-CP weight of this checkpoint")
    name: str | None = Field(None, min_length=1, max_length=200, description="Defaults to the folder name")

    _finite_rate = field_validator("learning_rate")(finite)


class ModelCreate(BaseModel):
    """Register a model. `source` is an absolute folder under an allowed root, or a hub id (`org/name`)
    resolved from the local cache only. Layers are listed from the config, without loading weights. Strict:
    numbers are JSON numbers (`"2"` or `true` is no count)."""

    model_config = strict_body_config(
        {
            "name": "minilm-sst2",
            "source": "/models/all-MiniLM-L6-v2",
            "task": "classification",
            "num_labels": 2,
            "adapter": "/models/runs/sst2-lora",
        }
    )

    name: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=1000, description="Hub id or absolute local folder")
    revision: str | None = Field(
        None, min_length=1, max_length=200, description="Hub revision (hub ids only)"
    )
    task: Task = "classification"
    num_labels: int | None = Field(
        None,
        ge=1,
        description="Classes of the head (classification); default: the config's. At most max_num_labels",
    )
    adapter: str | None = Field(None, min_length=1, max_length=1000, description="PEFT adapter folder")
    checkpoints: list[CheckpointIn] = Field(
        default_factory=list, max_length=64, description="TracIn-CP checkpoints (adapters), oldest first"
    )


class CheckpointOut(BaseModel):
    name: str
    adapter: str
    learning_rate: float
    weights_hash: str


class MemoryEstimateOut(BaseModel):
    """What a worker needs to featurize with the model under the service's current settings
    (compute_dtype, max_tokens_per_batch, head_chunk_tokens, activation_checkpointing, batch_size, max_length),
    every layer unit tapped with the auto projection; an index build recomputes it for its own units."""

    total_bytes: int = Field(description="The sum of the four parts")
    weights_bytes: int = Field(description="The model's and its adapters' tensors at the compute dtype")
    activations_bytes: int = Field(description="What the forward pass keeps for the backward pass, one batch")
    head_bytes: int = Field(description="A causal LM's vocabulary-wide logits of head_chunk_tokens tokens")
    gradients_bytes: int = Field(description="The taps' captures and per-row features of the units")
    dtype: Literal["float32", "bfloat16"] = Field(description="The compute dtype (compute_dtype)")
    tokens_per_batch: int = Field(description="Most tokens of one batch: max_tokens_per_batch or fewer")
    weights_from: Literal["safetensors", "config"] = Field(
        description="safetensors: the weight files' headers; config: arithmetic on the config's sizes"
    )
    worker_memory_bytes: int | None = Field(
        description="The worker budget it is held to (worker_memory_bytes, else 80% of the worker device's "
        "memory); null when unknown"
    )
    fits: bool = Field(description="Whether the estimate is within the budget: builds and queries need it")


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    source: str
    revision: str | None
    task: Task
    num_labels: int | None = Field(description="Classes of the head; null for causal-lm")
    adapter: str | None
    checkpoints: list[CheckpointOut]
    weights_hash: str = Field(description="sha256 over the safetensors of the model and its adapter")
    num_layers: int
    num_blocks: int
    memory_estimate: MemoryEstimateOut | None = Field(
        description="What a worker needs for the model under the current settings; null when its files cannot "
        "be read now"
    )
    created_at: UTCDateTime


class LayerOut(BaseModel):
    """One layer unit (influence.Layer): rows x cols is its weight in its own layout."""

    name: str
    module_path: str
    kind: Literal["linear", "conv1d", "embedding"]
    role: Literal["embedding", "attention", "mlp", "head", "lora"]
    block: int | None
    position: str | None
    rows: int
    cols: int
    has_bias: bool
    is_lora: bool
    num_params: int
    groups: list[str]


class ModelLayers(BaseModel):
    model_id: str
    num_blocks: int
    layers: list[LayerOut]
    groups: dict[str, list[str]] = Field(
        description="Group name -> member layer names (WE, blocks.*, CL, ...)"
    )
