"""The app as a whole: health and readiness, problem+json for every kind of error, the request's unit of work
(commit before the response, enqueue after the commit), OpenAPI, settings documentation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import influence.errors as lib
from app.api.deps import JobQueueDep, SessionDep
from app.config import Settings
from app.jobs import state as jobs
from app.jobs.readiness import ReadinessCheck
from app.main import create_app
from app.models import Job
from tests.app.conftest import RecordingQueue, build_api, make_settings, make_tenant
from tests.app.test_datasets import PROBLEM, assert_problem

ROOT = Path(__file__).resolve().parents[2]


# --- health ---------------------------------------------------------------------------------------------------


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    from app.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


HEAD = _head_revision()


def test_healthz_and_readyz_on_a_migrated_database(any_api):
    assert any_api.client.get("/healthz").json() == {"status": "ok", "version": any_api.app.version}
    response = any_api.client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"]["ok"] is True and HEAD in body["checks"]["database"]["detail"]
    # the query scoring kernel of this process (compiled first by the tests' session fixture)
    assert body["compiled_scoring"] == {"state": "ready", "failure": None}
    # how this process runs small featurizations: what influence.threads measured (None before any)
    from influence.threads import ONE_THREAD

    small = body["small_batches"]
    assert small["one_thread"] is ONE_THREAD.one_thread_pays
    if small["one_thread"] is None:
        assert small["measured_ms"] is None
    else:
        one, every = small["measured_ms"]["one thread"], small["measured_ms"]["all threads"]
        assert one <= every if small["one_thread"] else one >= every


@pytest.mark.parametrize("choice", ["one", "all"])
def test_a_fixed_small_batch_thread_choice_is_applied_at_start(tmp_path, sqlite_url, default_roots, choice):
    from influence.threads import ONE_THREAD

    before = ONE_THREAD.status()
    try:
        settings = make_settings(tmp_path, sqlite_url, default_roots, small_batch_threads=choice)
        app = create_app(settings, job_queue=RecordingQueue(), readiness_checks=())
        _, key = make_tenant(app.state.session_factory)  # the details are for callers with a key
        with TestClient(app, headers={"X-API-Key": key}) as client:  # runs the lifespan, which applies the setting
            body = client.get("/readyz").json()
        assert body["small_batches"] == {"one_thread": choice == "one", "measured_ms": None}
        app.state.engine.dispose()
    finally:  # the process' own choice back, as measured (or not yet) before this test
        ONE_THREAD.one_thread_pays = before["one_thread"]
        ONE_THREAD.calibration = {k: v / 1000 for k, v in (before["measured_ms"] or {}).items()}


def test_unknown_small_batch_thread_choices_are_refused(tmp_path, sqlite_url, default_roots):
    with pytest.raises(ValueError, match="small_batch_threads"):
        make_settings(tmp_path, sqlite_url, default_roots, small_batch_threads="two")


def test_readyz_is_503_on_an_unmigrated_database(tmp_path, default_roots):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    built = build_api(make_settings(tmp_path, url, default_roots), authenticate=False)
    assert built.client.get("/healthz").status_code == 200  # alive, just not ready
    # No key can be checked without a schema: the status only (the log says why).
    body = assert_problem(built.client.get("/readyz"), 503, "send an API key")
    assert "checks" not in body and "migrated" not in body["detail"]


def test_readyz_runs_the_plugged_in_checks(tmp_path, sqlite_url, default_roots):
    def broker() -> str:
        return "pong"

    def worker() -> str:
        raise RuntimeError("no worker answered within 2 s")

    settings = make_settings(tmp_path, sqlite_url, default_roots)
    healthy = build_api(settings, readiness_checks=[ReadinessCheck("broker", broker)])
    assert healthy.client.get("/readyz").json()["checks"]["broker"] == {
        "ok": True,
        "detail": "pong",
        "seconds": pytest.approx(0, abs=1),
    }
    failing = build_api(
        settings, readiness_checks=[ReadinessCheck("broker", broker), ReadinessCheck("worker", worker)]
    )
    body = assert_problem(failing.client.get("/readyz"), 503, "worker: no worker answered")
    assert body["checks"]["broker"]["ok"] is True and body["checks"]["worker"]["ok"] is False

    # no checks given: it cannot vouch for a worker
    unconfigured = TestClient(create_app(settings), headers={"X-API-Key": healthy.token})
    assert_problem(unconfigured.get("/readyz"), 503, "worker: no broker/worker readiness check")


def test_creating_an_app_never_touches_the_database(tmp_path):
    database = tmp_path / "never.db"
    app = create_app(Settings(_env_file=None, data_dir=tmp_path, database_url=f"sqlite:///{database}"))
    assert not database.exists()
    app.state.engine.dispose()


# --- errors ---------------------------------------------------------------------------------------------------


def _erroring_app(tmp_path, sqlite_url, default_roots):
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots))
    raising = {
        "invalid": lib.InvalidInputError("bad top_k"),
        "layer": lib.UnknownLayerError("no layer block.9"),
        "model": lib.UnsupportedModelError("pickle"),
        "manifest": lib.ManifestMismatchError("projection seed differs"),
        "incomplete": lib.StoreIncompleteError("still building"),
        "corrupted": lib.StoreCorruptedError("checksum"),
        "bug": RuntimeError("secret internals /etc/shadow"),
    }

    def route(kind: str):
        raise raising[kind]

    built.app.add_api_route("/boom/{kind}", route)
    return built


@pytest.mark.parametrize(
    ("kind", "status", "type_"),
    [
        ("invalid", 422, "invalid-input"),
        ("layer", 422, "unknown-layer"),
        ("model", 422, "unsupported-model"),
        ("manifest", 409, "manifest-mismatch"),
        ("incomplete", 409, "store-incomplete"),
        ("corrupted", 409, "store-corrupted"),
    ],
)
def test_library_errors_become_problems(tmp_path, sqlite_url, default_roots, kind, status, type_):
    built = _erroring_app(tmp_path, sqlite_url, default_roots)
    body = assert_problem(built.client.get(f"/boom/{kind}"), status)
    assert body["type"] == f"urn:influence:problem:{type_}"
    assert body["instance"] == f"/boom/{kind}"


def test_unexpected_errors_are_500_without_internals(tmp_path, sqlite_url, default_roots):
    built = _erroring_app(tmp_path, sqlite_url, default_roots)
    client = TestClient(built.app, raise_server_exceptions=False)
    response = client.get("/boom/bug")
    body = assert_problem(response, 500)
    assert "secret" not in response.text and "RuntimeError" not in response.text
    assert body["type"] == "urn:influence:problem:internal-error"


def test_framework_errors_are_problems(api):
    assert_problem(api.client.get("/v1/nowhere"), 404)
    assert_problem(api.client.delete("/v1/models"), 405)
    response = api.client.post(
        "/v1/models", content=b"{not json", headers={"content-type": "application/json"}
    )
    body = assert_problem(response, 422)
    assert body["type"] == "urn:influence:problem:invalid-request" and body["errors"]


# --- the unit of work -----------------------------------------------------------------------------------------


def _job_creating_app(tmp_path, sqlite_url, default_roots, queue):
    """An app with a route shaped like the index routes: create a job, enqueue it after the commit."""
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots), queue=queue)
    seen_at_enqueue: list[bool] = []
    factory = built.session_factory

    class CommittedCheck:
        def enqueue(self, job):
            with factory() as other:  # another connection sees the row only once it is committed
                seen_at_enqueue.append(other.get(Job, job.id) is not None)
            queue.enqueue(job)

    built.app.state.job_queue = CommittedCheck()

    def create(session: SessionDep, job_queue: JobQueueDep) -> dict:
        job = jobs.create_job(session, "test", tenant_id=built.tenant_id)
        jobs.enqueue_after_commit(session, job_queue, job)
        return {"id": job.id}

    built.app.add_api_route("/test/jobs", create, methods=["POST"], status_code=201)
    return built, seen_at_enqueue


def test_jobs_are_enqueued_after_the_request_commits(tmp_path, sqlite_url, default_roots):
    queue = RecordingQueue()
    built, seen = _job_creating_app(tmp_path, sqlite_url, default_roots, queue)
    response = built.client.post("/test/jobs")
    assert response.status_code == 201
    assert queue.enqueued == [response.json()["id"]] and seen == [True]


def test_a_broker_failure_is_503_and_the_job_says_why(tmp_path, sqlite_url, default_roots):
    built, _ = _job_creating_app(tmp_path, sqlite_url, default_roots, RecordingQueue(fail=True))
    assert_problem(built.client.post("/test/jobs"), 503, "could not be queued")
    listed = built.client.get("/v1/jobs").json()["items"]
    assert [(j["status"], "broker unreachable" in j["error"]) for j in listed] == [("failed", True)]


def test_no_job_queue_is_503(tmp_path, sqlite_url, default_roots):
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots))
    built.app.state.job_queue = None

    def needs_queue(job_queue: JobQueueDep) -> dict:
        return {}

    built.app.add_api_route("/test/queue", needs_queue)
    assert_problem(built.client.get("/test/queue"), 503, "no job queue")


# --- OpenAPI and settings -------------------------------------------------------------------------------------


def test_openapi_documents_the_routes_and_the_upload_form(api):
    assert api.client.get("/docs").status_code == 200
    spec = api.client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/models/{model_id}/layers",
        "/v1/datasets",
        "/v1/datasets/{dataset_id}",
        "/v1/datasets/{dataset_id}/rows",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
        "/healthz",
        "/readyz",
    ):
        assert path in paths, path
    upload = paths["/v1/datasets"]["post"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = spec["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]] if "$ref" in form else form
    assert {
        "file",
        "path",
        "format",
        "task",
        "text_column",
        "text_pair_column",
        "label_column",
        "noisy_column",
    } <= set(form["properties"])
    assert "413" in upload["responses"]
    assert form == spec["components"]["schemas"]["DatasetRegistrationForm"]
    for operations in paths.values():
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert response["content"] == {
                        PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}
                    }


def test_env_example_documents_every_setting():
    text = (ROOT / ".env.example").read_text()
    for name in Settings.model_fields:
        variable = f"INFLUENCE_{name.upper()}"
        match = re.search(rf"^# (.+)\n#? ?{variable}=", text, flags=re.MULTILINE)
        assert match, f"{variable} is missing from .env.example or has no comment line above it"
    # What the file states are the real defaults.
    assert Settings(_env_file=ROOT / ".env.example") == Settings(_env_file=None)
