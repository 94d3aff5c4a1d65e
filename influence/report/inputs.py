"""A layer report's inputs, checked and put in one shape: train features (a FeatureStore's live rows, a
FeatureSet or per-layer matrices) read in chunks, reference features, boolean masks, aggregation names and the
layer sets to score."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influence.aggregation import AGGREGATORS
from influence.errors import InvalidInputError
from influence.layers import Layer, layer_groups
from influence.report.defaults import CORRECT_SUFFIX
from influence.report.results import LayerSet
from influence.store import FeatureStore
from influence.tokens import TokenRows

# Rows per chunk when fitting an estimator on train features (float64 copies: 16k x 1024 x 8 = 128 MiB).
_FIT_ROWS = 16384


def percent_key(p: float) -> str:
    """How a percent keys the report's NDR dicts: "5" for 5, "2.5" for 2.5."""
    return str(int(p)) if float(p).is_integer() else repr(float(p))


@dataclass
class TrainSource:
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


def train_source(features: Any, names: Sequence[str]) -> TrainSource:
    """The named layers' train features of a FeatureStore (its live rows), a FeatureSet or a mapping."""
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

            return TrainSource(
                views,
                {n: np.asarray(features.norms(n))[live] for n in names},
                np.asarray(features.row_ids(), dtype=np.int64)[live],
                live_chunks,
            )

        def store_chunks(name: str) -> Iterator[np.ndarray]:
            for _, block in features.iter_layer_chunks(name, _FIT_ROWS):
                yield block

        return TrainSource(
            {n: features.layer(n) for n in names},
            {n: features.norms(n) for n in names},  # read-only memmaps: scoring takes them as they are
            np.asarray(features.row_ids(), dtype=np.int64),
            store_chunks,
        )
    mapping = as_mapping(features, "features")
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

    return TrainSource(arrays, None, np.arange(n, dtype=np.int64), array_chunks)


def as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    """layer -> matrix of a FeatureSet or a mapping; InvalidInputError naming `what` for anything else."""
    inner = getattr(value, "features", None)  # a featurize.FeatureSet
    if isinstance(inner, Mapping):
        return inner
    if not isinstance(value, Mapping):
        raise InvalidInputError(
            f"{what} must be a FeatureStore, a FeatureSet or a mapping of layer -> matrix"
        )
    return value


def boolean_mask(values: Any, size: int, what: str) -> np.ndarray:
    """A (size,) bool array of a bool or 0/1 integer array or tensor; InvalidInputError naming `what`."""
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


def split_aggregation(name: str) -> tuple[str, bool]:
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


def reference_size(queries: Mapping[str, Any], names: Sequence[str]) -> int:
    """m, the reference rows every named layer's (m, k) matrix holds."""
    missing = [n for n in names if n not in queries]
    if missing:
        raise InvalidInputError(f"reference features missing for layers {missing}")
    sizes = {tuple(getattr(queries[n], "shape", ())) for n in names}
    if any(len(s) != 2 for s in sizes) or len({s[0] for s in sizes}) != 1:
        raise InvalidInputError(f"reference features must be (m, k) matrices with one m, got {sorted(sizes)}")
    return int(next(iter(sizes))[0])
