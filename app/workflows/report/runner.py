"""Layer reports, the worker side: `run_layer_report`, registered with `@job_runner("layer_report")`.

In stages with progress (done / total = reference rows + cancellation rows + estimator x layer score blocks + 1):
  1. featurize the reference set exactly as a query does (references.featurize_reference: same projection,
     manifest checked), giving which reference rows the model predicts correctly and its accuracy;
  2. cancellation per layer (influence.layer_cancellation, as scripts/reproduce_paper.py does) over up to
     `cancellation_rows` live training rows drawn with a fixed seed;
  3. influence.layer_report over the index's store. Deleted (tombstoned) rows are left out everywhere: the
     library ranges over the store's live rows, the mask is built for exactly those, and cancellation rows are
     drawn from them. Estimators are the ones queries use (queries.index_estimators): DataInf is restored from
     the statistics fitted when the index was built (same lambda, same M as a query; they still include deleted
     rows until a compaction refits them, as for queries), and cosine uses the stored norms;
  4. `report.json` = LayerReport.to_dict() as the job's artifact, and a short summary as the job's result.
The index's projection fidelity (measured at build time, app/services/fidelity.py) goes into the report: every
entry carries the lowest and mean fidelity of its units, units below the threshold get warnings naming the layer
sets they make uncertain (the summary lists them), and an index without a measurement says so once.

Causal-LM indexes: there is no class prediction to be correct, so the `-c` aggregations are reported in the
report's `unavailable` (with the reason) instead of being refused, the accuracy is unknown, and the report says
it cannot recommend layers without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from app.config import Settings
from app.errors import Conflict
from app.jobs.context import store_compute_dtype
from app.jobs.kinds import LAYER_REPORT
from app.jobs.model_cache import ModelSpec
from app.jobs.run import JobRun, job_runner
from app.models import Dataset, Index
from app.services.datasets import read_rows
from app.services.fidelity import missing_note, record_threshold, unit_spearman
from app.services.indexes import layer_from_dict
from app.services.noisy import noisy_mask
from app.services.queries.compute import index_estimators
from app.services.references import load_index_reference
from app.workflows.report.service import REPORT_FILE
from influence import Estimator, encode_examples, iter_batches, layer_cancellation
from influence.data import Example, pad_token_id
from influence.report import layer_report

# Seed of the draw of the training rows cancellation is measured over (recorded in the summary).
CANCELLATION_SEED = 0


def _cancellation_rows(
    settings: Settings, dataset: Dataset, row_ids: np.ndarray, wanted: int
) -> list[Example]:
    """Up to `wanted` live training rows, drawn with a fixed seed (dataset rows only)."""
    eligible = row_ids[row_ids < dataset.row_count]
    chosen = eligible[np.random.default_rng(CANCELLATION_SEED).permutation(len(eligible))[:wanted]]
    out = []
    for row_id in chosen:
        row = read_rows(settings, dataset, int(row_id), 1)[0]
        out.append(Example(text=row["text"], label=row["label"], text_pair=row.get("text_pair")))
    return out


class _Counted(Estimator):
    """An estimator that calls `tick` the first time a layer is scored with it (progress, cancellation)."""

    def __init__(self, inner: Estimator, tick: Callable[[], None]):
        self.inner = inner
        self.needs_norms = inner.needs_norms  # type: ignore[misc]
        self.tick = tick
        self.ticked = False

    def _tick(self) -> None:
        if not self.ticked:
            self.ticked = True
            self.tick()

    def transform_query(self, queries):
        self._tick()
        return self.inner.transform_query(queries)

    def row_scale(self, norms):
        return self.inner.row_scale(norms)

    def score_transformed(self, train, transformed, norms=None):
        return self.inner.score_transformed(train, transformed, norms)

    def score_token_rows(self, train, queries, norms):
        self._tick()
        return self.inner.score_token_rows(train, queries, norms)


def _counting(estimators: dict[str, Estimator], tick: Callable[[], None]) -> dict[str, Estimator]:
    """The estimators (one per layer), each calling `tick` the first time its layer is scored."""
    return {name: _Counted(estimator, tick) for name, estimator in estimators.items()}


@job_runner(LAYER_REPORT)
def run_layer_report(run: JobRun) -> dict[str, Any]:
    """Featurize the reference set, measure cancellation, run influence.layer_report; write report.json."""
    started = time.perf_counter()
    params = run.params
    settings = run.settings
    with run.session() as session:
        index = session.get(Index, run.target_id)
        if index is None:
            raise Conflict(f"index {run.target_id!r} was deleted")
        inputs = load_index_reference(settings, session, index, params["reference"])
    model, dataset, store, examples = inputs.model, inputs.dataset, inputs.store, inputs.examples
    fidelity = index.fidelity
    names = list(params["layers"])
    by_name = {record["name"]: record for record in model.layers}
    missing = [name for name in names if name not in by_name or name not in store.layers]
    if missing:
        raise Conflict(f"index {index.id!r} no longer holds layers {missing[:5]}; rebuild it")
    layers = [layer_from_dict(by_name[name]) for name in names]
    estimators = list(params["estimators"])

    live = store.live_positions()
    row_ids = np.asarray(store.row_ids(), dtype=np.int64)[live]
    wanted_cancellation = min(int(params["cancellation_rows"]), len(row_ids))
    m = len(examples)
    total = m + wanted_cancellation + len(estimators) * len(layers) + 1
    run.progress(0, total)

    # 1. The reference set, as a query featurizes it.
    reference = inputs.featurize(run.ctx, names, progress=lambda done, _: run.progress(min(done, m), total))
    done = m
    run.progress(done, total)

    # 2. Cancellation per layer over live training rows (raw parameter gradients, method.md §5).
    cancellation = None
    used = 0
    if wanted_cancellation > 0:
        rows = _cancellation_rows(settings, dataset, row_ids, wanted_cancellation)
        used = len(rows)
        if rows:
            cached = run.ctx.models.get(
                ModelSpec.of(model, store_compute_dtype(store.manifest)), run.ctx.device
            )
            tokenizer = cached.loaded.tokenizer
            encoded = encode_examples(tokenizer, rows, model.task, store.manifest.max_length)

            def batches() -> Iterator[Any]:
                seen = 0
                for batch in iter_batches(
                    encoded,
                    pad_token_id(tokenizer),
                    model.task,
                    settings.batch_size,
                    max_tokens=settings.max_tokens_per_batch,
                ):
                    yield batch
                    seen += len(batch)
                    run.progress(done + seen, total)

            with cached.lock:
                cancellation = layer_cancellation(
                    cached.loaded.model,
                    layers,
                    batches(),
                    max_samples=used,
                    head_chunk_tokens=settings.head_chunk_tokens,
                    checkpointing=settings.activation_checkpointing,
                )
    done = m + wanted_cancellation
    run.progress(done, total)

    # 3. The report, with the estimators queries use (fitted ones, DataInf, from the build's statistics).
    scored = [0]

    def tick() -> None:
        scored[0] += 1
        run.progress(done + min(scored[0], len(estimators) * len(layers)), total)

    fitted = {name: _counting(index_estimators(store, names, name), tick) for name in estimators}
    mask, noisy = noisy_mask(settings, dataset, params.get("noisy"), row_ids)
    report = layer_report(
        store,
        reference.features,
        layers=layers,
        noisy=mask,
        reference_correct=reference.correct,
        reference_accuracy=reference.accuracy,
        num_classes=max(2, int(model.num_labels or 2)),
        estimators=estimators,
        aggregations=list(params["aggregations"]),
        vote_k=float(params["vote_k"]),
        cancellation=cancellation,
        fitted_estimators=fitted,
        top_rows=int(params["top_rows"]),
        fidelity=unit_spearman(fidelity, names),
        fidelity_threshold=record_threshold(fidelity),
    )
    document = report.to_dict()
    note = missing_note(fidelity)
    if note:
        # Said once: without a measurement no entry carries fidelity.
        note = f"{note[0].upper()}{note[1:]}."
        document["warnings"].append(note)

    # 4. The artifact, then the summary.
    run.write_json(REPORT_FILE, document)
    run.progress(total, total)
    return {"summary": _summary(document, noisy, used, time.perf_counter() - started, note)}


def _summary(
    document: dict[str, Any],
    noisy: dict[str, Any] | None,
    cancellation_rows: int,
    seconds: float,
    fidelity_note: str | None = None,
):
    recommendation = document.get("recommendation")
    baseline = document.get("random_baseline") or {}
    return {
        "recommendation": None
        if recommendation is None
        else {
            "estimator": recommendation["estimator"],
            "aggregation": recommendation["aggregation"],
            "layers": recommendation["layers"]["name"],
            "kind": recommendation["layers"]["kind"],
            "members": recommendation["layers"]["members"],
            "auc_ndr": recommendation["auc_ndr"],
            "ndr_30": (recommendation.get("ndr") or {}).get("30"),
            "random_auc_ndr": baseline.get("auc_ndr"),
            "fidelity_min": recommendation.get("fidelity_min"),
        },
        "reference_accuracy": document.get("reference_accuracy"),
        "near_chance": document.get("near_chance"),
        "warnings": len(document.get("warnings") or []),
        # The warnings about projection fidelity: units below the threshold, or why it is unknown.
        "fidelity_warnings": list((document.get("fidelity") or {}).get("warnings") or [])
        + ([fidelity_note] if fidelity_note else []),
        "unavailable": list(document.get("unavailable") or []),
        "n_train": document.get("n_train"),
        "n_reference": document.get("n_reference"),
        "n_noisy": document.get("n_noisy"),
        "noisy": noisy,
        "cancellation": {"rows": cancellation_rows, "seed": CANCELLATION_SEED} if cancellation_rows else None,
        "seconds": round(seconds, 3),
    }
