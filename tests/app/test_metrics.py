"""Observability: GET /metrics moves by what the service did (requests by route template and status, latencies,
jobs by kind and status, job run times, store bytes, queue depths), tells no ids; the worker's own metrics port
counts its steps across its pool processes; a request id follows a request into its log lines, its response,
the job it created and that job's log lines (inline and in a real worker), as JSON lines when asked."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

import app.metrics as metrics_module
from app.jobs.steps import run_build_inline
from app.logs import JsonFormatter, accepted_request_id, install_request_id_records, request_id_context
from app.models import Job
from tests.app.conftest import build_api, make_settings
from tests.worker.support import (
    ApiProcess,
    WorkerProcess,
    built_index,
    celery_api,
    free_port,
    register_dataset,
    register_model,
    wait_for_job,
)

Samples = dict[tuple[str, frozenset], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def value(scraped: Samples, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_requests_are_counted_by_route_template_and_status(api):
    before = scrape(api.client)
    for _ in range(2):
        assert api.client.get("/healthz").status_code == 200
    assert api.client.get("/v1/indexes/not-an-index").status_code == 404
    assert api.client.get("/v1/indexes/another-one").status_code == 404
    assert api.client.get("/no/such/route").status_code == 404
    assert api.client.get("/v1/indexes", headers={"Authorization": "Bearer wrong"}).status_code == 401
    after = scrape(api.client)

    requests = "influence_http_requests_total"
    assert moved(before, after, requests, method="GET", route="/healthz", status="200") == 2
    assert moved(before, after, requests, method="GET", route="/v1/indexes/{index_id}", status="404") == 2
    assert moved(before, after, requests, method="GET", route="<unmatched>", status="404") == 1
    assert moved(before, after, requests, method="GET", route="/v1/indexes", status="401") == 1
    # The first scrape is counted once it answered.
    assert moved(before, after, requests, method="GET", route="/metrics", status="200") == 1
    latency = "influence_http_request_duration_seconds"
    assert moved(before, after, f"{latency}_count", method="GET", route="/healthz") == 2
    assert moved(before, after, f"{latency}_bucket", method="GET", route="/healthz", le="+Inf") == 2
    assert moved(before, after, f"{latency}_count", method="GET", route="/v1/indexes/{index_id}") == 2
    # Raw paths never become labels.
    assert not any("not-an-index" in str(labels) or "/no/such" in str(labels) for _, labels in after)


def test_jobs_run_times_and_store_bytes_follow_a_build(api, tiny_model_dir, sst2_rows):
    before = scrape(api.client)
    assert value(before, "influence_metrics_source_up", source="database") == 1
    assert value(before, "influence_metrics_source_up", source="broker") == 1
    model, dataset, index = built_index(api, tiny_model_dir("bert", "classification", num_labels=2), sst2_rows[:20])
    after = scrape(api.client)

    assert moved(before, after, "influence_jobs", kind="index_build", status="succeeded") == 1
    assert moved(before, after, "influence_job_duration_seconds_count", kind="index_build", status="succeeded") == 1
    assert moved(before, after, "influence_job_duration_seconds_bucket", kind="index_build", status="succeeded",
                 le="+Inf") == 1
    assert index["size_bytes"] > 0
    assert moved(before, after, "influence_store_bytes") == index["size_bytes"]
    # Jobs are counted once: a second scrape adds no run time.
    again = scrape(api.client)
    assert moved(after, again, "influence_job_duration_seconds_count", kind="index_build", status="succeeded") == 0
    # Counts and sizes only: no id and no name of the tenant's resources.
    text = api.client.get("/metrics").text
    for secret in (model["id"], dataset["id"], index["id"], index["job"]["id"], api.tenant_id, "tiny-bert", "train"):
        assert secret not in text


def test_queue_depth_and_live_workers_over_the_filesystem_broker(
    tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows
):
    settings = make_settings(tmp_path, sqlite_url, default_roots)
    api = celery_api(settings)  # and no worker: the messages wait
    try:
        before = scrape(api.client)
        assert value(before, "influence_workers_live") == 0
        assert value(before, "influence_metrics_source_up", source="workers") == 1
        model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
        dataset = register_dataset(api.client, sst2_rows[:10])
        created = api.client.post("/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"]})
        assert created.status_code == 202, created.text
        after = scrape(api.client)
        assert moved(before, after, "influence_queue_depth", queue="cpu") == 1  # the build's plan step
        assert value(after, "influence_queue_depth", queue="gpu") == 0
        assert moved(before, after, "influence_jobs", kind="index_build", status="queued") == 1
    finally:
        api.close()


def test_metrics_can_be_disabled(tmp_path, sqlite_url, default_roots):
    disabled = build_api(make_settings(tmp_path, sqlite_url, default_roots, metrics_enabled=False))
    try:
        assert disabled.client.get("/metrics").status_code == 404
        assert "/metrics" not in disabled.client.get("/openapi.json").json()["paths"]
    finally:
        disabled.close()


def test_a_stuck_source_answers_503_without_holding_the_api(api, monkeypatch):
    release = threading.Event()

    def stuck_collect():
        release.wait(10)
        return iter(())

    monkeypatch.setattr(metrics_module, "SCRAPE_DEADLINE_S", 0.2)
    monkeypatch.setattr(api.app.state.metrics.registry, "collect", stuck_collect)
    try:
        started = time.monotonic()
        assert api.client.get("/metrics").status_code == 503
        # The stuck scrape still runs: the next one is refused at once, and the API answers meanwhile.
        assert api.client.get("/metrics").status_code == 503
        assert api.client.get("/healthz").status_code == 200
        assert time.monotonic() - started < 5
    finally:
        release.set()


# --- request ids and JSON logs ---------------------------------------------------------------------------


def test_accepted_request_ids():
    assert accepted_request_id("abc-123_X.y:z") == "abc-123_X.y:z"
    for insane in (None, "", "has space", "x" * 65, "new\nline", '{"json": 1}'):
        replaced = accepted_request_id(insane)
        assert replaced != insane and len(replaced) == 32


def test_json_lines_carry_the_request_id():
    install_request_id_records()
    with request_id_context("req-1"):
        record = logging.getLogRecordFactory()("app.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world" and line["request_id"] == "req-1" and line["level"] == "INFO"


def _build_requested_as(api, tiny_model_dir, rows, request_id: str) -> str:
    """The job id of an index build over `rows` on the tiny BERT's head, created by a request with this id."""
    model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
    dataset = register_dataset(api.client, rows)
    created = api.client.post(
        "/v1/indexes",
        json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "head"},
        headers={"X-Request-ID": request_id},
    )
    assert created.status_code == 202, created.text
    assert created.headers["X-Request-ID"] == request_id
    return created.json()["job"]["id"]


def test_a_request_id_follows_the_request_and_its_job(api, tiny_model_dir, sst2_rows, caplog):
    echoed = api.client.get("/healthz", headers={"X-Request-ID": "caller-chosen-1"})
    assert echoed.headers["X-Request-ID"] == "caller-chosen-1"
    replaced = api.client.get("/healthz", headers={"X-Request-ID": "not sane"})
    assert replaced.headers["X-Request-ID"] not in ("not sane", "")
    assert api.client.get("/healthz").headers["X-Request-ID"]

    job_id = _build_requested_as(api, tiny_model_dir, sst2_rows[:20], "build-req-7")
    with api.session_factory() as session:
        assert session.get(Job, job_id).request_id == "build-req-7"
    with caplog.at_level(logging.INFO, logger="app.jobs"):
        run_build_inline(api.settings, api.session_factory, job_id)
    step_lines = [record for record in caplog.records if record.name.startswith("app.jobs")]
    assert step_lines and {record.request_id for record in step_lines} == {"build-req-7"}


def test_a_live_api_writes_json_lines_with_the_request_id(tmp_path, sqlite_url, default_roots):
    settings = make_settings(tmp_path, sqlite_url, default_roots)
    server = ApiProcess(settings, tmp_path / "api.log", INFLUENCE_LOG_FORMAT="json").start()
    try:
        response = httpx.get(f"{server.url}/healthz", headers={"X-Request-ID": "live-req-3"}, timeout=10)
        assert response.headers["X-Request-ID"] == "live-req-3"
        scraped = samples(httpx.get(f"{server.url}/metrics", timeout=10).text)
        assert value(scraped, "influence_http_requests_total", method="GET", route="/healthz", status="200") >= 1
    finally:
        server.stop()
    lines = [json.loads(line) for line in (tmp_path / "api.log").read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line["request_id"] == "live-req-3"]
    assert mine and any("/healthz" in line["message"] for line in mine), lines


# --- the worker -------------------------------------------------------------------------------------------


def _scrape_worker(port: int, timeout: float = 90.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_worker_serves_its_pools_step_metrics_and_logs_request_ids(
    tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows
):
    settings = make_settings(tmp_path, sqlite_url, default_roots, chunk_size=10)
    api = celery_api(settings)
    port = free_port()
    worker = WorkerProcess(
        settings,
        "metrics",
        tmp_path / "worker.log",
        INFLUENCE_WORKER_METRICS_PORT=str(port),
        INFLUENCE_LOG_FORMAT="json",
    )
    # `python -m worker`, as the image and `make serve` run it: a prefork pool of two processes.
    worker.command = [
        sys.executable, "-m", "worker", "--queues", "cpu", "--concurrency", "2", "--hostname", "metrics@%h"
    ]
    worker.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker.start()
    try:
        assert value(_scrape_worker(port), "influence_worker_steps_total", step="plan") == 0
        job_id = _build_requested_as(api, tiny_model_dir, sst2_rows[:40], "worker-req-5")
        job = wait_for_job(api.client, job_id, timeout=180)
        assert job["status"] == "succeeded", (job, worker.output()[-3000:])
        scraped = _scrape_worker(port)
        assert value(scraped, "influence_worker_steps_total", step="plan") == 1
        assert value(scraped, "influence_worker_steps_total", step="chunk") == 4
        assert value(scraped, "influence_worker_steps_total", step="finalize") == 1
        assert value(scraped, "influence_worker_step_failures_total", step="chunk") == 0
        assert value(scraped, "influence_worker_step_duration_seconds_count", step="chunk") == 4
        # The API's view of the same queue, with the worker gone quiet.
        api_scrape = scrape(api.client)
        assert value(api_scrape, "influence_queue_depth", queue="cpu") == 0
        assert value(api_scrape, "influence_workers_live") == 1
    finally:
        worker.stop()
        api.close()
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    build_lines = [line for line in lines if "index build" in line["message"]]
    assert build_lines and {line["request_id"] for line in build_lines} == {"worker-req-5"}, lines[-20:]
