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

Public names are resolved on first access (PEP 562): `import influence.errors` or `import influence.registry`
loads no torch, transformers or faiss, so the service's API process stays light; `from influence import
load_model` imports what it needs then.
"""

from __future__ import annotations

from influence.errors import (
    InfluenceError,
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
    UnknownLayerError,
    UnsupportedModelError,
)
from influence.lazy import lazy_package
from influence.version import __version__

# Every lazy public name -> the module that defines it.
_LAZY: dict[str, str] = {
    # influence.aggregation
    "aggregate": "influence.aggregation",
    "aggregation_names": "influence.aggregation",
    "AGGREGATORS": "influence.aggregation",
    "average_ranks": "influence.aggregation",
    "register_aggregator": "influence.aggregation",
    # influence.data
    "Batch": "influence.data",
    "encode_examples": "influence.data",
    "Example": "influence.data",
    "iter_batches": "influence.data",
    "read_labelled_tsv": "influence.data",
    "stratified_subsample": "influence.data",
    # influence.estimators
    "Estimator": "influence.estimators",
    "estimator_class": "influence.estimators",
    "estimator_names": "influence.estimators",
    "ESTIMATORS": "influence.estimators",
    "fitted_estimator_names": "influence.estimators",
    "make_estimator": "influence.estimators",
    "register_estimator": "influence.estimators",
    # influence.featurize
    "build_store": "influence.featurize",
    "CheckpointFeaturizer": "influence.featurize",
    "FeatureSet": "influence.featurize",
    "featurize_examples": "influence.featurize",
    "store_manifest": "influence.featurize",
    # influence.finetune
    "finetune_lora": "influence.finetune",
    "inject_label_noise": "influence.finetune",
    "LoraSettings": "influence.finetune",
    "predict": "influence.finetune",
    "TrainSettings": "influence.finetune",
    # influence.gradients
    "Featurizer": "influence.gradients",
    "layer_cancellation": "influence.gradients",
    "per_sample_gradients": "influence.gradients",
    "per_sample_losses": "influence.gradients",
    # influence.index
    "build_store_indexes": "influence.index",
    "INDEX_KINDS": "influence.index",
    "LayerIndex": "influence.index",
    "load_store_indexes": "influence.index",
    # influence.layers
    "discover_layers": "influence.layers",
    "Layer": "influence.layers",
    "layer_groups": "influence.layers",
    "select_layers": "influence.layers",
    # influence.loading
    "load_model": "influence.loading",
    "load_tokenizer": "influence.loading",
    "LoadedModel": "influence.loading",
    "packaged_minilm_path": "influence.loading",
    # influence.metrics
    "auc_ndr": "influence.metrics",
    "Cancellation": "influence.metrics",
    "cancellation": "influence.metrics",
    "CancellationAccumulator": "influence.metrics",
    "DEFAULT_NDR_PERCENTS": "influence.metrics",
    "ndr_at": "influence.metrics",
    "ndr_curve": "influence.metrics",
    "random_baseline_auc_ndr": "influence.metrics",
    "random_baseline_ndr_at": "influence.metrics",
    # influence.projection
    "DEFAULT_DIM": "influence.projection",
    "make_projector": "influence.projection",
    "ProjectionSpec": "influence.projection",
    "PROJECTORS": "influence.projection",
    # influence.report
    "layer_report": "influence.report",
    "LayerReport": "influence.report",
    # influence.scoring
    "LazyScores": "influence.scoring",
    "score_layer": "influence.scoring",
    "score_tensor": "influence.scoring",
    "top_k": "influence.scoring",
    # influence.statistics
    "fit_store_statistics": "influence.statistics",
    "missing_statistics": "influence.statistics",
    "store_estimators": "influence.statistics",
    "zero_layers": "influence.statistics",
    # influence.store
    "FeatureStore": "influence.store",
    "LayerSpec": "influence.store",
    "StoreManifest": "influence.store",
}

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


__getattr__, __dir__ = lazy_package(__name__, _LAZY, globals())
