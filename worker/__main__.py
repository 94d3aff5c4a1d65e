"""`python -m worker`: a Celery worker whose queues and concurrency follow the machine.

    python -m worker [--queues auto|cpu|gpu,cpu] [--concurrency N] [--hostname NAME] [-- extra celery args]

auto: a machine with CUDA serves `gpu` and `cpu` with one process per GPU (each process pinned to its GPU,
see worker/tasks.py); a machine without serves `cpu` with INFLUENCE_WORKER_CONCURRENCY processes. Each
process featurizes on the device INFLUENCE_DEVICE names (auto: CUDA when present).
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
from app.jobs.celery_app import CPU_QUEUE, GPU_QUEUE
from worker.celery_app import TASK_MODULES, get_app


def plan(queues: str, concurrency: int | None, default_concurrency: int) -> tuple[str, int]:
    """(queues, concurrency) for this machine."""
    if queues != "auto":
        return queues, concurrency or default_concurrency
    if torch.cuda.is_available():
        return f"{GPU_QUEUE},{CPU_QUEUE}", concurrency or torch.cuda.device_count()
    return CPU_QUEUE, concurrency or default_concurrency


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
    parser.add_argument("--queues", default="auto", help="auto, or a comma list of cpu / gpu")
    parser.add_argument("--concurrency", type=int, default=None, help="worker processes (default: see above)")
    parser.add_argument("--hostname", default=None, help="node name, e.g. embedded@%%h")
    parser.add_argument("--loglevel", default="info")
    args, extra = parser.parse_known_args(argv)
    settings = get_settings()
    queues, concurrency = plan(args.queues, args.concurrency, settings.worker_concurrency)
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
    if args.hostname:
        command += ["--hostname", args.hostname]
    command += [a for a in extra if a != "--"]
    get_app(include=TASK_MODULES).worker_main(command)


if __name__ == "__main__":
    main(sys.argv[1:])
