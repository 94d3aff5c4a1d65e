"""`python -m worker`: a Celery worker whose queues and concurrency follow the machine.

    python -m worker [--queues auto|cpu|gpu,cpu|query] [--concurrency N] [--hostname NAME] [-- extra celery args]

auto: a machine with CUDA serves `gpu` and `cpu` with one process per GPU (each process pinned to its GPU,
see worker/tasks.py); a machine without serves `cpu` with INFLUENCE_WORKER_CONCURRENCY processes. Each
process featurizes on the device INFLUENCE_DEVICE names (auto: CUDA when present).

query: a query worker (worker/queries.py): INFLUENCE_QUERY_WORKER_CONCURRENCY threads of one process, which
keeps the models and memory-mapped stores of the indexes it is asked about open between queries (on the GPU
when INFLUENCE_DEVICE resolves to one), polls a filesystem broker every INFLUENCE_QUERY_POLLING_INTERVAL_S and
says it is alive every 2 s. `make serve` runs one beside the job worker; with Redis, run as many as you like.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile

import torch

from app.config import get_settings
from app.jobs.celery_app import CPU_QUEUE, GPU_QUEUE, QUERY_QUEUE, QUEUES
from worker.celery_app import TASK_MODULES, get_app


def plan(
    queues: str, concurrency: int | None, default_concurrency: int, query_concurrency: int = 1
) -> tuple[str, int]:
    """(queues, concurrency) for this machine."""
    if queues == QUERY_QUEUE:
        return queues, concurrency or query_concurrency
    if queues != "auto":
        return queues, concurrency or default_concurrency
    if torch.cuda.is_available():
        return f"{GPU_QUEUE},{CPU_QUEUE}", concurrency or torch.cuda.device_count()
    return CPU_QUEUE, concurrency or default_concurrency


def queue_names(queues: str) -> list[str]:
    """The queue names of a --queues value (SystemExit naming an unknown one)."""
    names = [name.strip() for name in queues.split(",") if name.strip()]
    unknown = [name for name in names if name not in QUEUES]
    if unknown or not names:
        raise SystemExit(
            f"--queues: unknown queue {', '.join(unknown) or '(none)'}; known: {', '.join(QUEUES)}"
        )
    return names


def prepare_multiprocess_dir() -> None:
    """A fresh folder for the pool processes' metric samples (worker/metrics.py), unless one is set already:
    prometheus_client picks its multiprocess mode from it when first imported, so this runs before the tasks
    module is loaded."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="influence-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--queues", default="auto", help="auto, or a comma list of cpu / gpu / query")
    parser.add_argument("--concurrency", type=int, default=None, help="worker processes (default: see above)")
    parser.add_argument("--hostname", default=None, help="node name, e.g. embedded@%%h")
    parser.add_argument("--loglevel", default="info")
    args, extra = parser.parse_known_args(argv)
    settings = get_settings()
    queues, concurrency = plan(
        args.queues, args.concurrency, settings.worker_concurrency, settings.query_worker_concurrency
    )
    names = queue_names(queues)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if settings.worker_metrics_port is not None:
        prepare_multiprocess_dir()
    command = [
        "worker",
        "--loglevel",
        args.loglevel,
        "--queues",
        queues,
        "--concurrency",
        str(concurrency),
        # No gossip, mingle or events: workers coordinate through the database, not through each other.
        "--without-gossip",
        "--without-mingle",
    ]
    if names == [QUERY_QUEUE]:
        # Threads of one process share one copy of each model and store, and a query reaches its thread
        # without a pipe; torch releases the GIL while it computes.
        command += ["--pool", "threads"]
    if args.hostname:
        command += ["--hostname", args.hostname]
    command += [a for a in extra if a != "--"]
    get_app(include=TASK_MODULES, queues=names).worker_main(command)


if __name__ == "__main__":
    main(sys.argv[1:])
