"""Stage `retraining` (optional): an `audit` job ranks the training rows; the lowest `remove_fraction` are
removed and the model fine-tuned again with the same settings and seed; the best held-out accuracy is compared
with removing as many rows at random (seeded) and with the oracle (flipped rows only). Each finished run is
recorded, so a restarted stage fine-tunes only the runs it had not finished."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict
from app.jobs.resources import artifact_path
from app.models import Job
from app.workflows.audit.schemas import AuditCreate
from app.workflows.audit.service import AUDIT, RANKING_FILE, create_audit
from app.workflows.experiment.stages.context import NoQueue, StageContext, base_model, reference_examples
from app.workflows.experiment.stages.finetune import epochs, finetune
from app.workflows.experiment.stages.noise import noisy_training
from app.workflows.experiment.stages.subjobs import reference_set, run_subjob, subjob

REMOVALS_FILE = "retraining.json"
RETRAINING_DIR = "retraining"
RETRAINING_RUNS = ("influence", "random", "oracle")
# Share of the retraining stage the ranking (the audit) takes; the three fine-tunes share the rest.
RANKING_SHARE = 0.1


def _ranking(ctx: StageContext, index_id: str) -> tuple[str, np.ndarray]:
    """The audit job's ranking of the training rows: (audit id, row ids, most detrimental first)."""
    retraining = ctx.params["retraining"]
    body = AuditCreate(
        reference=reference_set(ctx.params["reference"]),
        layers=retraining["layers"],
        estimator=retraining["estimator"],
        aggregation=retraining["aggregation"],
        correct_only=retraining["correct_only"],
        vote_k=retraining["vote_k"],
    )

    def create(session: Session, settings: Settings) -> Job:
        return create_audit(session, settings, NoQueue(), index_id, body, ctx.run.tenant_id)

    audit_id = subjob(ctx, "retraining", AUDIT, index_id, create)
    job = run_subjob(ctx, audit_id, "audit")
    ranking = np.load(artifact_path(ctx.settings, job, RANKING_FILE), allow_pickle=False)
    return audit_id, np.asarray(ranking["row"], dtype=np.int64)


def removal_sets(ranked: np.ndarray, mask: np.ndarray, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The training rows each retraining run removes (sorted row ids).

    ranked: (n,) row ids, most detrimental first; mask: (n,) bool, the flipped rows. k = round(fraction n).
    influence: the first k ranked; random: k rows drawn with the seed; oracle: the flipped rows, at most k
    (a seeded draw of k of them when there are more): the oracle never removes a clean row.
    """
    n = mask.shape[0]
    k = round(fraction * n)
    rng = np.random.default_rng(seed)
    flipped = np.flatnonzero(mask)
    oracle = flipped if flipped.size <= k else rng.choice(flipped, size=k, replace=False)
    return {
        "influence": np.sort(np.asarray(ranked[:k], dtype=np.int64)),
        "random": np.sort(rng.choice(n, size=k, replace=False)),
        "oracle": np.sort(np.asarray(oracle, dtype=np.int64)),
    }


def run(ctx: StageContext) -> dict[str, Any]:
    retraining = ctx.params["retraining"]
    index_id = ctx.state.outputs["index"]["index_id"]
    audit_id, ranked = _ranking(ctx, index_id)
    ctx.at(RANKING_SHARE)
    train, mask = noisy_training(ctx)
    if ranked.shape[0] != len(train) or set(ranked.tolist()) != set(range(len(train))):
        raise Conflict(
            f"the audit {audit_id!r} ranks {ranked.shape[0]} rows, not the {len(train)} training rows "
            "(were rows deleted from the experiment's index?)"
        )
    removals = removal_sets(ranked, mask, float(retraining["remove_fraction"]), int(ctx.params["seed"]))
    if REMOVALS_FILE not in ctx.state.artifacts:
        ctx.write_json(REMOVALS_FILE, {name: rows.tolist() for name, rows in removals.items()})
        ctx.state.save()
    base = base_model(ctx)
    heldout = reference_examples(ctx, "heldout")
    runs: dict[str, Any] = dict(ctx.state.partial.get("retraining", {}).get("runs", {}))
    share = (1.0 - RANKING_SHARE) / len(RETRAINING_RUNS)
    for i, name in enumerate(RETRAINING_RUNS):
        if name in runs:
            continue
        removed = removals[name]
        keep = np.setdiff1d(np.arange(len(train)), removed)
        start = RANKING_SHARE + i * share
        result = finetune(
            ctx,
            base,
            [train[j] for j in keep],
            mask[keep],
            heldout,
            ctx.run.directory / RETRAINING_DIR / name,
            lambda fraction, start=start: ctx.at(start + share * fraction, throttle=True),
        )
        accuracies = [float(e.eval_accuracy) for e in result.epochs]
        runs[name] = {
            "removed": int(removed.size),
            "noisy_removed": int(mask[removed].sum()),
            "best_accuracy": max(accuracies),
            "best_loss_epoch_accuracy": accuracies[result.best_epoch - 1],
            "epochs": epochs(result),
        }
        ctx.state.note("retraining", runs=runs)
    return {
        "remove_fraction": retraining["remove_fraction"],
        "heldout_rows": len(heldout),
        "audit_id": audit_id,
        "ranking": {
            "layers": retraining["layers"],
            "estimator": retraining["estimator"],
            "aggregation": retraining["aggregation"],
            "correct_only": retraining["correct_only"],
        },
        **runs,
    }
