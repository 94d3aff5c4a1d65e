"""The library's own computation of what the service answers, read straight from an index's store and a model
folder (no service code): the brute force the API tests hold the service to."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from influence import (
    FeatureSet,
    FeatureStore,
    Featurizer,
    LoadedModel,
    ProjectionSpec,
    discover_layers,
    featurize_examples,
    make_estimator,
    score_tensor,
)
from influence.data import Example


def index_store(api, index_id: str) -> FeatureStore:
    """The feature store of an index the service built (`api`: a tests.app Api)."""
    return FeatureStore.open(api.settings.resolved_artifacts_dir / f"indexes/{index_id}/store")


def featurize_as_indexed(
    store: FeatureStore, loaded: LoadedModel, layers: Sequence[str], rows, *, batch_size: int
) -> FeatureSet:
    """(text, label) rows featurized as the index's build featurized its own rows: the same model, the named
    layers (in the model's order), the store's projection and maximum length."""
    chosen = [layer for layer in discover_layers(loaded.model) if layer.name in layers]
    assert [layer.name for layer in chosen] == list(layers)
    featurizer = Featurizer(loaded.model, chosen, ProjectionSpec.from_dict(store.manifest.projection))
    return featurize_examples(
        featurizer,
        loaded.tokenizer,
        [Example(text, label) for text, label in rows],
        "classification",
        batch_size=batch_size,
        max_length=store.manifest.max_length,
    )


def store_scores(store: FeatureStore, queries: FeatureSet, layers: Sequence[str], estimator: str) -> np.ndarray:
    """S (stored rows, layers, queries) of every stored row, deleted ones included, against the featurized
    queries; an estimator that keeps statistics (datainf) is fitted over the stored rows."""
    estimators = {}
    for name in layers:
        estimators[name] = make_estimator(estimator)
        if estimator == "datainf":
            estimators[name].fit(
                lambda n=name: [torch.from_numpy(np.array(store.layer(n), dtype=np.float32))],
                store.layer_spec(name).num_params,
            )
    return score_tensor(
        {name: store.layer(name) for name in layers},
        {name: queries.features[name] for name in layers},
        estimators,
        {name: np.array(store.norms(name)) for name in layers},
    )
