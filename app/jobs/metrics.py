"""What /metrics says about the job engine, read when Prometheus scrapes: jobs by kind and status, the run time of
jobs that finished, queue depths, live workers, and the bytes of ready indexes.

Counts and sizes only: no job, index or tenant id and no name leaves this module. Each source is asked with a
short timeout (the broker, the workers) or a cheap query (the database: grouped counts and a sum on indexed
columns, the jobs finished since the last scrape); a source that fails is reported as
`influence_metrics_source_up{source} 0` and the scrape goes on. The API runs the collection in a thread of its
own with a deadline (app/metrics.py), never on the event loop.

Job run times come from the database rather than from the worker: the API then reports them in the embedded
default (whose worker serves no metrics port), counts jobs that finish without reaching a worker (failed to
enqueue), and loses none to a worker killed before it could report. A process counts the jobs that finished after
it started, as a counter does; with several API replicas, each reports every job (query one of them).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from celery import Celery
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.jobs.celery_app import QUEUES, filesystem_folders
from app.jobs.state import as_utc
from app.models import Index, Job, utcnow

log = logging.getLogger(__name__)

BROKER_TIMEOUT_S = 1.0
# A worker ping waits its whole timeout for every worker to answer, so its answer is kept a while: a scrape waits
# for a ping at most once in this many seconds.
WORKERS_TTL_S = 10.0
# Seconds of a job's run time: a compaction or a small audit takes seconds, a build minutes, an experiment hours.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, math.inf)
# A job whose finishing transaction commits late may carry a finished_at before the last scrape's newest one:
# each scrape looks back this far and skips the jobs it already counted.
FINISHED_LOOKBACK = timedelta(seconds=60)
# The most finished jobs one scrape reads; the rest wait for the next scrape.
MAX_FINISHED_PER_SCRAPE = 10_000
# kombu's Redis transport keeps a queue's messages of priority p (p > 0) in the list `<queue>\x06\x16<p>`.
REDIS_PRIORITY_SEPARATOR = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


@dataclass
class _Histogram:
    """Cumulative bucket counts and the sum of one label set's observations."""

    counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        for position, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.counts[position] += 1
        self.total += seconds


class FinishedJobDurations:
    """The run time (start to finish) of every job that finished since this process started, by kind and status,
    read from the jobs' rows at each scrape (the rows finished since the previous one)."""

    def __init__(self, since: datetime | None = None):
        self.since = since or utcnow()
        self.histograms: dict[tuple[str, str], _Histogram] = {}
        # Jobs counted within FINISHED_LOOKBACK of `since` (their finish moments): counted once, however late
        # their transaction committed.
        self._recent: dict[str, datetime] = {}

    def update(self, session: Session) -> None:
        rows = session.execute(
            select(Job.id, Job.kind, Job.status, Job.started_at, Job.finished_at)
            .where(Job.finished_at >= self.since - FINISHED_LOOKBACK)
            .order_by(Job.finished_at)
            .limit(MAX_FINISHED_PER_SCRAPE)
        )
        for job_id, kind, status, started, finished in rows:
            finished = as_utc(finished)
            if job_id in self._recent or finished is None:
                continue
            self._recent[job_id] = finished
            self.since = max(self.since, finished)
            started = as_utc(started)
            if started is not None:  # a job cancelled while queued never ran
                seconds = max(0.0, (finished - started).total_seconds())
                self.histograms.setdefault((kind, status), _Histogram()).observe(seconds)
        horizon = self.since - FINISHED_LOOKBACK
        self._recent = {job_id: moment for job_id, moment in self._recent.items() if moment >= horizon}

    def metric(self) -> Metric:
        family = HistogramMetricFamily(
            "influence_job_duration_seconds",
            "Run time (start to finish) of the jobs that finished since this process started, by kind and status",
            labels=["kind", "status"],
        )
        for (kind, status), histogram in sorted(self.histograms.items()):
            buckets = [
                ("+Inf" if math.isinf(bound) else repr(bound), count)
                for bound, count in zip(DURATION_BUCKETS, histogram.counts, strict=True)
            ]
            family.add_metric([kind, status], buckets, histogram.total)
        return family


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting in each Celery queue: the Redis lists' lengths, or the filesystem broker's message files.
    Empty for another broker."""
    if settings.uses_filesystem_broker:
        folder = filesystem_folders(settings)["queue"]
        depths = dict.fromkeys(QUEUES, 0)
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    # kombu names a message file <time>_<uuid>.<queue>.msg
                    queue = entry.name.rsplit(".", 2)[-2] if entry.name.endswith(".msg") else None
                    if queue in depths:
                        depths[queue] += 1
        return depths
    url = settings.resolved_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return {}
    client = redis.Redis.from_url(url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S)
    try:
        pipeline = client.pipeline(transaction=False)
        for queue in QUEUES:
            for priority in REDIS_PRIORITY_STEPS:
                pipeline.llen(f"{queue}{REDIS_PRIORITY_SEPARATOR}{priority}" if priority else queue)
        lengths = pipeline.execute()
    finally:
        client.close()
    steps = len(REDIS_PRIORITY_STEPS)
    return {queue: sum(lengths[i * steps : (i + 1) * steps]) for i, queue in enumerate(QUEUES)}


class LiveWorkers:
    """How many Celery workers answer a ping, asked at most once in WORKERS_TTL_S."""

    def __init__(self, app: Celery, clock: Callable[[], float] = time.monotonic):
        self.app = app
        self.clock = clock
        self._answer: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def count(self) -> int:
        with self._lock:
            now = self.clock()
            if self._answer is None or now - self._answer[0] > WORKERS_TTL_S:
                self._answer = (now, self._ping())
            return self._answer[1]

    def _ping(self) -> int:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=BROKER_TIMEOUT_S)
            replies = self.app.control.ping(timeout=BROKER_TIMEOUT_S, connection=connection)
        return len({name for reply in replies for name in reply})


class JobEngineCollector(Collector):
    """The job engine's series, read at scrape time (register it in the API's metrics registry)."""

    def __init__(
        self, settings: Settings, session_factory: sessionmaker[Session], workers: LiveWorkers | None = None
    ):
        self.settings = settings
        self.session_factory = session_factory
        self.workers = workers
        # The query workers' heartbeat (app.jobs.query_heartbeat), set where queries go to workers: they answer
        # no job and are told apart by it, not by a ping.
        self.query_heartbeat = None
        self.durations = FinishedJobDurations()
        self._lock = threading.Lock()  # two scrapes at once must not count a finished job twice

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "influence_metrics_source_up",
            "Whether this scrape could read the source (database, broker, workers)",
            labels=["source"],
        )
        sources: list[tuple[str, Callable[[], list[Metric]]]] = [
            ("database", self._database),
            ("broker", self._broker),
        ]
        if self.workers is not None:
            sources.append(("workers", self._workers))
        if self.query_heartbeat is not None:
            sources.append(("query_workers", self._query_workers))
        for source, read in sources:
            try:
                metrics = read()
            except Exception:
                log.warning("metrics: could not read the %s", source, exc_info=True)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from metrics
        yield up

    def _database(self) -> list[Metric]:
        jobs = GaugeMetricFamily("influence_jobs", "Jobs by kind and status", labels=["kind", "status"])
        store = GaugeMetricFamily("influence_store_bytes", "Bytes of the feature stores of ready indexes")
        with self._lock, self.session_factory() as session:
            counts = session.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))
            for kind, status, count in sorted(counts):
                jobs.add_metric([kind, status], count)
            ready_bytes = session.scalar(select(func.sum(Index.size_bytes)).where(Index.status == "ready"))
            store.add_metric([], float(ready_bytes or 0))
            self.durations.update(session)
        return [jobs, self.durations.metric(), store]

    def _broker(self) -> list[Metric]:
        depth = GaugeMetricFamily("influence_queue_depth", "Messages waiting in each queue", labels=["queue"])
        for queue, count in queue_depths(self.settings).items():
            depth.add_metric([queue], count)
        return [depth]

    def _workers(self) -> list[Metric]:
        assert self.workers is not None
        live = GaugeMetricFamily("influence_workers_live", "Celery workers that answered a ping (cached briefly)")
        live.add_metric([], self.workers.count())
        return [live]

    def _query_workers(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "influence_query_workers_up", "Whether a query worker's heartbeat is fresh (queries can be answered)"
        )
        up.add_metric([], 0 if self.query_heartbeat.alive() is None else 1)
        return [up]
