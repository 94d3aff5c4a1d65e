"""The Celery application: broker from the settings, no result backend, at-least-once delivery.

    celery -A worker.celery_app worker          (or `python -m worker`, which picks queues and concurrency)

Job state lives in the database, so there is no result backend. Delivery is at least once: `acks_late` acks a
task only after it ran, `task_reject_on_worker_lost` puts a task back when its pool process dies, and Redis
hands an unacknowledged task to another worker after `broker_visibility_timeout`. Tasks are therefore
idempotent (see worker/tasks.py). Two queues: `cpu` (planning, finalising, CPU featurisation) and `gpu`
(featurisation on workers that have CUDA).

The embedded default needs no server: kombu's filesystem transport keeps messages as files under
<data_dir>/broker (queue/, control/, processed/), shared by the API and the worker child process.
"""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery
from kombu import Queue

from app.config import Settings, get_settings

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
QUEUES = (CPU_QUEUE, GPU_QUEUE)

PLAN_BUILD = "influence.plan_build"
BUILD_CHUNK = "influence.build_chunk"
FINALIZE_BUILD = "influence.finalize_build"
COMPACT_INDEX = "influence.compact_index"
RUN_JOB = "influence.run_job"

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


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for `settings` (default: the process settings, i.e. the INFLUENCE_* environment)."""
    settings = settings or get_settings()
    url = settings.resolved_broker_url
    if url == "filesystem://":
        url = "filesystem://localhost/"  # the same transport; naming the host keeps kombu from warning
    app = Celery("influence", broker=url, include=["worker.tasks"])
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


def get_app() -> Celery:
    """The process-wide app from the INFLUENCE_* environment (what `celery -A worker.celery_app` runs)."""
    global _app
    if _app is None:
        settings = get_settings()
        # This is the worker process starting (`python -m worker`, `celery -A worker.celery_app`): before it
        # creates a broker folder or an artifact, it takes the service's umask (its pool processes inherit it).
        os.umask(int(settings.umask, 8))
        _app = make_celery(settings)
    return _app


def __getattr__(name: str):
    # `app` is built on first access, so importing this module (the API does, for the queue) creates no
    # broker folders and reads no settings.
    if name == "app":
        return get_app()
    raise AttributeError(name)
