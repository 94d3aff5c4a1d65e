"""An index's settings: which layers, estimator and aggregation a query, audit or check uses for what it does not
name. The one place that decides them.

An index follows a layer report (its `settings_mode`):
- "latest-report" (new indexes): its newest succeeded layer report;
- "pinned-report": the report a user pinned (PUT /v1/indexes/{id}/settings; its deletion is refused meanwhile);
- "defaults": today's defaults (DEFAULTS), whatever the reports say.
A report only counts when it recommends (a model above chance, an entry clearly better than a random order);
otherwise the defaults are used and the answer's `note` says why.

Per field, what a request names wins; then the report's recommendation (layers, estimator, aggregation and,
with the aggregation, the vote_k the report measured and the correct-only suffix `-c`); then the defaults. The
answer says where each field came from (`sources`) and, in one word, where the whole came from (`source`):
"request" when the request named layers, estimator and aggregation, "report <id>" when the report supplied some
of them, else "defaults".
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict, Invalid, NotFound
from app.jobs.kinds import LAYER_REPORT
from app.jobs.resources import artifact_path, get_workflow_job
from app.models import Index, Job
from influence.report import CORRECT_SUFFIX

# The layer report's document (influence.LayerReport.to_dict()) among its job's artifacts.
REPORT_FILE = "report.json"
SETTINGS_MODES = ("latest-report", "pinned-report", "defaults")
# What a request that names nothing uses without a recommendation; layers None = every layer of the index.
DEFAULTS: dict[str, Any] = {
    "layers": None,
    "estimator": "grad-dot",
    "aggregation": "rank",
    "vote_k": 0.2,
    "correct_only": False,
}
# A request that names these three takes nothing from a report.
NAMING_FIELDS = ("layers", "estimator", "aggregation")
# A query has no correct_only (it explains its own examples, each with its own label).
QUERY_FIELDS = ("layers", "estimator", "aggregation", "vote_k")
WORKFLOW_FIELDS = tuple(DEFAULTS)
Kind = Literal["query", "audit", "check"]
# Indexes a refusal names at most.
NAMED_INDEXES = 5


@dataclass(frozen=True)
class ResolvedSettings:
    """The settings a request runs with, and where each came from."""

    layers: Any  # a layer selector, the recommended unit names, or None (every layer of the index)
    estimator: str
    aggregation: str  # a registered aggregation, never with the `-c` suffix (that is correct_only)
    vote_k: float
    correct_only: bool
    source: str  # "request" | "report <id>" | "defaults"
    sources: dict[str, str]  # field -> "request" | "report <id>" | "defaults"
    report_id: str | None  # the report that supplied a field, if one did
    note: str | None  # why a report's recommendation was not (wholly) used

    def as_dict(self) -> dict[str, Any]:
        """The `settings` of an answer (correct_only only where the request kind has it)."""
        out: dict[str, Any] = {
            "layers": self.layers,
            "estimator": self.estimator,
            "aggregation": self.aggregation,
            "vote_k": self.vote_k,
        }
        if "correct_only" in self.sources:
            out["correct_only"] = self.correct_only
        return {**out, "sources": dict(self.sources), "report_id": self.report_id, "note": self.note}


@dataclass(frozen=True)
class Recommendation:
    """What a finished report says about settings: its recommendation (or why there is none), its vote_k."""

    layers: list[str] | None
    estimator: str | None
    aggregation: str | None  # as the report names it, `-c` suffix included
    vote_k: float | None
    reason: str | None  # why there is no recommendation

    @property
    def recommends(self) -> bool:
        return self.estimator is not None


# ------------------------------------------------------------------------------------------ the report


def read_report_document(settings: Settings, job: Job) -> dict[str, Any] | None:
    """A finished layer report's document (LayerReport.to_dict()), its checksum verified (409 if corrupted or
    missing on disk); None while the report is not done."""
    if job.status != "succeeded":
        return None
    return json.loads(artifact_path(settings, job, REPORT_FILE).read_bytes())


def _no_recommendation_reason(document: Mapping[str, Any]) -> str:
    reason = (document.get("unavailable_reasons") or {}).get("recommendation")
    if reason:
        return str(reason)
    for warning in document.get("warnings") or []:
        if "no layers are recommended" in str(warning):
            return str(warning)
    return "no layer set is clearly better than a random order at finding the noisy rows"


def recommendation_of(document: Mapping[str, Any]) -> Recommendation:
    """The settings part of a report document."""
    vote_k = document.get("vote_k")
    vote_k = float(vote_k) if isinstance(vote_k, int | float) and not isinstance(vote_k, bool) else None
    found = document.get("recommendation")
    if not found:
        return Recommendation(None, None, None, vote_k, _no_recommendation_reason(document))
    members = list((found.get("layers") or {}).get("members") or [])
    return Recommendation(members, str(found["estimator"]), str(found["aggregation"]), vote_k, None)


class _RecommendationCache:
    """Recommendations by (report id, the report file's checksum): a query that follows a report reads and
    parses its document once per process, not once per query (the checksum names the content)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], Recommendation] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, settings: Settings, job: Job) -> Recommendation:
        checksum = str(((job.result or {}).get("artifacts") or {}).get(REPORT_FILE))
        key = (job.id, checksum)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        document = read_report_document(settings, job)
        if document is None:
            raise Conflict(
                f"layer report {job.id!r} is {job.status}; it recommends nothing until it has succeeded"
            )
        found = recommendation_of(document)
        with self._lock:
            self._items[key] = found
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return found


RECOMMENDATIONS = _RecommendationCache()


def split_aggregation(name: str) -> tuple[str, bool]:
    """(base aggregation, correct-only) of a report's aggregation name ("rank-c" -> ("rank", True))."""
    if name.endswith(CORRECT_SUFFIX):
        return name[: -len(CORRECT_SUFFIX)], True
    return name, False


# -------------------------------------------------------------------------------------- which report


def latest_report(session: Session, index: Index) -> Job | None:
    """The index's newest succeeded layer report (same tenant), if any."""
    return session.scalars(
        select(Job)
        .where(
            Job.kind == LAYER_REPORT,
            Job.target_id == index.id,
            Job.tenant_id == index.tenant_id,
            Job.status == "succeeded",
        )
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(1)
    ).first()


def effective_report(session: Session, index: Index) -> Job | None:
    """The report the index's settings follow now: the latest succeeded one, the pinned one, or None."""
    if index.settings_mode == "defaults":
        return None
    if index.settings_mode == "pinned-report":
        job = session.get(Job, index.settings_report_id) if index.settings_report_id else None
        if job is None or job.tenant_id != index.tenant_id or job.kind != LAYER_REPORT:
            # Deleting a pinned report is refused; this is a deletion that raced the pin.
            raise Conflict(
                f"index {index.id!r} is pinned to layer report {index.settings_report_id!r}, which no longer "
                f"exists; pin another report or change its mode (PUT /v1/indexes/{index.id}/settings)"
            )
        return job
    return latest_report(session, index)


def _report_recommendation(settings: Settings, index: Index, job: Job) -> Recommendation:
    """The report's recommendation. A pinned report that cannot be read is 409 (the caller asked for it); the
    latest one is passed over with the reason (a query keeps being answered, with the defaults)."""
    try:
        return RECOMMENDATIONS.get(settings, job)
    except (Conflict, NotFound) as exc:
        if index.settings_mode == "pinned-report":
            raise
        return Recommendation(None, None, None, None, f"its document cannot be read ({exc.detail})")


# ------------------------------------------------------------------------------------------ resolving


def named_fields(body: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    """The fields a pydantic request body set explicitly (model_fields_set), with their values."""
    return {name: getattr(body, name) for name in fields if name in body.model_fields_set}


def resolve_settings(
    session: Session, settings: Settings, index: Index, named: Mapping[str, Any], *, kind: Kind
) -> ResolvedSettings:
    """The settings a request of `kind` runs with: what it `named` (only the fields it set), else the index's
    effective report's recommendation, else DEFAULTS."""
    fields = QUERY_FIELDS if kind == "query" else WORKFLOW_FIELDS
    values = {name: named[name] if name in named else DEFAULTS[name] for name in fields}
    sources = {name: "request" if name in named else "defaults" for name in fields}
    if all(name in named for name in NAMING_FIELDS):
        return _resolved(values, sources, "request", None, [])
    job = effective_report(session, index)
    if job is None:
        return _resolved(values, sources, "defaults", None, [])
    found = _report_recommendation(settings, index, job)
    if not found.recommends:
        return _resolved(
            values, sources, "defaults", None, [f"report {job.id} makes no recommendation: {found.reason}"]
        )
    label = f"report {job.id}"
    notes: list[str] = []
    if "layers" not in named:
        values["layers"], sources["layers"] = found.layers, label
    if "estimator" not in named:
        values["estimator"], sources["estimator"] = found.estimator, label
    if "aggregation" not in named:
        assert found.aggregation is not None
        base, only_correct = split_aggregation(found.aggregation)
        values["aggregation"], sources["aggregation"] = base, label
        if "vote_k" not in named and found.vote_k is not None:
            # The aggregation was measured at the report's vote_k.
            values["vote_k"], sources["vote_k"] = found.vote_k, label
        if kind == "query" and only_correct:
            notes.append(
                f"report {job.id} recommends {found.aggregation} (only the reference rows the model predicts "
                f"correctly vote); a query has no correct_only, so it aggregates with {base} over its examples"
            )
        elif kind != "query" and "correct_only" not in named:
            values["correct_only"], sources["correct_only"] = only_correct, label
    return _resolved(values, sources, label, job.id, notes)


def _resolved(
    values: dict[str, Any], sources: dict[str, str], source: str, report_id: str | None, notes: list[str]
) -> ResolvedSettings:
    return ResolvedSettings(
        layers=values["layers"],
        estimator=str(values["estimator"]),
        aggregation=str(values["aggregation"]),
        vote_k=float(values["vote_k"]),
        correct_only=bool(values.get("correct_only", False)),
        source=source,
        sources=sources,
        report_id=report_id,
        note="; ".join(notes) or None,
    )


# ------------------------------------------------------------------------------------ reading, pinning


def settings_view(session: Session, settings: Settings, index: Index) -> dict[str, Any]:
    """GET /v1/indexes/{id}/settings: the mode, the pinned report, and what an audit or check that names
    nothing would use now (a query the same, with the base aggregation of a `-c` recommendation)."""
    resolved = resolve_settings(session, settings, index, {}, kind="audit")
    return {
        "index_id": index.id,
        "mode": index.settings_mode,
        "report_id": index.settings_report_id,
        "settings_source": resolved.source,
        "settings": resolved.as_dict(),
    }


def update_settings(session: Session, index: Index, mode: str, report_id: str | None) -> None:
    """Set the index's mode (and pinned report): 422 naming report_id when it is missing for pinned-report or
    given for another mode; 404 for an unknown report or another tenant's; 409 for a report that has not
    succeeded or is of another index (and, when the caller reads the settings back, for a report whose
    document fails its checksum)."""
    if mode not in SETTINGS_MODES:
        raise Invalid(f"mode: expected one of {', '.join(SETTINGS_MODES)}, got {mode!r}")
    if mode != "pinned-report":
        if report_id is not None:
            raise Invalid(f"report_id: only with mode pinned-report (mode is {mode})")
    else:
        if report_id is None:
            raise Invalid("report_id: required with mode pinned-report (the layer report to pin)")
        job = get_workflow_job(session, report_id, index.tenant_id, LAYER_REPORT)
        if job.target_id != index.id:
            raise Conflict(
                f"report_id: layer report {job.id!r} is a report of index {job.target_id!r}, not {index.id!r}"
            )
        if job.status != "succeeded":
            raise Conflict(
                f"report_id: layer report {job.id!r} is {job.status}; only a succeeded report can be pinned"
            )
    index.settings_mode = mode
    index.settings_report_id = report_id
    session.flush()


def refuse_while_pinned(session: Session, job: Job) -> None:
    """409 naming the indexes that pin this layer report (before it is deleted)."""
    pinning = session.scalars(
        select(Index.id)
        .where(Index.settings_mode == "pinned-report", Index.settings_report_id == job.id)
        .order_by(Index.id)
        .limit(NAMED_INDEXES + 1)
    ).all()
    if pinning:
        raise Conflict(
            f"layer report {job.id!r} is pinned by index(es) {', '.join(pinning[:NAMED_INDEXES])}; pin another "
            "report or change their settings mode (PUT /v1/indexes/{id}/settings) first",
            indexes=list(pinning[:NAMED_INDEXES]),
        )
