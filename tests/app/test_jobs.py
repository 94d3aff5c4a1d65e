"""Jobs: the life cycle helpers workers use, the GET / cancel routes, and enqueueing only after commit."""

from __future__ import annotations

from datetime import datetime

import pytest

from app.db import session_scope
from app.errors import NotFound, Unavailable
from app.jobs import state as jobs
from app.models import Job
from tests.app.conftest import RecordingQueue
from tests.app.test_datasets import assert_problem


def new_job(api, **kwargs) -> str:
    with session_scope(api.session_factory) as session:
        return jobs.create_job(session, kwargs.pop("kind", "build-index"), tenant_id=api.tenant_id, **kwargs).id


def step(api, helper, *args, **kwargs):
    with session_scope(api.session_factory) as session:
        return helper(session, *args, **kwargs)


def test_a_job_from_queued_to_succeeded(any_api):
    job_id = new_job(any_api, target_id="idx1", params={"layers": "all"}, total=10)
    body = any_api.client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "queued" and body["done"] == 0 and body["total"] == 10
    assert body["progress"] == 0.0 and body["started_at"] is None and body["duration_s"] is None
    assert body["params"] == {"layers": "all"} and body["target_id"] == "idx1"
    assert datetime.fromisoformat(body["created_at"]).utcoffset().total_seconds() == 0

    claimed = step(any_api, jobs.mark_running, job_id)
    assert claimed is not None and claimed.status == "running" and claimed.attempts == 1
    assert step(any_api, jobs.update_progress, job_id, 4) is False
    body = any_api.client.get(f"/v1/jobs/{job_id}").json()
    assert (body["status"], body["done"], body["progress"]) == ("running", 4, 0.4)
    assert body["duration_s"] is not None and body["finished_at"] is None

    assert step(any_api, jobs.mark_succeeded, job_id, {"rows": 10}) is True
    body = any_api.client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "succeeded" and body["done"] == 10 and body["result"] == {"rows": 10}
    started, finished = (datetime.fromisoformat(body[k]) for k in ("started_at", "finished_at"))
    assert body["duration_s"] == pytest.approx((finished - started).total_seconds(), abs=1e-3)
    # A finished job cannot be claimed, failed or cancelled again.
    assert step(any_api, jobs.mark_running, job_id) is None
    assert step(any_api, jobs.mark_failed, job_id, "late") is False
    assert_problem(any_api.client.post(f"/v1/jobs/{job_id}/cancel"), 409, "already finished (succeeded)")


def test_failure_is_recorded_with_its_message(any_api):
    job_id = new_job(any_api)
    step(any_api, jobs.mark_running, job_id)
    assert step(any_api, jobs.mark_failed, job_id, "x" * 10_000) is True
    body = any_api.client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "failed" and len(body["error"]) == jobs.MAX_ERROR_CHARS
    assert body["finished_at"] is not None


def test_cancel_a_queued_job_at_once(any_api):
    job_id = new_job(any_api)
    response = any_api.client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"] is not None
    # The worker that picks it up later skips it.
    assert step(any_api, jobs.mark_running, job_id) is None
    assert_problem(any_api.client.post(f"/v1/jobs/{job_id}/cancel"), 409, "already finished (cancelled)")


def test_cancel_a_running_job_asks_its_worker(any_api):
    job_id = new_job(any_api, total=3)
    step(any_api, jobs.mark_running, job_id)
    body = any_api.client.post(f"/v1/jobs/{job_id}/cancel").json()
    assert body["status"] == "running" and body["cancel_requested"] is True
    again = any_api.client.post(f"/v1/jobs/{job_id}/cancel")  # asking twice is harmless
    assert again.status_code == 200 and again.json()["cancel_requested"] is True
    assert step(any_api, jobs.update_progress, job_id, 1) is True  # the worker learns it here
    assert step(any_api, jobs.mark_cancelled, job_id) is True
    body = any_api.client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "cancelled" and body["done"] == 1


def test_redelivered_running_job_is_claimed_again(api):
    job_id = new_job(api)
    first = step(api, jobs.mark_running, job_id)
    again = step(api, jobs.mark_running, job_id)
    assert again is not None and again.attempts == 2
    assert again.started_at == first.started_at


def test_list_and_filter_jobs(api):
    ids = [new_job(api, kind="build-index", target_id="a"), new_job(api, kind="audit", target_id="b")]
    step(api, jobs.mark_running, ids[1])
    assert api.client.get("/v1/jobs").json()["total"] == 2
    assert [j["id"] for j in api.client.get("/v1/jobs", params={"status": "running"}).json()["items"]] == [
        ids[1]
    ]
    assert [j["id"] for j in api.client.get("/v1/jobs", params={"kind": "build-index"}).json()["items"]] == [
        ids[0]
    ]
    assert api.client.get("/v1/jobs", params={"target_id": "b"}).json()["total"] == 1
    assert_problem(api.client.get("/v1/jobs", params={"status": "paused"}), 422, "status")


def test_unknown_job_ids(any_api):
    assert_problem(any_api.client.get("/v1/jobs/nope"), 404, "'nope'")
    assert_problem(any_api.client.post("/v1/jobs/nope/cancel"), 404, "'nope'")
    with pytest.raises(NotFound):
        step(any_api, jobs.mark_running, "nope")


def test_enqueued_only_after_commit(any_api):
    queue = RecordingQueue()
    with session_scope(any_api.session_factory) as session:
        job = jobs.create_job(session, "build-index", tenant_id=any_api.tenant_id)
        jobs.enqueue_after_commit(session, queue, job)
        assert queue.enqueued == []  # not before the commit
    assert queue.enqueued == [job.id]

    with pytest.raises(RuntimeError), session_scope(any_api.session_factory) as session:
        doomed = jobs.create_job(session, "build-index", tenant_id=any_api.tenant_id)
        jobs.enqueue_after_commit(session, queue, doomed)
        raise RuntimeError("the request failed")
    assert queue.enqueued == [job.id]  # the rolled-back job never reached the queue
    with any_api.session_factory() as session:
        assert session.get(Job, doomed.id) is None


def test_a_job_the_broker_refuses_is_marked_failed(any_api):
    with pytest.raises(Unavailable, match="marked failed"), session_scope(any_api.session_factory) as session:
        job = jobs.create_job(session, "build-index", tenant_id=any_api.tenant_id)
        jobs.enqueue_after_commit(session, RecordingQueue(fail=True), job)
    body = any_api.client.get(f"/v1/jobs/{job.id}").json()
    assert body["status"] == "failed" and "could not enqueue" in body["error"]


@pytest.fixture
def finish_calls():
    """A finish hook for the kind `hooked`, removed again afterwards (the registry is process-wide)."""
    calls: list[tuple[str, str]] = []

    def hook(session, job):
        calls.append((job.id, job.status))

    jobs.register_finish_hook("hooked", hook)
    jobs.register_finish_hook("hooked", hook)  # once only
    yield calls
    jobs._FINISH_HOOKS.pop("hooked", None)


def test_finish_hooks_see_every_final_state(any_api, finish_calls):
    cancelled = new_job(any_api, kind="hooked")
    any_api.client.post(f"/v1/jobs/{cancelled}/cancel")

    succeeded = new_job(any_api, kind="hooked")
    step(any_api, jobs.mark_running, succeeded)
    step(any_api, jobs.mark_succeeded, succeeded)
    step(any_api, jobs.mark_failed, succeeded, "too late")  # no transition, no call

    with pytest.raises(Unavailable), session_scope(any_api.session_factory) as session:
        refused = jobs.create_job(session, "hooked", tenant_id=any_api.tenant_id)
        jobs.enqueue_after_commit(session, RecordingQueue(fail=True), refused)

    other = new_job(any_api, kind="build-index")
    any_api.client.post(f"/v1/jobs/{other}/cancel")
    assert finish_calls == [(cancelled, "cancelled"), (succeeded, "succeeded"), (refused.id, "failed")]
