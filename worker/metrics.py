"""The worker's own metrics: job steps run and failed, and their durations, by step; served by the worker's main
process on INFLUENCE_WORKER_METRICS_PORT (none by default).

Celery's prefork pool runs the steps in child processes, so the counters live in prometheus-client's
multiprocess mode: every process writes its samples to files under PROMETHEUS_MULTIPROC_DIR, and the main
process serves them all together. That mode is chosen when prometheus_client is first imported, so
`python -m worker` sets the folder (worker/__main__.py `prepare_multiprocess_dir`) before anything imports this module.
"""

from __future__ import annotations

import logging
import os

from celery.signals import worker_ready
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

from app.config import get_settings

log = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# Seconds of a step: a plan or a small chunk takes seconds, a big chunk minutes, an experiment's run hours.
STEP_DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0)

STEPS_RUN = Counter("influence_worker_steps", "Job steps this worker ran, by step", ["step"])
STEPS_FAILED = Counter(
    "influence_worker_step_failures", "Job steps that failed their job on this worker, by step", ["step"]
)
STEP_DURATION = Histogram(
    "influence_worker_step_duration_seconds",
    "Time this worker spent in a job step, by step",
    ["step"],
    buckets=STEP_DURATION_BUCKETS,
)


def observe_step(step: str, outcome: str, seconds: float) -> None:
    STEPS_RUN.labels(step).inc()
    STEP_DURATION.labels(step).observe(seconds)
    if outcome == "failed":
        STEPS_FAILED.labels(step).inc()


@worker_ready.connect
def _serve(**_) -> None:
    """In the worker's main process, once its pool is up: serve every process's samples on the metrics port."""
    port = get_settings().worker_metrics_port
    if port is None:
        return
    if MULTIPROC_DIR_VARIABLE in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        # `celery -A worker.celery_app worker` without the folder: only this process's own samples.
        log.warning("%s is not set: the metrics port serves the main process only", MULTIPROC_DIR_VARIABLE)
        registry = REGISTRY
    start_http_server(port, registry=registry)
    log.info("worker metrics on port %d", port)
