"""Workflow jobs under races and failures: a second delivery of a running job changes nothing, a job cannot be
deleted while a process works on it, a failed append leaves the dataset as it was (a resubmission lands once),
and a reader keeps the version of a dataset's rows it started with while later appends go on."""

from __future__ import annotations

import json
import threading

import pytest

from app.jobs.model_cache import ModelCache
from app.jobs.steps import run_job_inline
from tests.app.conftest import TWO_REVIEWS, fresh_api
from tests.worker.support import assert_problem, built_index, tsv

MODELS = ModelCache()
ROWS = 60
LAYERS = ["embed", "block.1.attn.v", "head"]


@pytest.fixture
def grow(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """A fresh API with one ready tiny-BERT index over 60 SST-2 rows (appends change it: one per test)."""
    api = fresh_api(tmp_path_factory, sqlite_template, "races")
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    _, dataset, index = built_index(
        api, folder, sst2_rows[:ROWS], models=MODELS, dataset_name="grow", chunk_size=30, layers=LAYERS
    )
    yield api, dataset, index, sst2_rows
    api.close()


def _submit(api, index_id, rows):
    data = {
        "text_column": "sentence",
        "label_column": "label",
        "reference": json.dumps(TWO_REVIEWS),
        "append": "true",
        "max_flagged": "1000",
    }
    response = api.client.post(f"/v1/indexes/{index_id}/checks", files={"file": ("b.tsv", tsv(rows))}, data=data)
    assert response.status_code == 202, response.text
    return response.json()


def _sizes(api, dataset, index) -> tuple[int, int]:
    rows = api.client.get(f"/v1/datasets/{dataset['id']}").json()["row_count"]
    return rows, api.client.get(f"/v1/indexes/{index['id']}").json()["num_rows"]


def test_a_second_delivery_of_a_running_job_changes_nothing(grow, monkeypatch):
    from app.services import appends

    api, dataset, index, rows = grow
    check = _submit(api, index["id"], rows[200:205])
    entered, release = threading.Event(), threading.Event()
    real = appends.append_rows

    def slow_append(*args, **kwargs):
        entered.set()
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(appends, "append_rows", slow_append)
    errors: list[BaseException] = []

    def owner() -> None:
        try:
            run_job_inline(api.settings, api.session_factory, check["id"], models=MODELS)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        assert entered.wait(120)
        # The append has started; the user asks to cancel, and a duplicate delivery arrives meanwhile.
        assert api.client.post(f"/v1/jobs/{check['id']}/cancel").status_code == 200
        run_job_inline(api.settings, api.session_factory, check["id"], models=MODELS)
        assert api.client.get(f"/v1/checks/{check['id']}").json()["status"] == "running"
        assert_problem(api.client.delete(f"/v1/checks/{check['id']}"), 409)
    finally:
        release.set()
        thread.join(120)
    assert not errors
    finished = api.client.get(f"/v1/checks/{check['id']}").json()
    # An append that started completes (cancellation stops a check only before its append).
    assert finished["status"] == "succeeded" and finished["append"]["status"] == "appended"
    assert _sizes(api, dataset, index) == (ROWS + 5, ROWS + 5)
    assert api.client.delete(f"/v1/checks/{check['id']}").status_code == 204


def test_a_failed_append_leaves_the_dataset_as_it_was(grow, monkeypatch):
    from app.services import appends

    api, dataset, index, rows = grow
    check = _submit(api, index["id"], rows[200:205])
    real = appends.grow_store

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(appends, "grow_store", full_disk)
    with pytest.raises(OSError):
        run_job_inline(api.settings, api.session_factory, check["id"], models=MODELS)
    monkeypatch.setattr(appends, "grow_store", real)
    assert api.client.get(f"/v1/checks/{check['id']}").json()["status"] == "failed"
    assert _sizes(api, dataset, index) == (ROWS, ROWS)
    # The same batch, checked again, lands once.
    again = _submit(api, index["id"], rows[200:205])
    run_job_inline(api.settings, api.session_factory, again["id"], models=MODELS)
    assert _sizes(api, dataset, index) == (ROWS + 5, ROWS + 5)
    texts = [r["text"] for r in api.client.get(f"/v1/datasets/{dataset['id']}/rows?offset=60").json()["items"]]
    assert texts == [text for text, _ in rows[200:205]]


def test_a_reader_keeps_its_version_of_the_rows_while_appends_go_on(grow):
    from app.db import session_scope
    from app.workflows.audit import service as audits

    api, _, index, rows = grow
    first = _submit(api, index["id"], rows[190:193])  # the dataset is on an appended version from here
    run_job_inline(api.settings, api.session_factory, first["id"], models=MODELS)
    audit = api.client.post(f"/v1/indexes/{index['id']}/audits", json={"reference": TWO_REVIEWS, "layers": "head"})
    run_job_inline(api.settings, api.session_factory, audit.json()["id"], models=MODELS)
    with session_scope(api.session_factory) as session:
        ranked = audits.open_ranking(session, api.settings, audit.json()["id"], api.tenant_id)  # a download starts
    head = list(ranked.records(0, 2))
    for start in (200, 210):
        check = _submit(api, index["id"], rows[start : start + 3])
        run_job_inline(api.settings, api.session_factory, check["id"], models=MODELS)
        assert api.client.get(f"/v1/checks/{check['id']}").json()["append"]["status"] == "appended"
    rest = list(ranked.records(2, 20))  # the download goes on over the version it started with
    assert len(head) + len(rest) == 20 and all(r["text"] for r in head + rest)

