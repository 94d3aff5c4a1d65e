"""The Celery application: broker from the settings, job steps delivered at least once, queries at most once.

The worker's entry point is worker/celery_app.py (`celery -A worker.celery_app worker` or `python -m worker`);
the API builds its own app here to send tasks.

Job steps: job state lives in the database, so their results are not kept. Delivery is at least once:
`acks_late` acks a step only after it ran, `task_reject_on_worker_lost` puts it back when its pool process dies,
and Redis hands an unacknowledged step to another worker after `broker_visibility_timeout`. Steps are therefore
idempotent (see app/jobs/steps.py). Two queues: `cpu` (planning, finalising, CPU featurisation) and `gpu`
(featurisation on workers that have CUDA).

Queries (`influence.query` on the `query` queue, app/jobs/query_transport.py): the answer comes back through
the result backend (Redis when the broker is Redis, files under <data_dir>/results with the filesystem
broker), kept QUERY_RESULT_EXPIRES_S at most and deleted once read. A query is acked when a worker takes it and
never redelivered: by the time a redelivery ran, its caller would have given up.

The embedded default needs no server: kombu's filesystem transport keeps messages as files under
<data_dir>/broker (queue/, control/, processed/), shared by the API and the worker child processes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from time import monotonic

from celery import Celery
from kombu import Queue
from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

from app.config import Settings, get_settings
from app.jobs.query_results import QUERY_RESULT_EXPIRES_S, result_backend_url

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
QUERY_QUEUE = "query"
JOB_QUEUES = (CPU_QUEUE, GPU_QUEUE)
QUEUES = (*JOB_QUEUES, QUERY_QUEUE)

# Run step `step` of a job (app/jobs/steps.py); its arguments are the step name, the job id and the step's own
# arguments (a chunk number).
STEP_TASK = "influence.step"
# Answer a query (app/services/queries/compute.py); its one argument is the payload (app/services/queries/payload.py).
QUERY_TASK = "influence.query"

# Seconds between polls of the filesystem broker's folder (it has no push notification) by a worker that serves
# job queues only; one that serves queries polls every `query_polling_interval_s`.
FILESYSTEM_POLLING_INTERVAL = 0.2


class AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel, writing each message whole: to a name no consumer looks at, then renamed to
    its message name. kombu writes the message file in place, and a consumer that lists the folder between the
    file's creation and its write reads an empty message and stops with a JSON error (seen at a 5 ms poll)."""

    def _put(self, queue, payload, **kwargs):
        # The message name kombu gives (<ms>_<uuid>.<queue>.msg: consumers take the oldest first); the partial
        # name starts with a dot, so it names no queue.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        partial = Path(self.data_folder_out) / f".partial-{uuid.uuid4()}"
        try:
            partial.write_bytes(str_to_bytes(dumps(payload)))
            os.replace(partial, Path(self.data_folder_out) / name)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ChannelError(f"cannot add message {name!r} to {self.data_folder_out}") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    Channel = AtomicFilesystemChannel


def filesystem_folders(settings: Settings) -> dict[str, Path]:
    """The filesystem broker's folders; producers and consumers share one message folder."""
    root = settings.broker_dir
    return {"queue": root / "queue", "control": root / "control", "processed": root / "processed"}


def broker_transport_options(
    settings: Settings, polling_interval: float = FILESYSTEM_POLLING_INTERVAL
) -> dict:
    if settings.uses_filesystem_broker:
        folders = filesystem_folders(settings)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "control_folder": str(folders["control"]),
            # Taken messages are moved here (same filesystem: an atomic rename, so two consumers never both
            # get one); without it kombu moves them to the system temp dir, which may be another filesystem.
            "store_processed": True,
            "processed_folder": str(folders["processed"]),
            "polling_interval": polling_interval,
        }
    return {"visibility_timeout": settings.broker_visibility_timeout}


def make_celery(
    settings: Settings | None = None, include: Sequence[str] = (), queues: Sequence[str] | None = None
) -> Celery:
    """A Celery app for `settings` (default: the process settings, i.e. the INFLUENCE_* environment); `include`
    names the task modules a worker loads (the API only sends, by task name); `queues`: those a worker built
    from it consumes (None: a sender, or a worker of the job queues)."""
    settings = settings or get_settings()
    url = settings.resolved_broker_url
    if url == "filesystem://":
        url = "filesystem://localhost/"  # the same transport; naming the host keeps kombu from warning
    serves_queries = QUERY_QUEUE in (queues or ())
    only_queries = serves_queries and set(queues or ()) == {QUERY_QUEUE}
    polling = settings.query_polling_interval_s if serves_queries else FILESYSTEM_POLLING_INTERVAL
    app = Celery("influence", broker=url, backend=result_backend_url(settings), include=list(include))
    if settings.uses_filesystem_broker:
        app.conf.broker_transport = f"{__name__}:{AtomicFilesystemTransport.__name__}"
    app.conf.update(
        broker_transport_options=broker_transport_options(settings, polling),
        broker_connection_retry_on_startup=True,
        # Only queries keep a result (their task says so); a step's outcome is its job's row.
        task_ignore_result=True,
        result_expires=QUERY_RESULT_EXPIRES_S,
        result_serializer="json",
        result_accept_content=["json"],
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        # One task reserved per process: chunks spread over every worker instead of piling up in one.
        worker_prefetch_multiplier=1,
        task_default_queue=CPU_QUEUE,
        task_queues=[Queue(name) for name in QUEUES],
        task_create_missing_queues=False,
        worker_send_task_events=False,
        # Workers load a model per process; recycling them would reload it for nothing.
        worker_max_tasks_per_child=None,
    )
    if only_queries:
        app.conf.update(
            # A query worker is found by its heartbeat (app/jobs/query_heartbeat.py), not by pings: without
            # remote control it polls one queue, not a control queue as well, and /readyz's `worker` check
            # stays about the workers that run jobs.
            worker_enable_remote_control=False,
            # A busy query worker reserves nothing more (Redis only), so an idle one takes the next query.
            worker_disable_prefetch=not settings.uses_filesystem_broker,
        )
    return app


_app: Celery | None = None


def get_app(include: Sequence[str] = (), queues: Sequence[str] | None = None) -> Celery:
    """The worker process's app from the INFLUENCE_* environment (what `celery -A worker.celery_app` runs); the
    first call decides (`python -m worker` makes it with the queues it serves)."""
    global _app
    if _app is None:
        settings = get_settings()
        # This is the worker process starting (`python -m worker`, `celery -A worker.celery_app`): before it
        # creates a broker folder or an artifact, it takes the service's umask (its pool processes inherit it).
        os.umask(int(settings.umask, 8))
        _app = make_celery(settings, include, queues)
    return _app


def consumed_queues(app: Celery) -> set[str]:
    """The queues a worker of `app` consumes (in the worker's processes, once it has started)."""
    return set(app.amqp.queues.consume_from or app.amqp.queues)
