"""How the API and the workers hand work to Celery: the JobQueue the API enqueues committed jobs with, the
dispatcher build steps use to fan out, and the readiness checks of /readyz (broker reachable, a worker alive).

Messages carry ids only. Queues: planning and finalising go to `cpu`; featurisation chunks go to `gpu` when a
worker with CUDA serves it, else to `cpu` (decided once per build, when it is planned).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from celery import Celery

from app.api.deps import ReadinessCheck
from app.config import Settings
from app.models import Job
from app.services.pipelines import start_job
from worker.celery_app import (
    BUILD_CHUNK,
    COMPACT_INDEX,
    CPU_QUEUE,
    FINALIZE_BUILD,
    GPU_QUEUE,
    PLAN_BUILD,
    RUN_JOB,
    filesystem_folders,
    make_celery,
)

log = logging.getLogger(__name__)

# How long the answer to "does a live worker serve the gpu queue?" is reused.
GPU_PROBE_TTL_S = 60.0
PING_TIMEOUT_S = 2.0


class CeleryDispatcher:
    """pipelines.Dispatcher over Celery: one message per step, ids only."""

    def __init__(self, app: Celery, settings: Settings):
        self.app = app
        self.settings = settings
        self._gpu_probe: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    def plan(self, job_id: str) -> None:
        self.app.send_task(PLAN_BUILD, args=[job_id], queue=CPU_QUEUE)

    def build_chunks(self, job_id: str, chunks: Sequence[int]) -> None:
        queue = self.featurize_queue()
        for chunk in chunks:
            self.app.send_task(BUILD_CHUNK, args=[job_id, int(chunk)], queue=queue)

    def finalize(self, job_id: str) -> None:
        self.app.send_task(FINALIZE_BUILD, args=[job_id], queue=CPU_QUEUE)

    def compact(self, job_id: str) -> None:
        self.app.send_task(COMPACT_INDEX, args=[job_id], queue=CPU_QUEUE)

    def run(self, job_id: str) -> None:
        # Workflow jobs featurize (and an experiment fine-tunes): they go where featurisation goes.
        self.app.send_task(RUN_JOB, args=[job_id], queue=self.featurize_queue())

    def featurize_queue(self) -> str:
        """`gpu` when a worker with CUDA serves it, else `cpu`. The settings' device decides when it names one."""
        if self.settings.device == "cuda":
            return GPU_QUEUE
        if self.settings.device == "cpu":
            return CPU_QUEUE
        with self._lock:
            now = time.monotonic()
            if self._gpu_probe is None or now - self._gpu_probe[0] > GPU_PROBE_TTL_S:
                self._gpu_probe = (now, self._gpu_worker_alive())
            return GPU_QUEUE if self._gpu_probe[1] else CPU_QUEUE

    def _gpu_worker_alive(self) -> bool:
        import torch

        if torch.cuda.is_available():
            return True  # this worker has CUDA, and `python -m worker` then serves the gpu queue
        if self.settings.uses_filesystem_broker:
            return False  # embedded: the one worker is on this machine
        try:
            queues = self.app.control.inspect(timeout=1.0).active_queues() or {}
        except Exception:  # an unanswered probe means no GPU worker we can count on
            log.exception("could not ask the workers for their queues")
            return False
        return any(q.get("name") == GPU_QUEUE for worker in queues.values() for q in worker or [])


class CeleryJobQueue:
    """app.services.jobs.JobQueue over Celery; the API calls `enqueue` after the job's row committed."""

    def __init__(self, settings: Settings, app: Celery | None = None):
        self.settings = settings
        self.app = app or make_celery(settings)
        self.dispatcher = CeleryDispatcher(self.app, settings)

    def enqueue(self, job: Job) -> None:
        start_job(self.dispatcher, job.kind, job.id)


# ---------------------------------------------------------------------------------------------- readiness


def broker_check(app: Celery, settings: Settings) -> ReadinessCheck:
    """The broker accepts a connection (filesystem: its folders exist and are writable)."""

    def probe() -> str:
        if settings.uses_filesystem_broker:
            folders = filesystem_folders(settings)
            for name, folder in folders.items():
                if not folder.is_dir():
                    raise RuntimeError(f"filesystem broker folder {name}/ is missing ({folder})")
                probe_file = folder / f".ready-{threading.get_ident()}"
                probe_file.write_bytes(b"")
                probe_file.unlink()
            return f"filesystem broker at {settings.broker_dir}"
        with _connected(app) as connection:
            return f"{connection.transport_cls} broker at {connection.as_uri()}"

    return ReadinessCheck("broker", probe)


@contextlib.contextmanager
def _connected(app: Celery) -> Iterator[Any]:
    """A broker connection, failing at once (no retries) when the broker does not answer."""
    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=PING_TIMEOUT_S)
        yield connection


def worker_check(app: Celery) -> ReadinessCheck:
    """At least one Celery worker answers a ping."""

    def probe() -> str:
        with _connected(app) as connection:
            replies = app.control.ping(timeout=PING_TIMEOUT_S, limit=1, connection=connection)
        if not replies:
            raise RuntimeError(f"no Celery worker answered a ping within {PING_TIMEOUT_S:g}s")
        names = sorted(name for reply in replies for name in reply)
        return f"worker {', '.join(names)} answered"

    return ReadinessCheck("worker", probe)


def readiness_checks(app: Celery, settings: Settings) -> list[ReadinessCheck]:
    return [broker_check(app, settings), worker_check(app)]
