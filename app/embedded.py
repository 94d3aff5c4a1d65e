"""The service's composition root and the embedded runner.

    python -m app.embedded serve [--host 127.0.0.1] [--port 8000]     (what `make serve` runs)

`serve` needs no server: it migrates the database (SQLite under the data dir unless INFLUENCE_DATABASE_URL
says otherwise), makes sure an API key of the `local` tenant is in <data_dir>/local-api-key (created on first
start, mode 0600; its path is printed: send it as `Authorization: Bearer $(cat <path>)`), starts real Celery
workers as child processes (on kombu's filesystem transport under <data_dir>/broker unless INFLUENCE_BROKER_URL
names a broker): `python -m worker` for jobs and, with INFLUENCE_QUERY_ON_WORKERS (the default), `python -m
worker --queues query` for queries, so that a long build chunk never holds a query back; restarts a child that
dies, and serves the API with uvicorn until interrupted; then it stops the workers (warm shutdown, then SIGKILL).

`create_service_app` is the API wired to Celery (job queue, query transport, broker and worker readiness
checks); production runs it as `uvicorn --factory app.embedded:create_service_app` (docker/entrypoint.sh `api`).
Workers are only ever child processes here (`python -m worker`): app/ never imports worker/.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.config import Settings, get_settings

# Before anything imports torch (OpenMP reads it once): OpenMP threads that spin while they wait made torch
# several times slower on shared CPU hosts under load (docs/benchmarks.md, item 2). The worker child inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger("app.embedded")

ROOT = Path(__file__).resolve().parents[1]
WORKER_STOP_TIMEOUT_S = 30.0
# Restarts of a dying worker child are spaced out: 1 s, 2 s, 4 s ... at most this long.
MAX_RESTART_DELAY_S = 30.0
QUERY_WORKER_HOSTNAME = "embedded-query@%h"


def create_service_app(settings: Settings | None = None):
    """The API with the Celery job queue and the broker / live-worker readiness checks; with query_on_workers,
    the query transport (app.state.query_transport: queries go to query workers) and its readiness check."""
    # Imported here, not at the top: `python -m app.embedded` sets OMP_WAIT_POLICY above before anything may
    # import torch (the API itself does not; the modules it reaches load it lazily, on a worker).
    from app.jobs.dispatch import CeleryJobQueue
    from app.jobs.query_transport import CeleryQueryTransport, query_worker_check
    from app.jobs.readiness import readiness_checks
    from app.main import create_app

    settings = settings or get_settings()
    queue = CeleryJobQueue(settings)
    checks = readiness_checks(queue.app, settings)
    transport = CeleryQueryTransport(queue.app, settings) if settings.query_on_workers else None
    if transport is not None:
        checks.append(query_worker_check(transport))
    app = create_app(settings, job_queue=queue, readiness_checks=checks)
    app.state.query_transport = transport
    if transport is not None and app.state.metrics is not None:
        app.state.metrics.job_engine.query_heartbeat = transport.heartbeat
    return app


def absolute_settings_env(settings: Settings) -> dict[str, str]:
    """INFLUENCE_* variables that pin the data dir (and what derives from it) to absolute paths, so the
    worker child resolves the same SQLite file, artifacts and broker whatever its working directory."""
    data_dir = settings.data_dir.resolve()
    env = {"INFLUENCE_DATA_DIR": str(data_dir)}
    if settings.artifacts_dir is not None:
        env["INFLUENCE_ARTIFACTS_DIR"] = str(settings.artifacts_dir.resolve())
    return env


def _parent_death_signal() -> None:
    """In the child: receive SIGTERM when the runner dies, even by SIGKILL (Linux), so no worker is orphaned."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerSupervisor:
    """Runs `python -m worker` as a child process and starts it again when it exits unexpectedly."""

    def __init__(
        self, settings: Settings, hostname: str = "embedded@%h", queues: str | None = None, **env: str
    ):
        self.settings = settings
        self.command = [sys.executable, "-m", "worker", "--hostname", hostname]
        if queues is not None:
            self.command += ["--queues", queues]
        self.env = {**os.environ, **absolute_settings_env(settings), **env}
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, preexec_fn=_parent_death_signal)
        log.info("worker %s started (pid %d)", self.command[4], self.process.pid)

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            process = self.process
            assert process is not None
            started = time.monotonic()
            code = process.wait()
            if self._stopping.is_set():
                return
            log.warning(
                "worker %s exited with status %s; starting it again in %.0fs", self.command[4], code, delay
            )
            if self._stopping.wait(delay):
                return
            self._spawn()
            # A worker that ran a while before dying earns a quick restart next time.
            delay = 1.0 if time.monotonic() - started > 60 else min(MAX_RESTART_DELAY_S, delay * 2)

    def stop(self) -> None:
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # warm shutdown: the running chunk finishes
        try:
            process.wait(timeout=WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # A chunk cut short is redone on the next start: builds are resumable.
            process.kill()
            process.wait()
        log.info("worker stopped")


def query_worker_env(settings: Settings) -> dict[str, str]:
    """The query child's own settings: its metrics on the port after the job worker's (one port, one server)."""
    if settings.worker_metrics_port is None:
        return {}
    port = settings.worker_metrics_port % 65535 + 1
    log.info("query worker metrics on port %d (INFLUENCE_WORKER_METRICS_PORT + 1)", port)
    return {"INFLUENCE_WORKER_METRICS_PORT": str(port)}


def local_api_key(settings: Settings) -> tuple[Path, bool]:
    """Make sure <data_dir>/local-api-key holds a valid key of the `local` tenant; (path, created now)."""
    # Imported here, as in create_service_app.
    from app.db import make_engine, make_session_factory, session_scope
    from app.services.tenancy import ensure_local_key

    engine = make_engine(settings.resolved_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return ensure_local_key(session, settings.data_dir.resolve())
    finally:
        engine.dispose()


def serve(settings: Settings, host: str, port: int, with_worker: bool = True) -> None:
    # Only needed to serve, and like every import of torch here, after OMP_WAIT_POLICY is set.
    import uvicorn

    from app.migrate import upgrade

    # Before the first file: the data dir, the SQLite database, the broker's folders and the worker child
    # (which inherits it) are the service user's alone by default.
    os.umask(int(settings.umask, 8))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(absolute_settings_env(settings))
    settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
    upgrade(settings.resolved_database_url)
    log.info("database migrated: %s", settings.resolved_database_url)
    key_path, created = local_api_key(settings)
    print(
        f"API key of tenant 'local' {'created' if created else 'kept'} at {key_path} (mode 0600); "
        f"send it as: Authorization: Bearer $(cat {key_path})",
        flush=True,
    )
    supervisors = []
    if with_worker:
        supervisors.append(WorkerSupervisor(settings))
        if settings.query_on_workers:
            # A worker of its own: a query never waits behind a build chunk or an experiment.
            supervisors.append(
                WorkerSupervisor(settings, QUERY_WORKER_HOSTNAME, queues="query", **query_worker_env(settings))
            )
    for supervisor in supervisors:
        supervisor.start()
    try:
        uvicorn.run(create_service_app(settings), host=host, port=port, log_level="info")
    finally:
        for supervisor in supervisors:
            supervisor.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.embedded", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="migrate, start a worker child process and serve the API")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=None, help="default: INFLUENCE_PORT (8000)")
    run.add_argument("--no-worker", action="store_true", help="serve the API only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    # SIGTERM (docker stop, a supervisor) ends the service as Ctrl-C does: uvicorn exits, the worker stops.
    serve(settings, args.host, args.port or settings.port, with_worker=not args.no_worker)


if __name__ == "__main__":
    main()
