"""The service's JSON as TypedDicts: its answers, the request bodies a caller builds, and the options of the
client's methods, field for field as the service's pydantic models in app/schemas declare them.

tests/client/test_openapi_contract.py holds each of them against the service's OpenAPI document (keys, which
are required, Literal values, nested shapes), so a field renamed on either side fails there.

Answers carry every field of their model (null where unset); a key the service leaves out of some answers is
NotRequired. Options left at None are not sent: the service's defaults apply.

No `from __future__ import annotations` here: TypedDict decides its required keys at runtime from the
annotations, and Python 3.11 cannot see NotRequired inside a string.

Size: declarations only, one TypedDict per schema of the service, and in one module on purpose: the contract
test finds every TypedDict defined here, so none can escape it, and a caller imports them from one place.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Generic, Literal, NotRequired, TypedDict, TypeVar

T = TypeVar("T")

# A layer selector: a name, a glob, `re:...`, `blocks:2-4`, `role:...`, `position:...`, a group (`middle`, `CL`),
# terms joined by `&`; a list unites its items; an object {names, regex, blocks, roles, position, groups}.
LayerSelector = str | list[Any] | dict[str, Any]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Task = Literal["classification", "causal-lm"]
DatasetFormat = Literal["jsonl", "csv", "tsv", "parquet"]


class Page(TypedDict, Generic[T]):
    """One page of a list: `items` from `offset`, at most `limit`, out of `total`."""

    items: list[T]
    total: int
    offset: int
    limit: int


# ------------------------------------------------------------------------------------------------ health


class Health(TypedDict):
    status: str
    version: str


class ReadinessCheck(TypedDict):
    ok: bool
    detail: str
    seconds: float


class ScoringKernel(TypedDict):
    state: str  # off | enabled | compiling | ready | failed
    failure: str | None


class SmallBatches(TypedDict):
    one_thread: bool | None
    measured_ms: dict[str, float] | None


class Readiness(TypedDict):
    """`status` only, unless the request carried a valid API key."""

    status: str
    checks: NotRequired[dict[str, ReadinessCheck] | None]
    compiled_scoring: NotRequired[ScoringKernel | None]
    small_batches: NotRequired[SmallBatches | None]


# ---------------------------------------------------------------------------------------------- models


class CheckpointIn(TypedDict):
    adapter: str
    learning_rate: float
    name: NotRequired[str | None]


class Checkpoint(TypedDict):
    name: str
    adapter: str
    learning_rate: float
    weights_hash: str


class MemoryEstimate(TypedDict):
    """What a worker needs to featurize with a model under the service's current settings (bytes)."""

    total_bytes: int
    weights_bytes: int
    activations_bytes: int
    head_bytes: int
    gradients_bytes: int
    dtype: Literal["float32", "bfloat16"]
    tokens_per_batch: int
    weights_from: Literal["safetensors", "config"]
    worker_memory_bytes: int | None
    fits: bool


class Model(TypedDict):
    id: str
    name: str
    source: str
    revision: str | None
    task: Task
    num_labels: int | None
    adapter: str | None
    checkpoints: list[Checkpoint]
    weights_hash: str
    num_layers: int
    num_blocks: int
    memory_estimate: MemoryEstimate | None  # null when the model's files cannot be read now
    created_at: str


class Layer(TypedDict):
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


class ModelLayers(TypedDict):
    model_id: str
    num_blocks: int
    layers: list[Layer]
    groups: dict[str, list[str]]


class ModelOptions(TypedDict, total=False):
    """register_model's options (POST /v1/models beside `source` and `name`)."""

    task: str | None
    num_labels: int | None
    revision: str | None
    adapter: str | None
    checkpoints: Sequence[CheckpointIn] | None


# -------------------------------------------------------------------------------------------- datasets


class ColumnMapping(TypedDict):
    text: str
    text_pair: str | None
    label: str | None
    noisy: str | None


class Dataset(TypedDict):
    id: str
    name: str
    format: DatasetFormat
    task: Task
    source: str | None
    size_bytes: int
    columns: ColumnMapping
    row_count: int
    content_hash: str
    labels: list[int]
    label_names: list[str] | None
    has_noisy_flag: bool
    created_at: str


class DatasetRow(TypedDict):
    row: int
    text: str
    text_pair: str | None
    label: int | str | None
    label_name: str | None
    noisy: bool | None


class DatasetOptions(TypedDict, total=False):
    """upload_dataset's and register_dataset_path's options (the POST /v1/datasets form beside the file or
    its server path). Without `format` the service goes by the file name's extension."""

    name: str | None
    format: str | None
    task: str | None
    text_column: str | None
    text_pair_column: str | None
    label_column: str | None
    noisy_column: str | None


# ------------------------------------------------------------------------------------------------- jobs


class Job(TypedDict):
    id: str
    kind: str
    status: JobStatus
    target_id: str | None
    done: int
    total: int
    progress: float | None
    cancel_requested: bool
    attempts: int
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    duration_s: float | None


# ---------------------------------------------------------------------------------------------- indexes


class UnitProjection(TypedDict):
    kind: str  # identity (exact) | factorized | gaussian | rademacher | tokens
    dim: int  # the unit's target dimension
    features: int  # numbers stored per row for the unit


class Projection(TypedDict):
    kind: str  # auto | factorized | gaussian | rademacher | identity | tokens
    dim: int
    seed: int
    exact_max_params: int | None  # auto only: the largest unit (in parameters) stored exactly
    units: dict[str, UnitProjection]  # per layer unit, the projection actually used


class FidelitySample(TypedDict):
    train_rows: int
    query_rows: int
    seed: int
    dtype: str
    note: str | None


class UnitFidelity(TypedDict):
    projection: dict[str, Any]  # {kind, dim}
    spearman: float | None  # projected vs exact scores: 1 = the same ranking
    spearman_min: float | None
    rel_error: float | None
    top10_overlap: float | None


class IndexFidelity(TypedDict):
    """Measured when the build finalized; or only `skipped`, with the reason."""

    skipped: str | None
    sample: FidelitySample | None
    threshold: float | None
    seconds: float | None
    units: dict[str, UnitFidelity] | None
    below_threshold: list[str] | None


class Index(TypedDict):
    id: str
    model_id: str
    dataset_id: str
    status: Literal["pending", "building", "ready", "failed", "cancelled"]
    layer_selector: Any
    layers: list[str]
    projection: Projection
    dtype: str
    faiss_kind: str
    num_rows: int
    deleted_rows: int
    size_bytes: int
    feature_bytes_estimate: int
    manifest: dict[str, Any] | None
    job: Job | None
    fidelity: IndexFidelity | None
    created_at: str


class IndexOptions(TypedDict, total=False):
    """create_index's options (POST /v1/indexes beside `model_id` and `dataset_id`). `projection` is {kind,
    dim, seed, exact_max_params, units} (auto, 256, 0, 4096 by default: units with at most exact_max_params
    parameters stored exactly, the others factorized at dim); `units` overrides single units, e.g.
    {"head": {"kind": "gaussian", "dim": 64}}."""

    layers: LayerSelector | None
    projection: Mapping[str, Any] | None
    dtype: str | None
    faiss_kind: str | None
    chunk_size: int | None
    max_length: int | None


SettingsMode = Literal["latest-report", "pinned-report", "defaults"]


class AnswerSettings(TypedDict):
    """The settings a query ran with, and where each came from. `sources` maps each field to "request" (the
    request named it), "report <id>" (that layer report recommended it) or "defaults"; `note` says why a
    report's recommendation was not (wholly) used."""

    layers: Any  # the layer selector asked for, the recommended units, or None: every layer of the index
    estimator: str
    aggregation: str
    vote_k: float
    sources: dict[str, str]
    report_id: str | None
    note: str | None


class WorkflowSettings(AnswerSettings):
    """The settings an audit or a check ran with (a query's, plus correct_only)."""

    correct_only: bool


class IndexSettings(TypedDict):
    """GET /v1/indexes/{id}/settings: what queries, audits and checks take for what they do not name.
    `settings_source` is "request", "report <id>" or "defaults"."""

    index_id: str
    mode: SettingsMode
    report_id: str | None  # the pinned report (pinned-report only)
    settings_source: str
    settings: WorkflowSettings  # what an audit or check that names nothing uses now


class IndexSettingsUpdate(TypedDict):
    """PUT /v1/indexes/{id}/settings: follow the latest layer report, pin one (`report_id`), or the defaults."""

    mode: SettingsMode
    report_id: NotRequired[str | None]


class RowsDeleted(TypedDict):
    index_id: str
    deleted: int
    already_deleted: int
    num_rows: int
    deleted_rows: int


# ---------------------------------------------------------------------------------------------- queries


class Example(TypedDict):
    """An input to explain (or a reference example): the label whose prediction is explained (a class index
    or a label name; the completion for causal LMs)."""

    text: str
    label: int | str | None
    text_pair: NotRequired[str | None]


class ScoringOptions(TypedDict, total=False):
    """How rows are scored and aggregated: the options queries, audits and checks share. Estimator and
    aggregation names are the service's (it answers 422 naming the field for one it does not know). Those left
    out come from the index's settings (its layer report's recommendation, else the defaults): the answer's
    `settings_source` and `settings` say what was used."""

    layers: LayerSelector | None
    estimator: str | None
    aggregation: str | None
    vote_k: float | None


class QueryOptions(ScoringOptions, total=False):
    """query's options (POST /v1/indexes/{id}/query beside `examples`)."""

    top_k: int | None
    direction: str | None  # helpful | harmful | both
    approximate: bool | None
    candidates_per_layer: int | None


class LayerScore(TypedDict):
    layer: str
    score: float
    rank: float


class Hit(TypedDict):
    row: int
    text: str
    text_pair: str | None
    label: Any
    noisy: bool | None
    score: float
    layers: list[LayerScore]


class ExampleResult(TypedDict):
    example: int
    text: str
    label: Any
    prediction: int | None
    loss: float
    candidates: int
    helpful: list[Hit] | None
    harmful: list[Hit] | None


class Approximation(TypedDict):
    what: str
    faiss_kind: str
    faiss_exact_search: bool
    candidates_per_layer: int


class QueryResult(TypedDict):
    index_id: str
    settings_source: str  # "request", "report <id>" or "defaults"
    settings: AnswerSettings
    estimator: str
    aggregation: str
    vote_k: float
    direction: str
    layers: list[str]
    num_rows: int
    approximate: bool
    approximation: Approximation | None
    fidelity: dict[str, float | None] | None  # per layer used: Spearman of projected vs exact scores
    fidelity_warning: str | None
    conventions: str
    results: list[ExampleResult]
    seconds: float


# ------------------------------------------------------------------------------------------- workflows
# Each is a job, and its id is the job's id (docs/decisions/0005-workflows.md).


class Reference(TypedDict, total=False):
    """The reference ("test") set: `dataset_id` (with `rows` or `limit`), or inline `examples`."""

    dataset_id: str | None
    rows: list[int] | None
    limit: int | None
    examples: list[Example] | None


class NoisyRows(TypedDict):
    """Noisy training rows by dataset row id (e.g. the rows a reviewer confirmed)."""

    rows: list[int]


class AuditReview(TypedDict):
    """An audit's review prefix: the shortest start of the ranking expected to hold `target_recall` (in (0, 1])
    of the noisy rows, measured against `noisy`: "dataset" (the index dataset's noisy column, the default when
    it has one) or {"rows": [...]}."""

    target_recall: float
    noisy: NotRequired[Literal["dataset"] | NoisyRows | None]


class AuditOptions(ScoringOptions, total=False):
    """create_audit's options (POST /v1/indexes/{id}/audits beside `reference`)."""

    correct_only: bool | None
    review: AuditReview | None


class AuditTopRow(TypedDict):
    rank: int
    row: int
    score: float
    text: str | None
    label: Any
    label_name: str | None
    noisy: bool | None


class NoiseDetection(TypedDict):
    noisy_rows: int
    ndr_at_30: float | None
    auc_ndr: float | None
    random_ndr_at_30: float | None
    random_auc_ndr: float | None
    ndr_at: dict[str, float] | None


class AuditSummary(TypedDict):
    num_rows: int
    layers: list[str]
    num_reference: int
    reference_accuracy: float | None
    correct_reference: int | None
    num_voters: int
    estimator: str
    aggregation: str
    correct_only: bool
    vote_k: float
    dataset_id: str
    index_deleted_rows_at_audit: int
    top: list[AuditTopRow]
    noise: NoiseDetection | None
    score_tensor_bytes: int
    # With `review`: {target_recall, rows (the prefix's length), total_rows, share, known_noisy, found, recall,
    # recall_interval, precision, precision_interval, confidence, noisy (the mask's source), assumes, read}.
    review: dict[str, Any] | None
    fidelity: dict[str, float | None] | None
    fidelity_warning: str | None
    seconds: float


class Audit(TypedDict):
    id: str
    index_id: str | None
    status: JobStatus
    params: dict[str, Any]
    settings_source: str | None  # "request", "report <id>" or "defaults"; null for audits from before
    settings: WorkflowSettings | None
    job: Job
    summary: AuditSummary | None
    rows_deleted_since_audit: int | None
    conventions: str
    created_at: str


class AuditLayer(TypedDict):
    layer: str
    score: float
    aggregate: float
    rank: int


class AuditRow(TypedDict):
    rank: int
    row: int
    score: float
    text: str | None
    text_pair: str | None
    label: Any
    label_name: str | None
    noisy: bool | None
    layers: list[AuditLayer]


class AuditRowsPage(TypedDict):
    """A page of an audit's ranking, most detrimental first."""

    items: list[AuditRow]
    total: int  # rows in the ranking (review: in its review prefix)
    review: bool  # the page is of the review prefix only
    offset: int
    limit: int
    layers: list[str]
    estimator: str
    aggregation: str
    conventions: str


class ReportOptions(TypedDict, total=False):
    """create_report's options (POST /v1/indexes/{id}/reports beside `reference`). `noisy` is "dataset" (the
    index dataset's noisy column, the default when it has one) or {"rows": [...]}."""

    layers: LayerSelector | None
    estimators: Sequence[str] | None
    aggregations: Sequence[str] | None
    vote_k: float | None
    noisy: str | Mapping[str, Any] | None
    cancellation_rows: int | None
    top_rows: int | None


class Report(TypedDict):
    id: str
    index_id: str | None
    status: JobStatus
    params: dict[str, Any]
    job: Job
    summary: dict[str, Any] | None
    # influence.LayerReport.to_dict(): GET /v1/reports/{id} once succeeded; null in lists and before.
    report: dict[str, Any] | None
    created_at: str


class CheckOptions(ScoringOptions, total=False):
    """create_check's options (the POST /v1/indexes/{id}/checks form beside the file, the reference set and
    the text and label columns). `layers` travels as JSON unless a plain string. Either `threshold_percentile`
    (5 when nothing is given) or one target, `target_precision` or `target_recall` in (0, 1]: the threshold is
    then calibrated on the existing rows against `noisy` ("dataset", or {"rows": [...]}; by default the
    dataset's noisy column, else the explicit rows of the index's layer report)."""

    format: str | None
    text_pair_column: str | None
    correct_only: bool | None
    threshold_percentile: float | None
    target_precision: float | None
    target_recall: float | None
    noisy: str | Mapping[str, Any] | None
    max_flagged: int | None
    append: bool | None


class CheckLayer(TypedDict):
    layer: str
    score: float
    aggregate: float
    percentile: float


class CheckRow(TypedDict):
    row: int
    dataset_row: int | None
    text: str
    text_pair: str | None
    label: Any
    score: float
    percentile: float
    flagged: bool
    layers: list[CheckLayer]


class CheckAppend(TypedDict):
    requested: bool
    status: Literal["not-requested", "pending", "appended", "skipped", "refused", "incomplete"]
    reason: str | None
    dataset_rows: list[int] | None
    index_rows: int | None


class Check(TypedDict):
    """`summary["calibration"]`, for a check made with a target: {target, value, cutoff_rows, rows,
    threshold_percentile (the derived one), score_cutoff, known_noisy, found, precision, precision_interval,
    recall, recall_interval, confidence, noisy (the mask's source), assumes}."""

    id: str
    index_id: str | None
    status: JobStatus
    params: dict[str, Any]
    settings_source: str | None  # "request", "report <id>" or "defaults"; null for checks from before
    settings: WorkflowSettings | None
    job: Job
    verdict: Literal["pass", "fail"] | None
    reasons: list[str]
    warnings: list[str]
    summary: dict[str, Any] | None
    appended: int
    append: CheckAppend
    rows: list[CheckRow] | None
    rows_total: int | None
    created_at: str


class ExperimentOptions(TypedDict, total=False):
    """create_experiment's options (POST /v1/experiments beside the base model, the dataset and the reference
    set). `lora` is {r, alpha, dropout, targets}; `report` the report's settings (layers, estimators,
    aggregations, vote_k, cancellation_rows, top_rows); `retraining` {"enabled": true, ...} needs `heldout`."""

    name: str | None
    heldout: Reference | Mapping[str, Any] | None
    noise_rate: float | None
    seed: int | None
    lora: Mapping[str, Any] | None
    epochs: int | None
    learning_rate: float | None
    batch_size: int | None
    max_length: int | None
    warmup_ratio: float | None
    layers: LayerSelector | None
    projection: Mapping[str, Any] | None
    dtype: str | None
    chunk_size: int | None
    report: Mapping[str, Any] | None
    retraining: Mapping[str, Any] | None


class Experiment(TypedDict):
    id: str
    name: str | None
    status: JobStatus
    stage: Literal["noise", "finetune", "register", "index", "report", "retraining", "done"] | None
    stages_done: list[str]
    params: dict[str, Any]
    job: Job
    model_id: str | None
    dataset_id: str | None
    index_id: str | None
    report_id: str | None
    noise: dict[str, Any] | None
    finetune: dict[str, Any] | None
    retraining: dict[str, Any] | None
    created_at: str
