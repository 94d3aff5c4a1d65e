"""What a layer report holds: its entries, recommendation, baselines, cancellation, score distributions and
detrimental rows; `LayerReport.to_dict()` is its strict-JSON form."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LayerSet:
    """A set of layer units scored together: a single layer (kind "layer") or a group (kind "group")."""

    kind: str
    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class RandomBaseline:
    """What a uniformly random order of the n training rows scores; ndr keys are the percents as strings."""

    ndr: dict[str, float]
    ndr_std: dict[str, float]
    auc_ndr: float
    auc_ndr_std: float


@dataclass(frozen=True)
class ReportEntry:
    """One (estimator, aggregation, layer set): its noise detection and how far it is above random.

    ndr: NDR@p keyed by str(p). auc_ndr_z: (auc_ndr - random_auc_ndr) / random AUC-NDR standard deviation.
    fidelity_min / fidelity_mean: the lowest / mean projection fidelity (Spearman of projected vs exact scores)
    of the set's units, when the report was given fidelity (None otherwise, or when none of its units has one).
    """

    estimator: str
    aggregation: str
    layers: LayerSet
    ndr: dict[str, float]
    auc_ndr: float
    random_ndr: dict[str, float]
    random_auc_ndr: float
    auc_ndr_gain: float
    auc_ndr_z: float
    fidelity_min: float | None = None
    fidelity_mean: float | None = None


@dataclass(frozen=True)
class Recommendation:
    """The best (layers, aggregation, estimator) by AUC-NDR, with the margin it cleared and the runners-up."""

    estimator: str
    aggregation: str
    layers: LayerSet
    auc_ndr: float
    ndr: dict[str, float]
    auc_ndr_gain: float
    required_gain: float
    auc_ndr_z: float
    best_single_layer: dict[str, Any] | None
    runners_up: list[dict[str, Any]]
    fidelity_min: float | None = None
    fidelity_mean: float | None = None


@dataclass(frozen=True)
class FidelitySummary:
    """The projection fidelity the report was given: per reported layer unit its Spearman (None: unknown), the
    threshold below which a unit's rankings are uncertain, the units below it (lowest first), and the warnings
    about the entries that use them (also in LayerReport.warnings)."""

    threshold: float
    units: dict[str, float | None]
    below_threshold: list[str]
    warnings: list[str]


@dataclass(frozen=True)
class LayerCancellation:
    """Cancellation of one layer (method.md §5); None where not finite (a zero gradient sum)."""

    layer: str
    l1_over_l1: float | None
    l1_over_l2: float | None
    num_samples: int


@dataclass(frozen=True)
class GroupCancellation:
    """Mean cancellation over a group's member layers (those with finite values; `members_used` of them)."""

    group: str
    members: tuple[str, ...]
    l1_over_l1: float | None
    l1_over_l2: float | None
    members_used: int


@dataclass(frozen=True)
class CancellationSummary:
    """Cancellation per layer and group, and its Spearman correlation with AUC-NDR across single layers.

    correlation rows: {estimator, aggregation, spearman, layers}; a negative value means layers with less
    cancellation detect noise better (Yeh et al.'s premise).
    """

    layers: list[LayerCancellation]
    groups: list[GroupCancellation]
    correlation_with_auc_ndr: list[dict[str, Any]]
    note: str


@dataclass(frozen=True)
class ScoreDistribution:
    """Distribution of one layer's scores under one estimator.

    quantiles (keys str(q)), mean, std and share_negative are over all n x m scores (over evenly spaced train
    rows when n x m exceeds 4 million). noisy_mean / clean_mean: mean score of noisy / clean rows (needs mask).
    """

    estimator: str
    layer: str
    quantiles: dict[str, float]
    mean: float
    std: float
    share_negative: float
    noisy_mean: float | None
    clean_mean: float | None
    sampled_rows: int


@dataclass(frozen=True)
class DetrimentalRow:
    """A most detrimental training row by rank aggregation over all layers (lower score = more harmful)."""

    estimator: str
    position: int
    row_id: int
    score: float
    noisy: bool | None


@dataclass(frozen=True)
class Criteria:
    """The margins a recommendation must clear, and why (influence.report.recommendation explains them)."""

    alpha: float
    num_candidates: int
    z_critical: float | None
    min_auc_gain: float
    required_auc_gain: float | None
    chance_accuracy: float
    min_accuracy_gain: float
    accuracy_z: float
    accuracy_threshold: float
    explanation: str


@dataclass
class LayerReport:
    """Everything `layer_report` measured; `to_dict()` is strict JSON (non-finite numbers become null)."""

    n_train: int
    n_reference: int
    n_noisy: int | None
    noise_rate: float | None
    num_classes: int
    reference_accuracy: float | None
    reference_correct_count: int | None
    near_chance: bool | None
    estimators: list[str]
    aggregations: list[str]
    percents: list[float]
    vote_k: float
    layers: list[str]
    groups: dict[str, list[str]]
    random_baseline: RandomBaseline | None
    criteria: Criteria
    entries: list[ReportEntry]
    recommendation: Recommendation | None
    cancellation: CancellationSummary | None
    distributions: list[ScoreDistribution]
    detrimental: list[DetrimentalRow]
    unavailable: list[str] = field(default_factory=list)
    unavailable_reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fidelity: FidelitySummary | None = None

    def entry(self, estimator: str, aggregation: str, layers: str, kind: str | None = None) -> ReportEntry:
        """The entry of one (estimator, aggregation, layer set name); KeyError when absent."""
        for e in self.entries:
            if (e.estimator, e.aggregation, e.layers.name) == (estimator, aggregation, layers) and (
                kind is None or e.layers.kind == kind
            ):
                return e
        raise KeyError((estimator, aggregation, layers, kind))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples as lists, NaN and infinities as None)."""
        return jsonable(dataclasses.asdict(self))


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: string keys, tuples as lists, numpy scalars as Python numbers, NaN and infinities as
    None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
