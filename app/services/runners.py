"""Single-step jobs: the paper's workflows (audit, layer report, batch check, experiment) as registered runners.

A workflow job is one Celery task, `influence.run_job(job_id)`, that looks its kind up here:

    @job_runner("audit")
    def run_audit(run: JobRun) -> dict: ...      # returns the job's result (JSON); raises to fail it

`run_job` claims the job (queued|running -> running, attempts + 1), holds an fcntl lock on
artifacts/jobs/<id>/run.lock while the runner works (a duplicate delivery while a live process holds it
returns "busy"; the kernel drops the lock when that process dies, even by kill -9), and records the outcome:
succeeded with the result, cancelled (the runner's `progress` saw a cancel request), or failed with the error.
A worker that starts re-runs every queued or running job of these kinds (pipelines.recover_interrupted), so a
runner must be idempotent: its artifacts are written whole-or-not-at-all (`JobRun.write_*`), and a rerun
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
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, session_scope
from app.errors import Conflict, NotFound
from app.models import Job
from app.services import jobs as job_service
from app.services.datasets import sha256_file

log = logging.getLogger(__name__)

Runner = Callable[["JobRun"], dict[str, Any]]
RUNNERS: dict[str, Runner] = {}
# Modules whose import registers runners; imported lazily (they import the library) by `runner_for`.
RUNNER_MODULES = (
    "app.services.audits",
    "app.services.reports",
    "app.services.checks",
    "app.services.experiments",
)
# The kinds those modules register (declared here so the API and the recovery query need no heavy import).
WORKFLOW_KINDS = ("audit", "layer_report", "batch_check", "experiment")


def job_runner(kind: str) -> Callable[[Runner], Runner]:
    """Register `fn(run) -> result` as the runner of jobs of `kind`."""
    if kind not in WORKFLOW_KINDS:
        raise ValueError(f"declare {kind!r} in WORKFLOW_KINDS first")

    def register(fn: Runner) -> Runner:
        RUNNERS[kind] = fn
        return fn

    return register


def runner_for(kind: str) -> Runner:
    if kind not in RUNNERS:
        for module in RUNNER_MODULES:
            with contextlib.suppress(ModuleNotFoundError):
                importlib.import_module(module)
    try:
        return RUNNERS[kind]
    except KeyError:
        raise ValueError(f"no runner for jobs of kind {kind!r}") from None


class JobCancelled(Exception):
    """Raised by JobRun.progress when the job's cancellation was requested: the runner stops there."""


RUN_LOCK = "run.lock"
# A sub-job's params name the job it runs for under this key (an experiment tags its report and audit).
PARENT_PARAM = "experiment_id"


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.resolved_artifacts_dir / "jobs" / job_id


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it (after fsync) when the block ends without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@dataclass
class JobRun:
    """What a runner gets: its job's fields (a detached copy), its directory and the worker's context."""

    ctx: Any  # pipelines.BuildContext
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
            cancelled = job_service.update_progress(session, self.job_id, done, total)
            parent = self.params.get(PARENT_PARAM)
            if not cancelled and parent:
                with contextlib.suppress(NotFound):
                    cancelled = job_service.is_cancel_requested(session, parent)
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


_VERIFIED: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()
_VERIFIED_CAPACITY = 4096


def artifact_path(settings: Settings, job: Job, name: str) -> Path:
    """A finished job's artifact, its checksum verified against the job's result (409 if it does not match:
    a corrupted file is refused, never served; 404 when the job has no such artifact)."""
    listed = ((job.result or {}).get("artifacts") or {}).get(name)
    if job.status != "succeeded" or listed is None:
        raise NotFound(f"job {job.id!r} has no artifact {name!r}" + ("" if job.status == "succeeded" else
                       f" (it is {job.status})"))
    path = job_dir(settings, job.id) / name
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise Conflict(f"the artifact {name!r} of job {job.id!r} is missing on disk; run the job again") from None
    # Hashing a 2 GB score tensor on every download would cost more than serving it: a file is hashed once per
    # version (inode, size, modification time) per process; any write to it makes a new version, hashed again.
    version = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, listed)
    if version not in _VERIFIED:
        if sha256_file(path) != listed:
            raise Conflict(
                f"the artifact {name!r} of job {job.id!r} is corrupted (checksum mismatch); run the job again"
            )
        with _VERIFIED_LOCK:
            if len(_VERIFIED) >= _VERIFIED_CAPACITY:
                _VERIFIED.clear()
            _VERIFIED.add(version)
    return path


def run_job(ctx: Any, job_id: str) -> str:
    """Run a workflow job to its end (see the module docstring). Returns what happened, for the task log.

    The run lock is taken FIRST: a second delivery of a job that a live process is running (a broker
    redelivery, another worker's start-up recovery) answers "busy" and changes nothing, not even a pending
    cancellation (the process that runs the job honours it at its next progress call)."""
    from app.services.pipelines import exclusive

    with ctx.session_factory() as session:
        if session.get(Job, job_id) is None:
            return "skipped"  # deleted: no folder (not even a lock file) is made for it
    with exclusive(job_dir(ctx.settings, job_id) / RUN_LOCK) as taken:
        if not taken:
            return "busy"
        with session_scope(ctx.session_factory) as session:
            job = job_service.mark_running(session, job_id)
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
                job_service.mark_cancelled(session, job_id)
                return "cancelled"
        runner = runner_for(run.kind)
        try:
            result = runner(run)
        except JobCancelled:
            with session_scope(ctx.session_factory) as session:
                job_service.mark_cancelled(session, job_id)
            return "cancelled"
        result = dict(result or {})
        result["artifacts"] = {**result.get("artifacts", {}), **run.artifacts}
        with session_scope(ctx.session_factory) as session:
            if not job_service.mark_succeeded(session, job_id, result):
                log.warning("job %s finished its work but was no longer running; its result is dropped", job_id)
                return "superseded"
    log.info("job %s (%s) succeeded", job_id, run.kind)
    return "succeeded"


def job_is_running_here(settings: Settings, job_id: str) -> bool:
    """Whether a live process holds the job's run lock (it is working on the job right now)."""
    from app.services.pipelines import exclusive

    lock = job_dir(settings, job_id) / RUN_LOCK
    if not lock.exists():
        return False
    with exclusive(lock) as taken:
        return not taken


def delete_job_resource(session: Session, settings: Settings, job: Job) -> None:
    """Remove a finished workflow job and its artifacts (a queued or running one must be cancelled first)."""
    from app.services.pipelines import remove_tree

    if job.status in job_service.ACTIVE:
        raise Conflict(f"job {job.id!r} is {job.status}; cancel it (POST /v1/jobs/{job.id}/cancel) first")
    if job_is_running_here(settings, job.id):
        raise Conflict(f"job {job.id!r} is still finishing its work; delete it again in a moment")
    session.delete(job)
    session.flush()
    directory = job_dir(settings, job.id)
    # Files go once the row is gone for good: a rolled-back delete keeps both.
    after_commit(session, lambda: remove_tree(directory))


def get_workflow_job(session: Session, job_id: str, tenant_id: str, kind: str) -> Job:
    """A job of this tenant and kind (NotFound for another tenant's job, another kind or an unknown id)."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id or job.kind != kind:
        raise NotFound(f"{kind.replace('_', ' ')} {job_id!r} does not exist")
    return job
