"""Featurising example sets: projected per-sample gradients in memory (queries) or into a feature store (builds).

This is the glue between the hook machinery (gradients.py) and the store (store/): batching with length
bucketing, restoring input order, several checkpoints for TracIn-CP, and chunked, resumable store builds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influence.data import Example, encode_examples, iter_batches, pad_token_id
from influence.errors import InvalidInputError
from influence.gradients import DEFAULT_HEAD_CHUNK_TOKENS, FeatureBatch, Featurizer
from influence.store import CheckpointSpec, FeatureStore, LayerSpec, StoreManifest
from influence.tokens import TokenRows

ProgressCallback = Callable[[int, int], None]  # (rows done, rows total)


class CheckpointFeaturizer:
    """Features from several checkpoints of one model, concatenated per unit (TracIn-CP, method.md §2).

    The feature of unit u is [g_u^1, g_u^2, ...]; the tracin-cp estimator weights block c by eta_c.
    """

    def __init__(self, featurizers: Sequence[Featurizer]):
        if not featurizers:
            raise InvalidInputError("at least one checkpoint is needed")
        names = [[layer.name for layer in f.layers] for f in featurizers]
        if any(n != names[0] for n in names):
            raise InvalidInputError("every checkpoint must expose the same layers")
        tokens = [name for name, p in featurizers[0].projectors.items() if p.kind == "tokens"]
        if tokens:
            raise InvalidInputError(
                f"units {tokens} are projected as `tokens` (exact token rows), which TracIn-CP cannot "
                "concatenate across checkpoints; give them a dense projection (e.g. factorized)"
            )
        self.featurizers = list(featurizers)
        self.layers = featurizers[0].layers

    @property
    def dims(self) -> dict[str, int]:
        return {name: sum(f.dims[name] for f in self.featurizers) for name in self.featurizers[0].dims}

    @property
    def checkpoint_dims(self) -> dict[str, list[int]]:
        """Per unit, the size of each checkpoint's block."""
        return {name: [f.dims[name] for f in self.featurizers] for name in self.featurizers[0].dims}

    def featurize(
        self,
        batch,
        *,
        head_chunk_tokens: int | None = DEFAULT_HEAD_CHUNK_TOKENS,
        checkpointing: bool = False,
    ) -> FeatureBatch:
        parts = [
            f.featurize(batch, head_chunk_tokens=head_chunk_tokens, checkpointing=checkpointing)
            for f in self.featurizers
        ]
        features = {name: torch.cat([p.features[name] for p in parts], dim=1) for name in parts[0].features}
        return FeatureBatch(features, parts[-1].losses, parts[-1].logits)


AnyFeaturizer = Featurizer | CheckpointFeaturizer


@dataclass
class FeatureSet:
    """Features of an example set in input order: features[unit] is (n, dim) float32, or TokenRows (float32
    values) for a `tokens` unit."""

    features: dict[str, np.ndarray]
    losses: np.ndarray
    predictions: np.ndarray  # (n,) predicted class (classification), -1 otherwise

    def __len__(self) -> int:
        return len(self.losses)


def featurize_examples(
    featurizer: AnyFeaturizer,
    tokenizer,
    examples: Sequence[Example],
    task: str,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    max_tokens: int | None = None,
    head_chunk_tokens: int | None = DEFAULT_HEAD_CHUNK_TOKENS,
    checkpointing: bool = False,
    progress: ProgressCallback | None = None,
) -> FeatureSet:
    """Projected per-sample gradients of `examples` (length-bucketed batches, results in input order).

    Batches hold at most `batch_size` rows and `max_tokens` tokens counting padding (data.iter_batches);
    `head_chunk_tokens` bounds the tokens whose vocabulary-wide logits a causal LM holds at once and
    `checkpointing` recomputes the blocks' activations in backward (gradients.HookedModel). None of the three
    changes the features, only the memory and time they take."""
    if not examples:
        raise InvalidInputError("no examples to featurize")
    encoded = encode_examples(tokenizer, examples, task, max_length)
    n = len(encoded)
    token_units = set(token_unit_names(featurizer))
    features: dict[str, Any] = {
        name: np.zeros((n, dim), dtype=np.float32)
        for name, dim in featurizer.dims.items()
        if name not in token_units
    }
    token_parts: dict[str, list[tuple[TokenRows, np.ndarray]]] = {name: [] for name in token_units}
    losses = np.zeros(n, dtype=np.float64)
    predictions = np.full(n, -1, dtype=np.int64)
    done = 0
    batches = iter_batches(
        encoded, pad_token_id(tokenizer), task, batch_size, sort_by_length=True, max_tokens=max_tokens
    )
    for batch in batches:
        result = featurizer.featurize(batch, head_chunk_tokens=head_chunk_tokens, checkpointing=checkpointing)
        rows = batch.row_ids.numpy()
        for name, value in result.features.items():
            if name in token_units:
                token_parts[name].append((value, rows))
            else:
                features[name][rows] = value.detach().to(torch.float32).cpu().numpy()
        losses[rows] = result.losses.double().cpu().numpy()
        if task == "classification":
            predictions[rows] = result.predictions.cpu().numpy()
        done += len(batch)
        if progress is not None:
            progress(done, n)
    for name, parts in token_parts.items():
        in_order = TokenRows.gather(parts, n)
        features[name] = TokenRows(
            in_order.offsets,
            np.asarray(in_order.tokens, dtype=np.int32),
            np.asarray(in_order.values, dtype=np.float32),
            check=False,
        )
    return FeatureSet(features, losses, predictions)


def feature_arrays(features: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{unit: features} as plain arrays for np.savez: a matrix as it is, token rows as their three arrays
    `<unit>__offsets`, `<unit>__tokens`, `<unit>__values` (features_from_arrays reads them back)."""
    arrays = {}
    for name, value in features.items():
        if isinstance(value, TokenRows):
            for part in _TOKEN_PARTS:
                arrays[f"{name}__{part}"] = np.asarray(getattr(value, part))
        else:
            arrays[name] = np.asarray(value)
    return arrays


def features_from_arrays(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    """The inverse of feature_arrays for `names` (KeyError for a unit the arrays lack)."""
    return {
        name: arrays[name]
        if name in arrays
        else TokenRows(*(np.asarray(arrays[f"{name}__{part}"]) for part in _TOKEN_PARTS))
        for name in names
    }


_TOKEN_PARTS = ("offsets", "tokens", "values")


def token_unit_names(featurizer: AnyFeaturizer) -> list[str]:
    """Units the featurizer gives as TokenRows (projection `tokens`: the exact embedding)."""
    first = featurizer.featurizers[0] if isinstance(featurizer, CheckpointFeaturizer) else featurizer
    return [name for name, projector in first.projectors.items() if projector.kind == "tokens"]


def store_manifest(
    featurizer: AnyFeaturizer,
    *,
    model_id: str,
    revision: str | None,
    weights_hash: str,
    tokenizer_name: str,
    dataset_hash: str,
    num_rows: int,
    task: str,
    max_length: int,
    dtype: str = "float16",
    chunk_size: int = 1024,
    checkpoints: Sequence[CheckpointSpec] = (),
    extra: dict | None = None,
) -> StoreManifest:
    """The manifest of a store built by `featurizer`: layers with their feature dims, projection, identity."""
    first = featurizer.featurizers[0] if isinstance(featurizer, CheckpointFeaturizer) else featurizer
    tokens = set(token_unit_names(featurizer))
    layers = [
        LayerSpec(
            layer.name,
            featurizer.dims[layer.name],
            layer.num_params,
            "tokens" if layer.name in tokens else "dense",
        )
        for layer in first.layers
    ]
    return StoreManifest(
        model_id=model_id,
        revision=revision or "",
        weights_hash=weights_hash,
        tokenizer=tokenizer_name,
        dataset_hash=dataset_hash,
        layers=layers,
        projection=first.projection.to_dict(),
        dtype=dtype,
        num_rows=num_rows,
        chunk_size=chunk_size,
        task=task,
        max_length=max_length,
        checkpoints=list(checkpoints),
        extra=extra or {},
    )


def build_store(
    featurizer: AnyFeaturizer,
    tokenizer,
    examples: Sequence[Example],
    store: FeatureStore,
    *,
    row_ids: Sequence[int] | np.ndarray | None = None,
    chunks: Sequence[int] | None = None,
    batch_size: int = 32,
    max_tokens: int | None = None,
    head_chunk_tokens: int | None = DEFAULT_HEAD_CHUNK_TOKENS,
    checkpointing: bool = False,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[int]:
    """Featurize and write the store's pending chunks (or the given ones); returns the chunks written.

    Idempotent and resumable: a chunk is written whole or not at all, so after a crash the next call
    redoes only what is missing. Several processes may run this on disjoint (or even the same) chunks.
    `should_stop` is checked between chunks (cancellation). batch_size, max_tokens, head_chunk_tokens and
    checkpointing: as featurize_examples.
    """
    manifest = store.manifest
    if len(examples) != manifest.num_rows:
        raise InvalidInputError(f"the store plans {manifest.num_rows} rows, got {len(examples)} examples")
    ids = np.arange(len(examples), dtype=np.int64) if row_ids is None else np.asarray(row_ids, dtype=np.int64)
    ranges = store.chunk_ranges()
    todo = list(store.pending_chunks() if chunks is None else chunks)
    written = []
    total = sum(ranges[c][1] - ranges[c][0] for c in todo)
    done = 0
    for chunk in todo:
        if should_stop is not None and should_stop():
            break
        start, end = ranges[chunk]
        feature_set = featurize_examples(
            featurizer,
            tokenizer,
            examples[start:end],
            manifest.task,
            batch_size=batch_size,
            max_length=manifest.max_length,
            max_tokens=max_tokens,
            head_chunk_tokens=head_chunk_tokens,
            checkpointing=checkpointing,
        )
        store.write_chunk(chunk, ids[start:end], feature_set.features)
        written.append(chunk)
        done += end - start
        if progress is not None:
            progress(done, total)
    return written
