"""Layer-wise training-data influence for language models (Vitel & Chhabra, ICLR 2026).

The pure library under the influence service: torch, transformers, peft, numpy and faiss only. The method,
formula by formula, lives in one place each:

    layers/         what a layer unit is, its name, role, block, groups; selectors       (method.md §1)
    gradients.py    per-sample gradients of a whole batch from hooks                       (§2)
    projection.py   identity / dense Gaussian, Rademacher / factorized (LoGra) projections  (§2)
    estimators.py   grad-dot (TracIn), cosine, DataInf, TracIn-CP as query transforms       (§2)
    statistics.py   fitted estimators' state beside a feature store, restored per query
    aggregation.py  mean, rank, vote and friends over layers and test samples              (§3)
    metrics.py      NDR, AUC-NDR, cancellation                                             (§4, §5)
    store/          append-only memory-mapped feature store; index/: FAISS per layer
    featurize.py    example sets -> features (in memory or into a store)
    scoring.py      exact scores over the store, lazily per layer
    report/         the layer report: NDR / AUC-NDR per layer, group, aggregation and estimator
    finetune/       LoRA fine-tuning with seeded label noise, for experiments

A minimal session::

    loaded = load_model(packaged_minilm_path(), adapter="run/best")
    layers = select_layers(discover_layers(loaded.model), "position:middle&role:attention")
    featurizer = Featurizer(loaded.model, layers, ProjectionSpec("factorized", 256, seed=0))
    train = featurize_examples(featurizer, loaded.tokenizer, train_examples, "classification")
    test = featurize_examples(featurizer, loaded.tokenizer, test_examples, "classification")
    estimators = {n: make_estimator("grad-dot") for n in train.features}
    agg = aggregate(LazyScores(train.features, test.features, estimators), "rank")   # low = detrimental
"""

from influence.aggregation import (
    AGGREGATORS,
    aggregate,
    aggregation_names,
    average_ranks,
    register_aggregator,
)
from influence.data import (
    Batch,
    Example,
    encode_examples,
    iter_batches,
    read_labelled_tsv,
    stratified_subsample,
)
from influence.errors import (
    InfluenceError,
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
    UnknownLayerError,
    UnsupportedModelError,
)
from influence.estimators import (
    ESTIMATORS,
    Estimator,
    estimator_class,
    estimator_names,
    fitted_estimator_names,
    make_estimator,
    register_estimator,
)
from influence.featurize import (
    CheckpointFeaturizer,
    FeatureSet,
    build_store,
    featurize_examples,
    store_manifest,
)
from influence.finetune import LoraSettings, TrainSettings, finetune_lora, inject_label_noise, predict
from influence.gradients import Featurizer, layer_cancellation, per_sample_gradients, per_sample_losses
from influence.index import INDEX_KINDS, LayerIndex, build_store_indexes, load_store_indexes
from influence.layers import Layer, discover_layers, layer_groups, select_layers
from influence.loading import LoadedModel, load_model, load_tokenizer, packaged_minilm_path
from influence.metrics import (
    DEFAULT_NDR_PERCENTS,
    Cancellation,
    CancellationAccumulator,
    auc_ndr,
    cancellation,
    ndr_at,
    ndr_curve,
    random_baseline_auc_ndr,
    random_baseline_ndr_at,
)
from influence.projection import DEFAULT_DIM, PROJECTORS, ProjectionSpec, make_projector
from influence.report import LayerReport, layer_report
from influence.scoring import LazyScores, score_layer, score_tensor, top_k
from influence.statistics import fit_store_statistics, missing_statistics, store_estimators, zero_layers
from influence.store import FeatureStore, LayerSpec, StoreManifest
from influence.version import __version__

__all__ = [
    "AGGREGATORS",
    "DEFAULT_DIM",
    "DEFAULT_NDR_PERCENTS",
    "ESTIMATORS",
    "INDEX_KINDS",
    "PROJECTORS",
    "Batch",
    "Cancellation",
    "CancellationAccumulator",
    "CheckpointFeaturizer",
    "Estimator",
    "Example",
    "FeatureSet",
    "FeatureStore",
    "Featurizer",
    "InfluenceError",
    "InvalidInputError",
    "Layer",
    "LayerIndex",
    "LayerReport",
    "LayerSpec",
    "LazyScores",
    "LoadedModel",
    "LoraSettings",
    "ManifestMismatchError",
    "ProjectionSpec",
    "StoreCorruptedError",
    "StoreIncompleteError",
    "StoreManifest",
    "TrainSettings",
    "UnknownLayerError",
    "UnsupportedModelError",
    "__version__",
    "aggregate",
    "aggregation_names",
    "auc_ndr",
    "average_ranks",
    "build_store",
    "build_store_indexes",
    "cancellation",
    "discover_layers",
    "encode_examples",
    "estimator_class",
    "estimator_names",
    "featurize_examples",
    "finetune_lora",
    "fit_store_statistics",
    "fitted_estimator_names",
    "inject_label_noise",
    "iter_batches",
    "layer_cancellation",
    "layer_groups",
    "layer_report",
    "load_model",
    "load_store_indexes",
    "load_tokenizer",
    "make_estimator",
    "make_projector",
    "missing_statistics",
    "ndr_at",
    "ndr_curve",
    "packaged_minilm_path",
    "per_sample_gradients",
    "per_sample_losses",
    "predict",
    "random_baseline_auc_ndr",
    "random_baseline_ndr_at",
    "read_labelled_tsv",
    "register_aggregator",
    "register_estimator",
    "score_layer",
    "score_tensor",
    "select_layers",
    "store_estimators",
    "store_manifest",
    "stratified_subsample",
    "top_k",
    "zero_layers",
]
