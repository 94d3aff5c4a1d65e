"""Indexes and queries: what a caller sends and what the service answers.

Conventions of every query answer:
- a per-layer score is the estimator's influence of a training row on the example: POSITIVE = the row HELPS
  the example's prediction, negative = it hurts;
- a per-layer rank is the row's 0-based average rank among the ranked rows for that layer, in ASCENDING order
  of score: rank 0 = the lowest score = the most detrimental row (ties share their average rank). Exact
  answers rank every row of the index; approximate answers rank the candidate rows only;
- the aggregated score orders rows the same way: higher = more helpful, lower = more harmful (for `rank` it is
  the mean rank; for `vote` minus the Borda points; see influence.aggregation).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from app.schemas.common import UTCDateTime, finite, strict_body_config
from app.schemas.jobs import JobOut
from influence.aggregation import aggregation_names
from influence.estimators import estimator_class, estimator_names
from influence.projection import AUTO_EXACT_MAX_PARAMS, DEFAULT_DIM

ProjectionKind = Literal["auto", "factorized", "gaussian", "rademacher", "identity"]
UnitProjectionKind = Literal["factorized", "gaussian", "rademacher", "identity", "tokens"]
# Most per-unit overrides in one request (a registered model lists at most max_model_layer_units units).
MAX_PROJECTION_UNITS = 4096
UnitName = Annotated[str, Field(min_length=1, max_length=512)]
Dtype = Literal["float16", "float32"]
FaissKind = Literal["flat", "ivf", "hnsw"]
IndexStatus = Literal["pending", "building", "ready", "failed", "cancelled"]


def _served_estimator(name: str) -> str:
    """A registered estimator an index can serve, looked up when the request arrives (so that one registered
    after startup is accepted)."""
    served = estimator_names(one_checkpoint=True)
    if name in served:
        return name
    if name in estimator_names() and estimator_class(name).needs_checkpoints:
        raise ValueError(
            f"estimator {name!r} needs per-checkpoint features, an index holds one checkpoint's; use one of "
            f"{', '.join(served)}"
        )
    raise ValueError(f"unknown estimator {name!r}; registered: {', '.join(served)}")


def _registered_aggregation(name: str) -> str:
    """A registered aggregation method, looked up when the request arrives."""
    if name not in aggregation_names():
        raise ValueError(f"unknown aggregation {name!r}; registered: {', '.join(aggregation_names())}")
    return name


ESTIMATOR_HELP = (
    "A registered estimator (influence.estimators): "
    f"{', '.join(estimator_names(one_checkpoint=True))}, or one registered since the service started"
)
AGGREGATION_HELP = (
    "A registered cross-layer aggregation (influence.aggregation): "
    f"{', '.join(aggregation_names())}, or one registered since the service started"
)
# What a request's layers, estimator, aggregation and vote_k default to when not sent (app/services/
# index_settings.py); the documented default is the one used without a recommendation.
NOT_SENT = (
    "Not sent: the index's settings (GET /v1/indexes/{id}/settings: its layer report's recommendation), else "
    "this default"
)
EstimatorName = Annotated[
    str,
    Field(min_length=1, max_length=64, description=ESTIMATOR_HELP),
    AfterValidator(_served_estimator),
]
AggregationName = Annotated[
    str,
    Field(min_length=1, max_length=64, description=AGGREGATION_HELP),
    AfterValidator(_registered_aggregation),
]
Direction = Literal["helpful", "harmful", "both"]
VoteK = Annotated[
    float,
    Field(gt=0, le=1, description="vote: share of the ranked rows each voter scores"),
    AfterValidator(finite),
]

# A layer selector (influence.select_layers): an exact name, a glob, `re:<regex>`, `blocks:2-4`,
# `role:attention`, `position:middle`, a group name (`WE`, `CL`, `middle`, `blocks.02-03`), terms joined by
# `&`; a list is the union of its items; an object {names, regex, blocks, roles, position, groups} intersects.
LayerSelector = str | list[str | dict[str, Any]] | dict[str, Any]

CONVENTIONS = (
    "score > 0: the training row helps the example (per layer and aggregated: higher = more helpful). "
    "rank: 0-based average rank in ascending score order among the ranked rows, 0 = most detrimental."
)


class UnitProjectionIn(BaseModel):
    """How one layer unit is projected, overriding the projection's kind for that unit."""

    model_config = strict_body_config()

    kind: UnitProjectionKind = Field(
        description="factorized (LoGra) | gaussian | rademacher (dense random) | identity (exact: the unit's "
        "whole gradient, one number per parameter) | tokens (embeddings: per row its distinct tokens, each with "
        "its gradient row; exact at the embedding's width, or each row sketched to `dim` numbers below it)"
    )
    dim: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="Target dimension of this unit (factorized: about this); default the projection's dim. "
        "identity ignores it (its dimension is the unit's parameter count)",
    )


class ProjectionIn(BaseModel):
    """How per-sample gradients are projected before they are stored (influence.ProjectionSpec), per layer unit."""

    model_config = strict_body_config()

    kind: ProjectionKind = Field(
        "auto",
        description="auto (default): the word embedding is stored exactly as token rows (`tokens`: its gradient "
        "is row-sparse), units with at most exact_max_params parameters (LoRA matrices, a classification head) "
        "exactly (identity), every other unit factorized at `dim` (LoGra). Or one kind for every unit: "
        "factorized | gaussian | rademacher | identity",
    )
    dim: int = Field(
        DEFAULT_DIM, ge=1, le=65536, description="Target dimension per projected unit (factorized: about this)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the random projection")
    exact_max_params: int = Field(
        AUTO_EXACT_MAX_PARAMS,
        ge=1,
        le=2**24,
        description="auto only: the largest unit (in parameters) stored exactly; larger units are factorized. Not "
        "sent: the default, lowered (largest units first) until the index fits max_feature_bytes_per_row and "
        "max_statistics_bytes; the index shows the value it got",
    )
    units: dict[UnitName, UnitProjectionIn] | None = Field(
        None,
        max_length=MAX_PROJECTION_UNITS,
        description="Per-unit overrides {unit name: {kind, dim}}, naming units among the index's layers; "
        "units not named follow `kind`",
    )

    def spec_dict(self) -> dict[str, Any]:
        """The mapping influence.ProjectionSpec.from_dict takes (overrides without their unset dims)."""
        out: dict[str, Any] = {"kind": self.kind, "dim": self.dim, "seed": self.seed}
        if self.kind == "auto":
            out["exact_max_params"] = self.exact_max_params
        if self.units:
            out["units"] = {name: unit.model_dump(exclude_none=True) for name, unit in self.units.items()}
        return out


class IndexCreate(BaseModel):
    """Build an index: projected per-layer gradients of every row of a dataset under a model."""

    model_config = strict_body_config(
        {
            "model_id": "3f0c...",
            "dataset_id": "9a1b...",
            "layers": "all",
            "projection": {
                "kind": "auto",
                "dim": 256,
                "seed": 0,
                "units": {"head": {"kind": "gaussian", "dim": 64}},
            },
            "dtype": "float16",
            "faiss_kind": "flat",
        }
    )

    model_id: str = Field(min_length=1, max_length=32)
    dataset_id: str = Field(min_length=1, max_length=32)
    layers: LayerSelector | None = Field(None, description="Layer selector; default every layer of the model")
    projection: ProjectionIn = Field(default_factory=ProjectionIn)
    dtype: Dtype = Field("float16", description="Storage type of the features (norms are always float32)")
    faiss_kind: FaissKind = Field("flat", description="FAISS index per layer: flat (exact), ivf or hnsw")
    chunk_size: int | None = Field(
        None, ge=1, le=1_000_000, description="Rows per build chunk (unit of parallelism); default: settings"
    )
    max_length: int | None = Field(None, ge=2, le=32768, description="Token limit per row; default: settings")


class RowsDelete(BaseModel):
    """Rows to delete from an index, by their row position in the dataset (as hits and dataset pages number them)."""

    model_config = strict_body_config({"row_ids": [17, 403]})

    row_ids: list[Annotated[int, Field(ge=0, le=2**62)]] = Field(min_length=1, max_length=1_000_000)


class RowsDeleted(BaseModel):
    index_id: str
    deleted: int = Field(description="Rows newly deleted by this request")
    already_deleted: int = Field(description="Rows of the request that were deleted before")
    num_rows: int = Field(description="Rows that answer queries now")
    deleted_rows: int = Field(description="Deleted rows still on disk until a compaction (POST .../compact)")


class UnitProjectionOut(BaseModel):
    kind: str = Field(description="How the unit is projected: identity (exact) | factorized | gaussian | rademacher")
    dim: int = Field(description="The unit's target dimension as its projection records it")
    features: int = Field(description="Numbers stored per row for this unit")


class ProjectionOut(BaseModel):
    kind: str = Field(description="auto | factorized | gaussian | rademacher | identity | tokens")
    dim: int
    seed: int
    exact_max_params: int | None = Field(
        None, description="auto only: the largest unit (in parameters) stored exactly"
    )
    units: dict[str, UnitProjectionOut] = Field(
        default_factory=dict,
        description="Per layer unit, the projection actually used: from the index's manifest once the build "
        "has planned it, resolved from the request before",
    )


class FidelitySample(BaseModel):
    train_rows: int = Field(description="Training rows of the dataset in the sample")
    query_rows: int = Field(description="Other rows of the dataset scored against them as queries")
    seed: int = Field(description="Seed of the draw")
    dtype: str = Field(description="The index's storage dtype, which the projected features were cast to")
    note: str | None = Field(
        None, description="E.g. that a model with checkpoints was measured at its final state"
    )


class UnitFidelityOut(BaseModel):
    projection: dict[str, Any] = Field(description="The unit's projection: {kind, dim}")
    spearman: float | None = Field(
        description="Mean over the queries of the Spearman correlation between the unit's projected and exact "
        "grad-dot scores of the training rows (1 = the same ranking)"
    )
    spearman_min: float | None = Field(description="The lowest of those per-query correlations")
    rel_error: float | None = Field(description="||projected - exact||_F / ||exact||_F over the sample")
    top10_overlap: float | None = Field(
        description="Mean share of a query's 10 highest exact scores among its 10 highest projected ones"
    )


class IndexFidelity(BaseModel):
    """How faithful each unit's stored (projected) features are to its exact gradients, measured when the build
    finalized (app/services/fidelity.py). Either the measurement, or `skipped` with the reason."""

    skipped: str | None = Field(None, description="Why fidelity was not measured (then nothing else is set)")
    sample: FidelitySample | None = None
    threshold: float | None = Field(
        None, description="Below this Spearman a unit's rankings (and what is decided from them) are unsure"
    )
    seconds: float | None = Field(None, description="Time the measurement took")
    units: dict[str, UnitFidelityOut] | None = Field(None, description="Per layer unit of the index")
    below_threshold: list[str] | None = Field(
        None, description="Units whose spearman is below the threshold, lowest first"
    )


class IndexOut(BaseModel):
    id: str
    model_id: str
    dataset_id: str
    status: IndexStatus = Field(description="pending -> building -> ready (or failed / cancelled)")
    layer_selector: Any = Field(description="The selector the index was asked for (null: all layers)")
    layers: list[str] = Field(description="The layer units the index holds, in model order")
    projection: ProjectionOut
    dtype: str
    faiss_kind: str
    num_rows: int = Field(description="Rows that answer queries (deleted rows excluded)")
    deleted_rows: int = Field(
        0, description="Rows deleted whose features are still on disk until a compaction removes them"
    )
    size_bytes: int = Field(description="Bytes on disk: features, norms, statistics and FAISS indexes")
    feature_bytes_estimate: int = Field(description="Bytes the stored features take (rows x dims x dtype)")
    manifest: dict[str, Any] | None = Field(
        description="What the features were computed from (model, weights hash, tokenizer, dataset hash, "
        "layers with their dims, projection, dtype, ...); a query must match it"
    )
    job: JobOut | None = Field(description="The build job: status and progress (done / total chunks)")
    fidelity: IndexFidelity | None = Field(
        None,
        description="Per-unit fidelity of the projection, measured when the build finalized (null while "
        "building, and for indexes built before it was measured)",
    )
    created_at: UTCDateTime


class QueryExample(BaseModel):
    """One input to explain: text (and text_pair) with the label whose prediction is explained."""

    model_config = strict_body_config()

    text: str = Field(min_length=1)
    text_pair: str | None = None
    label: int | str | None = Field(
        description="Classification: a class index (or a label name of the dataset). Causal LM: the completion"
    )


class QueryRequest(BaseModel):
    """Which training rows most helped / harmed each example, aggregated over the chosen layers."""

    model_config = strict_body_config(
        {
            "examples": [{"text": "a gorgeous , witty , seductive movie .", "label": 1}],
            "layers": "middle",
            "estimator": "grad-dot",
            "aggregation": "rank",
            "top_k": 5,
            "direction": "both",
        }
    )

    examples: list[QueryExample] = Field(min_length=1)
    layers: LayerSelector | None = Field(
        None,
        description="Layer names, groups or selectors, among the index's layers. Not sent: the index's settings "
        "(GET /v1/indexes/{id}/settings: its layer report's recommendation), else all of them",
    )
    estimator: EstimatorName = Field("grad-dot", description=f"{NOT_SENT}; {ESTIMATOR_HELP}")
    aggregation: AggregationName = Field("rank", description=f"{NOT_SENT}; {AGGREGATION_HELP}")
    vote_k: VoteK = 0.2
    top_k: int = Field(10, ge=1)
    direction: Direction = "both"
    approximate: bool = Field(
        False,
        description="Exact by default (every row scored). true: per-layer FAISS search proposes candidates, "
        "which are then scored exactly; the answer says what was approximated",
    )
    candidates_per_layer: int | None = Field(
        None, ge=1, description="approximate only: rows FAISS proposes per layer and direction (default 4 x top_k)"
    )


class LayerScore(BaseModel):
    layer: str
    score: float = Field(description="The estimator's score in this layer (> 0 helps)")
    rank: float = Field(description="0-based ascending rank among the ranked rows for this layer (0 = most harmful)")


class Hit(BaseModel):
    row: int = Field(description="Row position in the dataset (as GET /v1/datasets/{id}/rows numbers it)")
    text: str
    text_pair: str | None
    label: Any
    noisy: bool | None = Field(description="The dataset's noisy flag of the row, when it has one")
    score: float = Field(description="Aggregated score (higher = more helpful)")
    layers: list[LayerScore] = Field(description="Per-layer scores and ranks behind the aggregated score")


class ExampleResult(BaseModel):
    example: int = Field(description="Position of the example in the request")
    text: str
    label: Any
    prediction: int | None = Field(description="The model's predicted class (classification)")
    loss: float = Field(description="The model's loss on the example, in nats")
    candidates: int = Field(description="Rows ranked: every row (exact) or the FAISS candidates (approximate)")
    helpful: list[Hit] | None = Field(description="Most helpful rows first (direction helpful or both)")
    harmful: list[Hit] | None = Field(description="Most harmful rows first (direction harmful or both)")


class Approximation(BaseModel):
    what: str = Field(description="What was approximated")
    faiss_kind: str
    faiss_exact_search: bool = Field(description="Whether the per-layer search itself is exact (flat)")
    candidates_per_layer: int


def fidelity_field(layers: str) -> Any:
    """The `fidelity` field of an answer (app/services/queries.answer_fidelity) over the layers it has `layers`
    ("used", "scored")."""
    return Field(
        None,
        description=f"Per layer {layers}: the Spearman correlation of its projected scores with exact gradient "
        "scores, measured when the index was built (null for an index without that measurement)",
    )


def fidelity_warning_field(layers: str) -> Any:
    """The `fidelity_warning` field of an answer over the layers it has `layers` ("used", "scored")."""
    return Field(
        None, description=f"Set when a layer {layers} ranks rows unlike its exact gradients (Spearman below 0.9)"
    )


SettingsMode = Literal["latest-report", "pinned-report", "defaults"]
SETTINGS_SOURCE = (
    'Where the settings came from: "request" (the request named layers, estimator and aggregation), '
    '"report <id>" (the index\'s layer report recommended what the request did not name) or "defaults"'
)


class AnswerSettings(BaseModel):
    """The settings a query used, each with where it came from (app/services/index_settings.py)."""

    layers: Any = Field(
        description="The layer selector asked for, or the recommended layer units; null: every layer of the index"
    )
    estimator: str
    aggregation: str
    vote_k: float
    sources: dict[str, str] = Field(
        description='Per field: "request" (named by the request), "report <id>" (its recommendation) or "defaults"'
    )
    report_id: str | None = Field(
        description="The layer report whose recommendation supplied a field, if one did"
    )
    note: str | None = Field(
        description="Why a report's recommendation was not (wholly) used: it makes none (e.g. a model near chance), "
        "or a query cannot use its correct-only aggregation"
    )


class WorkflowSettings(AnswerSettings):
    """The settings an audit or a check used (a query's, plus correct_only)."""

    correct_only: bool


class IndexSettingsUpdate(BaseModel):
    """Which settings the index's queries, audits and checks use for what they do not name."""

    model_config = strict_body_config({"mode": "pinned-report", "report_id": "5e2d..."})

    mode: SettingsMode = Field(
        description="latest-report: the index's newest succeeded layer report (the default); pinned-report: the "
        "report `report_id` (its deletion is refused while pinned); defaults: today's defaults, whatever reports say"
    )
    report_id: str | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="The layer report to pin: required with pinned-report only",
    )


class IndexSettingsOut(BaseModel):
    index_id: str
    mode: SettingsMode
    report_id: str | None = Field(description="The pinned layer report (pinned-report only)")
    settings_source: str = Field(description=SETTINGS_SOURCE + ", for a request that names nothing")
    settings: WorkflowSettings = Field(
        description="What an audit or check that names nothing uses now (a query the same, without correct_only: "
        "a recommended `-c` aggregation is used without its suffix)"
    )


class QueryResponse(BaseModel):
    index_id: str
    settings_source: str = Field(description=SETTINGS_SOURCE)
    settings: AnswerSettings
    estimator: str
    aggregation: str
    vote_k: float
    direction: str
    layers: list[str] = Field(description="The layers scored and aggregated, in index order")
    num_rows: int = Field(description="Rows in the index that answer queries (deleted rows excluded)")
    approximate: bool
    approximation: Approximation | None
    fidelity: dict[str, float | None] | None = fidelity_field("used")
    fidelity_warning: str | None = fidelity_warning_field("used")
    conventions: str = CONVENTIONS
    results: list[ExampleResult]
    seconds: float
