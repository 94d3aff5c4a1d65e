"""Queries on real query workers (`python -m worker --queues query`): over Redis and over the embedded filesystem
broker the answer is the in-process answer, field for field but `seconds`; a refusal raised on the worker comes
back with the API's own status and body; no query worker alive is a 503 at once; a stalled worker is a 504 after
query_timeout_s, never a hang, and its query expires unanswered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from fastapi.testclient import TestClient

from tests.app.conftest import TWO_REVIEWS, fresh_api
from tests.app.test_metrics import scrape
from tests.worker.support import ROOT, WorkerProcess, built_index, register_model

REDIS_URL = "redis://127.0.0.1:6379/11"  # tests/worker/conftest.py REDIS_DB: this suite's, flushed
# Generous bounds that tell "answered at once" and "waited for the timeout" from a hang; not speed targets.
AT_ONCE_S = 5.0
SHORT_TIMEOUT_S = 2.0
STARTUP_S = 180.0

QUERIES = [
    {},  # the index's settings (defaults here), exact
    {
        "top_k": 4,
        "direction": "harmful",
        "layers": "role:attention",
        "estimator": "cosine",
        "aggregation": "vote",
    },
    {"top_k": 3, "layers": ["head"], "estimator": "datainf", "aggregation": "mean"},
    {"top_k": 5, "approximate": True, "candidates_per_layer": 20, "layers": "middle"},
]
# Refused only where the model is known: a label it has no class for, a layer the index does not hold.
REFUSED = [
    {"examples": [{"text": "a fine film", "label": 7}]},
    {"layers": ["block.0.no-such-unit"]},
]


class QueryWorker(WorkerProcess):
    """`python -m worker --queues query`, as `make serve` and a deployment run it."""

    def __init__(self, settings, name: str, log, **env):
        super().__init__(settings, name, log, **env)
        self.command = [sys.executable, "-m", "worker", "--queues", "query", "--hostname", f"{name}@%h"]


def _wait_alive(transport, worker: QueryWorker) -> None:
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert worker.process.poll() is None, worker.output()
        try:
            transport.live_worker()
            return
        except Exception:
            assert time.monotonic() < deadline, f"no heartbeat after {STARTUP_S}s: {worker.output()}"
            time.sleep(0.2)


def _forwarding_client(served, settings, **overrides):
    """A client of an app that sends its queries to workers (create_service_app), as the tenant of `served`."""
    from app.embedded import create_service_app

    # No request-isolation processes: these apps never parse an upload.
    settings = settings.model_copy(update={"request_processes": 0, **overrides})
    app = create_service_app(settings)
    return TestClient(app, headers={"Authorization": f"Bearer {served['api'].token}"}), app


def _query(client, index_id, **body):
    return client.post(f"/v1/indexes/{index_id}/query", json={**TWO_REVIEWS, **body})


def _same_but_seconds(a: dict, b: dict) -> None:
    assert a.pop("seconds") >= 0 and b.pop("seconds") >= 0
    assert a == b


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """An in-process API with a ready tiny-BERT index over 60 SST-2 rows (SQLite: workers share the file)."""
    api = fresh_api(tmp_path_factory, sqlite_template, "query-worker")
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    _, _, index = built_index(api, folder, sst2_rows[:60], chunk_size=30)
    yield {"api": api, "index": index}
    api.close()


@pytest.fixture(scope="module")
def redis_worker(served, tmp_path_factory):
    """A query worker over Redis (this suite's database), and the settings of an API that forwards to it."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    settings = served["api"].settings.model_copy(update={"broker_url": REDIS_URL})
    log = tmp_path_factory.mktemp("query-worker") / "redis-worker.log"
    worker = QueryWorker(settings, "query-redis", log).start()
    try:
        # Warm: its first query loads the model and waits for the scoring kernel's compile (seconds).
        forwarding, app = _forwarding_client(served, settings)
        with forwarding:
            _wait_alive(app.state.query_transport, worker)
            assert _query(forwarding, served["index"]["id"]).status_code == 200
        yield settings, worker
    finally:
        worker.kill()
        client.flushdb()
        client.close()


def test_redis_worker_answers_as_the_api_does(served, redis_worker):
    settings, worker = redis_worker
    api, index_id = served["api"], served["index"]["id"]
    forwarding, app = _forwarding_client(served, settings)
    with forwarding:
        _wait_alive(app.state.query_transport, worker)
        for body in QUERIES:
            local = _query(api.client, index_id, **body)
            remote = _query(forwarding, index_id, **body)
            assert local.status_code == remote.status_code == 200, (local.text, remote.text)
            _same_but_seconds(local.json(), remote.json())
        for body in REFUSED:
            local = _query(api.client, index_id, **body)
            remote = _query(forwarding, index_id, **body)
            assert local.status_code == remote.status_code == 422, (local.text, remote.text)
            assert remote.headers["content-type"] == "application/problem+json"
            assert local.json() == remote.json()
        # Refused before anything is sent: the same as in-process, without a worker's help.
        assert _query(forwarding, "missing").json() == _query(api.client, "missing").json()
        # /readyz asks for a live query worker (no job worker runs here: that check fails, this one passes).
        checks = forwarding.get("/readyz").json()["checks"]
        assert checks["query_worker"]["ok"] is True and "query-redis@" in checks["query_worker"]["detail"], (
            checks
        )
        assert scrape(forwarding)[("influence_query_workers_up", frozenset())] == 1
    # Read once, deleted at once: no answer is left in Redis.
    assert not redis.Redis.from_url(REDIS_URL).keys("celery-task-meta-*")


def test_a_stalled_worker_is_a_504_then_a_503_never_a_hang(served, redis_worker):
    from app.jobs.query_heartbeat import HEARTBEAT_TTL_S

    settings, worker = redis_worker
    index_id = served["index"]["id"]
    # Two APIs on the same worker: one that waits query_timeout_s = 2 s, one with the default 30 s.
    hasty, app = _forwarding_client(served, settings, query_timeout_s=SHORT_TIMEOUT_S)
    patient, _ = _forwarding_client(served, settings)
    with hasty, patient:
        _wait_alive(app.state.query_transport, worker)
        assert _query(patient, index_id).status_code == 200
        os.killpg(worker.process.pid, signal.SIGSTOP)
        try:
            stopped = started = time.monotonic()
            # Its last heartbeat is at most 2 s old: the API still believes it, sends, and gives up.
            response = _query(hasty, index_id)
            waited = time.monotonic() - started
            assert response.status_code == 504, response.text
            assert response.json()["type"] == "urn:influence:problem:gateway-timeout"
            assert "query_timeout_s" in response.json()["detail"]
            assert SHORT_TIMEOUT_S <= waited < SHORT_TIMEOUT_S + AT_ONCE_S
            # Its heartbeat stops with it: once it is stale, the API sends nothing and says so at once.
            time.sleep(max(0.0, HEARTBEAT_TTL_S + 0.5 - (time.monotonic() - stopped)))
            started = time.monotonic()
            response = _query(patient, index_id)
            assert response.status_code == 503, response.text
            assert "python -m worker --queues query" in response.json()["detail"]
            assert time.monotonic() - started < AT_ONCE_S
        finally:
            os.killpg(worker.process.pid, signal.SIGCONT)
        # Resumed, it drops the expired query instead of answering it, and answers the next one.
        _wait_alive(app.state.query_transport, worker)
        assert _query(patient, index_id).status_code == 200
    # Celery counts an expired message as revoked.
    assert "Discarding revoked task: influence.query[" in worker.output(), worker.output()


def test_embedded_filesystem_broker_answers_as_the_api_does(served, tmp_path):
    api, index_id = served["api"], served["index"]["id"]
    settings = api.settings.model_copy(update={"broker_url": None})
    forwarding, app = _forwarding_client(served, settings)
    worker = QueryWorker(settings, "query-files", tmp_path / "files-worker.log").start()
    try:
        with forwarding:
            _wait_alive(app.state.query_transport, worker)
            for body in QUERIES[:2]:
                local = _query(api.client, index_id, **body)
                remote = _query(forwarding, index_id, **body)
                assert local.status_code == remote.status_code == 200, (local.text, remote.text)
                _same_but_seconds(local.json(), remote.json())
            local, remote = (_query(client, index_id, **REFUSED[0]) for client in (api.client, forwarding))
            assert remote.status_code == 422 and local.json() == remote.json()
    finally:
        worker.stop()
    # Every answer was read and deleted.
    results = settings.data_dir.resolve() / "results"
    assert [p.name for p in results.iterdir() if p.name.startswith("celery-task-meta-")] == []


def test_no_query_worker_is_a_503_at_once(served, tmp_path):
    # A data dir of its own: a filesystem broker no query worker has ever served.
    settings = served["api"].settings.model_copy(update={"broker_url": None, "data_dir": tmp_path / "data"})
    forwarding, _ = _forwarding_client(served, settings)
    with forwarding:
        started = time.monotonic()
        response = _query(forwarding, served["index"]["id"])
        assert time.monotonic() - started < AT_ONCE_S
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == (
            "no query worker is running: start one with `python -m worker --queues query`"
        )
        ready = forwarding.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["query_worker"]["ok"] is False
        assert scrape(forwarding)[("influence_query_workers_up", frozenset())] == 0


def test_a_model_no_worker_can_hold_is_a_503_before_anything_is_sent(served, tmp_path):
    # A worker budget below the tiny model's own weights: refused on the API side, before the heartbeat is asked.
    settings = served["api"].settings.model_copy(
        update={"broker_url": None, "data_dir": tmp_path / "data", "worker_memory_bytes": 1024}
    )
    forwarding, _ = _forwarding_client(served, settings)
    with forwarding:
        response = _query(forwarding, served["index"]["id"])
        assert response.status_code == 503, response.text
        assert "no worker can hold model" in response.json()["detail"]
        assert response.json()["worker_memory_bytes"] == 1024
    assert list((settings.broker_dir / "queue").iterdir()) == []  # nothing was sent


def test_a_query_worker_unloads_the_models_deleted_since_it_loaded_them(served, tiny_model_dir):
    """The API that deletes a model cannot reach a query worker's cache: before each query the worker drops the
    loaded models whose rows are gone (an LLM's weights are too large to wait for the LRU)."""
    from app.jobs.model_cache import ModelSpec
    from app.jobs.query_worker import QueryWorkerContext, drop_deleted_models
    from app.models import RegisteredModel

    api = served["api"]
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    kept_id = served["index"]["model_id"]
    deleted_id = register_model(api.client, folder, name="to-delete")["id"]
    ctx = QueryWorkerContext(api.settings, api.session_factory)
    with api.session_factory() as session:
        for model_id in (kept_id, deleted_id):
            ctx.runtime.models.get(ModelSpec.of(session.get(RegisteredModel, model_id)), "cpu")
    assert ctx.runtime.models.model_ids() == {kept_id, deleted_id}
    with api.session_factory() as session:
        drop_deleted_models(session, ctx.runtime.models)
    assert ctx.runtime.models.model_ids() == {kept_id, deleted_id}  # nothing deleted yet: nothing dropped
    assert api.client.delete(f"/v1/models/{deleted_id}").status_code == 204
    with api.session_factory() as session:
        drop_deleted_models(session, ctx.runtime.models)
    assert ctx.runtime.models.model_ids() == {kept_id}


API_SIDE = ("app.services.queries.request", "app.jobs.query_transport", "app.api.v1.indexes")
HEAVY = ("torch", "transformers", "faiss")


def _who_imports(heavy: str) -> str:
    """The chain of imports that first loads `heavy` when the API side is imported (python -X importtime)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import app.errors, {', '.join(API_SIDE)}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    # importtime lists a module after the modules it imported, indented two spaces deeper than its importer.
    entries = []
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and not line.endswith("imported package"):
            name = line.rsplit("|", 1)[1]
            entries.append(((len(name) - len(name.lstrip())) // 2, name.strip()))
    for i, (depth, name) in enumerate(entries):
        if name == heavy:
            chain = [name]
            for other_depth, other in entries[i + 1 :]:
                if other_depth < depth:
                    chain.append(other)
                    depth = other_depth
            return " <- ".join(chain)
    return f"{heavy}: not found"


def test_the_forwarding_api_imports_no_compute_side():
    """The API side of a query (its service module, the transport, the route's module) loads nothing that
    computes: neither the compute side nor torch, transformers or faiss, beyond what app.errors itself loads
    (nothing of them, now that influence.errors is light)."""
    probe = (
        "import json, sys\n"
        "import app.errors\n"
        "before = set(sys.modules)\n"
        f"import {', '.join(API_SIDE)}\n"
        "new = set(sys.modules) - before\n"
        f"heavy = sorted({{m.split('.')[0] for m in new}} & {set(HEAVY)!r})\n"
        "heavy += sorted(new & {'app.services.queries.compute', 'app.jobs.query_worker'})\n"
        "print(json.dumps(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    heavy = json.loads(out.stdout)
    assert heavy == [], [_who_imports(name) if name in HEAVY else name for name in heavy]


def test_filesystem_broker_messages_are_read_whole_while_being_written(tmp_path):
    """A consumer that polls the queue folder as fast as it can, while a producer writes 300 messages, reads every
    one whole, once (kombu's own filesystem channel writes in place: a fast poll could read an empty file)."""
    import threading
    from queue import Empty

    from kombu import Connection

    from app.jobs.celery_app import AtomicFilesystemTransport

    folder = tmp_path / "queue"
    folder.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder), "store_processed": False}
    read: list[dict] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def consume() -> None:
        with Connection(
            "filesystem://localhost/", transport=AtomicFilesystemTransport, transport_options=options
        ) as c:
            channel = c.default_channel
            while len(read) < 300 and not errors:
                try:
                    read.append(channel._get("q"))
                except Empty:
                    pass
                except Exception as exc:  # the half-written message kombu's own channel could hand out
                    errors.append(exc)
                if done.is_set() and not any(p.name.endswith(".q.msg") for p in folder.iterdir()):
                    break

    consumer = threading.Thread(target=consume)
    consumer.start()
    with Connection(
        "filesystem://localhost/", transport=AtomicFilesystemTransport, transport_options=options
    ) as c:
        channel = c.default_channel
        for i in range(300):
            channel._put("q", {"i": i, "body": "x" * 20_000})
    done.set()
    consumer.join(timeout=120)
    assert errors == []
    # Oldest first to the millisecond (messages of one millisecond in any order), as kombu names them.
    assert sorted(message["i"] for message in read) == list(range(300))
    assert all(len(message["body"]) == 20_000 for message in read)
    assert [p.name for p in folder.iterdir()] == []  # nothing partial left behind


def test_expired_query_files_are_swept_and_nothing_else(tmp_path):
    from app.config import Settings
    from app.jobs.celery_app import filesystem_folders, make_celery
    from app.jobs.query_results import QUERY_RESULT_EXPIRES_S, results_dir, sweep_query_files

    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    make_celery(settings)  # makes the broker's and the results' folders
    processed = filesystem_folders(settings)["processed"]
    old = time.time() - QUERY_RESULT_EXPIRES_S - 10
    files = {
        "old answer": results_dir(settings) / "celery-task-meta-1",
        "old partial answer": results_dir(settings) / "celery-task-meta-2.partial-ab",
        "fresh answer": results_dir(settings) / "celery-task-meta-3",
        "old query message": processed / "1_a.query.msg",
        "fresh query message": processed / "2_b.query.msg",
        "old step message": processed / "3_c.cpu.msg",
        "old other file": results_dir(settings) / "notes.txt",
    }
    for name, path in files.items():
        path.write_text("{}")
        if name.startswith("old"):
            os.utime(path, (old, old))
    assert sweep_query_files(settings, processed) == 3
    left = {name for name, path in files.items() if path.exists()}
    assert left == {"fresh answer", "fresh query message", "old step message", "old other file"}


def test_a_file_heartbeat_is_believed_for_its_time_to_live_only(tmp_path):
    from app.jobs.query_heartbeat import HEARTBEAT_TTL_S, FileHeartbeat

    heartbeat = FileHeartbeat(tmp_path)
    assert heartbeat.alive() is None
    heartbeat.beat("query@host")
    assert heartbeat.alive() == "query@host"
    stale = time.time() - HEARTBEAT_TTL_S - 1
    os.utime(heartbeat.path, (stale, stale))
    assert heartbeat.alive() is None
    heartbeat.beat("other@host")
    assert heartbeat.alive() == "other@host"
