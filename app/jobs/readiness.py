"""What /readyz asks before it calls a process ready: the database, the broker, a live worker.

Each check is a probe that returns a short detail when healthy and raises when not; the HTTP layer
(app/api/v1/health.py) runs them and shows the details only to a caller with an API key.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import text
from sqlalchemy.engine import Engine

from app.config import Settings
from app.jobs.celery_app import filesystem_folders

PING_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ReadinessCheck:
    """One dependency of readiness: `probe` returns a short detail when healthy and raises when not."""

    name: str
    probe: Callable[[], str]


def database_check(engine: Engine) -> ReadinessCheck:
    """The database answers and its schema is migrated (an `alembic_version` row exists)."""

    def probe() -> str:
        with engine.connect() as connection:
            try:
                version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception as exc:
                raise RuntimeError("the schema is not migrated (run `python -m app.migrate`)") from exc
        if version is None:
            raise RuntimeError("the schema is not migrated (run `python -m app.migrate`)")
        return f"{engine.dialect.name}, schema revision {version}"

    return ReadinessCheck("database", probe)


def unconfigured_worker_check() -> ReadinessCheck:
    """For a process built without broker/worker checks: nothing vouches for its workers, so it reports a
    failing `worker` check rather than claiming readiness it cannot know."""

    def probe() -> str:
        raise RuntimeError("no broker/worker readiness check is configured for this process")

    return ReadinessCheck("worker", probe)


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
    """The broker and live-worker checks of a process that sends jobs over Celery."""
    return [broker_check(app, settings), worker_check(app)]
