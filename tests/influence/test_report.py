"""The layer report: known answers on synthetic features, brute-force checks of every number, a real tiny model."""

from __future__ import annotations

import itertools
import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from influence.aggregation import aggregate
from influence.data import encode_examples, iter_batches, pad_token_id
from influence.errors import InvalidInputError
from influence.estimators import make_estimator
from influence.featurize import featurize_examples
from influence.finetune import inject_label_noise
from influence.gradients import Featurizer, layer_cancellation
from influence.layers import discover_layers, select_layers
from influence.loading import load_model
from influence.metrics import Cancellation, auc_ndr, ndr_at, random_baseline_auc_ndr, random_baseline_ndr_at
from influence.projection import ProjectionSpec
from influence.report import (
    LayerSet,
    aggregated_scores,
    layer_report,
    layer_sets,
    random_auc_ndr_std,
    random_ndr_std,
)
from influence.scoring import score_tensor, top_k
from influence.store import FeatureStore, LayerSpec, StoreManifest
from tests.conftest import every_noisy_mask, tiny_config

SIGNAL = "block.1.attn.v"
NAMES = ["embed", "block.0.attn.q", SIGNAL, "block.2.attn.v", "head"]
N, M, K = 200, 30, 8


@pytest.fixture(scope="module")
def layers():
    """Real Layer objects (names, groups, positions) of a 3-block BERT: WE, one unit per block, CL."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config("bert", vocab_size=50, max_position_embeddings=32, num_labels=2)
    return select_layers(discover_layers(BertForSequenceClassification(config)), NAMES)


def synthetic(seed: int = 0, signal: bool = True):
    """(train features, reference features, noisy mask): SIGNAL separates noisy rows when `signal`, the rest is
    noise. Noisy rows' gradients point against the reference gradients' common direction e0."""
    rng = np.random.default_rng(seed)
    noisy = np.zeros(N, dtype=bool)
    noisy[rng.choice(N, N // 5, replace=False)] = True
    train = {name: rng.standard_normal((N, K)).astype(np.float32) for name in NAMES}
    reference = {name: rng.standard_normal((M, K)).astype(np.float32) for name in NAMES}
    if signal:
        direction = np.where(noisy, -1.0, 1.0)
        train[SIGNAL] = (0.5 * rng.standard_normal((N, K))).astype(np.float32)
        train[SIGNAL][:, 0] = direction * (1 + 0.2 * rng.random(N))
        reference[SIGNAL] = (0.2 * rng.standard_normal((M, K))).astype(np.float32)
        reference[SIGNAL][:, 0] += 1.0
    return train, reference, noisy


def correct_mask(seed: int = 1) -> np.ndarray:
    correct = np.random.default_rng(seed).random(M) < 0.8
    correct[0] = True
    return correct


# One estimator and one aggregation: enough for the tests of a report's warnings and reasons.
GRAD_DOT_RANK = {"estimators": ("grad-dot",), "aggregations": ("rank",)}


def report_on(layers, features, **options):
    """layer_report of synthetic features: (train, reference, noisy mask), as synthetic() returns them."""
    train, reference, noisy = features
    return layer_report(train, reference, layers=layers, noisy=noisy, **options)


def brute(train, reference, layers, members, estimator, method, correct=None):
    """aggregate() over the members' materialised (n, U, m) scores, estimators fitted directly."""
    by_name = {layer.name: layer for layer in layers}
    fitted = {}
    for name in members:
        fitted[name] = make_estimator(estimator)
        fitted[name].fit(lambda n=name: [torch.from_numpy(train[n])], by_name[name].num_params)
    scores = score_tensor({n: train[n] for n in members}, {n: reference[n] for n in members}, fitted)
    return aggregate(scores, method, correct=correct)


def all_scores(train, reference, layers, estimator) -> np.ndarray:
    """The full (n, U, m) score tensor over every layer (U in `layers` order), estimators fitted directly."""
    fitted = {}
    for layer in layers:
        fitted[layer.name] = make_estimator(estimator)
        fitted[layer.name].fit(lambda n=layer.name: [torch.from_numpy(train[n])], layer.num_params)
    names = [layer.name for layer in layers]
    return score_tensor({n: train[n] for n in names}, {n: reference[n] for n in names}, fitted)


def test_the_separating_layer_ranks_first_and_is_recommended(layers):
    report = report_on(
        layers, synthetic(), reference_correct=correct_mask(), num_classes=2, reference_accuracy=0.9
    )
    assert report.recommendation is not None and report.warnings == []
    rec = report.recommendation
    assert (rec.layers.kind, rec.layers.name, rec.estimator) == ("layer", SIGNAL, "grad-dot")
    a = N // 5
    perfect = ((a + 1) / 2 + N - a) / (a / 2 + N - a)  # every noisy row first ("about 1")
    assert (
        rec.auc_ndr == pytest.approx(perfect)
        and rec.ndr["20"] == 1.0
        and rec.auc_ndr_gain >= rec.required_gain
    )
    assert rec.best_single_layer["layers"] == SIGNAL
    for est in ("grad-dot", "cosine", "datainf"):
        for agg in ("mean", "rank", "vote", "rank-c", "vote-c"):
            singles = [
                e
                for e in report.entries
                if (e.estimator, e.aggregation, e.layers.kind) == (est, agg, "layer")
            ]
            assert max(singles, key=lambda e: e.auc_ndr).layers.name == SIGNAL, (est, agg)
    baseline, std = report.random_baseline.auc_ndr, report.random_baseline.auc_ndr_std
    for name in NAMES:
        if name != SIGNAL:  # pure noise: within 5 standard deviations of a random order
            assert abs(report.entry("grad-dot", "rank", name, "layer").auc_ndr - baseline) < 5 * std
    # the paper's groups and positions come from the layers; the middle third is block 1 alone
    assert report.groups["WE"] == ["embed"] and report.groups["CL"] == ["head"]
    assert report.groups["middle"] == [SIGNAL] and report.groups["total"] == NAMES
    assert report.entry("grad-dot", "mean", "middle").auc_ndr == pytest.approx(perfect)
    # every entry carries its random baselines; JSON out
    entry = report.entry("cosine", "vote-c", "total")
    assert entry.random_auc_ndr == pytest.approx(random_baseline_auc_ndr(N, N // 5))
    assert entry.random_ndr == {str(p): v for p, v in random_baseline_ndr_at(report.percents, N).items()}
    assert entry.auc_ndr_z == pytest.approx((entry.auc_ndr - entry.random_auc_ndr) / std)
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert json.loads(text)["recommendation"]["layers"]["members"] == [SIGNAL]
    # the margin: Bonferroni over every entry, never below the floor
    c = report.criteria
    assert c.num_candidates == len(report.entries) == 3 * 5 * (5 + 9)
    assert c.z_critical == pytest.approx(NormalDist().inv_cdf(1 - 0.01 / c.num_candidates))
    assert c.required_auc_gain == pytest.approx(max(0.02, c.z_critical * std))


@pytest.mark.parametrize("estimator", ["grad-dot", "cosine", "datainf"])
def test_group_scores_equal_aggregate_over_their_members(layers, estimator):
    train, reference, noisy = synthetic(seed=2)
    correct = correct_mask()
    sets = [*layer_sets(layers), LayerSet("group", "pair", ("block.0.attn.q", SIGNAL))]
    aggregations = ["mean", "rank", "vote", "rank-c", "vote-c", "median", "rrf"]
    got = aggregated_scores(
        train,
        reference,
        layers=layers,
        estimator=estimator,
        aggregations=aggregations,
        sets=sets,
        reference_correct=correct,
    )
    report = report_on(
        layers,
        (train, reference, noisy),
        reference_correct=correct,
        estimators=[estimator],
        aggregations=aggregations,
        extra_groups={"pair": ["block.0.attn.q", SIGNAL]},
        reference_accuracy=0.9,
    )
    scores = all_scores(train, reference, layers, estimator)
    for layer_set, agg in itertools.product(sets, aggregations):
        method, only_correct = (agg[:-2], True) if agg.endswith("-c") else (agg, False)
        columns = [NAMES.index(name) for name in layer_set.members]
        expected = aggregate(scores[:, columns, :], method, correct=correct if only_correct else None)
        value = got[(layer_set.kind, layer_set.name, agg)]
        if method in ("rank", "vote", "median"):
            np.testing.assert_array_equal(value, expected)  # exact: same ties, same order
        else:
            np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-12)
        entry = report.entry(estimator, agg, layer_set.name, layer_set.kind)
        assert entry.auc_ndr == pytest.approx(auc_ndr(expected, noisy), abs=1e-12)
        assert entry.ndr == pytest.approx({str(p): v for p, v in ndr_at(expected, noisy).items()}, abs=1e-12)


def test_random_baseline_moments_are_exact():
    n, a = 7, 3
    aucs, ndrs = [], []
    for mask in every_noisy_mask(n, a):
        order = np.arange(n, dtype=float)  # every subset of positions is equally likely under a random order
        aucs.append(auc_ndr(order, mask))
        ndrs.append(ndr_at(order, mask, (30, 50)))
    assert np.mean(aucs) == pytest.approx(random_baseline_auc_ndr(n, a), abs=1e-12)
    assert np.std(aucs) == pytest.approx(random_auc_ndr_std(n, a), abs=1e-12)
    expected_std = random_ndr_std((30, 50), n, a)
    for p in (30, 50):
        assert np.std([d[p] for d in ndrs]) == pytest.approx(expected_std[str(p)], abs=1e-12)
    # the paper's setting: 4,500 rows, 900 noisy
    assert random_baseline_auc_ndr(4500, 900) == pytest.approx(0.5557, abs=1e-4)
    assert random_auc_ndr_std(4500, 900) == pytest.approx(0.00956, abs=1e-5)


def test_random_features_give_no_recommendation_and_a_warning(layers):
    report = report_on(
        layers,
        synthetic(seed=3, signal=False),
        reference_correct=correct_mask(),
        reference_accuracy=0.9,
        estimators=("grad-dot",),
    )
    assert report.recommendation is None and report.near_chance is False
    assert len(report.warnings) == 1 and "better than a random order" in report.warnings[0]
    assert "no layers are recommended" in report.warnings[0]
    assert report.entries and "recommendation" not in report.unavailable


def test_near_chance_or_unknown_accuracy_withholds_the_recommendation(layers):
    features = synthetic()
    near = report_on(layers, features, reference_accuracy=0.55, **GRAD_DOT_RANK)
    assert near.near_chance is True and near.recommendation is None
    assert any("near chance" in w and "uninformative" in w for w in near.warnings)
    assert near.entry("grad-dot", "rank", SIGNAL, "layer").ndr["20"] == 1.0  # the metrics are still there
    # m = 30: chance + 3 binomial standard deviations = 0.5 + 3 * sqrt(0.25 / 30)
    assert near.criteria.accuracy_threshold == pytest.approx(0.5 + 3 * math.sqrt(0.25 / 30))
    unknown = report_on(layers, features, **GRAD_DOT_RANK)
    assert unknown.near_chance is None and unknown.recommendation is None
    assert any("accuracy" in w and "unknown" in w for w in unknown.warnings)
    # the accuracy follows from reference_correct when not given
    correct = np.zeros(M, dtype=bool)
    correct[:20] = True  # 3 classes, 30 rows: needs 1/3 + 3 sqrt((2/9) / 30) = 59.1%
    from_correct = report_on(layers, features, reference_correct=correct, num_classes=3, **GRAD_DOT_RANK)
    assert from_correct.reference_accuracy == pytest.approx(20 / 30) and from_correct.near_chance is False
    assert from_correct.recommendation is not None


def test_without_a_mask_the_rest_is_still_reported(layers):
    train, reference, _ = synthetic()
    cancellation = {name: Cancellation(1.5 + i, 30.0 + i, 64) for i, name in enumerate(NAMES)}
    cancellation["head"] = Cancellation(math.inf, math.inf, 64)
    report = report_on(
        layers, (train, reference, None), reference_accuracy=0.9, cancellation=cancellation, top_rows=7
    )
    assert report.unavailable[:3] == ["ndr", "auc_ndr", "recommendation"]
    assert "rank-c" in report.unavailable and "vote-c" in report.unavailable
    assert (
        "noisy mask" in report.unavailable_reasons["ndr"]
        and "reference_correct" in report.unavailable_reasons["rank-c"]
    )
    assert report.entries == [] and report.recommendation is None and report.random_baseline is None
    assert report.aggregations == ["mean", "rank", "vote"]
    assert len(report.distributions) == 3 * len(NAMES)
    dist = next(d for d in report.distributions if (d.estimator, d.layer) == ("grad-dot", "embed"))
    scores = train["embed"].astype(np.float64) @ reference["embed"].astype(np.float64).T
    assert dist.quantiles["0.5"] == pytest.approx(np.median(scores), rel=1e-5)
    assert dist.mean == pytest.approx(scores.mean(), rel=1e-5) and dist.std == pytest.approx(
        scores.std(), rel=1e-5
    )
    assert dist.share_negative == pytest.approx((scores < 0).mean()) and dist.noisy_mean is None
    for est in ("grad-dot", "cosine", "datainf"):
        rows = [r for r in report.detrimental if r.estimator == est]
        expected = brute(train, reference, layers, NAMES, est, "rank")
        assert [r.position for r in rows] == top_k(expected, 7, "harmful").tolist()
        assert [r.score for r in rows] == pytest.approx(expected[[r.position for r in rows]].tolist())
        assert all(r.noisy is None for r in rows)
    # cancellation: per layer, per group (mean of finite members), infinities as null in JSON
    assert [c.layer for c in report.cancellation.layers] == NAMES
    groups = {g.group: g for g in report.cancellation.groups}
    assert (
        groups["total"].l1_over_l1 == pytest.approx(np.mean([1.5, 2.5, 3.5, 4.5]))
        and groups["total"].members_used == 4
    )
    assert groups["CL"].l1_over_l1 is None and groups["CL"].members_used == 0
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["cancellation"]["layers"][-1]["l1_over_l1"] is None


def test_a_mask_without_noise_is_unavailable_and_cancellation_correlates(layers):
    train, reference, noisy = synthetic()
    no_noise = np.zeros(N, dtype=bool)
    empty = report_on(layers, (train, reference, no_noise), reference_accuracy=0.9, **GRAD_DOT_RANK)
    assert "no training row" in empty.unavailable_reasons["ndr"] and empty.entries == []
    # cancellation ordered like the noise-detection quality of the layers: Spearman -1 / +1
    report = report_on(
        layers,
        (train, reference, noisy),
        reference_accuracy=0.9,
        cancellation={n: Cancellation(10.0 if n == SIGNAL else 1.0 + i, 1.0, 8) for i, n in enumerate(NAMES)},
        **GRAD_DOT_RANK,
    )
    row = report.cancellation.correlation_with_auc_ndr[0]
    singles = {e.layers.name: e.auc_ndr for e in report.entries if e.layers.kind == "layer"}
    x = [10.0 if n == SIGNAL else 1.0 + i for i, n in enumerate(NAMES)]
    from scipy.stats import spearmanr

    assert row["layers"] == 5 and row["spearman"] == pytest.approx(
        spearmanr(x, [singles[n] for n in NAMES]).statistic
    )


def test_a_feature_store_gives_the_same_report(layers, tmp_path):
    train, reference, noisy = synthetic(seed=4)
    manifest = StoreManifest(
        model_id="synthetic",
        revision="",
        weights_hash="w",
        tokenizer="t",
        dataset_hash="d",
        layers=[LayerSpec(layer.name, K, layer.num_params) for layer in layers],
        projection={"kind": "identity"},
        dtype="float32",
        num_rows=N,
        chunk_size=64,
        task="classification",
        max_length=16,
    )
    store = FeatureStore.create(tmp_path / "store", manifest)
    for index, (start, stop) in enumerate(store.chunk_ranges()):
        store.write_chunk(index, np.arange(start, stop) + 1000, {n: train[n][start:stop] for n in NAMES})
    store.finalize()
    kwargs = dict(
        layers=layers, noisy=noisy, reference_correct=correct_mask(), reference_accuracy=0.9, top_rows=5
    )
    from_store = layer_report(FeatureStore.open(tmp_path / "store"), reference, **kwargs)
    in_memory = layer_report(train, reference, **kwargs)
    assert [(e.estimator, e.aggregation, e.layers.name) for e in from_store.entries] == [
        (e.estimator, e.aggregation, e.layers.name) for e in in_memory.entries
    ]
    np.testing.assert_allclose(
        [e.auc_ndr for e in from_store.entries], [e.auc_ndr for e in in_memory.entries], atol=1e-6
    )
    assert [r.row_id for r in from_store.detrimental] == [r.position + 1000 for r in from_store.detrimental]


def test_bad_inputs(layers):
    train, reference, noisy = synthetic()
    with pytest.raises(InvalidInputError, match="unknown aggregation"):
        layer_report(train, reference, layers=layers, aggregations=("nope",))
    with pytest.raises(InvalidInputError, match="features missing"):
        layer_report({n: train[n] for n in NAMES[:2]}, reference, layers=layers)
    with pytest.raises(InvalidInputError, match="noisy"):
        layer_report(train, reference, layers=layers, noisy=noisy[:-1])
    with pytest.raises(InvalidInputError, match="extra group"):
        layer_report(train, reference, layers=layers, extra_groups={"x": ["missing"]})
    with pytest.raises(InvalidInputError, match="reference_correct"):
        aggregated_scores(train, reference, layers=layers, estimator="grad-dot", aggregations=("rank-c",))


@pytest.mark.slow
def test_real_tiny_model_end_to_end(tiny_model_dir, sst2_train, sst2_validation):
    """A tiny BERT (untrained: near chance) featurized on real SST-2 rows, every unit, two estimators."""
    loaded = load_model(tiny_model_dir("bert", num_labels=2), num_labels=2)
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = discover_layers(model)
    train_rows, reference_rows = sst2_train[:96], sst2_validation[:24]
    labels, noisy = inject_label_noise([e.label for e in train_rows], 0.2, seed=0)
    from dataclasses import replace

    train_rows = [replace(e, label=int(y)) for e, y in zip(train_rows, labels, strict=True)]
    featurizer = Featurizer(model, layers, ProjectionSpec("factorized", 16, seed=0))
    train = featurize_examples(featurizer, tokenizer, train_rows, "classification", max_length=32)
    reference = featurize_examples(featurizer, tokenizer, reference_rows, "classification", max_length=32)
    correct = reference.predictions == np.array([e.label for e in reference_rows])
    encoded = encode_examples(tokenizer, train_rows, "classification", 32)
    cancellation = layer_cancellation(
        model, layers, iter_batches(encoded, pad_token_id(tokenizer), "classification", 32), max_samples=64
    )
    report = layer_report(
        train,
        reference,
        layers=layers,
        noisy=noisy,
        reference_correct=correct,
        cancellation=cancellation,
        estimators=("grad-dot", "datainf"),
        aggregations=("mean", "rank", "vote-c"),
    )
    assert report.reference_accuracy == pytest.approx(correct.mean())
    assert report.near_chance is True and report.recommendation is None  # 24 rows: needs >= 80.6%
    assert any("near chance" in w for w in report.warnings)
    assert len(report.distributions) == 2 * len(layers) and len(report.cancellation.layers) == len(layers)
    assert {"WE", "first", "middle", "last", "CL", "total"} <= set(report.groups)
    for est in ("grad-dot", "datainf"):
        for group in ("total", "middle"):
            members = report.groups[group]
            expected = brute(train.features, reference.features, layers, members, est, "rank")
            assert report.entry(est, "rank", group).auc_ndr == pytest.approx(
                auc_ndr(expected, noisy), abs=1e-12
            )
    json.dumps(report.to_dict(), allow_nan=False)
