"""Layer report: which layers, aggregation and estimator find the noisy training rows (method.md §3, §4, §5).

For researchers choosing layers. Given train features (a FeatureStore or per-layer matrices), reference
("test") features, the layer units and, when known, the noisy mask, `layer_report` scores every single layer
and every layer group (WE, block ranges, first / middle / last, CL, total, plus caller-defined groups) with
every estimator, aggregates each set with every aggregation (mean, rank, vote and their correct-only "-c"
variants, or any registered aggregator), and measures NDR@p and AUC-NDR against their random-order baselines.

How the work is shared. Each layer's (n, m) score block is computed once per estimator (LazyScores), and
every aggregation is run on that one layer. A group's aggregate is then assembled from its members' per-layer
aggregates where the method is a sum over voters (mean, rank, vote, rrf, zmean): every layer has the same
voters (all or the same correct reference rows), so e.g. rank(group) = sum_u T_u / (|group| V) with T_u the
layer's exact half-integer rank sum. This equals `aggregate()` over the members bit for bit for rank and vote
(sums of half-integers are exact in float64) and to rounding for the others. Other methods (median, ...) are
aggregated over the group's members directly. Nothing of size n x U x m is held: one (n, m) block at a time.

Whether to recommend. AUC-NDR of a uniformly random order is an affine function of the Mann-Whitney statistic
of the noisy rows' positions, so its mean and standard deviation are exact:
    sum_t NDR(t) = (n + 1) - (1/a) sum_{noisy i} pos_i,  Var = (n - a)(n + 1) / (12 a),   a = #noisy,
    AUC-NDR = sum_t NDR(t) / (a/2 + n - a).
The best entry is picked among N candidates, so it must clear the one-sided Bonferroni bound
z* = Phi^-1(1 - alpha / N) standard deviations above random (alpha = 0.01: under random features the chance
of any recommendation is below 1%), and at least `min_auc_gain` (a floor so that a huge n does not make a
useless improvement "significant"). The model must also be above chance on the reference set by
max(min_accuracy_gain, accuracy_z * sqrt(c (1 - c) / m)) (c = 1/num_classes; accuracy_z = 3 binomial standard
deviations of a chance-level classifier on m rows): a model at chance has gradients that say nothing about the
task, so its influence scores say nothing about which rows hurt it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from influence.aggregation import AGGREGATORS, aggregate, average_ranks, combine_layer_aggregates
from influence.errors import InvalidInputError
from influence.estimators import Estimator, make_estimator
from influence.layers import Layer, layer_groups
from influence.metrics import (
    DEFAULT_NDR_PERCENTS,
    Cancellation,
    auc_ndr,
    ndr_at,
    random_baseline_auc_ndr,
    random_baseline_ndr_at,
)
from influence.scoring import LazyScores, top_k
from influence.store import FeatureStore
from influence.tokens import TokenRows

DEFAULT_ESTIMATORS: tuple[str, ...] = ("grad-dot", "cosine", "datainf")
DEFAULT_AGGREGATIONS: tuple[str, ...] = ("mean", "rank", "vote", "rank-c", "vote-c")
DEFAULT_QUANTILES: tuple[float, ...] = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
CORRECT_SUFFIX = "-c"

# How a group's aggregate follows from its members' when every member has the same number of voters.
# "average": mean of the members' values; "rank-sum": the same, from exact half-integer rank sums;
# "sum": sum of the members' values. Methods not listed are aggregated over the group directly.
_DECOMPOSABLE = {"mean": "average", "zmean": "average", "rank": "rank-sum", "vote": "sum", "rrf": "sum"}
# Quantiles are taken over all n x m scores of a layer up to this many, else over evenly spaced rows.
_QUANTILE_BUDGET = 4_000_000
# Rows per chunk when fitting an estimator on train features (float64 copies: 16k x 1024 x 8 = 128 MiB).
_FIT_ROWS = 16384

_NO_MASK = "no noisy mask was given: the noise detection rate needs to know which training rows are noisy"


# --------------------------------------------------------------------------------------------- results


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
    """The margins a recommendation must clear, and why (see the module docstring)."""

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
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------------------ the inputs


def _percent_key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else repr(float(p))


@dataclass
class _TrainSource:
    """Per-layer train feature matrices (n, k_u), optional stored norms, row ids and chunk iterators."""

    arrays: dict[str, Any]
    norms: dict[str, Any] | None
    row_ids: np.ndarray
    chunks: Callable[[str], Iterator[np.ndarray]]


class _LiveRows:
    """One layer's (n, k) features restricted to a store's live positions, as an (n_live, k) array-like whose
    row slices are gathered when read: never a whole layer copied into memory at once."""

    def __init__(self, matrix: Any, live: np.ndarray) -> None:
        self._matrix, self._live = matrix, live
        self.shape = (len(live), int(matrix.shape[1]))
        self.dtype = matrix.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        return np.asarray(self._matrix[self._live[rows]])


def _live_rows(matrix: Any, live: np.ndarray) -> Any:
    # Token rows are a few numbers per row: selected at once.
    return matrix.select(live) if isinstance(matrix, TokenRows) else _LiveRows(matrix, live)


def _train_source(features: Any, names: Sequence[str]) -> _TrainSource:
    if isinstance(features, FeatureStore):
        missing = [n for n in names if n not in features.layers]
        if missing:
            raise InvalidInputError(f"the feature store has no layers {missing}")
        live = features.live_positions()
        if len(live) < features.num_rows:
            # Deleted (tombstoned) rows are in no rank, mask position or detrimental list: a report ranges over
            # the live rows only, read through per-layer views that gather a block of rows at a time.
            views = {n: _live_rows(features.layer(n), live) for n in names}

            def live_chunks(name: str) -> Iterator[np.ndarray]:
                view = views[name]
                for i0 in range(0, len(view), _FIT_ROWS):
                    yield view[i0 : i0 + _FIT_ROWS]

            return _TrainSource(
                views,
                {n: np.asarray(features.norms(n))[live] for n in names},
                np.asarray(features.row_ids(), dtype=np.int64)[live],
                live_chunks,
            )

        def store_chunks(name: str) -> Iterator[np.ndarray]:
            for _, block in features.iter_layer_chunks(name, _FIT_ROWS):
                yield block

        return _TrainSource(
            {n: features.layer(n) for n in names},
            {n: features.norms(n) for n in names},  # read-only memmaps: scoring takes them as they are
            np.asarray(features.row_ids(), dtype=np.int64),
            store_chunks,
        )
    mapping = _as_mapping(features, "features")
    missing = [n for n in names if n not in mapping]
    if missing:
        raise InvalidInputError(f"features missing for layers {missing}")
    arrays = {n: mapping[n] for n in names}
    sizes = {tuple(getattr(a, "shape", ())) for a in arrays.values()}
    if any(len(s) != 2 for s in sizes) or len({s[0] for s in sizes}) != 1:
        raise InvalidInputError(
            f"train features must be (n, k) matrices with one n, got shapes {sorted(sizes)}"
        )
    n = next(iter(sizes))[0]

    def array_chunks(name: str) -> Iterator[np.ndarray]:
        array = arrays[name]
        for i0 in range(0, n, _FIT_ROWS):
            yield array[i0 : i0 + _FIT_ROWS]

    return _TrainSource(arrays, None, np.arange(n, dtype=np.int64), array_chunks)


def _as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    inner = getattr(value, "features", None)  # a featurize.FeatureSet
    if isinstance(inner, Mapping):
        return inner
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            f"{what} must be a FeatureStore, a FeatureSet or a mapping of layer -> matrix"
        )
    return value


def _mask(values: Any, size: int, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    mask = np.asarray(values)
    if mask.shape != (size,):
        raise InvalidInputError(f"{what} must have shape ({size},), got {mask.shape}")
    if mask.dtype != np.bool_:
        if not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
            raise InvalidInputError(f"{what} must be a boolean mask, got dtype {mask.dtype}")
        mask = mask.astype(bool)
    return mask


def _split_aggregation(name: str) -> tuple[str, bool]:
    """(registered method, correct-only?) of an aggregation name such as "rank-c"."""
    if name in AGGREGATORS:
        return name, False
    if name.endswith(CORRECT_SUFFIX) and name[: -len(CORRECT_SUFFIX)] in AGGREGATORS:
        return name[: -len(CORRECT_SUFFIX)], True
    raise InvalidInputError(
        f"unknown aggregation {name!r}; expected one of {', '.join(AGGREGATORS)} or one of them + '-c'"
    )


def layer_sets(
    layers: Sequence[Layer],
    extra_groups: Mapping[str, Sequence[str]] | None = None,
    include_layers: bool = True,
) -> list[LayerSet]:
    """Every single layer (in order), then the paper's groups (layer_groups), then `extra_groups`."""
    names = [layer.name for layer in layers]
    sets = [LayerSet("layer", n, (n,)) for n in names] if include_layers else []
    sets += [LayerSet("group", g, tuple(m)) for g, m in layer_groups(layers).items()]
    known = {s.name for s in sets if s.kind == "group"}
    for group, members in (extra_groups or {}).items():
        members = tuple(members)
        unknown = [m for m in members if m not in names]
        if not members or unknown:
            raise InvalidInputError(
                f"extra group {group!r} must list known layers; unknown: {unknown or 'empty'}"
            )
        if group in known:
            raise InvalidInputError(f"extra group {group!r} clashes with a built-in group name")
        known.add(group)
        sets.append(LayerSet("group", group, members))
    return sets


# --------------------------------------------------------------------------------------- the scores


@dataclass
class _EstimatorScores:
    """One estimator's aggregated scores keyed (kind, layer set name, aggregation), and its distributions."""

    scores: dict[tuple[str, str, str], np.ndarray]
    distributions: list[ScoreDistribution]


def _fit(
    name: str, options: Mapping[str, Any], layer: Layer, chunks: Callable[[], Iterator[Any]], rows: Any = None
) -> Estimator:
    estimator = make_estimator(name, **dict(options))
    if isinstance(rows, TokenRows):  # the exact embedding: fitted over its rows at once
        estimator.fit_token_rows(rows, layer.num_params)
        return estimator

    def train_chunks() -> Iterator[torch.Tensor]:
        for block in chunks():
            # A copy in float64: stored memmaps are read-only and float16, which torch refuses or loses.
            yield torch.from_numpy(np.array(block, dtype=np.float64))

    estimator.fit(train_chunks, layer.num_params)
    return estimator


def _distribution(
    estimator: str, layer: str, block: torch.Tensor, noisy: np.ndarray | None, quantiles: Sequence[float]
) -> ScoreDistribution:
    n, m = block.shape
    block = block.detach().cpu()
    sampled = block
    if n * m > _QUANTILE_BUDGET:
        rows = np.unique(np.linspace(0, n - 1, max(1, _QUANTILE_BUDGET // m)).round().astype(np.int64))
        sampled = block[torch.from_numpy(rows)]
    qs = np.quantile(sampled.numpy().astype(np.float64).ravel(), list(quantiles))
    # float64 statistics over row chunks: no float64 copy of the whole (n, m) block.
    step = max(1, _QUANTILE_BUDGET // max(m, 1))
    row_sums = torch.cat([block[i : i + step].double().sum(dim=1) for i in range(0, n, step)])
    mean = float(row_sums.sum()) / (n * m)
    squares = sum(float((block[i : i + step].double() - mean).square_().sum()) for i in range(0, n, step))
    negative = sum(int((block[i : i + step] < 0).sum()) for i in range(0, n, step))
    row_means = (row_sums / m).numpy()
    noisy_mean = clean_mean = None
    if noisy is not None:
        noisy_mean = float(row_means[noisy].mean()) if noisy.any() else None
        clean_mean = float(row_means[~noisy].mean()) if (~noisy).any() else None
    return ScoreDistribution(
        estimator=estimator,
        layer=layer,
        quantiles={repr(float(q)): float(v) for q, v in zip(quantiles, qs, strict=True)},
        mean=mean,
        std=math.sqrt(squares / (n * m)),
        share_negative=negative / (n * m),
        noisy_mean=noisy_mean,
        clean_mean=clean_mean,
        sampled_rows=int(sampled.shape[0]),
    )


def aggregated_scores(
    features: FeatureStore | Mapping[str, Any],
    reference_features: Mapping[str, Any],
    *,
    layers: Sequence[Layer],
    estimator: str,
    aggregations: Sequence[str] = DEFAULT_AGGREGATIONS,
    sets: Sequence[LayerSet] | None = None,
    reference_correct: Any = None,
    vote_k: float = 0.2,
    estimator_options: Mapping[str, Any] | None = None,
) -> dict[tuple[str, str, str], np.ndarray]:
    """Aggregated scores (n,) float64 (lower = more detrimental) keyed (kind, layer set name, aggregation).

    features: train features (n, k_u) per layer; reference_features: (m, k_u) per layer. sets: default every
    layer and group of `layers` (layer_sets). "-c" aggregations need reference_correct (m,) bool.
    """
    names = [layer.name for layer in layers]
    source = _train_source(features, names)
    queries = _as_mapping(reference_features, "reference_features")
    m = _reference_size(queries, names)
    correct = None if reference_correct is None else _mask(reference_correct, m, "reference_correct")
    result = _score_estimator(
        source,
        queries,
        list(layers),
        estimator,
        dict(estimator_options or {}),
        list(aggregations),
        list(sets) if sets is not None else layer_sets(layers),
        correct,
        vote_k,
        None,
        None,  # no distributions: only the scores are asked for
    )
    return result.scores


def _reference_size(queries: Mapping[str, Any], names: Sequence[str]) -> int:
    missing = [n for n in names if n not in queries]
    if missing:
        raise InvalidInputError(f"reference features missing for layers {missing}")
    sizes = {tuple(getattr(queries[n], "shape", ())) for n in names}
    if any(len(s) != 2 for s in sizes) or len({s[0] for s in sizes}) != 1:
        raise InvalidInputError(f"reference features must be (m, k) matrices with one m, got {sorted(sizes)}")
    return int(next(iter(sizes))[0])


def _score_estimator(
    source: _TrainSource,
    queries: Mapping[str, Any],
    layers: list[Layer],
    estimator: str,
    options: dict[str, Any],
    aggregations: list[str],
    sets: list[LayerSet],
    correct: np.ndarray | None,
    vote_k: float,
    noisy: np.ndarray | None,
    quantiles: Sequence[float] | None,
    fitted: Mapping[str, Estimator] | None = None,
) -> _EstimatorScores:
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted({n for s in sets for n in s.members} - set(by_name))
    if unknown:
        raise InvalidInputError(f"layer sets name layers that are not in `layers`: {unknown}")
    parsed = {a: _split_aggregation(a) for a in aggregations}
    if any(c for _, c in parsed.values()) and correct is None:
        raise InvalidInputError("correct-only ('-c') aggregations need reference_correct")
    columns = {False: None, True: correct}
    m = int(queries[layers[0].name].shape[0])
    num_voters = {False: m, True: None if correct is None else int(correct.sum())}
    estimators: dict[str, Estimator] = {}

    def lazy(members: Sequence[str]) -> LazyScores:
        for name in members:
            if name not in estimators:
                given = None if fitted is None else fitted.get(name)
                estimators[name] = (
                    given
                    if given is not None
                    else _fit(
                        estimator,
                        options,
                        by_name[name],
                        lambda n=name: source.chunks(n),
                        source.arrays[name],
                    )
                )
        return LazyScores(
            {n: source.arrays[n] for n in members},
            {n: queries[n] for n in members},
            {n: estimators[n] for n in members},
            None if source.norms is None else {n: source.norms[n] for n in members},
        )

    # Per-layer aggregates of every method, from one (n, m) block per layer (LazyScores caches it).
    needed_layers = {n for s in sets for n in s.members}
    per_layer: dict[tuple[str, str], np.ndarray] = {}
    distributions = []
    for layer in layers:
        if layer.name not in needed_layers:
            continue
        scores = lazy([layer.name])
        if quantiles is not None:
            distributions.append(
                _distribution(estimator, layer.name, scores.layer_scores(0), noisy, quantiles)
            )
        for agg, (method, only_correct) in parsed.items():
            per_layer[(layer.name, agg)] = aggregate(
                scores, method, vote_k=vote_k, correct=columns[only_correct]
            )
        estimators.pop(layer.name, None)  # DataInf's k x k matrix is not needed again unless a group asks

    out: dict[tuple[str, str, str], np.ndarray] = {}
    for layer_set in sets:
        for agg, (method, only_correct) in parsed.items():
            parts = [per_layer[(name, agg)] for name in layer_set.members]
            rule = _DECOMPOSABLE.get(method)
            if len(parts) == 1:
                value = parts[0]
            elif rule == "sum":
                value = np.sum(parts, axis=0)
            elif rule == "average":
                value = np.mean(parts, axis=0)
            elif rule == "rank-sum":
                voters = num_voters[only_correct]
                assert voters is not None
                # Exact half-integer rank sums per layer, summed, divided once: aggregate()'s own arithmetic.
                value = combine_layer_aggregates(parts, "rank", voters)
            else:
                value = aggregate(
                    lazy(layer_set.members), method, vote_k=vote_k, correct=columns[only_correct]
                )
            out[(layer_set.kind, layer_set.name, agg)] = value
    return _EstimatorScores(out, distributions)


# ------------------------------------------------------------------------------------- the statistics


def random_auc_ndr_std(n: int, n_noisy: int) -> float:
    """Exact standard deviation of AUC-NDR under a uniformly random order of n rows with n_noisy noisy.

    sum_t NDR(t) = (n + 1) - mean position of the noisy rows; the sum of a random n_noisy-subset of 1..n
    has variance a (n - a)(n + 1) / 12.
    """
    if not 1 <= n_noisy <= n:
        raise InvalidInputError(f"n_noisy must be in [1, n={n}], got {n_noisy}")
    variance = (n - n_noisy) * (n + 1) / (12 * n_noisy)
    return math.sqrt(variance) / (n_noisy / 2 + (n - n_noisy))


def random_ndr_std(percents: Sequence[float], n: int, n_noisy: int) -> dict[str, float]:
    """Standard deviation of NDR@p under a random order: hypergeometric count of noisy rows among t, over a."""
    out = {}
    baseline = random_baseline_ndr_at(percents, n)
    for p in percents:
        t = round(baseline[p] * n)
        share = n_noisy / n
        variance = t * share * (1 - share) * ((n - t) / (n - 1) if n > 1 else 0.0)
        out[_percent_key(p)] = math.sqrt(variance) / n_noisy
    return out


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3:
        return None
    rx = average_ranks(torch.tensor(x, dtype=torch.float64)).numpy()
    ry = average_ranks(torch.tensor(y, dtype=torch.float64)).numpy()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _cancellation_summary(
    cancellation: Mapping[str, Cancellation],
    sets: list[LayerSet],
    entries: list[ReportEntry],
    names: list[str],
) -> CancellationSummary:
    rows = [
        LayerCancellation(n, _finite(c.l1_over_l1), _finite(c.l1_over_l2), int(c.num_samples))
        for n in names
        if (c := cancellation.get(n)) is not None
    ]
    by_layer = {r.layer: r for r in rows}
    groups = []
    for s in sets:
        if s.kind != "group":
            continue
        known = [by_layer[m] for m in s.members if m in by_layer]
        l1 = [r.l1_over_l1 for r in known if r.l1_over_l1 is not None]
        l2 = [r.l1_over_l2 for r in known if r.l1_over_l2 is not None]
        groups.append(
            GroupCancellation(
                s.name,
                s.members,
                float(np.mean(l1)) if l1 else None,
                float(np.mean(l2)) if l2 else None,
                len(l1),
            )
        )
    correlations = []
    cells = sorted({(e.estimator, e.aggregation) for e in entries}, key=lambda c: (c[0], c[1]))
    for est, agg in cells:
        pairs = [
            (by_layer[e.layers.name].l1_over_l1, e.auc_ndr)
            for e in entries
            if (e.estimator, e.aggregation, e.layers.kind) == (est, agg, "layer")
            and e.layers.name in by_layer
            and by_layer[e.layers.name].l1_over_l1 is not None
        ]
        correlations.append(
            {
                "estimator": est,
                "aggregation": agg,
                "spearman": _spearman([p[0] for p in pairs], [p[1] for p in pairs]),
                "layers": len(pairs),
            }
        )
    note = (
        "Group values are the mean over member layers. Embedding gradients are row-sparse, so their "
        "cancellation is low by construction; label-flipped rows push against clean ones, so cancellation is "
        "partly the very signal noise detection uses (method.md §5)."
    )
    return CancellationSummary(rows, groups, correlations, note)


# ------------------------------------------------------------------------------------------ the report


def layer_report(
    features: FeatureStore | Mapping[str, Any],
    reference_features: Mapping[str, Any],
    *,
    layers: Sequence[Layer],
    noisy: Any = None,
    reference_correct: Any = None,
    reference_accuracy: float | None = None,
    num_classes: int = 2,
    estimators: Sequence[str] = DEFAULT_ESTIMATORS,
    aggregations: Sequence[str] = DEFAULT_AGGREGATIONS,
    vote_k: float = 0.2,
    percents: Sequence[float] = DEFAULT_NDR_PERCENTS,
    cancellation: Mapping[str, Cancellation] | None = None,
    extra_groups: Mapping[str, Sequence[str]] | None = None,
    estimator_options: Mapping[str, Mapping[str, Any]] | None = None,
    fitted_estimators: Mapping[str, Mapping[str, Estimator]] | None = None,
    alpha: float = 0.01,
    min_auc_gain: float = 0.02,
    min_accuracy_gain: float = 0.05,
    accuracy_z: float = 3.0,
    top_rows: int = 20,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    fidelity: Mapping[str, float | None] | None = None,
    fidelity_threshold: float | None = None,
) -> LayerReport:
    """Noise detection of every layer, group, aggregation and estimator, with baselines and a recommendation.

    features: train features (n, k_u) per layer (FeatureStore, FeatureSet or mapping); reference_features:
    (m, k_u) per layer. layers: the units to report (names must match; groups come from them). noisy: (n,)
    bool or None. reference_correct: (m,) bool, whether the model predicts each reference row correctly (needed
    by the "-c" aggregations; gives the accuracy when reference_accuracy is None). cancellation: layer ->
    metrics.Cancellation. extra_groups: name -> member layers. fitted_estimators: estimator name -> layer ->
    an Estimator used as given instead of one fitted on `features` (e.g. DataInf restored from the statistics an
    index was built with, so the report scores as its queries do). A FeatureStore's deleted rows are left out.
    fidelity: layer -> projection fidelity (influence.fidelity: Spearman of the unit's projected vs exact scores;
    None or absent: unknown): every entry then carries the lowest and mean fidelity of its units, and each unit
    below `fidelity_threshold` (default influence.fidelity.FIDELITY_WARNING) gets a warning naming the entries
    whose AUC-NDR it makes uncertain. The margins are explained in the module docstring.
    """
    layers = list(layers)
    if not layers:
        raise InvalidInputError("layer_report needs at least one layer")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise InvalidInputError("layer names must be unique")
    if not estimators:
        raise InvalidInputError("layer_report needs at least one estimator")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not (0 < alpha < 1):
        raise InvalidInputError(f"alpha must be in (0, 1), got {alpha!r}")
    for a in aggregations:
        _split_aggregation(a)
    unit_fidelity = _fidelity_input(fidelity, names)
    if fidelity_threshold is None:
        from influence.fidelity import FIDELITY_WARNING

        fidelity_threshold = FIDELITY_WARNING
    source = _train_source(features, names)
    queries = _as_mapping(reference_features, "reference_features")
    m = _reference_size(queries, names)
    n = len(source.row_ids)
    sets = layer_sets(layers, extra_groups)

    unavailable: list[str] = []
    reasons: dict[str, str] = {}
    warnings: list[str] = []

    mask = None if noisy is None else _mask(noisy, n, "noisy")
    usable_mask = mask
    if mask is None:
        reason = _NO_MASK
    elif not mask.any() or mask.all():
        reason = (
            f"the noisy mask marks {'no' if not mask.any() else 'every'} training row: the noise detection rate "
            "needs both noisy and clean rows"
        )
        usable_mask = None
    if usable_mask is None:
        for what in ("ndr", "auc_ndr", "recommendation"):
            unavailable.append(what)
            reasons[what] = reason

    correct = None if reference_correct is None else _mask(reference_correct, m, "reference_correct")
    run_aggregations = []
    for a in aggregations:
        _, only_correct = _split_aggregation(a)
        if only_correct and correct is None:
            unavailable.append(a)
            reasons[a] = "needs reference_correct (which reference rows the model predicts correctly)"
        elif only_correct and not correct.any():
            unavailable.append(a)
            reasons[a] = (
                "the model predicts no reference row correctly: the correct-only variant has no voters"
            )
        else:
            run_aggregations.append(a)
    # The most detrimental rows are ranked by "rank" over all layers, whether or not "rank" is reported.
    scored_aggregations = [*run_aggregations, *(["rank"] if "rank" not in run_aggregations else [])]

    if reference_accuracy is None and correct is not None:
        reference_accuracy = float(correct.mean())
    if reference_accuracy is not None and not 0.0 <= float(reference_accuracy) <= 1.0:
        raise InvalidInputError(f"reference_accuracy must be in [0, 1], got {reference_accuracy!r}")
    chance = 1.0 / num_classes
    accuracy_margin = max(min_accuracy_gain, accuracy_z * math.sqrt(chance * (1 - chance) / m))
    accuracy_threshold = chance + accuracy_margin
    near_chance = None if reference_accuracy is None else bool(reference_accuracy < accuracy_threshold)
    if near_chance:
        warnings.append(
            f"The model is near chance on the reference set: accuracy {reference_accuracy:.1%} against "
            f"{chance:.1%} for guessing (it needs at least {accuracy_threshold:.1%} on {m} rows to count as "
            "having learned the task). Its gradients say little about the task, so influence scores are "
            "uninformative and no layers are recommended."
        )
    elif reference_accuracy is None:
        warnings.append(
            "The model's accuracy on the reference set is unknown (pass reference_accuracy or reference_correct):"
            " without it we cannot tell whether the model learned the task, so no layers are recommended."
        )

    all_total = LayerSet("group", "all layers", tuple(names))
    entries: list[ReportEntry] = []
    distributions: list[ScoreDistribution] = []
    detrimental: list[DetrimentalRow] = []
    baseline = None
    if usable_mask is not None:
        a = int(usable_mask.sum())
        baseline = RandomBaseline(
            ndr={_percent_key(p): v for p, v in random_baseline_ndr_at(percents, n).items()},
            ndr_std=random_ndr_std(percents, n, a),
            auc_ndr=random_baseline_auc_ndr(n, a),
            auc_ndr_std=random_auc_ndr_std(n, a),
        )
    for estimator in estimators:
        scored = _score_estimator(
            source,
            queries,
            layers,
            estimator,
            dict((estimator_options or {}).get(estimator, {})),
            scored_aggregations,
            [*sets, all_total],
            correct,
            vote_k,
            usable_mask,
            quantiles,
            (fitted_estimators or {}).get(estimator),
        )
        distributions.extend(scored.distributions)
        harmful = scored.scores[("group", all_total.name, "rank")]
        for position in top_k(harmful, top_rows, "harmful"):
            detrimental.append(
                DetrimentalRow(
                    estimator,
                    int(position),
                    int(source.row_ids[position]),
                    float(harmful[position]),
                    None if mask is None else bool(mask[position]),
                )
            )
        if usable_mask is None or baseline is None:
            continue
        for layer_set in sets:
            for agg in run_aggregations:
                values = scored.scores[(layer_set.kind, layer_set.name, agg)]
                auc = auc_ndr(values, usable_mask)
                low, mean = _set_fidelity(layer_set, unit_fidelity)
                entries.append(
                    ReportEntry(
                        estimator=estimator,
                        aggregation=agg,
                        layers=layer_set,
                        ndr={_percent_key(p): v for p, v in ndr_at(values, usable_mask, percents).items()},
                        auc_ndr=auc,
                        random_ndr=dict(baseline.ndr),
                        random_auc_ndr=baseline.auc_ndr,
                        auc_ndr_gain=auc - baseline.auc_ndr,
                        auc_ndr_z=(auc - baseline.auc_ndr) / baseline.auc_ndr_std
                        if baseline.auc_ndr_std > 0
                        else math.nan,
                        fidelity_min=low,
                        fidelity_mean=mean,
                    )
                )

    num_candidates = len(entries)
    z_critical = required_gain = None
    if baseline is not None and num_candidates:
        z_critical = NormalDist().inv_cdf(1 - alpha / num_candidates)
        required_gain = max(min_auc_gain, z_critical * baseline.auc_ndr_std)
    criteria = Criteria(
        alpha=alpha,
        num_candidates=num_candidates,
        z_critical=z_critical,
        min_auc_gain=min_auc_gain,
        required_auc_gain=required_gain,
        chance_accuracy=chance,
        min_accuracy_gain=min_accuracy_gain,
        accuracy_z=accuracy_z,
        accuracy_threshold=accuracy_threshold,
        explanation=(
            "A recommendation needs (1) the best AUC-NDR to exceed the random-order AUC-NDR by "
            "max(min_auc_gain, z_critical x its exact standard deviation), z_critical being the one-sided "
            "Bonferroni bound for picking the best of num_candidates entries at level alpha, and (2) the model's "
            "reference accuracy to be at least chance + max(min_accuracy_gain, accuracy_z x the binomial "
            "standard deviation of a chance-level classifier on the reference rows)."
        ),
    )

    recommendation = None
    if entries and baseline is not None and required_gain is not None:
        order = sorted(
            range(len(entries)), key=lambda i: (-entries[i].auc_ndr, len(entries[i].layers.members), i)
        )
        best = entries[order[0]]
        beats_random = best.auc_ndr_gain >= required_gain
        if not beats_random:
            warnings.append(
                "No layer set is clearly better than a random order at finding the noisy rows: the best AUC-NDR "
                f"is {best.auc_ndr:.3f} ({best.estimator}, {best.aggregation}, {best.layers.name}) against "
                f"{baseline.auc_ndr:.3f} ± {baseline.auc_ndr_std:.3f} for a random order, and a recommendation "
                f"needs at least {baseline.auc_ndr + required_gain:.3f}. Influence is uninformative here, so no "
                "layers are recommended."
            )
        if beats_random and near_chance is False:
            singles = [entries[i] for i in order if entries[i].layers.kind == "layer"]
            recommendation = Recommendation(
                estimator=best.estimator,
                aggregation=best.aggregation,
                layers=best.layers,
                auc_ndr=best.auc_ndr,
                ndr=dict(best.ndr),
                auc_ndr_gain=best.auc_ndr_gain,
                required_gain=required_gain,
                auc_ndr_z=best.auc_ndr_z,
                best_single_layer=_brief(singles[0]) if singles else None,
                runners_up=[_brief(entries[i]) for i in order[1:6]],
                fidelity_min=best.fidelity_min,
                fidelity_mean=best.fidelity_mean,
            )

    fidelity_summary = None
    if unit_fidelity is not None:
        fidelity_summary = _fidelity_summary(
            unit_fidelity, float(fidelity_threshold), sets, entries, recommendation
        )
        warnings.extend(fidelity_summary.warnings)

    summary = None
    if cancellation is not None:
        summary = _cancellation_summary(cancellation, sets, entries, names)
        missing = [n for n in names if n not in cancellation]
        if missing:
            warnings.append(
                f"No cancellation was given for {len(missing)} layers ({', '.join(missing[:5])}...)."
            )

    return LayerReport(
        n_train=n,
        n_reference=m,
        n_noisy=None if mask is None else int(mask.sum()),
        noise_rate=None if mask is None else float(mask.mean()),
        num_classes=num_classes,
        reference_accuracy=None if reference_accuracy is None else float(reference_accuracy),
        reference_correct_count=None if correct is None else int(correct.sum()),
        near_chance=near_chance,
        estimators=list(estimators),
        aggregations=run_aggregations,
        percents=list(percents),
        vote_k=float(vote_k),
        layers=names,
        groups={s.name: list(s.members) for s in sets if s.kind == "group"},
        random_baseline=baseline,
        criteria=criteria,
        entries=entries,
        recommendation=recommendation,
        cancellation=summary,
        distributions=distributions,
        detrimental=detrimental,
        unavailable=unavailable,
        unavailable_reasons=reasons,
        warnings=warnings,
        fidelity=fidelity_summary,
    )


def _brief(entry: ReportEntry) -> dict[str, Any]:
    return {
        "estimator": entry.estimator,
        "aggregation": entry.aggregation,
        "kind": entry.layers.kind,
        "layers": entry.layers.name,
        "auc_ndr": entry.auc_ndr,
        "ndr": dict(entry.ndr),
        "fidelity_min": entry.fidelity_min,
    }


# ---------------------------------------------------------------------------------------- the fidelity


def _fidelity_input(
    fidelity: Mapping[str, Any] | None, names: Sequence[str]
) -> dict[str, float | None] | None:
    """The reported layers' fidelity (None: unknown, as are layers the mapping lacks); None when not given."""
    if fidelity is None:
        return None
    if not isinstance(fidelity, Mapping):
        raise InvalidInputError("fidelity must be a mapping of layer name -> Spearman (or None)")
    out: dict[str, float | None] = {}
    for name in names:
        value = fidelity.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float | np.number)):
            raise InvalidInputError(f"fidelity of layer {name!r} must be a number or None, got {value!r}")
        out[name] = float(value) if value is not None and math.isfinite(float(value)) else None
    return out


def _set_fidelity(
    layer_set: LayerSet, fidelity: Mapping[str, float | None] | None
) -> tuple[float | None, float | None]:
    """(lowest, mean) fidelity of a layer set's units that have one; (None, None) when none has."""
    if fidelity is None:
        return None, None
    known = [value for name in layer_set.members if (value := fidelity.get(name)) is not None]
    if not known:
        return None, None
    return min(known), float(np.mean(known))


def _fidelity_summary(
    fidelity: dict[str, float | None],
    threshold: float,
    sets: list[LayerSet],
    entries: list[ReportEntry],
    recommendation: Recommendation | None,
) -> FidelitySummary:
    """The units below the threshold, and one warning per such unit (the 5 lowest; then one for the rest)
    naming the layer sets whose AUC-NDR it makes uncertain, and one when the recommendation uses one."""
    low = sorted(
        ((value, name) for name, value in fidelity.items() if value is not None and value < threshold),
        key=lambda item: item[0],
    )
    warnings = []
    compared = {(e.layers.kind, e.layers.name) for e in entries}
    for value, name in low[:5]:
        using = [s.name for s in sets if name in s.members and (not entries or (s.kind, s.name) in compared)]
        shown = ", ".join(using[:4]) + (f" and {len(using) - 4} more" if len(using) > 4 else "")
        what = (
            f"the AUC-NDR of every layer set that uses it ({shown}) is uncertain"
            if entries
            else f"the scores of every layer set that uses it ({shown}) are approximate"
        )
        warnings.append(
            f"Layer unit {name}'s projected scores agree with its exact ones at Spearman {value:.2f} (below "
            f"{threshold:g}): {what}. Rebuild the index with an exact projection for it (projection.units "
            f"{{{name}: {{kind: identity}}}}, or tokens for an embedding) or a larger projection dim."
        )
    if len(low) > 5:
        rest = ", ".join(f"{name} ({value:.2f})" for value, name in low[5:15])
        warnings.append(
            f"{len(low) - 5} more layer units are below fidelity {threshold:g}: {rest}"
            + (", ..." if len(low) > 15 else "")
            + "; the layer sets that use them are uncertain too."
        )
    rec = recommendation
    if rec is not None and rec.fidelity_min is not None and rec.fidelity_min < threshold:
        worst = min((v, n) for v, n in low if n in set(rec.layers.members))
        warnings.append(
            f"The recommended entry ({rec.estimator}, {rec.aggregation}, {rec.layers.name}) uses layer unit "
            f"{worst[1]}, whose projected scores agree with its exact ones at Spearman {worst[0]:.2f}: its AUC-NDR "
            "is uncertain; confirm it on an index with an exact projection for that unit."
        )
    return FidelitySummary(
        threshold=threshold,
        units=dict(fidelity),
        below_threshold=[name for _, name in low],
        warnings=warnings,
    )
