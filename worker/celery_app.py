"""Celery's entry point: `celery -A worker.celery_app worker` (or `python -m worker`, which picks queues and
concurrency). The application itself is configured in app/jobs/celery_app.py; this module adds the tasks."""

from __future__ import annotations

from app.jobs.celery_app import get_app

TASK_MODULES = ["worker.tasks"]


def __getattr__(name: str):
    # `app` is built on first access, so importing this module creates no broker folders and reads no settings.
    if name == "app":
        return get_app(include=TASK_MODULES)
    raise AttributeError(name)
