"""The `batch_check` runner: scores a check's batch next to the index's existing rows, gives the verdict, and
appends a passing batch when asked. In two stages, each resumable:

  1. scoring. The batch rows are featurized as TRAINING rows (the store's featurizer, projection and max_length,
     checked against its manifest; their features are cast to the store's dtype and their norms taken before
     the cast, exactly as FeatureStore.append would store them), the reference as a query is. The score tensor
     S over the existing LIVE rows followed by the batch rows (influence.LazyScores, i.e. score_tensor computed
     layer by layer, with the index's estimators) is aggregated over the chosen layers with the chosen method
     across that union, so both live on one scale. Per new row: percentile = 100 x (existing live rows with a
     strictly LOWER aggregated score) / (existing live rows) (ties do not count as lower, so a tie with the
     lowest existing row is percentile 0), flagged = percentile < threshold_percentile; per layer the same
     with the layer's own aggregate, and the layer's score averaged over the voting reference rows. The
     verdict fails when more than max_flagged rows are flagged. Written to check.json (then reused by a rerun).
  2. append (append=true): only when the verdict passes (a failed batch never enters the index); then the
     rows join the index's dataset and its feature store without a rebuild (app/services/appends.py, which
     says why a crash leaves a consistent index and why a rerun never appends twice). Cancellation is honoured
     up to the start of the append; an append that has started completes.
The reference accuracy near chance is reported as a warning, never as a failure.

A calibrated check (params["calibration"] = {target: precision | recall, value, noisy: a mask spec of
app/services/noisy.py}, threshold_percentile null) derives its threshold in stage 1: the known-noisy mask over the
existing rows (read first, so a mask too small to calibrate on fails the job before any featurization), the
existing rows' aggregated scores (from the union above, the scale a new row is judged on), then
influence.calibration.calibrate; summary["calibration"] says what was derived, how precise it is expected to be
and what that assumes. A target no threshold reaches fails the job with the library's message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from app.errors import Conflict
from app.jobs.kinds import BATCH_CHECK
from app.jobs.run import JobCancelled, JobRun, job_runner
from app.models import Index
from app.services import appends
from app.services.noisy import noisy_mask
from app.services.queries.compute import index_estimators
from app.services.references import (
    IndexSources,
    featurize_for_index,
    featurize_reference,
    load_reference,
    open_index_store,
)
from app.workflows.check.service import RESULT_FILE, total_steps
from influence import LazyScores, aggregate
from influence.calibration import ASSUMPTION, Calibration, calibrate, check_mask
from influence.data import Example
from influence.errors import InvalidInputError
from influence.featurize import feature_arrays, features_from_arrays
from influence.files import atomic_path, sha256_file
from influence.tokens import TokenRows

# The batch's float32 features for every layer of the store, kept between the stages of a passing check that
# appends (so the rows that join are the rows that were scored); removed once the append is done.
FEATURES_FILE = "batch_features.npz"
# A model whose reference accuracy is within this of the majority-class share is "near chance" (a warning).
NEAR_CHANCE_MARGIN = 0.05
# Existing rows below which a percentile is coarse (it moves in steps of 100 / n): a warning.
FEW_EXISTING_ROWS = 100
LISTED_FLAGGED = 10
TIE_RULE = (
    "percentile = 100 x (existing live rows whose aggregated score is strictly lower) / (existing live rows); "
    "ties do not count as lower; flagged = percentile < threshold_percentile"
)


class _UnionRows:
    """Rows of one layer: the store's rows at `positions` followed by `extra` rows, as an (n, k) matrix that
    influence.scoring reads by row slices (copies of the rows asked for; nothing of size n is held)."""

    def __init__(self, stored: Any, positions: np.ndarray, extra: np.ndarray):
        self.stored, self.positions, self.extra = stored, positions, extra
        self.everything = len(positions) == len(stored)  # no deleted rows: read slices, not gathers
        self.split = len(positions)
        self.shape = (self.split + len(extra), int(extra.shape[1]))

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.shape[0])
        if step != 1:
            raise TypeError("only contiguous row slices")
        parts = []
        if start < self.split:
            end = min(stop, self.split)
            parts.append(
                self.stored[start:end] if self.everything else self.stored[self.positions[start:end]]
            )
        if stop > self.split:
            parts.append(self.extra[max(start - self.split, 0) : stop - self.split])
        if not parts:
            return self.extra[:0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def union_rows(stored: Any, positions: np.ndarray, extra: Any) -> Any:
    """The store's rows at `positions` followed by `extra`: token rows (the exact embedding) gathered at
    once (a few numbers per row), dense layers through _UnionRows."""
    if isinstance(stored, TokenRows):
        return TokenRows.concat([stored.select(positions), extra])
    return _UnionRows(stored, positions, extra)


def as_stored(
    features: Mapping[str, np.ndarray], dtype: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Features as a store holds them: cast to its dtype, norms (float32) from the float32 values before the
    cast (FeatureStore.append does the same), so the batch rows score now as they will once appended."""
    stored, norms = {}, {}
    for name, values in features.items():
        if isinstance(values, TokenRows):  # the exact embedding: its entries' vectors are what is stored
            norms[name] = values.norms().numpy()
            vectors = np.asarray(values.values, dtype=np.float32).astype(np.dtype(dtype), copy=False)
            stored[name] = TokenRows(values.offsets, values.tokens, vectors, check=False)
            continue
        values32 = np.ascontiguousarray(values, dtype=np.float32)
        norms[name] = np.sqrt(np.einsum("ij,ij->i", values32, values32, dtype=np.float64)).astype(np.float32)
        stored[name] = values32.astype(np.dtype(dtype), copy=False)
    return stored, norms


def percentiles(existing: np.ndarray, new: np.ndarray) -> np.ndarray:
    """100 x share of `existing` strictly below each value of `new` (ties do not count): (len(new),) float64."""
    ordered = np.sort(np.asarray(existing, dtype=np.float64))
    lower = np.searchsorted(ordered, np.asarray(new, dtype=np.float64), side="left")
    return 100.0 * lower / len(ordered)


def _ordinal(value: float) -> str:
    if float(value).is_integer():
        number = int(value)
        suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
        return f"{number}{suffix}"
    return f"{value:.4g}th"


def verdict_reasons(
    rows: Sequence[Mapping[str, Any]], existing: int, threshold: float, max_flagged: int
) -> tuple[str, list[str]]:
    """The verdict (pass | fail) and its reasons in plain words."""
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: (r["percentile"], r["score"], r["row"]))
    verdict = "fail" if len(flagged) > max_flagged else "pass"
    head = (
        f"{len(flagged):,} of {len(rows):,} new rows score below the {_ordinal(threshold)} percentile of the "
        f"{existing:,} existing rows"
    )
    if flagged:
        worst = flagged[0]
        head += f" (most detrimental: row {worst['row']}, percentile {worst['percentile']:.1f})"
    reasons = [head]
    if flagged:
        listed = ", ".join(
            f"row {r['row']} (percentile {r['percentile']:.1f})" for r in flagged[:LISTED_FLAGGED]
        )
        more = len(flagged) - LISTED_FLAGGED
        reasons.append(
            f"flagged, most detrimental first: {listed}" + (f", and {more:,} more" if more > 0 else "")
        )
    allowed = f"at most {max_flagged:,} may be flagged (max_flagged)"
    reasons.append(f"fail: {allowed}" if verdict == "fail" else f"pass: {allowed}")
    return verdict, reasons


def _warnings(reference: Any, existing: int, threshold: float) -> list[str]:
    out = []
    accuracy = reference.accuracy
    if accuracy is not None:
        counts = np.bincount(reference.labels)
        chance = float(counts.max() / counts.sum())
        if accuracy <= chance + NEAR_CHANCE_MARGIN:
            out.append(
                f"the model predicts {accuracy:.0%} of the {len(reference.labels):,} reference rows correctly, near "
                f"chance ({chance:.0%} by always predicting the most common label): influence scores of a model "
                "that has not learnt the task say little about the rows"
            )
    if existing < FEW_EXISTING_ROWS:
        out.append(
            f"only {existing:,} existing rows: a percentile moves in steps of {100 / existing:.2g}"
            + (
                ", so only rows that score below every existing row can be flagged"
                if threshold * existing / 100 <= 1
                else ""
            )
        )
    return out


def _read_batch(run: JobRun) -> list[dict[str, Any]]:
    """The normalised batch the API stored, checked against the sha256 in the job's params."""
    info = run.params["batch"]
    path = run.directory / info["file"]
    try:
        data = path.read_bytes()
    except OSError:
        raise Conflict(f"the batch of check {run.job_id!r} is missing; submit it again") from None
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise Conflict(f"the batch of check {run.job_id!r} is corrupted (checksum mismatch); submit it again")
    return [json.loads(line) for line in data.splitlines()]


def _load(run: JobRun) -> IndexSources:
    with run.session() as session:
        index = session.get(Index, run.target_id)
        if index is None:  # deleted: the delete cancelled this job
            raise JobCancelled(run.job_id)
        return IndexSources.detached(session, index)


def _examples(rows: Sequence[Mapping[str, Any]]) -> list:
    return [Example(text=r["text"], label=r["label"], text_pair=r.get("text_pair")) for r in rows]


def _score(
    run: JobRun, loaded: IndexSources, batch: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Stage 1: the outcome (verdict, reasons, warnings, summary, rows) and the batch's float32 features (every
    layer of the store when the check may append, in the store's order; else the scored layers)."""
    started = time.perf_counter()
    params, settings = run.params, run.settings
    layers: list[str] = list(params["layers"])
    method, vote_k = params["aggregation"], float(params["vote_k"])
    store = open_index_store(settings, loaded.index)
    with run.session() as session:
        reference_examples = load_reference(settings, session, params["reference"])
    b, m, u_count = len(batch), len(reference_examples), len(layers)
    total = total_steps(b, m, u_count, bool(params["append"]))
    existing = _existing_positions(run, loaded, store)
    n_existing = len(existing)
    # The mask is read (and a too small one refused) before the costly featurization.
    spec = params.get("calibration")
    mask, mask_info = (None, None) if spec is None else _calibration_mask(run, loaded, store, existing, spec)
    # Every layer of the store when the rows may join it (it holds them all), else the scored ones only.
    feature_layers = list(store.layers) if params["append"] else layers
    space = loaded.space(run.ctx, store)
    batch_features = featurize_for_index(
        space, _examples(batch), feature_layers, progress=lambda done, _: run.progress(done, total)
    )
    reference = featurize_reference(
        space, reference_examples, layers, progress=lambda done, _: run.progress(b + done, total)
    )
    correct = reference.correct if params["correct_only"] else None
    if correct is not None and not correct.any():
        raise Conflict(
            f"correct_only: the model predicts none of the {m:,} reference rows correctly, so no reference row votes"
        )
    voters = np.flatnonzero(correct) if correct is not None else np.arange(m)
    stored, norms = as_stored({name: batch_features.features[name] for name in layers}, store.manifest.dtype)
    scores = LazyScores(
        {name: union_rows(store.layer(name), existing, stored[name]) for name in layers},
        reference.features,
        index_estimators(store, layers, params["estimator"]),
        {name: np.concatenate([np.asarray(store.norms(name))[existing], norms[name]]) for name in layers},
    )
    layer_aggregates = np.empty((n_existing + b, u_count), dtype=np.float64)
    layer_scores = np.empty((b, u_count), dtype=np.float64)
    for u in range(u_count):
        block = scores.layer_scores(u).cpu().numpy()  # (n_existing + b, m)
        layer_aggregates[:, u] = aggregate(block[:, None, :], method, vote_k=vote_k, correct=correct)
        layer_scores[:, u] = block[n_existing:][:, voters].astype(np.float64).mean(axis=1)
        run.progress(b + m + u + 1, total)
    aggregated = aggregate(scores, method, vote_k=vote_k, correct=correct)
    calibration = None
    if spec is not None:
        # The existing rows' scores on the batch's scale (aggregated with it): the scale a new row is judged on.
        calibration = calibrate(
            aggregated[:n_existing], mask, **{f"target_{spec['target']}": float(spec["value"])}
        )
        threshold = calibration.threshold_percentile
    else:
        threshold = float(params["threshold_percentile"])
    rank = percentiles(aggregated[:n_existing], aggregated[n_existing:])
    layer_ranks = np.stack(
        [
            percentiles(layer_aggregates[:n_existing, u], layer_aggregates[n_existing:, u])
            for u in range(u_count)
        ],
        axis=1,
    )
    rows = []
    for i, row in enumerate(batch):
        rows.append(
            {
                "row": i,
                "text": row["text"],
                "text_pair": row.get("text_pair"),
                "label": row["label"],
                "score": float(aggregated[n_existing + i]),
                "percentile": float(rank[i]),
                "flagged": bool(rank[i] < threshold),
                "layers": [
                    {
                        "layer": name,
                        "score": float(layer_scores[i, u]),
                        "aggregate": float(layer_aggregates[n_existing + i, u]),
                        "percentile": float(layer_ranks[i, u]),
                    }
                    for u, name in enumerate(layers)
                ],
            }
        )
    verdict, reasons = verdict_reasons(rows, n_existing, threshold, int(params["max_flagged"]))
    warnings = _warnings(reference, n_existing, threshold)
    if calibration is not None:
        reasons.insert(1, calibration_reason(calibration))
        warnings.extend(_mask_warnings(mask_info))
    summary = {
        "rows": b,
        "existing_rows": n_existing,
        "flagged": sum(1 for row in rows if row["flagged"]),
        "threshold_percentile": threshold,
        "max_flagged": int(params["max_flagged"]),
        "layers": layers,
        "estimator": params["estimator"],
        "aggregation": method,
        "vote_k": vote_k,
        "correct_only": bool(params["correct_only"]),
        "reference": {
            "rows": m,
            "voters": len(voters),
            "accuracy": reference.accuracy,
            "correct": None if reference.correct is None else int(reference.correct.sum()),
        },
        "percentile_rule": TIE_RULE,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if calibration is not None:
        summary["calibration"] = {**calibration.to_dict(), "noisy": mask_info, "assumes": ASSUMPTION}
    outcome = {
        "verdict": verdict,
        "reasons": reasons,
        "warnings": warnings,
        "summary": summary,
        "rows": rows,
    }
    return outcome, {name: batch_features.features[name] for name in feature_layers}


def _calibration_mask(
    run: JobRun, loaded: IndexSources, store: Any, existing: np.ndarray, spec: Mapping[str, Any]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The known-noisy mask over the existing rows (aligned with `existing`) and what it left out; refused
    (influence's InvalidInputError, the job's error) when too few noisy or clean rows remain to calibrate on,
    e.g. after deletions since the check was asked for."""
    mask, info = noisy_mask(run.settings, loaded.dataset, spec["noisy"], store.row_ids()[existing])
    if mask is None:
        raise InvalidInputError("calibration: the check names no noisy mask to calibrate on")
    return check_mask(mask), dict(info or {})


def calibration_reason(calibration: Calibration) -> str:
    """How the threshold was derived, in one sentence."""
    c = calibration
    return (
        f"threshold: {_ordinal(c.threshold_percentile)} percentile (the {c.cutoff_rows:,} lowest "
        f"existing rows), derived for {c.target} >= {c.value:g} on {c.rows:,} existing rows with {c.known_noisy:,} "
        f"known noisy: expected precision {c.precision:.2f} [{c.precision_interval[0]:.2f}, "
        f"{c.precision_interval[1]:.2f}], recall {c.recall:.2f} [{c.recall_interval[0]:.2f}, "
        f"{c.recall_interval[1]:.2f}], clean rows flagged {c.clean_flag_rate:.1%} "
        f"[{c.clean_flag_rate_interval[0]:.1%}, {c.clean_flag_rate_interval[1]:.1%}] ({c.confidence:.0%} intervals)"
    )


def _mask_warnings(info: Mapping[str, Any] | None) -> list[str]:
    unflagged = int((info or {}).get("rows_without_flag") or 0)
    if not unflagged:
        return []
    return [
        f"{unflagged:,} existing rows have no noisy flag in the dataset: the calibration counts them as clean, so "
        "its expected precision is a lower bound"
    ]


def _existing_positions(run: JobRun, loaded: IndexSources, store: Any) -> np.ndarray:
    """Store positions of the existing live rows the batch is compared with: a rerun that finds its own rows
    appended already (it died after the append began, and must score again) leaves them out."""
    live = store.live_positions()
    own = appends.recorded_append(run.settings, loaded.dataset, run.job_id)
    if own is None:
        return live
    row_ids = store.row_ids()[live]
    return live[(row_ids < own[0]) | (row_ids >= own[1])]


def _load_outcome(run: JobRun) -> dict[str, Any] | None:
    """check.json of an earlier attempt of this job (it is written whole or not at all), registered again."""
    path = run.directory / RESULT_FILE
    try:
        outcome = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(outcome, dict) or outcome.get("verdict") not in ("pass", "fail"):
        return None
    run.artifacts[RESULT_FILE] = sha256_file(path)
    return outcome


def _save_features(run: JobRun, features: Mapping[str, np.ndarray]) -> None:
    """Keep the features of every store layer (keyed by their position in the store's layer order)."""
    with atomic_path(run.directory / FEATURES_FILE) as tmp, open(tmp, "wb") as out:
        np.savez(out, **feature_arrays({f"layer_{u}": values for u, values in enumerate(features.values())}))


def _append_features(run: JobRun, loaded: IndexSources, batch: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The batch's float32 features for every store layer: those scored in stage 1 (saved), or computed again
    the same way when that file is gone."""
    store = open_index_store(run.settings, loaded.index)
    layers = list(store.layers)
    with contextlib.suppress(OSError, ValueError, KeyError, InvalidInputError):
        with np.load(run.directory / FEATURES_FILE, allow_pickle=False) as saved:
            by_position = features_from_arrays(saved, [f"layer_{u}" for u in range(len(layers))])
        features = {name: by_position[f"layer_{u}"] for u, name in enumerate(layers)}
        if all(features[name].shape == (len(batch), store.layer_spec(name).dim) for name in layers):
            return features
    computed = featurize_for_index(loaded.space(run.ctx, store), _examples(batch), layers)
    return {name: computed.features[name] for name in layers}


@job_runner(BATCH_CHECK)
def run_check(run: JobRun) -> dict[str, Any]:
    """The batch_check runner: stage 1 (scoring, resumed from check.json), stage 2 (append on pass)."""
    params = run.params
    batch = _read_batch(run)
    loaded = _load(run)
    outcome = _load_outcome(run)
    if outcome is None:
        outcome, features = _score(run, loaded, batch)
        if params["append"] and outcome["verdict"] == "pass":
            _save_features(run, features)
        run.write_json(RESULT_FILE, outcome)
    append: dict[str, Any] = {"requested": bool(params["append"]), "status": "not-requested"}
    appended = 0
    if params["append"] and outcome["verdict"] == "fail":
        append.update(status="skipped", reason="the verdict is fail: a failed batch never enters the index")
    elif params["append"]:
        # The last point where a cancel is honoured: an append that has started completes.
        total = total_steps(
            len(batch), int(outcome["summary"]["reference"]["rows"]), len(params["layers"]), True
        )
        run.progress(total - 1, total)
        try:
            result = appends.append_rows(
                run.ctx,
                job_id=run.job_id,
                index_id=loaded.index.id,
                dataset_id=loaded.dataset.id,
                rows=batch,
                features=lambda: _append_features(run, loaded, batch),
            )
        except appends.AppendRefused as exc:
            append.update(status="refused", reason=str(exc))
        except appends.IndexDeleted:
            raise JobCancelled(run.job_id) from None
        else:
            appended = len(batch)
            append.update(
                status="appended",
                dataset_rows=list(result.dataset_rows),
                index_rows=result.index_rows,
            )
        with contextlib.suppress(FileNotFoundError):
            (run.directory / FEATURES_FILE).unlink()
    return {
        "verdict": outcome["verdict"],
        "reasons": outcome["reasons"],
        "warnings": outcome["warnings"],
        "summary": outcome["summary"],
        "appended": appended,
        "append": append,
    }
