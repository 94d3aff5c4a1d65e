"""Deletion over HTTP: datasets (409 while an index uses them), indexes (their job ends, their artifacts go),
rows of an index (tombstones: out of every exact and approximate answer at once) and compaction (the rows gone
from disk, statistics refitted, FAISS rebuilt; a failed compaction is retried)."""

from __future__ import annotations

import numpy as np
import pytest

from app.jobs import index_build
from app.jobs.context import WorkerContext
from app.jobs.dispatch import InlineDispatcher
from app.jobs.model_cache import ModelCache
from app.jobs.steps import run_build_inline, run_job_inline
from tests.worker.support import assert_problem, register_dataset, register_model

ROWS = 60
EXAMPLES = [
    {"text": "it 's a charming and often affecting journey . ", "label": 1},
    {"text": "unflinchingly bleak and desperate ", "label": 0},
]


@pytest.fixture
def built(api, tiny_model_dir, sst2_rows):
    """A ready index (tiny BERT, middle + head layers, float32, flat FAISS) over 60 SST-2 rows."""
    model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
    dataset = register_dataset(api.client, sst2_rows[:ROWS])
    body = {
        "model_id": model["id"],
        "dataset_id": dataset["id"],
        "layers": ["block.1.attn.v", "block.1.mlp.down", "head"],
        "chunk_size": 25,
        "dtype": "float32",
    }
    index = api.client.post("/v1/indexes", json=body).json()
    models = ModelCache()
    run_build_inline(api.settings, api.session_factory, index["job"]["id"], models)
    api.models = models
    return api, model, dataset, index


def _query(client, index_id, **body):
    response = client.post(f"/v1/indexes/{index_id}/query", json={"examples": EXAMPLES, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _rows_in(answer) -> set[int]:
    return {hit["row"] for result in answer["results"] for key in ("helpful", "harmful") for hit in result[key] or []}


def _store(api, index):
    from influence import FeatureStore

    return FeatureStore.open(api.settings.resolved_artifacts_dir / f"indexes/{index['id']}/store")


def test_delete_a_dataset_only_once_no_index_uses_it(built):
    api, _, dataset, index = built
    client = api.client
    folder = api.settings.resolved_artifacts_dir / "datasets" / dataset["id"]
    assert folder.is_dir()
    body = assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 409, "used by index", index["id"])
    assert body["indexes"] == [index["id"]]
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 200 and folder.is_dir()

    assert client.delete(f"/v1/indexes/{index['id']}").status_code == 204
    response = client.delete(f"/v1/datasets/{dataset['id']}")
    assert response.status_code == 204 and response.content == b""
    assert not folder.exists()
    assert_problem(client.get(f"/v1/datasets/{dataset['id']}"), 404)
    assert_problem(client.get(f"/v1/datasets/{dataset['id']}/rows"), 404)
    assert_problem(client.delete(f"/v1/datasets/{dataset['id']}"), 404)


def test_delete_an_index_removes_its_artifacts_and_ends_its_job(built, sst2_rows):
    api, model, dataset, index = built
    client = api.client
    folder = api.settings.resolved_artifacts_dir / "indexes" / index["id"]
    assert (folder / "store" / "segments.json").is_file()
    assert _query(client, index["id"])["num_rows"] == ROWS  # cached in this API process
    assert client.delete(f"/v1/indexes/{index['id']}").status_code == 204
    assert not folder.exists()
    for response in (
        client.get(f"/v1/indexes/{index['id']}"),
        client.post(f"/v1/indexes/{index['id']}/query", json={"examples": EXAMPLES}),
        client.delete(f"/v1/indexes/{index['id']}"),
        client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": [1]}),
        client.post(f"/v1/indexes/{index['id']}/compact"),
    ):
        assert_problem(response, 404)
    assert client.get("/v1/indexes").json()["total"] == 0
    # The finished build job stays as history.
    assert client.get(f"/v1/jobs/{index['job']['id']}").json()["status"] == "succeeded"

    # A build in progress: its job ends as cancelled, and the worker's next step cleans up after itself.
    running = client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "head", "chunk_size": 20}
    ).json()
    ctx = WorkerContext(api.settings, api.session_factory, api.models, InlineDispatcher())
    assert index_build.plan_build(ctx, running["job"]["id"]) == "planned"
    assert index_build.build_chunk(ctx, running["job"]["id"], 0) == "written"
    assert client.delete(f"/v1/indexes/{running['id']}").status_code == 204
    job = client.get(f"/v1/jobs/{running['job']['id']}").json()
    assert job["status"] == "cancelled" and job["error"] == "its index was deleted"
    assert index_build.build_chunk(ctx, running["job"]["id"], 1) == "skipped"
    assert not (api.settings.resolved_artifacts_dir / "indexes" / running["id"]).exists()
    # A queued build whose index is deleted never starts.
    queued = client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "head"}
    ).json()
    assert client.delete(f"/v1/indexes/{queued['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{queued['job']['id']}").json()["status"] == "cancelled"
    assert index_build.plan_build(ctx, queued["job"]["id"]) == "skipped"
    assert not (api.settings.resolved_artifacts_dir / "indexes" / queued["id"]).exists()


def test_deleted_rows_leave_every_answer_at_once(built):
    api, _, _, index = built
    client = api.client
    before = _query(client, index["id"], top_k=3, aggregation="mean")
    victims = sorted(_rows_in(before))
    assert len(victims) >= 3
    response = client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": [*victims, victims[0]]})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "index_id": index["id"],
        "deleted": len(victims),
        "already_deleted": 0,
        "num_rows": ROWS - len(victims),
        "deleted_rows": len(victims),
    }
    again = client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": victims[:1]}).json()
    assert again["deleted"] == 0 and again["already_deleted"] == 1
    shown = client.get(f"/v1/indexes/{index['id']}").json()
    assert shown["num_rows"] == ROWS - len(victims) and shown["deleted_rows"] == len(victims)

    live = ROWS - len(victims)
    for options in (
        {"aggregation": "mean"},
        {"aggregation": "rank", "estimator": "cosine"},
        {"aggregation": "vote", "estimator": "datainf"},
        {"approximate": True, "candidates_per_layer": 5},
    ):
        answer = _query(client, index["id"], top_k=ROWS, **options)
        assert answer["num_rows"] == live
        assert not _rows_in(answer) & set(victims), options
        for result in answer["results"]:
            if not options.get("approximate"):
                # Every live row is ranked, and only those: ranks run over the live rows.
                assert result["candidates"] == live and len(result["helpful"]) == live
                assert max(layer["rank"] for hit in result["helpful"] for layer in hit["layers"]) <= live - 1
    # Per-row scores do not depend on the other rows: the survivors keep theirs (grad-dot, mean).
    after = _query(client, index["id"], top_k=ROWS, aggregation="mean")
    scores = {hit["row"]: hit["score"] for hit in after["results"][0]["helpful"]}
    for hit in before["results"][0]["helpful"] + before["results"][0]["harmful"]:
        assert hit["row"] in victims or scores[hit["row"]] == hit["score"]
    # Exact and approximate (every live row a candidate, flat FAISS) agree with the rows deleted.
    exact = _query(client, index["id"], top_k=4)
    approximate = _query(client, index["id"], top_k=4, approximate=True, candidates_per_layer=ROWS)
    for a, b in zip(exact["results"], approximate["results"], strict=True):
        assert b["candidates"] == live
        assert [h["row"] for h in a["helpful"]] == [h["row"] for h in b["helpful"]]
        assert [h["row"] for h in a["harmful"]] == [h["row"] for h in b["harmful"]]


def test_row_deletion_refuses_bad_requests(built, sst2_rows):
    api, model, dataset, index = built
    client = api.client
    url = f"/v1/indexes/{index['id']}/rows/delete"
    assert_problem(client.post(url, json={"row_ids": [ROWS]}), 422, "not rows of index")
    assert_problem(client.post(url, json={"row_ids": [-1]}), 422)
    assert_problem(client.post(url, json={"row_ids": []}), 422)
    assert_problem(client.post(url, json={"row_ids": ["a"]}), 422)
    assert_problem(client.post(url, json={"rows": [1]}), 422)
    assert_problem(client.post(url, json={"row_ids": list(range(ROWS))}), 422, "without rows")
    assert_problem(client.post("/v1/indexes/nope/rows/delete", json={"row_ids": [1]}), 404)
    pending = client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "head"}
    ).json()
    assert_problem(client.post(f"/v1/indexes/{pending['id']}/rows/delete", json={"row_ids": [1]}), 409, "not ready")
    assert_problem(client.post(f"/v1/indexes/{pending['id']}/compact"), 409, "not ready")
    assert client.get(f"/v1/indexes/{index['id']}").json()["deleted_rows"] == 0


def test_compaction_removes_deleted_rows_for_good(built):
    api, _, _, index = built
    client = api.client
    victims = [0, 7, 31, 59]
    client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": victims})
    features_before = {name: np.array(_store(api, index).layer(name)) for name in index["layers"]}
    answers = {
        e: _query(client, index["id"], top_k=5, estimator=e, aggregation="mean") for e in ("grad-dot", "cosine")
    }

    response = client.post(f"/v1/indexes/{index['id']}/compact")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "index_compact" and job["status"] == "queued" and job["target_id"] == index["id"]
    assert api.queue.enqueued[-1] == job["id"]
    assert_problem(client.post(f"/v1/indexes/{index['id']}/compact"), 409, "already being compacted", job["id"])
    run_job_inline(api.settings, api.session_factory, job["id"], api.models)

    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    assert done["result"]["rows_removed"] == 4 and done["result"]["faiss_rebuilt"] == len(index["layers"])
    shown = client.get(f"/v1/indexes/{index['id']}").json()
    assert shown["num_rows"] == ROWS - 4 and shown["deleted_rows"] == 0 and shown["status"] == "ready"
    store = _store(api, index)
    keep = np.setdiff1d(np.arange(ROWS), victims)
    assert store.num_rows == ROWS - 4 and np.array_equal(store.row_ids(), keep)
    for name, features in features_before.items():
        assert np.array_equal(store.layer(name), features[keep])  # the deleted rows' features are gone
        assert store.has_layer_statistics(name)  # refitted over the rows that remain
    # Gradient-only estimators answer as before the compaction (the rows were already excluded); scores may
    # differ in the last bits only (the matrix products run over a matrix of another shape).
    for estimator, answer in answers.items():
        again = _query(client, index["id"], top_k=5, estimator=estimator, aggregation="mean")
        for a, b in zip(answer["results"], again["results"], strict=True):
            assert a["candidates"] == b["candidates"] == ROWS - 4
            for key in ("helpful", "harmful"):
                assert [h["row"] for h in a[key]] == [h["row"] for h in b[key]]
                assert [h["score"] for h in a[key]] == pytest.approx([h["score"] for h in b[key]], rel=1e-5)
    approximate = _query(
        client, index["id"], top_k=5, approximate=True, candidates_per_layer=ROWS, aggregation="mean"
    )
    assert [h["row"] for h in approximate["results"][0]["helpful"]] == [
        h["row"] for h in answers["grad-dot"]["results"][0]["helpful"]
    ]
    _query(client, index["id"], estimator="datainf")


def test_a_failed_compaction_is_retried_and_finishes(built, monkeypatch):
    api, _, _, index = built
    client = api.client
    client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": [3, 4]})
    job = client.post(f"/v1/indexes/{index['id']}/compact").json()

    def crash(store):
        raise OSError("disk full")

    # Dies after the store was rewritten, before statistics and FAISS were redone.
    monkeypatch.setattr(index_build, "fit_store_statistics", crash)
    with pytest.raises(OSError):
        run_job_inline(api.settings, api.session_factory, job["id"], api.models)
    monkeypatch.undo()
    failed = client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and "disk full" in failed["error"]
    # The index keeps answering in the meantime: exact queries (statistics-free estimators) work; DataInf and
    # approximate queries say what is missing instead of serving stale state.
    assert _query(client, index["id"])["num_rows"] == ROWS - 2
    assert_problem(
        client.post(f"/v1/indexes/{index['id']}/query", json={"examples": EXAMPLES, "estimator": "datainf"}), 409
    )
    assert_problem(
        client.post(f"/v1/indexes/{index['id']}/query", json={"examples": EXAMPLES, "approximate": True}),
        409,
        "compact",
    )
    retry = client.post(f"/v1/indexes/{index['id']}/compact").json()
    run_job_inline(api.settings, api.session_factory, retry["id"], api.models)
    assert client.get(f"/v1/jobs/{retry['id']}").json()["status"] == "succeeded"
    assert _query(client, index["id"], estimator="datainf", approximate=True)["num_rows"] == ROWS - 2
