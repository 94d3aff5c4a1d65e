"""The Celery application: broker from the settings, no result backend, at-least-once delivery.

The worker's entry point is worker/celery_app.py (`celery -A worker.celery_app worker` or `python -m worker`);
the API builds its own app here to send tasks.

Job state lives in the database, so there is no result backend. Delivery is at least once: `acks_late` acks a
task only after it ran, `task_reject_on_worker_lost` puts a task back when its pool process dies, and Redis
hands an unacknowledged task to another worker after `broker_visibility_timeout`. Tasks are therefore
idempotent (see app/jobs/steps.py). Two queues: `cpu` (planning, finalising, CPU featurisation) and `gpu`
(featurisation on workers that have CUDA).

The embedded default needs no server: kombu's filesystem transport keeps messages as files under
<data_dir>/broker (queue/, control/, processed/), shared by the API and the worker child process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
QUEUES = (CPU_QUEUE, GPU_QUEUE)

# The one task: run step `step` of a job (app/jobs/steps.py); its arguments are the step name, the job id and
# the step's own arguments (a chunk number).
STEP_TASK = "influence.step"

# Seconds between polls of the filesystem broker's folder (it has no push notification).
FILESYSTEM_POLLING_INTERVAL = 0.2


def filesystem_folders(settings: Settings) -> dict[str, Path]:
    """The filesystem broker's folders; producers and consumers share one message folder."""
    root = settings.broker_dir
    return {"queue": root / "queue", "control": root / "control", "processed": root / "processed"}


def broker_transport_options(settings: Settings) -> dict:
    if settings.uses_filesystem_broker:
        folders = filesystem_folders(settings)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            # Taken messages are moved here (same filesystem: an atomic rename, so two consumers never both
            # get one); without it kombu moves them to the system temp dir, which may be another filesystem.
            "store_processed": True,
            "processed_folder": str(folders["processed"]),
            "polling_interval": FILESYSTEM_POLLING_INTERVAL,
        }
    return {"visibility_timeout": settings.broker_visibility_timeout}


def make_celery(settings: Settings | None = None, include: Sequence[str] = ()) -> Celery:
    """A Celery app for `settings` (default: the process settings, i.e. the INFLUENCE_* environment); `include`
    names the task modules a worker loads (the API only sends, by task name)."""
    settings = settings or get_settings()
    url = settings.resolved_broker_url
    if url == "filesystem://":
        url = "filesystem://localhost/"  # the same transport; naming the host keeps kombu from warning
    app = Celery("influence", broker=url, include=list(include))
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # One task reserved per process: chunks spread over every worker instead of piling up in one.
        worker_prefetch_multiplier=1,
        task_default_queue=CPU_QUEUE,
        task_queues=[Queue(name) for name in QUEUES],
        task_create_missing_queues=False,
        worker_send_task_events=False,
        # Workers load a model per process; recycling them would reload it for nothing.
        worker_max_tasks_per_child=None,
    )
    return app


_app: Celery | None = None


def get_app(include: Sequence[str] = ()) -> Celery:
    """The worker process's app from the INFLUENCE_* environment (what `celery -A worker.celery_app` runs)."""
    global _app
    if _app is None:
        settings = get_settings()
        # This is the worker process starting (`python -m worker`, `celery -A worker.celery_app`): before it
        # creates a broker folder or an artifact, it takes the service's umask (its pool processes inherit it).
        os.umask(int(settings.umask, 8))
        _app = make_celery(settings, include)
    return _app
