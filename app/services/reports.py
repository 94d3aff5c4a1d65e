"""Layer reports as a service: which layers, aggregation and estimator find the noisy rows of an index.

In the API (cheap checks, nothing heavy loaded): `create_report` checks the index is ready, picks its layers,
checks estimator and aggregation names against the library's registries (`-c` variants included), resolves the
reference set and the noisy mask (the dataset's noisy column, or explicit row ids that must be rows of the index),
then records a `layer_report` job and enqueues it once committed. `get_report`, `list_reports`, `report_page`
and `delete_report` read and remove it (the job row is the resource: docs/decisions/0005-workflows.md).

In the worker (`run_layer_report`, registered with `@job_runner("layer_report")`), in stages with progress
(done / total = reference rows + cancellation rows + estimator x layer score blocks + 1):
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

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, Invalid
from app.models import Dataset, Index, Job
from app.schemas.reports import NoisyRows, ReportCreate
from app.services import jobs as job_service
from app.services.datasets import iter_rows, read_rows
from app.services.indexes import get_index, layer_from_dict, require_ready
from app.services.pipelines import index_sources, store_dir
from app.services.runners import (
    JobRun,
    artifact_path,
    delete_job_resource,
    get_workflow_job,
    job_runner,
)

log = logging.getLogger(__name__)

LAYER_REPORT = "layer_report"
REPORT_FILE = "report.json"
CORRECT_SUFFIX = "-c"
# Seed of the draw of the training rows cancellation is measured over (recorded in the summary).
CANCELLATION_SEED = 0


# --------------------------------------------------------------------------------------------- in the API


def check_aggregations(names: Sequence[str]) -> list[str]:
    """The aggregation names, deduplicated in order; 422 for names the library does not know."""
    from influence.aggregation import AGGREGATORS

    unknown = []
    for name in names:
        base = name[: -len(CORRECT_SUFFIX)] if name.endswith(CORRECT_SUFFIX) else name
        if name not in AGGREGATORS and base not in AGGREGATORS:
            unknown.append(name)
    if unknown:
        raise Invalid(
            f"unknown aggregations {unknown[:5]}; expected one of {', '.join(AGGREGATORS)}, each optionally with "
            f"the correct-only suffix '{CORRECT_SUFFIX}'"
        )
    return list(dict.fromkeys(names))


def _resolve_noisy(
    settings: Settings, index: Index, dataset: Dataset, body: ReportCreate
) -> dict[str, Any] | None:
    """The noisy mask's spec for the job: {"source": "dataset"}, {"source": "rows", "rows": [...]} or None."""
    given = (
        body.noisy if "noisy" in body.model_fields_set else ("dataset" if dataset.has_noisy_flag else None)
    )
    if given is None:
        return None
    if given == "dataset":
        if not dataset.has_noisy_flag:
            raise Invalid(
                f'noisy: dataset {dataset.id!r} has no noisy column; pass noisy: {{"rows": [...]}} with the '
                "noisy row ids, or null"
            )
        return {"source": "dataset"}
    assert isinstance(given, NoisyRows)
    from influence import FeatureStore

    rows = np.unique(np.asarray(given.rows, dtype=np.int64))
    store = FeatureStore.open(store_dir(settings, index), verify=False)
    known = np.isin(rows, store.row_ids())
    if not known.all():
        raise Invalid(
            f"noisy.rows {rows[~known][:5].tolist()} are not rows of index {index.id!r} "
            f"(it holds dataset rows by id; {store.num_rows} rows)"
        )
    return {"source": "rows", "rows": rows.tolist()}


def create_report(
    session: Session,
    settings: Settings,
    queue: job_service.JobQueue,
    index_id: str,
    body: ReportCreate,
    tenant_id: str,
) -> Job:
    """Check the request against a ready index of this tenant and queue its `layer_report` job."""
    from app.services.queries import select_query_layers
    from app.services.references import resolve_reference

    index = get_index(session, index_id, tenant_id)
    require_ready(index)
    model, dataset = index_sources(session, index)
    layers = select_query_layers(index, model, body.layers)
    aggregations = check_aggregations(body.aggregations)
    reference = resolve_reference(
        session, settings, body.reference, tenant_id=tenant_id, model=model, trained=dataset
    )
    noisy = _resolve_noisy(settings, index, dataset, body)
    params = {
        "index_id": index.id,
        "model": {"id": model.id, "name": model.name, "task": model.task},
        "dataset": {"id": dataset.id, "name": dataset.name},
        "reference": reference,
        "layers": layers,
        "estimators": list(dict.fromkeys(body.estimators)),
        "aggregations": aggregations,
        "vote_k": body.vote_k,
        "noisy": noisy,
        "cancellation_rows": body.cancellation_rows,
        "top_rows": body.top_rows,
    }
    job = job_service.create_job(
        session,
        LAYER_REPORT,
        tenant_id=tenant_id,
        target_id=index.id,
        params=params,
        max_active=settings.max_active_jobs_per_tenant,
    )
    job_service.enqueue_after_commit(session, queue, job)
    return job


def get_report(session: Session, report_id: str, tenant_id: str) -> Job:
    """The report (its job) of this tenant; 404 for another tenant's, another kind or an unknown id."""
    return get_workflow_job(session, report_id, tenant_id, LAYER_REPORT)


def read_report(settings: Settings, job: Job) -> dict[str, Any] | None:
    """The finished report (LayerReport.to_dict()), its checksum verified; None while it is not done."""
    import json

    if job.status != "succeeded":
        return None
    return json.loads(artifact_path(settings, job, REPORT_FILE).read_bytes())


def get_report_with_body(session: Session, settings: Settings, report_id: str, tenant_id: str):
    """(job, report or None): a single read includes the report once it has succeeded."""
    job = get_report(session, report_id, tenant_id)
    return job, read_report(settings, job)


def list_reports(
    session: Session, *, tenant_id: str, index_id: str | None, status: str | None, offset: int, limit: int
) -> tuple[Sequence[Job], int]:
    return job_service.list_jobs(
        session,
        tenant_id=tenant_id,
        kind=LAYER_REPORT,
        target_id=index_id,
        status=status,
        offset=offset,
        limit=limit,
    )


def delete_report(session: Session, settings: Settings, report_id: str, tenant_id: str) -> None:
    """Delete a finished report and its artifacts (409 while queued or running: cancel it first)."""
    delete_job_resource(session, settings, get_report(session, report_id, tenant_id))


def _detrimental_texts(
    settings: Settings, session: Session, job: Job, report: dict[str, Any]
) -> dict[str, Any]:
    """Row id -> {text, text_pair, label} of the report's most detrimental rows, while the dataset exists."""
    dataset = session.get(Dataset, (job.params.get("dataset") or {}).get("id", ""))
    if dataset is None or dataset.tenant_id != job.tenant_id:
        return {}
    out: dict[str, Any] = {}
    for row in report.get("detrimental") or []:
        row_id = row.get("row_id")
        if not isinstance(row_id, int) or str(row_id) in out or not 0 <= row_id < dataset.row_count:
            continue
        try:
            found = read_rows(settings, dataset, row_id, 1)[0]
        except Conflict:  # the dataset's rows are gone or corrupted: the page shows ids only
            return {}
        label = found.get("label")
        if isinstance(label, int) and dataset.label_names and 0 <= label < len(dataset.label_names):
            label = dataset.label_names[label]
        out[str(row_id)] = {"text": found.get("text"), "text_pair": found.get("text_pair"), "label": label}
    return out


def report_page(session: Session, settings: Settings, report_id: str, tenant_id: str) -> str:
    """The report as one self-contained HTML page (409 until the report has succeeded)."""
    from app.services.report_page import render_report_html

    job = get_report(session, report_id, tenant_id)
    if job.status != "succeeded":
        why = {
            "queued": "it is queued",
            "running": "it is still running",
            "failed": f"it failed ({job.error})",
            "cancelled": "it was cancelled",
        }.get(job.status, job.status)
        raise Conflict(f"report {job.id!r} has no page: {why}; the page exists once the report has succeeded")
    report = read_report(settings, job)
    assert report is not None
    params = job.params or {}
    model = params.get("model") or {}
    dataset = params.get("dataset") or {}
    created = job_service.as_utc(job.created_at)
    context = {
        "report_id": job.id,
        "index_id": job.target_id,
        "model": f"{model.get('name')} ({model.get('id')})" if model else None,
        "dataset": f"{dataset.get('name')} ({dataset.get('id')})" if dataset else None,
        "reference_size": report.get("n_reference"),
        "created": created.isoformat() if isinstance(created, dt.datetime) else None,
        "rows": _detrimental_texts(settings, session, job, report),
    }
    title = f"Layer report: {model.get('name', 'model')} on {dataset.get('name', 'dataset')}"
    return render_report_html(report, title=title, context=context)


# ---------------------------------------------------------------------------------------------- in workers


def _noisy_mask(
    settings: Settings, dataset: Dataset, spec: dict[str, Any] | None, row_ids: np.ndarray
) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """(n_live,) bool mask aligned with the live rows' dataset ids, and what was left out of it."""
    if spec is None:
        return None, None
    if spec["source"] == "rows":
        given = np.asarray(spec["rows"], dtype=np.int64)
        mask = np.isin(row_ids, given)
        # Named rows deleted from the index since the request: they are not in the report.
        return mask, {
            "source": "rows",
            "given": len(given),
            "deleted_rows_left_out": int(len(given) - mask.sum()),
        }
    flags = np.zeros(dataset.row_count, dtype=bool)
    for position, row in enumerate(iter_rows(settings, dataset)):
        flags[position] = bool(row.get("noisy"))
    inside = row_ids < dataset.row_count
    mask = np.zeros(len(row_ids), dtype=bool)
    mask[inside] = flags[row_ids[inside]]
    return mask, {
        "source": "dataset",
        # Rows appended to the index that are not rows of its dataset have no flag: they count as clean.
        "rows_without_flag": int((~inside).sum()),
        "deleted_rows_left_out": int(flags.sum() - mask.sum()),
    }


def _cancellation_rows(settings: Settings, dataset: Dataset, row_ids: np.ndarray, wanted: int) -> list[Any]:
    """Up to `wanted` live training rows as influence.Example, drawn with a fixed seed (dataset rows only)."""
    from influence.data import Example

    eligible = row_ids[row_ids < dataset.row_count]
    chosen = eligible[np.random.default_rng(CANCELLATION_SEED).permutation(len(eligible))[:wanted]]
    out = []
    for row_id in chosen:
        row = read_rows(settings, dataset, int(row_id), 1)[0]
        out.append(Example(text=row["text"], label=row["label"], text_pair=row.get("text_pair")))
    return out


def _counting(estimators: dict[str, Any], tick: Callable[[], None]) -> dict[str, Any]:
    """The estimators, each calling `tick` the first time a layer is scored with it (progress, cancel)."""
    from influence import Estimator

    class Counted(Estimator):
        def __init__(self, inner: Estimator):
            self.inner = inner
            self.needs_norms = inner.needs_norms  # type: ignore[misc]
            self.ticked = False

        def _tick(self) -> None:
            if not self.ticked:
                self.ticked = True
                tick()

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

    return {name: Counted(estimator) for name, estimator in estimators.items()}


@job_runner(LAYER_REPORT)
def run_layer_report(run: JobRun) -> dict[str, Any]:
    """Featurize the reference set, measure cancellation, run influence.layer_report; write report.json."""
    from app.services.fidelity import missing_note, record_threshold, unit_spearman
    from app.services.queries import index_estimators
    from app.services.references import featurize_reference, load_reference, open_index_store
    from influence import encode_examples, iter_batches, layer_cancellation, make_estimator
    from influence.data import pad_token_id
    from influence.report import layer_report

    started = time.perf_counter()
    params = run.params
    settings = run.settings
    with run.session() as session:
        index = session.get(Index, run.target_id)
        if index is None:
            raise Conflict(f"index {run.target_id!r} was deleted")
        model, dataset = index_sources(session, index)
        store = open_index_store(settings, index)
        examples = load_reference(settings, session, params["reference"])
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
    reference = featurize_reference(
        settings,
        run.ctx.models,
        run.ctx.device,
        store,
        model,
        dataset,
        examples,
        names,
        progress=lambda done, _: run.progress(min(done, m), total),
    )
    done = m
    run.progress(done, total)

    # 2. Cancellation per layer over live training rows (raw parameter gradients, method.md §5).
    cancellation = None
    used = 0
    if wanted_cancellation > 0:
        from app.services.pipelines import ModelSpec

        rows = _cancellation_rows(settings, dataset, row_ids, wanted_cancellation)
        used = len(rows)
        if rows:
            cached = run.ctx.models.get(ModelSpec.of(model), run.ctx.device)
            tokenizer = cached.loaded.tokenizer
            encoded = encode_examples(tokenizer, rows, model.task, store.manifest.max_length)

            def batches() -> Iterator[Any]:
                seen = 0
                for batch in iter_batches(encoded, pad_token_id(tokenizer), model.task, settings.batch_size):
                    yield batch
                    seen += len(batch)
                    run.progress(done + seen, total)

            with cached.lock:
                cancellation = layer_cancellation(cached.loaded.model, layers, batches(), max_samples=used)
    done = m + wanted_cancellation
    run.progress(done, total)

    # 3. The report, with the estimators queries use (DataInf from the build's statistics).
    scored = [0]

    def tick() -> None:
        scored[0] += 1
        run.progress(done + min(scored[0], len(estimators) * len(layers)), total)

    fitted = {}
    for name in estimators:
        per_layer = (
            index_estimators(store, names, name)
            if name == "datainf"
            else {n: make_estimator(name) for n in names}
        )
        fitted[name] = _counting(per_layer, tick)
    mask, noisy = _noisy_mask(settings, dataset, params.get("noisy"), row_ids)
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
