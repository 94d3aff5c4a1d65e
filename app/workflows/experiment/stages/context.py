"""What every stage gets (StageContext: the job run, the experiment's state, its progress) and the look-ups
several stages share: the training dataset and base model (checked unchanged), the reference examples, the
settings sub-jobs are created with, and the wait for a sub-job another process may still be running."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.errors import Conflict
from app.jobs import state as job_state
from app.jobs.run import JobRun
from app.models import Dataset, Job, RegisteredModel
from app.services.references import load_reference
from app.workflows.experiment.state import PROGRESS_TOTAL, ExperimentState

# Shares of the job's progress by stage (rough shares of time).
STAGE_WEIGHTS = {"noise": 1, "finetune": 40, "register": 3, "index": 20, "report": 15, "retraining": 100}
# Least seconds between two progress writes from inside a fine-tune (a write per step would be one per batch).
PROGRESS_INTERVAL_S = 1.0
# Seconds between checks while another process finishes a sub-job this experiment waits for.
WAIT_POLL_S = 0.5


class Progress:
    """Stage-weighted job progress: finished stages count whole, the running one by its fraction. Every
    write checks for cancellation (JobCancelled)."""

    def __init__(self, run: JobRun, stages: Sequence[str]):
        self.run = run
        self.weights = {stage: STAGE_WEIGHTS[stage] for stage in stages}
        self.total = sum(self.weights.values())
        self.last_write = 0.0

    def at(self, stage: str, fraction: float, done: Sequence[str], *, throttle: bool = False) -> None:
        now = time.monotonic()
        if throttle and now - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.last_write = now
        units = sum(self.weights[s] for s in done if s in self.weights)
        units += self.weights[stage] * min(1.0, max(0.0, fraction))
        self.run.progress(int(PROGRESS_TOTAL * units / self.total), PROGRESS_TOTAL)


@dataclass
class StageContext:
    run: JobRun
    state: ExperimentState
    progress: Progress

    @property
    def params(self) -> dict[str, Any]:
        return self.run.params

    @property
    def settings(self) -> Settings:
        return self.run.settings

    def at(self, fraction: float, *, throttle: bool = False) -> None:
        """The running stage has done `fraction` of its work (raises JobCancelled when cancelled)."""
        self.progress.at(self.state.stage or "noise", fraction, self.state.stages_done, throttle=throttle)

    def write_json(self, name: str, value: Any) -> None:
        self.run.write_json(name, value)
        self.state.artifacts[name] = self.run.artifacts[name]


def sub_settings(settings: Settings, *extra_roots: Path) -> Settings:
    """The settings sub-jobs are created with: no second admission check (the experiment was admitted and
    its sub-jobs run in its own slot), and the folders this experiment wrote allowed for registration."""
    return settings.model_copy(
        update={
            "max_active_jobs_per_tenant": None,
            "allowed_roots": [*settings.allowed_roots, *extra_roots],
        }
    )


class NoQueue:
    """A sub-job (the index build, the report, the audit) is run inside this job, never handed to the workers."""

    def enqueue(self, job: Job) -> None:
        return None


def training_dataset(session: Session, params: dict[str, Any]) -> Dataset:
    """The training dataset, detached; Conflict when it was deleted or changed since the experiment began."""
    dataset = session.get(Dataset, params["dataset_id"])
    if dataset is None:
        raise Conflict(f"the training dataset {params['dataset_id']!r} was deleted")
    # A batch check may append rows without changing the content hash (it hashes the registered file).
    if dataset.content_hash != params["training_hash"] or dataset.row_count != params["training_rows"]:
        raise Conflict(f"the training dataset {dataset.id!r} changed since the experiment was created")
    session.expunge(dataset)
    return dataset


def base_model(ctx: StageContext) -> RegisteredModel:
    with ctx.run.session() as session:
        base = session.get(RegisteredModel, ctx.params["base_model_id"])
        if base is None:
            raise Conflict(f"the base model {ctx.params['base_model_id']!r} no longer exists")
        session.expunge(base)
    return base


def reference_examples(ctx: StageContext, key: str) -> list:
    """The examples of the experiment's `reference` or `heldout` set."""
    with ctx.run.session() as session:
        return load_reference(ctx.settings, session, ctx.params[key])


def wait_for(ctx: StageContext, job_id: str, what: str) -> Job:
    """The sub-job once it has finished (another live process may still be running it: wait, checking this
    experiment's cancellation); Conflict unless it succeeded."""
    while True:
        with ctx.run.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise Conflict(f"the {what} job {job_id!r} was deleted")
            session.expunge(job)
        if job.status not in job_state.ACTIVE:
            break
        ctx.at(1.0, throttle=True)
        time.sleep(WAIT_POLL_S)
    if job.status == "cancelled":
        ctx.at(1.0)  # cancelled because this experiment was: end the experiment as cancelled, not failed
    if job.status != "succeeded":
        raise Conflict(
            f"the {what} job {job_id!r} ended {job.status}" + (f": {job.error}" if job.error else "")
        )
    return job
