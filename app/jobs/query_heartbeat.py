"""Whether a query worker is alive: each one says so every HEARTBEAT_INTERVAL_S, and the API believes it for
HEARTBEAT_TTL_S.

Redis broker: one key, set by every query worker with that time to live (Redis counts it: no clock of ours is
compared with another machine's). Filesystem broker (one machine): a file under the broker's folder, rewritten by
every query worker; its modification time is the last beat. Either holds the name of the worker that beat last.

The API asks before it sends a query (app/jobs/query_transport.py): none alive is a 503 at once; a worker that
stopped beating less than HEARTBEAT_TTL_S ago still counts, and a query sent to it meanwhile ends in a 504 after
query_timeout_s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import redis

from app.config import Settings

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
# Three beats missed: a worker busy with a query still beats (its heartbeat is a thread of its main process).
HEARTBEAT_TTL_S = 6.0
REDIS_KEY = "influence:query-worker"
FILE_NAME = "query-worker.alive"
# A probe of Redis that takes longer than this fails (the API answers 503 rather than wait on it).
PROBE_TIMEOUT_S = 2.0


class Heartbeat(Protocol):
    def beat(self, name: str) -> None:
        """Say that worker `name` is alive."""
        ...

    def alive(self) -> str | None:
        """The name of a worker that beat within HEARTBEAT_TTL_S, None if none did (raises when it cannot
        tell: Redis unreachable)."""
        ...


class RedisHeartbeat:
    def __init__(self, url: str):
        self.client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
        )

    def beat(self, name: str) -> None:
        self.client.set(REDIS_KEY, name, px=int(HEARTBEAT_TTL_S * 1000))

    def alive(self) -> str | None:
        value = self.client.get(REDIS_KEY)
        return value.decode("utf-8", "replace") if value else None


class FileHeartbeat:
    def __init__(self, folder: Path):
        self.path = folder / FILE_NAME

    def beat(self, name: str) -> None:
        partial = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.{threading.get_ident()}")
        partial.write_text(name, encoding="utf-8")
        os.replace(partial, self.path)

    def alive(self) -> str | None:
        try:
            if time.time() - self.path.stat().st_mtime > HEARTBEAT_TTL_S:
                return None
            return self.path.read_text(encoding="utf-8") or "a query worker"
        except FileNotFoundError:
            return None


def heartbeat_for(settings: Settings) -> Heartbeat | None:
    """The heartbeat of the settings' broker; None for a broker other than Redis or the filesystem."""
    url = settings.resolved_broker_url
    if settings.uses_filesystem_broker:
        settings.broker_dir.mkdir(parents=True, exist_ok=True)
        return FileHeartbeat(settings.broker_dir)
    if url.startswith(("redis://", "rediss://")):
        return RedisHeartbeat(url)
    return None


class HeartbeatThread:
    """Beats for worker `name` every `interval` seconds, in a daemon thread, until stopped; runs `chores` (the
    query files' sweep) every `chores_every` seconds beside."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        name: str,
        interval: float = HEARTBEAT_INTERVAL_S,
        chores: Callable[[], object] | None = None,
        chores_every: float = 60.0,
    ):
        self.heartbeat = heartbeat
        self.name = name
        self.interval = interval
        self.chores = chores
        self.chores_every = chores_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="query-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> HeartbeatThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + PROBE_TIMEOUT_S)

    def _run(self) -> None:
        last_chores = time.monotonic()
        while True:
            try:
                self.heartbeat.beat(self.name)
                if self._failing:
                    log.info("query heartbeat sent again")
                self._failing = False
            except Exception:  # Redis or the disk down for a while: keep trying, say so once
                if not self._failing:
                    log.exception("could not send the query heartbeat")
                self._failing = True
            if self.chores is not None and time.monotonic() - last_chores >= self.chores_every:
                last_chores = time.monotonic()
                try:
                    self.chores()
                except Exception:  # a sweep that fails is tried again next time
                    log.exception("query worker chores failed")
            if self._stop.wait(self.interval):
                return
