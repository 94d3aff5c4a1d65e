"""Where query answers wait for the API: Celery's Redis result backend when the broker is Redis, files under
<data_dir>/results with the embedded filesystem broker (no server).

A result is read once and deleted (app/jobs/query_transport.py); one nobody reads (its caller gave up: 504) goes
after QUERY_RESULT_EXPIRES_S: Redis expires it, and with files a query worker sweeps them (sweep_query_files),
with the broker's copies of the query messages it took.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

from celery.backends.filesystem import FilesystemBackend
from kombu.utils.encoding import ensure_bytes

from app.config import Settings

log = logging.getLogger(__name__)

# Seconds an unread answer is kept: only abandoned ones get that old (a waiting API reads an answer at once).
QUERY_RESULT_EXPIRES_S = 300
RESULTS_DIR = "results"
# Names of Celery's result files, and of kombu's message files of the query queue (<time>_<uuid>.query.msg).
RESULT_PREFIX = "celery-task-meta-"
QUERY_MESSAGE_SUFFIX = "query.msg"


class AtomicFilesystemBackend(FilesystemBackend):
    """Celery's file result backend, writing each result whole: to a file of its own, then renamed over the one
    the API polls (Celery's own writes in place, so a poll could read half an answer)."""

    def set(self, key, value):
        target = self._filename(key)
        partial = target + b".partial-" + uuid.uuid4().hex.encode()
        with self.open(partial, "wb") as out:
            out.write(ensure_bytes(value))
        os.replace(partial, target)


def results_dir(settings: Settings) -> Path:
    return settings.data_dir.resolve() / RESULTS_DIR


def result_backend_url(settings: Settings) -> str | None:
    """The result backend of the settings' broker: the broker itself for Redis, files for the filesystem broker
    (its folder made here, as the broker's folders are); None for another broker (queries then need the API to
    answer them itself: query_on_workers false)."""
    url = settings.resolved_broker_url
    if settings.uses_filesystem_broker:
        folder = results_dir(settings)
        folder.mkdir(parents=True, exist_ok=True)
        return f"{AtomicFilesystemBackend.__module__}:{AtomicFilesystemBackend.__name__}+file://{folder}"
    if url.startswith(("redis://", "rediss://")):
        return url
    return None


def _remove_older(folder: Path, cutoff: float, wanted) -> int:
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not wanted(entry.name):
            continue
        try:
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:  # read and deleted by its owner meanwhile
            continue
    return removed


def sweep_query_files(settings: Settings, processed: Path, now: float | None = None) -> int:
    """Remove, with the filesystem broker, the answers nobody read and the copies of the query messages workers
    took (kombu keeps every message it hands out in its `processed` folder), once QUERY_RESULT_EXPIRES_S old.
    The number of files removed."""
    if not settings.uses_filesystem_broker:
        return 0
    cutoff = (time.time() if now is None else now) - QUERY_RESULT_EXPIRES_S
    removed = _remove_older(results_dir(settings), cutoff, lambda name: name.startswith(RESULT_PREFIX))
    removed += _remove_older(processed, cutoff, lambda name: name.partition(".")[2] == QUERY_MESSAGE_SUFFIX)
    if removed:
        log.info("removed %d expired query files", removed)
    return removed
