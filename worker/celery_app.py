"""Celery's entry point: `celery -A worker.celery_app worker` (or `python -m worker`, which picks queues and
concurrency). The application itself is configured in app/jobs/celery_app.py; this module adds the tasks: job
steps (worker/tasks.py) and queries (worker/queries.py)."""

from __future__ import annotations

from app.jobs.celery_app import get_app

TASK_MODULES = ["worker.tasks", "worker.queries"]


def __getattr__(name: str):
    # `app` is built on first access, so importing this module creates no broker folders and reads no settings.
    if name == "app":
        return get_app(include=TASK_MODULES)
    raise AttributeError(name)
