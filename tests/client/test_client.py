"""InfluenceClient against the real app: models, datasets (upload from a path, bytes or a file object, or a
server path), an index built while wait_for_job follows it, queries equal to the raw HTTP answer, row deletion
and compaction, jobs (list, cancel, time-outs), and every error answer as InfluenceAPIError."""

from __future__ import annotations

import io
import threading

import httpx
import pytest

from app.jobs.steps import run_build_inline, run_job_inline
from influence.version import __version__ as service_version
from influence_client import InfluenceAPIError, InfluenceClient
from tests.client import client_for, start_api
from tests.worker.support import tsv

EXAMPLES = [
    {"text": "it 's a charming and often affecting journey . ", "label": 1},
    {"text": "unflinchingly bleak and desperate ", "label": 0},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, sst2_train):
    """The app (jobs recorded, run by the tests), a client, a tiny BERT, 40 SST-2 rows and an index over the
    middle layers, built while wait_for_job follows it."""
    api = start_api(tmp_path_factory.mktemp("client"))
    rows = [(e.text, e.label) for e in sst2_train[:40]]
    with client_for(api) as client:
        folder = tiny_model_dir("bert", "classification", num_labels=2)
        model = client.register_model(str(folder), name="tiny-bert", num_labels=2)
        dataset = client.upload_dataset(
            tsv(rows, noisy=[i % 5 == 0 for i in range(40)]),
            filename="sst2.tsv",
            name="sst2-40",
            text_column="sentence",
            noisy_column="noisy",
        )
        index = client.create_index(model["id"], dataset["id"], layers="middle", chunk_size=10)
        seen = []
        builder = threading.Thread(
            target=run_build_inline, args=(api.settings, api.session_factory, index["job"]["id"])
        )
        builder.start()
        try:
            job = client.wait_for_job(index["job"]["id"], poll=0.02, timeout=120, on_progress=seen.append)
        finally:
            builder.join()
        yield api, client, model, dataset, client.get_index(index["id"]), job, seen
    api.close()


def test_health_and_readiness(served):
    _, client, *_ = served
    assert client.health() == {"status": "ok", "version": service_version}
    ready = client.ready()
    assert ready["status"] == "ready" and ready["checks"]["database"]["ok"] is True


def test_models_read_back_with_their_layers(served):
    _, client, model, *_ = served
    assert model["name"] == "tiny-bert" and model["task"] == "classification" and model["num_labels"] == 2
    assert client.get_model(model["id"]) == model
    page = client.list_models()
    assert page["total"] == 1 and page["items"] == [model] and page["limit"] == 50
    layers = client.model_layers(model["id"])
    names = [layer["name"] for layer in layers["layers"]]
    assert layers["model_id"] == model["id"] and len(names) == model["num_layers"]
    assert "head" in names and "middle" in layers["groups"]


def test_datasets_from_a_path_bytes_a_file_object_and_a_server_path(served, tmp_path, sst2_train):
    _, client, _, first, *_ = served
    assert first["row_count"] == 40 and first["has_noisy_flag"] and first["columns"]["text"] == "sentence"
    rows = [(e.text, e.label) for e in sst2_train[100:110]]
    path = tmp_path / "ten.tsv"
    path.write_bytes(tsv(rows))
    from_path = client.upload_dataset(path, text_column="sentence")
    assert (from_path["name"], from_path["format"], from_path["row_count"]) == ("ten", "tsv", 10)
    from_bytes = client.upload_dataset(tsv(rows), format="tsv", name="bytes", text_column="sentence")
    from_handle = client.upload_dataset(io.BytesIO(tsv(rows)), filename="h.tsv", text_column="sentence")
    on_server = client.register_dataset_path(str(path), name="server", text_column="sentence")
    assert on_server["source"] == str(path)
    hashes = {d["content_hash"] for d in (from_path, from_bytes, from_handle, on_server)}
    assert hashes == {from_path["content_hash"]}
    page = client.dataset_rows(from_path["id"], offset=8, limit=5)
    assert page["total"] == 10 and [r["row"] for r in page["items"]] == [8, 9]
    assert page["items"][0]["text"] == rows[8][0] and page["items"][0]["label"] == rows[8][1]
    assert client.get_dataset(on_server["id"]) == on_server
    listed = client.list_datasets(limit=2)
    assert listed["total"] == 5 and len(listed["items"]) == 2
    for dataset in (from_path, from_bytes, from_handle, on_server):
        client.delete_dataset(dataset["id"])
    with pytest.raises(InfluenceAPIError) as caught:
        client.get_dataset(from_path["id"])
    assert caught.value.status == 404


def test_wait_for_job_follows_the_build_to_its_end(served):
    _, client, model, _, index, job, seen = served
    assert job["status"] == "succeeded" and job["kind"] == "index_build" and job["done"] == job["total"] == 4
    assert seen[-1] == job and all(s["id"] == job["id"] for s in seen)
    assert [s["done"] for s in seen] == sorted(s["done"] for s in seen)  # progress never goes back
    assert index["status"] == "ready" and index["num_rows"] == 40 and index["layer_selector"] == "middle"
    assert client.list_indexes(model_id=model["id"], status="ready")["items"] == [index]
    assert client.list_indexes(dataset_id="nope")["total"] == 0


def test_query_returns_what_the_http_api_answers(served):
    api, client, _, _, index, *_ = served
    answer = client.query(index["id"], EXAMPLES, top_k=3, direction="harmful", aggregation="mean")
    raw = api.client.post(
        f"/v1/indexes/{index['id']}/query",
        json={"examples": EXAMPLES, "top_k": 3, "direction": "harmful", "aggregation": "mean"},
    ).json()
    answer.pop("seconds"), raw.pop("seconds")
    assert answer == raw
    assert answer["num_rows"] == 40 and answer["layers"] == index["layers"]
    for result in answer["results"]:
        assert result["helpful"] is None and len(result["harmful"]) == 3
        scores = [hit["score"] for hit in result["harmful"]]
        assert scores == sorted(scores)
    both = client.query(index["id"], EXAMPLES[:1], layers=index["layers"][:1], approximate=True, top_k=2)
    assert both["approximate"] is True and both["layers"] == index["layers"][:1]
    assert len(both["results"][0]["helpful"]) == len(both["results"][0]["harmful"]) == 2


def test_row_deletion_and_compaction(served):
    api, client, _, _, index, *_ = served
    deleted = client.delete_rows(index["id"], [3, 7])
    assert deleted == {
        "index_id": index["id"],
        "deleted": 2,
        "already_deleted": 0,
        "num_rows": 38,
        "deleted_rows": 2,
    }
    assert client.delete_rows(index["id"], [3])["already_deleted"] == 1
    answer = client.query(index["id"], EXAMPLES[:1], top_k=40)
    rows = {hit["row"] for hit in answer["results"][0]["helpful"]}
    assert answer["num_rows"] == 38 and not rows & {3, 7}
    job = client.compact(index["id"])
    assert job["kind"] == "index_compact" and job["status"] == "queued"
    run_job_inline(api.settings, api.session_factory, job["id"])
    assert client.wait_for_job(job["id"], timeout=10)["status"] == "succeeded"
    after = client.get_index(index["id"])
    assert (after["num_rows"], after["deleted_rows"]) == (38, 0)


def test_jobs_list_cancel_and_time_out(served):
    _, client, model, dataset, index, build, _ = served
    queued = client.create_index(model["id"], dataset["id"], layers="head")
    job_id = queued["job"]["id"]
    with pytest.raises(TimeoutError, match=job_id):
        client.wait_for_job(job_id, poll=0.05, timeout=0.2)
    assert client.list_jobs(status="queued")["items"][0]["id"] == job_id
    cancelled = client.cancel_job(job_id)
    assert cancelled["status"] == "cancelled"
    assert client.wait_for_job(job_id) == client.get_job(job_id)
    kinds = client.list_jobs(kind="index_build", target_id=index["id"])
    assert [j["id"] for j in kinds["items"]] == [build["id"]]
    with pytest.raises(InfluenceAPIError) as caught:
        client.cancel_job(job_id)
    assert caught.value.status == 409 and "cancelled" in caught.value.detail
    client.delete_index(queued["id"])
    with pytest.raises(InfluenceAPIError) as caught:
        client.get_index(queued["id"])
    assert caught.value.status == 404


def test_error_answers_are_influence_api_errors(served, tmp_path):
    api, client, model, _, index, *_ = served
    with pytest.raises(InfluenceAPIError) as caught:
        client.get_model("nope")
    error = caught.value
    assert (error.status, error.title, error.type) == (404, "Not found", "urn:influence:problem:not-found")
    assert "nope" in error.detail and error.body["instance"] == "/v1/models/nope"
    assert str(error).startswith("404 Not found: ")
    # Request validation: the problem lists where.
    with pytest.raises(InfluenceAPIError) as caught:
        client.register_model("/x", name="bad", num_labels=0)
    assert caught.value.status == 422 and caught.value.type.endswith("invalid-request")
    assert [e["loc"] for e in caught.value.errors] == [["body", "num_labels"]]
    # The service's own checks: a path outside the allowed roots, a layer the index does not hold, a bad file.
    with pytest.raises(InfluenceAPIError) as caught:
        client.register_model("/etc", name="outside")
    assert caught.value.status == 403
    with pytest.raises(InfluenceAPIError) as caught:
        client.query(index["id"], EXAMPLES, layers="embed")
    assert caught.value.status == 422 and caught.value.errors == []
    with pytest.raises(InfluenceAPIError) as caught:
        client.upload_dataset(b"sentence\tlabel\nfine\t1\n", filename="x.tsv", text_column="text")
    assert caught.value.status == 422 and "text" in caught.value.detail
    # No key, a wrong key: 401.
    for token in ("", "not-a-key"):
        with client_for(api, token) as anonymous, pytest.raises(InfluenceAPIError) as caught:
            anonymous.list_models()
        assert caught.value.status == 401
    # Another tenant sees nothing of this one.
    other = api.other_client()
    with client_for(api, other.token) as stranger, pytest.raises(InfluenceAPIError) as caught:
        stranger.get_model(model["id"])
    assert caught.value.status == 404


def test_an_error_answer_that_is_not_problem_json():
    request = httpx.Request("GET", "http://proxy/v1/models")
    response = httpx.Response(502, text="<html>bad gateway</html>", request=request)
    error = InfluenceAPIError.from_response(response)
    assert (error.status, error.title, error.detail, error.body) == (
        502,
        "Bad Gateway",
        "<html>bad gateway</html>",
        {},
    )


def test_url_and_key_come_from_the_environment(served, monkeypatch):
    api, *_ = served
    from tests.client import AppTransport

    monkeypatch.setenv("INFLUENCE_URL", "http://testserver/")
    monkeypatch.setenv("INFLUENCE_API_KEY", api.token)
    with InfluenceClient(transport=AppTransport(api.app)) as client:
        assert client.base_url == "http://testserver"
        assert client.list_models()["total"] == 1
    monkeypatch.delenv("INFLUENCE_URL")
    with InfluenceClient(api_key="x") as client:
        assert client.base_url == "http://127.0.0.1:8000"
