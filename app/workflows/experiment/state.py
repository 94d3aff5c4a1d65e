"""An experiment's record of its stages, artifacts/jobs/<id>/state.json: written by the runner at every change,
read by the API (GET /v1/experiments/{id}) and by the model deletion guard (app/services/models.py), which is
why this module imports nothing from app.services.

    stage        the live stage (None before the first, "done" once all finished)
    stages_done  the finished stages in order; `outputs` what each of them returned
    partial      what the running stage has made so far (an id it created), so a resumed stage does not make
                 it again
    artifacts    the files written (name -> sha256)

The file is replaced whole (atomically) at every change, so a reader sees one version or the next.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.config import Settings
from app.jobs.kinds import EXPERIMENT
from app.models import Job
from app.stores import job_dir
from influence.files import atomic_path

KIND = EXPERIMENT
STATE_FILE = "state.json"
# artifacts/adapters/<experiment id>/: the registered model's adapter, outside the experiment's folder.
ADAPTERS_DIR = "adapters"
# An experiment's job progress runs over this many units, shared among its stages (the runner weighs them).
PROGRESS_TOTAL = 1000


def adapter_home(settings: Settings, experiment_id: str) -> Path:
    """Where the registered model's adapter lives: outside the experiment's folder, which DELETE removes."""
    return settings.resolved_artifacts_dir / ADAPTERS_DIR / experiment_id


@dataclass
class ExperimentState:
    """state.json as the runner keeps it (see the module docstring)."""

    path: Path
    stage: str | None = None
    stages_done: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    partial: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ExperimentState:
        """The recorded state; an empty one before the first write or when the file cannot be read."""
        state = cls(path)
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            state.stage = data.get("stage")
            state.stages_done = list(data.get("stages_done") or [])
            state.outputs = dict(data.get("outputs") or {})
            state.partial = dict(data.get("partial") or {})
            state.artifacts = dict(data.get("artifacts") or {})
        return state

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "stages_done": self.stages_done,
            "outputs": self.outputs,
            "partial": self.partial,
            "artifacts": self.artifacts,
        }

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), allow_nan=False), encoding="utf-8")

    def note(self, stage: str, **values: Any) -> None:
        """Record part of a stage's work (an id it created) before the stage finishes."""
        self.partial.setdefault(stage, {}).update(values)
        self.save()

    def finish(self, stage: str, output: dict[str, Any]) -> None:
        self.outputs[stage] = output
        if stage not in self.stages_done:
            self.stages_done.append(stage)
        self.partial.pop(stage, None)
        self.save()


def read_state(settings: Settings, job: Job) -> dict[str, Any]:
    """The experiment's live state: its result once it succeeded, else what state.json records so far."""
    if job.status == "succeeded" and job.result:
        return job.result
    return ExperimentState.load(job_dir(settings, job.id) / STATE_FILE).to_dict()


def describe(settings: Settings, job: Job) -> dict[str, Any]:
    """What GET /v1/experiments/{id} shows besides the job: the stage and what the stages made so far (an id
    appears as soon as its resource exists, e.g. the index while it is being built)."""
    state = read_state(settings, job)
    outputs = state.get("outputs") or {}
    partial = state.get("partial") or {}

    def made(stage: str, key: str, partial_key: str | None = None) -> str | None:
        return (outputs.get(stage) or {}).get(key) or (partial.get(stage) or {}).get(partial_key or key)

    return {
        "stage": state.get("stage"),
        "stages_done": list(state.get("stages_done") or []),
        "model_id": made("register", "model_id"),
        "dataset_id": made("register", "dataset_id"),
        "index_id": made("index", "index_id"),
        "report_id": made("report", "report_id", "layer_report_id"),
        "noise": outputs.get("noise"),
        "finetune": outputs.get("finetune"),
        "retraining": outputs.get("retraining"),
    }
