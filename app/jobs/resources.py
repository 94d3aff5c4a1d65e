"""A finished workflow job as a resource the API serves: found by tenant and kind, its artifacts verified before
they are served, deleted with its files."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit
from app.errors import Conflict, NotFound
from app.jobs import state as job_state
from app.jobs.run import RUN_LOCK
from app.models import Job
from app.stores import job_dir
from influence.files import remove_tree, sha256_file, try_locked

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


def job_is_running_here(settings: Settings, job_id: str) -> bool:
    """Whether a live process holds the job's run lock (it is working on the job right now)."""
    lock = job_dir(settings, job_id) / RUN_LOCK
    if not lock.exists():
        return False
    with try_locked(lock) as taken:
        return not taken


def delete_job_resource(session: Session, settings: Settings, job: Job) -> None:
    """Remove a finished workflow job and its artifacts (a queued or running one must be cancelled first)."""
    if job.status in job_state.ACTIVE:
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
