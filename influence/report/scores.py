"""A layer report's scores: per estimator, the aggregated scores of every layer set and aggregation.

How the work is shared. Each layer's (n, m) score block is computed once per estimator (LazyScores), and
every aggregation is run on that one layer. A group's aggregate is then assembled from its members' per-layer
aggregates where the method is a sum over voters (mean, rank, vote, rrf, zmean): every layer has the same
voters (all or the same correct reference rows), so e.g. rank(group) = sum_u T_u / (|group| V) with T_u the
layer's exact half-integer rank sum. This equals `aggregate()` over the members bit for bit for rank and vote
(sums of half-integers are exact in float64) and to rounding for the others. Other methods (median, ...) are
aggregated over the group's members directly. Nothing of size n x U x m is held: one (n, m) block at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influence.aggregation import aggregate, combine_layer_aggregates
from influence.errors import InvalidInputError
from influence.estimators import Estimator, make_estimator
from influence.layers import Layer
from influence.report.defaults import DEFAULT_AGGREGATIONS
from influence.report.inputs import (
    TrainSource,
    as_mapping,
    boolean_mask,
    layer_sets,
    reference_size,
    split_aggregation,
    train_source,
)
from influence.report.results import LayerSet, ScoreDistribution
from influence.scoring import LazyScores
from influence.store import FeatureStore
from influence.tokens import TokenRows

# How a group's aggregate follows from its members' when every member has the same number of voters.
# "average": mean of the members' values; "rank-sum": the same, from exact half-integer rank sums;
# "sum": sum of the members' values. Methods not listed are aggregated over the group directly.
_DECOMPOSABLE = {"mean": "average", "zmean": "average", "rank": "rank-sum", "vote": "sum", "rrf": "sum"}
# Quantiles are taken over all n x m scores of a layer up to this many, else over evenly spaced rows.
_QUANTILE_BUDGET = 4_000_000


@dataclass
class EstimatorScores:
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
    source = train_source(features, names)
    queries = as_mapping(reference_features, "reference_features")
    m = reference_size(queries, names)
    correct = None if reference_correct is None else boolean_mask(reference_correct, m, "reference_correct")
    result = score_estimator(
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


def score_estimator(
    source: TrainSource,
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
) -> EstimatorScores:
    """One estimator's aggregated scores of every layer set and aggregation, and (quantiles given) each
    layer's score distribution. fitted: layer -> an Estimator used as given instead of one fitted here."""
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted({n for s in sets for n in s.members} - set(by_name))
    if unknown:
        raise InvalidInputError(f"layer sets name layers that are not in `layers`: {unknown}")
    parsed = {a: split_aggregation(a) for a in aggregations}
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
    return EstimatorScores(out, distributions)
