"""Single-step jobs: the paper's workflows (audit, layer report, batch check, experiment) as registered runners.

A workflow job is one step, `run` (app/jobs/kinds.py), that looks its kind's runner up here:

    @job_runner("audit")
    def run_audit(run: JobRun) -> dict: ...      # returns the job's result (JSON); raises to fail it

`run_job` claims the job (queued|running -> running, attempts + 1), holds an fcntl lock on
artifacts/jobs/<id>/run.lock while the runner works (a duplicate delivery while a live process holds it
returns "busy"; the kernel drops the lock when that process dies, even by kill -9), and records the outcome:
succeeded with the result, cancelled (the runner's `progress` saw a cancel request), or failed with the error.
A worker that starts re-runs every queued or running job (app/jobs/steps.py `recover_interrupted`), so a runner
must be idempotent: its artifacts are written whole-or-not-at-all (`JobRun.write_*`), and a rerun
either redoes the work or resumes from what it finished (an experiment's fine-tune and index build resume).
The job row is the resource (its id is the audit / report / check / experiment id); its files live under
`artifacts/jobs/<job_id>/`, listed with their sha256 in `result["artifacts"]` and verified when served.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.db import session_scope
from app.errors import NotFound
from app.jobs import state as job_state
from app.jobs.context import WorkerContext
from app.jobs.kinds import kind_of
from app.models import Job
from app.stores import job_dir
from influence.files import atomic_path, sha256_file, try_locked

log = logging.getLogger(__name__)

Runner = Callable[["JobRun"], dict[str, Any]]
RUNNERS: dict[str, Runner] = {}


def job_runner(kind: str) -> Callable[[Runner], Runner]:
    """Register `fn(run) -> result` as the runner of jobs of `kind` (declared in app/jobs/kinds.py)."""
    if kind_of(kind).runner_module is None:
        raise ValueError(f"job kind {kind!r} declares no runner module")

    def register(fn: Runner) -> Runner:
        RUNNERS[kind] = fn
        return fn

    return register


def runner_for(kind: str) -> Runner:
    """The runner of `kind`, importing the module its kind declares the first time it is needed."""
    if kind not in RUNNERS:
        module = kind_of(kind).runner_module
        if module is None:
            raise ValueError(f"job kind {kind!r} is not a workflow: it has no runner")
        # Imported here, not at the top: runner modules import this one (for JobRun and job_runner).
        importlib.import_module(module)
    try:
        return RUNNERS[kind]
    except KeyError:
        raise ValueError(f"{kind_of(kind).runner_module} registers no runner for jobs of kind {kind!r}") from None


class JobCancelled(Exception):
    """Raised by JobRun.progress when the job's cancellation was requested: the runner stops there."""


RUN_LOCK = "run.lock"
# A sub-job's params name the job it runs for under this key (an experiment tags its report and audit).
PARENT_PARAM = "experiment_id"


@dataclass
class JobRun:
    """What a runner gets: its job's fields (a detached copy), its directory and the worker's context."""

    ctx: WorkerContext
    job_id: str
    kind: str
    tenant_id: str
    target_id: str | None
    params: dict[str, Any]
    attempts: int
    # name -> sha256 of the artifacts written by this run (merged into the result).
    artifacts: dict[str, str]

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def directory(self) -> Path:
        return job_dir(self.settings, self.job_id)

    def session(self):
        """A short unit of work (commits on success)."""
        return session_scope(self.ctx.session_factory)

    def progress(self, done: int, total: int | None = None) -> None:
        """Record progress; raises JobCancelled when a cancel was requested (the runner stops there), of this
        job or of the job it runs for (an experiment's report and audit sub-jobs stop with the experiment)."""
        with self.session() as session:
            cancelled = job_state.update_progress(session, self.job_id, done, total)
            parent = self.params.get(PARENT_PARAM)
            if not cancelled and parent:
                with contextlib.suppress(NotFound):
                    cancelled = job_state.is_cancel_requested(session, parent)
        if cancelled:
            raise JobCancelled(self.job_id)

    def write_bytes(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        self.artifacts[name] = hashlib.sha256(data).hexdigest()
        return path

    def write_json(self, name: str, value: Any) -> Path:
        return self.write_bytes(name, json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8"))

    @contextlib.contextmanager
    def write_file(self, name: str) -> Iterator[Path]:
        """Yields a temporary path to write `name` through; it is checksummed and renamed into place."""
        path = self.directory / name
        with atomic_path(path) as tmp:
            yield tmp
            digest = sha256_file(tmp)
        self.artifacts[name] = digest


def run_job(ctx: WorkerContext, job_id: str) -> str:
    """Run a workflow job to its end (see the module docstring). Returns what happened, for the task log.

    The run lock is taken FIRST: a second delivery of a job that a live process is running (a broker
    redelivery, another worker's start-up recovery) answers "busy" and changes nothing, not even a pending
    cancellation (the process that runs the job honours it at its next progress call)."""
    with ctx.session_factory() as session:
        if session.get(Job, job_id) is None:
            return "skipped"  # deleted: no folder (not even a lock file) is made for it
    with try_locked(job_dir(ctx.settings, job_id) / RUN_LOCK) as taken:
        if not taken:
            return "busy"
        with session_scope(ctx.session_factory) as session:
            job = job_state.mark_running(session, job_id)
            if job is None:
                return "skipped"
            run = JobRun(
                ctx=ctx,
                job_id=job.id,
                kind=job.kind,
                tenant_id=job.tenant_id,
                target_id=job.target_id,
                params=dict(job.params or {}),
                attempts=job.attempts,
                artifacts={},
            )
            if job.cancel_requested:
                job_state.mark_cancelled(session, job_id)
                return "cancelled"
        runner = runner_for(run.kind)
        try:
            result = runner(run)
        except JobCancelled:
            with session_scope(ctx.session_factory) as session:
                job_state.mark_cancelled(session, job_id)
            return "cancelled"
        result = dict(result or {})
        result["artifacts"] = {**result.get("artifacts", {}), **run.artifacts}
        with session_scope(ctx.session_factory) as session:
            if not job_state.mark_succeeded(session, job_id, result):
                log.warning("job %s finished its work but was no longer running; its result is dropped", job_id)
                return "superseded"
    log.info("job %s (%s) succeeded", job_id, run.kind)
    return "succeeded"
