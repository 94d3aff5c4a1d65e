"""Estimator statistics beside a feature store: fitted once over its rows, restored for every query.

Every registered estimator with `requires_fit` (DataInf's M_u, ...) is fitted on each layer it can score, and
its state_dict() saved in the layer's statistics with keys "<estimator>.<key>", so that the states of several
fitted estimators share a layer without colliding. `store_estimators` makes the estimators a query scores
with: fitted ones restored from those statistics, never refitted per query.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from influence.errors import StoreIncompleteError
from influence.estimators import Estimator, estimator_class, fitted_estimator_names, make_estimator
from influence.lazy import lazy_module

if TYPE_CHECKING:
    from influence.store import FeatureStore

# Imported on first use: the API asks missing_statistics() of a store without loading torch.
torch = lazy_module("torch")

STATISTICS_BLOCK_ROWS = 8192
# Stores built before statistics were keyed by estimator hold DataInf's state alone, under its own keys
# ("matrix", "damping", "num_samples"; none has a "."): such a layer's statistics are read as DataInf's.
_UNKEYED_OWNER = "datainf"


def zero_layers(store: FeatureStore, block_rows: int = STATISTICS_BLOCK_ROWS) -> list[str]:
    """Layers whose STORED features are zero in every row (read back: the norms are taken before the float16
    cast, so they do not show features that underflowed)."""
    return [
        name
        for name in store.layers
        if not any(np.any(_values(block)) for _, block in store.iter_layer_chunks(name, block_rows))
    ]


def _values(block: Any) -> Any:
    # Here, not at the top: influence.tokens imports torch (the store that yielded the block has loaded it).
    from influence.tokens import TokenRows

    return block.values if isinstance(block, TokenRows) else block


def fit_store_statistics(store: FeatureStore, block_rows: int = STATISTICS_BLOCK_ROWS) -> None:
    """Fit, per layer, every registered estimator that requires_fit and save its state in the store.

    Layers whose statistics already hold every such estimator's state (a resumed build) are skipped; a layer
    missing some keeps what it has and gains the others."""
    for layer in store.layers:
        spec = store.layer_spec(layer)
        keys = _keyed(dict.fromkeys(store.layer_statistics_keys(layer)))
        missing = [
            name
            for name in fitted_estimator_names()
            if _scores_layer(name, spec.layout) and not _state(keys, name)
        ]
        if not missing:
            continue
        saved = _keyed(store.load_layer_statistics(layer)) if keys else {}
        for name in missing:
            estimator = make_estimator(name)
            if spec.layout == "tokens":
                estimator.fit_token_rows(store.layer(layer), spec.num_params)
            else:
                estimator.fit(lambda layer=layer: _float32_chunks(store, layer, block_rows), spec.num_params)
            state = estimator.state_dict()
            if not state:  # saved statistics are how a fitted estimator is found again: it needs some
                raise RuntimeError(f"estimator {name!r} requires_fit but its state_dict() is empty")
            saved.update({f"{name}.{key}": value.cpu().numpy() for key, value in state.items()})
        store.save_layer_statistics(layer, saved)


def _float32_chunks(store: FeatureStore, layer: str, block_rows: int) -> Iterator[torch.Tensor]:
    for _, block in store.iter_layer_chunks(layer, block_rows):
        yield torch.from_numpy(np.array(block, dtype=np.float32))


def store_estimators(store: FeatureStore, layers: Sequence[str], name: str) -> dict[str, Estimator]:
    """One estimator `name` per layer, fitted ones restored from the store's statistics (StoreIncompleteError
    naming the layer when they are missing) and bound to the store's rows on token-row layers."""
    fitted = estimator_class(name).requires_fit
    out = {}
    for layer in layers:
        estimator = make_estimator(name)
        layout = store.layer_spec(layer).layout
        if fitted and _scores_layer(name, layout):
            saved = store.load_layer_statistics(layer) if store.has_layer_statistics(layer) else {}
            state = _state(_keyed(saved), name)
            if not state:
                raise StoreIncompleteError(
                    f"the index has no {name} statistics for layer {layer!r}; rebuild it to query with {name}"
                )
            estimator.load_state_dict(
                {key: torch.from_numpy(np.array(value)) for key, value in state.items()}
            )
            if layout == "tokens":
                estimator.attach_token_rows(store.layer(layer))
        out[layer] = estimator
    return out


def missing_statistics(store: FeatureStore, layers: Sequence[str], name: str) -> list[str]:
    """The layers whose statistics lack estimator `name`'s state (read from the store's index, not loaded)."""
    if not estimator_class(name).requires_fit:
        return []
    return [
        layer
        for layer in layers
        if _scores_layer(name, store.layer_spec(layer).layout)
        and not _state(_keyed(dict.fromkeys(store.layer_statistics_keys(layer))), name)
    ]


def _scores_layer(name: str, layout: str) -> bool:
    """Whether estimator `name` scores a layer of this layout at all (an estimator refusing token rows is
    neither fitted nor restored there: scoring says why it refuses)."""
    return layout != "tokens" or estimator_class(name).token_rows_refusal is None


def _keyed(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A layer's saved statistics with every key "<estimator>.<key>"."""
    if saved and not any("." in key for key in saved):
        return {f"{_UNKEYED_OWNER}.{key}": value for key, value in saved.items()}
    return dict(saved)


def _state(keyed: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Estimator `name`'s part of keyed statistics, under its own keys; {} when it has none."""
    prefix = f"{name}."
    return {key[len(prefix) :]: value for key, value in keyed.items() if key.startswith(prefix)}
