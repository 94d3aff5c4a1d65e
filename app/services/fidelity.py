"""Projection fidelity of an index: measured once when its build finalizes, shown where decisions are made.

An index stores each layer unit's per-sample gradient projected (`auto`: small units exactly, the others
factorized). `influence.fidelity.measure_fidelity` tells, per unit, how well the projected scores keep the
exact grad-dot scores on a sample. `measure_build_fidelity` runs it from the build's finalize step
(app/jobs/index_build.py), BEFORE the index is marked ready, and the result is stored on the Index row
(`Index.fidelity`, JSON):

    {"sample": {"train_rows", "query_rows", "seed", "dtype"[, "note"]},
     "threshold": 0.9, "seconds": ...,
     "units": {unit: {"projection": {"kind", "dim"}, "spearman", "spearman_min", "rel_error", "top10_overlap"}},
     "below_threshold": [units with spearman < threshold, lowest first]}

or {"skipped": "<why>"} (disabled by settings, too few rows, a sample too large to hold even one row at a time,
an error: a failed measurement never fails the build). A sample over FIDELITY_MEMORY_BYTES is measured smaller
rather than skipped (`fit_sample`: one training row per pass, then fewer query rows; `sample.note` says so), which
is what an LLM's vocabulary-wide head needs. The sample: `fidelity_train_rows` training rows and `fidelity_query_rows`
OTHER rows of the index's dataset as queries, drawn with seed 0; a dataset with fewer rows shares what it has
in the same proportion (at least 2 training rows and 1 query). The model is the worker's cached model, the one
the features were computed with: for a model with checkpoints (TracIn-CP) that is its final state, which
`sample.note` says. Appends add rows under the same projection, so they do not measure again.

Readers: `unit_spearman` (unit -> Spearman of a set of layers, None for an index without a measurement),
`fidelity_warning` (one sentence naming the units below the threshold), `missing_note` (why an index has no
measurement). Query answers, audits, layer reports and the CLI use them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.db import session_scope
from app.jobs import state as job_state
from app.models import RegisteredModel
from app.services.datasets import read_rows
from influence import ProjectionSpec
from influence.data import Example, encode_examples
from influence.fidelity import FIDELITY_WARNING, measure_fidelity
from influence.memory import format_bytes

log = logging.getLogger(__name__)

FIDELITY_SEED = 0
# The measurement keeps the query rows' inputs and output gradients of every unit (float64) for the whole run,
# and one training batch's beside them: above this many bytes the sample is not measured (skipped, with why)
# rather than risk the worker's memory.
FIDELITY_MEMORY_BYTES = 4 * 1024**3
# Most rows in one batch of the measurement; fewer where the longest row times this exceeds the worker's
# max_tokens_per_batch (`batch_rows`).
FIDELITY_BATCH_ROWS = 16


def threshold() -> float:
    return float(FIDELITY_WARNING)


def sample_sizes(row_count: int, train_rows: int, query_rows: int) -> tuple[int, int] | str:
    """(training rows, query rows) of the sample, or why there is none. A dataset smaller than the two together
    is shared in the same proportion: at least 1 query and 2 training rows, else there is no sample."""
    if train_rows <= 0 or query_rows <= 0:
        return "disabled (settings fidelity_train_rows / fidelity_query_rows are 0)"
    if row_count < 3:
        return (
            f"the dataset has {row_count} rows; measuring fidelity needs at least 3 (2 training rows and 1 "
            "query row)"
        )
    if row_count >= train_rows + query_rows:
        return train_rows, query_rows
    queries = max(1, row_count * query_rows // (train_rows + query_rows))
    return min(train_rows, row_count - queries), queries


def sample_rows(row_count: int, train_rows: int, query_rows: int, seed: int = FIDELITY_SEED):
    """(training row ids, query row ids): disjoint, drawn with `seed`; or why there is no sample."""
    sizes = sample_sizes(row_count, train_rows, query_rows)
    if isinstance(sizes, str):
        return sizes
    train, queries = sizes
    order = np.random.default_rng(seed).permutation(row_count)
    return sorted(order[:train].tolist()), sorted(order[train : train + queries].tolist())


def _finite(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def batch_rows(lengths: Sequence[int], max_tokens: int) -> int:
    """Rows per batch of the measurement: FIDELITY_BATCH_ROWS, fewer where that many of the longest rows would
    exceed `max_tokens` (padding counted), at least 1. One size for the whole sample, which measure_fidelity
    batches in its own order."""
    longest = max(lengths, default=1)
    return max(1, min(FIDELITY_BATCH_ROWS, max_tokens // max(longest, 1)))


def _held_bytes(
    layers: Sequence[Any],
    query_lengths: Sequence[int],
    train_lengths: Sequence[int],
    rows: int = FIDELITY_BATCH_ROWS,
) -> int:
    """Bytes of float64 (inputs, output gradients) the measurement holds at its peak: every query token of every
    unit, and the longest training batch's tokens (`rows` rows per batch)."""
    width = 0
    for layer in layers:
        if layer.kind == "embedding":
            width += 1 + layer.out_features
        else:
            width += layer.in_features + int(layer.has_bias) + layer.out_features
    ordered = sorted(train_lengths, reverse=True)
    tokens = sum(query_lengths) + sum(ordered[:rows])
    return tokens * width * 8


def fit_sample(
    layers: Sequence[Any],
    query_lengths: Sequence[int],
    train_lengths: Sequence[int],
    rows: int,
    limit: int | None = None,
) -> tuple[int, int] | None:
    """(query rows kept, training rows per pass) under which the measurement holds at most `limit` bytes, or None
    when not even 1 and 1 fit. An LLM's vocabulary-wide head makes every token cost megabytes, so the sample
    gives up its batching first (the training rows are all measured, one pass at a time) and then its last query
    rows (each query is one column of every unit's comparison; the training rows are what the rankings rank).
    `limit`: FIDELITY_MEMORY_BYTES unless given."""
    limit = FIDELITY_MEMORY_BYTES if limit is None else limit
    for batch in range(rows, 0, -1):
        if _held_bytes(layers, query_lengths, train_lengths, batch) <= limit:
            return len(query_lengths), batch
    for kept in range(len(query_lengths) - 1, 0, -1):
        if _held_bytes(layers, query_lengths[:kept], train_lengths, 1) <= limit:
            return kept, 1
    return None


def measure_build_fidelity(ctx: Any, rows: Any, store: Any) -> dict[str, Any] | None:
    """The fidelity record of a build (module docstring), or None when the job was asked to stop meanwhile.

    ctx: the step's WorkerContext; rows: its _BuildRows snapshot of the job; store: the finalized store.
    Never raises (but for the cancellation it reports): a failure is recorded as {"skipped": ...} and logged."""

    def cancelled() -> bool:
        with session_scope(ctx.session_factory) as session:
            return job_state.is_cancel_requested(session, rows.job_id)

    if cancelled():
        return None
    try:
        record = _measure(ctx, rows, store)
    except Exception as exc:  # the measurement must never fail the build
        log.exception("index build %s: measuring projection fidelity failed", rows.job_id)
        detail = str(exc) or exc.__class__.__name__
        record = {"skipped": f"measuring fidelity failed: {exc.__class__.__name__}: {detail}"[:2000]}
    if "skipped" in record:
        log.info("index build %s: fidelity not measured: %s", rows.job_id, record["skipped"])
    return None if cancelled() else record


def _measure(ctx: Any, rows: Any, store: Any) -> dict[str, Any]:

    settings = ctx.settings
    chosen = sample_rows(rows.dataset.row_count, settings.fidelity_train_rows, settings.fidelity_query_rows)
    if isinstance(chosen, str):
        return {"skipped": chosen}
    train_ids, query_ids = chosen

    def examples(ids: Sequence[int]) -> list[Example]:
        out = []
        for row_id in ids:
            row = read_rows(settings, rows.dataset, int(row_id), 1)[0]
            out.append(Example(text=row["text"], label=row["label"], text_pair=row.get("text_pair")))
        return out

    train, queries = examples(train_ids), examples(query_ids)
    manifest = store.manifest
    cached = ctx.models.get(rows.model, ctx.device)
    by_name = {layer.name: layer for layer in cached.layers}
    missing = [name for name in rows.index_layers if name not in by_name]
    if missing:
        return {"skipped": f"the loaded model lacks layers {missing[:5]} that the index names"}
    layers = [by_name[name] for name in rows.index_layers]
    tokenizer = cached.loaded.tokenizer
    lengths = [
        [len(e.input_ids) for e in encode_examples(tokenizer, part, manifest.task, manifest.max_length)]
        for part in (queries, train)
    ]
    rows_per_batch = batch_rows([*lengths[0], *lengths[1]], settings.max_tokens_per_batch)
    fitted = fit_sample(layers, lengths[0], lengths[1], rows_per_batch)
    if fitted is None:
        held = _held_bytes(layers, lengths[0][:1], lengths[1], 1)
        return {
            "skipped": f"even 1 query row and 1 training row per batch would hold {held / 1024**3:.1f} GiB of "
            f"activations and gradients (limit {FIDELITY_MEMORY_BYTES / 1024**3:.0f} GiB): lower max_length"
        }
    kept_queries, fitted_batch = fitted
    fit_note = None
    if (kept_queries, fitted_batch) != (len(queries), rows_per_batch):
        fit_note = (
            f"sized to the measurement's memory limit ({format_bytes(FIDELITY_MEMORY_BYTES)}): {kept_queries} "
            f"of the {len(queries)} query rows, {fitted_batch} training row(s) per pass"
        )
        queries, rows_per_batch = queries[:kept_queries], fitted_batch
    spec = ProjectionSpec.from_dict(manifest.projection)
    started = time.perf_counter()
    with cached.lock:
        measured = measure_fidelity(
            cached.loaded.model,
            tokenizer,
            layers,
            spec,
            train,
            queries,
            manifest.task,
            max_length=manifest.max_length,
            dtype=manifest.dtype,
            batch_size=rows_per_batch,
            head_chunk_tokens=settings.head_chunk_tokens,
            checkpointing=settings.activation_checkpointing,
        )
    seconds = time.perf_counter() - started
    limit = threshold()
    units = {}
    for layer in layers:
        numbers = measured[layer.name]
        units[layer.name] = {
            "projection": spec.for_layer(layer).to_dict(),
            "spearman": _finite(numbers.spearman),
            "spearman_min": _finite(numbers.spearman_min),
            "rel_error": _finite(numbers.rel_error),
            "top10_overlap": _finite(numbers.top10_overlap),
        }
    sample: dict[str, Any] = {
        "train_rows": len(train),
        "query_rows": len(queries),
        "seed": FIDELITY_SEED,
        "dtype": manifest.dtype,
    }
    notes = [fit_note, _checkpoint_note(ctx, rows, manifest, RegisteredModel)]
    if any(notes):
        sample["note"] = "; ".join(note for note in notes if note)
    return {
        "sample": sample,
        "threshold": limit,
        "seconds": round(seconds, 3),
        "units": units,
        "below_threshold": _below(units, limit),
    }


def _checkpoint_note(ctx: Any, rows: Any, manifest: Any, registered: Any) -> str | None:
    with session_scope(ctx.session_factory) as session:
        model = session.get(registered, rows.model.id)
        checkpoints = len(model.checkpoints or ()) if model is not None else 0
    checkpoints = max(checkpoints, len(getattr(manifest, "checkpoints", None) or ()))
    if checkpoints <= 1:
        return None
    return (
        f"the model has {checkpoints} checkpoints (TracIn-CP): fidelity is measured at the final model state "
        "only"
    )


def _below(units: Mapping[str, Mapping[str, Any]], limit: float) -> list[str]:
    """Units whose mean Spearman is below `limit` (an unknown one counts as below), lowest first."""
    low = [
        (value if value is not None else -math.inf, name)
        for name, record in units.items()
        if (value := record.get("spearman")) is None or value < limit
    ]
    return [name for _, name in sorted(low)]


# ---------------------------------------------------------------------------------------------- readers


def unit_spearman(
    fidelity: Mapping[str, Any] | None, layers: Sequence[str]
) -> dict[str, float | None] | None:
    """{unit: mean Spearman} of `layers` from an index's fidelity record; None when it has no measurement (an
    index built before fidelity was measured, or a skipped one). A unit the record lacks maps to None."""
    if not fidelity or not isinstance(fidelity.get("units"), Mapping):
        return None
    units = fidelity["units"]
    return {name: (units.get(name) or {}).get("spearman") for name in layers}


def record_threshold(fidelity: Mapping[str, Any] | None) -> float:
    value = (fidelity or {}).get("threshold")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else threshold()


def fidelity_warning(spearman: Mapping[str, float | None] | None, limit: float | None = None) -> str | None:
    """One sentence naming the units whose projected scores rank rows unlike their exact ones (Spearman below
    the threshold), lowest first; None when there are none (or no measurement)."""
    if not spearman:
        return None
    limit = threshold() if limit is None else limit
    low = sorted(
        ((value, name) for name, value in spearman.items() if value is not None and value < limit),
        key=lambda item: item[0],
    )
    if not low:
        return None
    shown = ", ".join(f"{name} ({value:.2f})" for value, name in low[:5])
    more = f" and {len(low) - 5} more" if len(low) > 5 else ""
    return (
        f"{len(low)} of the {len(spearman)} layer units used rank training rows unlike their exact gradients "
        f"would (Spearman of projected vs exact scores below {limit:g}: {shown}{more}); their scores and ranks "
        "are approximate. Rebuild the index with an exact projection for them (projection.units {unit: {kind: "
        "identity}}, or tokens for an embedding) or a larger projection dim, or leave them out of the layers"
    )


def missing_note(fidelity: Mapping[str, Any] | None) -> str | None:
    """Why an index has no fidelity measurement (None when it has one)."""
    if fidelity and isinstance(fidelity.get("units"), Mapping):
        return None
    if fidelity and fidelity.get("skipped"):
        return f"the projection's fidelity was not measured when the index was built ({fidelity['skipped']})"
    return (
        "the index has no fidelity measurement (it was built before fidelity was measured): how faithfully its "
        "projected features rank rows compared with exact gradients is unknown; rebuild it to measure"
    )
