"""How a job's steps reach a worker: one Dispatcher interface, run inline or sent over Celery.

Messages carry ids only: a step name, a job id and the step's own arguments (a chunk number). Where a step runs
is its kind's declaration (app/jobs/kinds.py): `cpu` steps go to the cpu queue, `featurize` steps to the gpu
queue when a worker with CUDA serves it, else to cpu (decided once per build, when it is planned).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from celery import Celery

from app.config import Settings
from app.jobs.celery_app import CPU_QUEUE, GPU_QUEUE, STEP_TASK, make_celery
from app.jobs.kinds import FEATURIZE, STEPS, kind_of
from app.models import Job

log = logging.getLogger(__name__)

# How long the answer to "does a live worker serve the gpu queue?" is reused.
GPU_PROBE_TTL_S = 60.0


class Dispatcher(Protocol):
    """Hands a step of a job to whoever runs it."""

    def send(self, step: str, job_id: str, *args: Any) -> None: ...


def start_job(dispatcher: Dispatcher, kind: str, job_id: str) -> None:
    """Hand the first step of a job of `kind` to the workers (ValueError for kinds no worker runs)."""
    dispatcher.send(kind_of(kind).first_step, job_id)


class InlineDispatcher:
    """Collects sent steps so that app/jobs/steps.py can run them in this process, in order."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, tuple[Any, ...]]] = []

    def send(self, step: str, job_id: str, *args: Any) -> None:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}")
        self.steps.append((step, job_id, args))


class CeleryDispatcher:
    """Dispatcher over Celery: one message per step."""

    def __init__(self, app: Celery, settings: Settings):
        self.app = app
        self.settings = settings
        self._gpu_probe: tuple[float, bool] | None = None
        self._lock = threading.Lock()

    def send(self, step: str, job_id: str, *args: Any) -> None:
        queue = self.featurize_queue() if STEPS[step].queue == FEATURIZE else CPU_QUEUE
        self.app.send_task(STEP_TASK, args=[step, job_id, *args], queue=queue)

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
        import torch  # heavy: only asked once a minute, and the API's dispatcher must not need it to import

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
    """app.jobs.state.JobQueue over Celery; the API calls `enqueue` after the job's row committed."""

    def __init__(self, settings: Settings, app: Celery | None = None):
        self.settings = settings
        self.app = app or make_celery(settings)
        self.dispatcher = CeleryDispatcher(self.app, settings)

    def enqueue(self, job: Job) -> None:
        start_job(self.dispatcher, job.kind, job.id)
