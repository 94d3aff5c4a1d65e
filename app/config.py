"""All settings in one place (env prefix INFLUENCE_); every setting is documented in .env.example."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings. Embedded default: SQLite + local artifacts + a filesystem broker, no servers."""

    model_config = SettingsConfigDict(env_prefix="INFLUENCE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root of local state: SQLite file, artifacts, broker folders")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<data_dir>/influence.db")
    broker_url: str | None = Field(
        None, description="Celery broker; default a filesystem broker under <data_dir>/broker (no server)"
    )
    artifacts_dir: Path | None = Field(
        None, description="Feature stores, datasets, adapters; default <data_dir>/artifacts"
    )
    allowed_roots: list[Path] = Field(
        default_factory=list, description="Server-side folders that datasets and models may be registered from"
    )
    max_upload_bytes: int = Field(200 * 1024 * 1024, description="Largest accepted dataset upload (HTTP 413 above)")
    max_request_bytes: int = Field(
        32 * 1024 * 1024, description="Largest accepted JSON request body (HTTP 413 above); uploads: max_upload_bytes"
    )
    max_rows: int = Field(2_000_000, description="Most rows in one dataset")
    max_dataset_bytes: int = Field(
        1024**3,
        description="Most bytes a dataset's normalised rows may take once decoded and decompressed (uploads, "
        "server-side files and batch-check files alike; HTTP 413 above): a small compressed Parquet file may "
        "expand a thousandfold",
    )
    max_text_chars: int = Field(20_000, description="Longest text field accepted in a row or query example")
    max_query_examples: int = Field(256, description="Most examples in one query")
    max_score_tensor_bytes: int = Field(
        2 * 1024**3,
        description="Largest raw score tensor (train rows x layers x reference rows x 4 bytes) an audit writes "
        "(HTTP 422 above)",
    )
    max_reference_rows: int = Field(
        10_000, description="Most reference rows of an audit, layer report or batch check (HTTP 422 above)"
    )
    max_top_k: int = Field(1000, description="Largest top_k of a query")
    max_statistics_bytes: int = Field(
        2 * 1024**3,
        description="The most bytes of estimator statistics an index may fit at build time: DataInf keeps a k x k "
        "float64 matrix per dense unit of k features (HTTP 422 above, naming the units)",
    )
    max_feature_bytes_per_row: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="The most bytes of features one row may take in an index, all units together, at the "
        "index's dtype (HTTP 422 above): bounds what exact (identity) units may cost",
    )
    max_model_blocks: int = Field(
        512, description="Most transformer blocks (num_hidden_layers and the like) a registered model may have"
    )
    max_model_layer_units: int = Field(
        20_000, description="Most layer units (weight tensors an index can select) a registered model may list"
    )
    max_model_width: int = Field(
        65_536, description="Largest hidden / intermediate size in a registered model's config"
    )
    max_model_vocab: int = Field(1_048_576, description="Largest vocabulary in a registered model's config")
    max_num_labels: int = Field(
        10_000, description="Most classes of a classification model (num_labels) and of a dataset's labels"
    )
    umask: str = Field(
        "077",
        pattern=r"^0?[0-7]{3}$",
        description="Octal umask of the API and worker processes: 077 makes the database, artifacts and logs "
        "readable by the service's own user only (files 0600, folders 0700); 022 makes them world-readable",
    )
    max_active_jobs_per_tenant: int = Field(
        4, description="Most jobs (index builds, compactions) one tenant may have queued or running (HTTP 429)"
    )
    chunk_size: int = Field(512, description="Rows per index-build chunk (the unit of parallelism and resume)")
    batch_size: int = Field(32, ge=1, description="Most rows in one featurisation batch")
    max_tokens_per_batch: int = Field(
        8192,
        ge=16,
        description="Most tokens in one featurisation batch, padding included (rows x longest row): batches are "
        "cut by this budget, so 256-token rows of an LLM run in smaller batches than short sentences; a row "
        "longer than the budget runs alone",
    )
    head_chunk_tokens: int = Field(
        1024,
        ge=1,
        description="Tokens whose vocabulary-wide logits a causal LM's loss holds at once (the head's logits and "
        "their gradient are computed chunk by chunk, never for the whole batch in float32)",
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Dtype of the model's weights in workers: bfloat16 halves their memory; projected features "
        "are always accumulated in float32",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in the backward pass instead of keeping them (less memory "
        "per token, about a third more compute); for models that support gradient checkpointing",
    )
    worker_memory_bytes: int | None = Field(
        None,
        ge=1,
        description="Memory a worker may use for one model (weights, optimizer-free gradients of the selected "
        "units, activations at max_tokens_per_batch): larger models are refused at registration and build with "
        "the estimate; empty: 80% of the worker device's memory (GPU memory with a GPU, else RAM)",
    )
    max_length: int = Field(128, description="Token limit per example when featurising")
    fidelity_train_rows: int = Field(
        64,
        ge=0,
        description="Training rows of the sample on which a build measures each layer unit's projection "
        "fidelity (projected vs exact gradient scores, seed 0); 0 disables the measurement",
    )
    fidelity_query_rows: int = Field(
        16,
        ge=0,
        description="Other rows of the dataset scored as queries in that sample; 0 disables the measurement",
    )
    device: str = Field("auto", description="auto | cpu | cuda: where workers featurise")
    compiled_scoring: bool = Field(
        True,
        description="Score float16 features against up to 8 examples (a query) with a kernel compiled by "
        "torch.compile (needs a C++ compiler; about 3x faster on CPU); falls back to BLAS when it cannot compile",
    )
    small_batch_threads: Literal["auto", "one", "all"] = Field(
        "auto",
        description="Intra-op threads for small featurization batches (a query's examples): auto measures on "
        "the first small batch whether one thread is faster than all (slow OpenMP wake-ups); one / all fix it",
    )
    request_processes: int = Field(
        2,
        ge=0,
        description="Processes beside the API that parse uploaded files and inspect model folders, the request "
        "work that holds the GIL long enough to stall the API's other requests; each holds 4 requests at most "
        "(one running, three waiting; more: 503); 0: in the API process itself",
    )
    worker_concurrency: int = Field(1, description="Processes of the embedded worker")
    query_on_workers: bool = Field(
        True,
        description="Queries are computed by query workers (`python -m worker --queues query`; `make serve` starts "
        "one), which keep models and stores warm, and the API forwards them (it then loads no model and imports "
        "no torch); false: the API process computes them itself. Read where the service is composed "
        "(app.embedded.create_service_app: `make serve`, docker's api); an app built by create_app alone computes "
        "queries itself",
    )
    query_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds the API waits for a query worker's answer before it answers 504 (the query then "
        "expires: a worker that takes it later drops it)",
    )
    query_polling_interval_s: float = Field(
        0.005,
        gt=0,
        le=1,
        description="Filesystem broker only (Redis pushes): seconds between a query worker's looks for new queries "
        "and between the API's looks for their answers",
    )
    query_worker_concurrency: int = Field(
        2,
        ge=1,
        description="Queries one query worker computes at once (threads sharing one copy of each model and store)",
    )
    broker_visibility_timeout: int = Field(
        900, description="Seconds before Redis hands an unacknowledged task (a dead worker's) to another worker"
    )
    port: int = Field(8000, description="Port of `make serve`")
    metrics_enabled: bool = Field(
        True,
        description="Serve GET /metrics (Prometheus text format: request, job, queue, worker and store counts "
        "and sizes, never ids or names); false answers 404",
    )
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port on which each worker (`python -m worker`) serves its own metrics (steps run and failed, "
        "step durations, every pool process together); empty: none. `make serve`'s query worker child takes the "
        "next port",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text | json: json writes one JSON object per log line, with the request id of the request "
        "(or of the job's creating request, in the worker) that logged it",
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'influence.db').resolve()}"

    @property
    def resolved_artifacts_dir(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own Settings and override the dependency)."""
    return Settings()
