"""Audits over HTTP: the ranking and the raw score tensor equal the library's computation on the same inputs
(the index's store and the reference featurized independently); correct_only and vote_k; dataset and inline
references; pages, CSV and JSONL agree; deleted rows appear nowhere (and an audit is a snapshot); another
tenant sees nothing; 404 / 409 / 422 where due, a corrupted artifact is refused; deletion and cancellation."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from app.jobs.steps import run_build_inline, run_job_inline
from app.models import Job
from app.stores import job_dir
from influence import load_model
from tests.app.conftest import build_api, fresh_api, make_settings
from tests.app.library import featurize_as_indexed, index_store, store_scores
from tests.worker.support import assert_problem, register_dataset, register_model, tsv

ROWS = 120
REFERENCE_ROWS = 40
NOISY = [i % 7 == 0 for i in range(ROWS)]
# The index's layers: a few per role and block (featurizing costs about the same per layer).
INDEX_LAYERS = [
    "embed",
    "block.0.attn.v",
    "block.1.attn.q",
    "block.1.attn.v",
    "block.1.mlp.down",
    "block.2.attn.v",
    "block.2.mlp.down",
    "head",
]
EXAMPLES = [
    {"text": "it 's a charming and often affecting journey . ", "label": 1},
    {"text": "unflinchingly bleak and desperate ", "label": 0},
    {"text": "the acting , costumes , music , cinematography and sound are all astounding", "label": 0},
    {"text": "a gorgeous , witty , seductive movie .", "label": 1},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """An API with a tiny-BERT index (8 layers) over 120 SST-2 rows flagged noisy every 7th row, and a
    reference dataset of 40 other SST-2 rows."""
    built = fresh_api(
        tmp_path_factory, sqlite_template, "audits", max_reference_rows=50, max_active_jobs_per_tenant=50
    )
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    model = register_model(built.client, folder)
    dataset = register_dataset(built.client, sst2_rows[:ROWS], noisy=NOISY)
    reference = register_dataset(built.client, sst2_rows[200 : 200 + REFERENCE_ROWS], name="reference")
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "layers": INDEX_LAYERS, "chunk_size": 60}
    index = built.client.post("/v1/indexes", json=body).json()
    run_build_inline(built.settings, built.session_factory, index["job"]["id"])
    yield {
        "api": built,
        "folder": folder,
        "model": model,
        "dataset": dataset,
        "reference": reference,
        "index": built.client.get(f"/v1/indexes/{index['id']}").json(),
        "rows": sst2_rows,
        "features": {},
    }
    built.close()


def _create(api, index_id, **body):
    return api.client.post(f"/v1/indexes/{index_id}/audits", json=body)


def _run(api, index_id, **body) -> dict:
    """POST an audit, run its job in-process, return the finished audit."""
    response = _create(api, index_id, **body)
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] == "queued" and created["job"]["kind"] == "audit"
    assert created["index_id"] == index_id and created["summary"] is None
    assert api.queue.enqueued[-1] == created["id"]
    run_job_inline(api.settings, api.session_factory, created["id"])
    audit = api.client.get(f"/v1/audits/{created['id']}").json()
    assert audit["status"] == "succeeded", audit
    return audit


def _all_rows(api, audit_id) -> list[dict]:
    response = api.client.get(f"/v1/audits/{audit_id}/rows", params={"limit": 1000})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["total"] == len(page["items"])
    return page["items"]


def _scores(api, audit_id):
    from safetensors import safe_open
    from safetensors.numpy import load

    response = api.client.get(f"/v1/audits/{audit_id}/scores")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert "safetensors" in response.headers["content-disposition"]
    tensors = load(response.content)
    path = api.settings.resolved_artifacts_dir / "jobs" / audit_id / "scores.safetensors"
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
    return tensors, metadata


def _reference_examples(served, reference_body) -> list[tuple[str, int]]:
    if "examples" in reference_body:
        return [(e["text"], e["label"]) for e in reference_body["examples"]]
    rows = served["rows"][200 : 200 + REFERENCE_ROWS]
    if reference_body.get("rows") is not None:
        return [rows[i] for i in sorted(set(reference_body["rows"]))]
    return rows[: reference_body.get("limit") or REFERENCE_ROWS]


def _library(served, index, layers, estimator, examples):
    """The library's exact computation on the same inputs: S over every store row, the store's row ids and
    deleted row ids, the reference predictions (the store and the model read directly, no service code)."""
    store = index_store(served["api"], index["id"])
    key = (index["id"], tuple(layers), tuple(examples))
    if key not in served["features"]:
        loaded = load_model(served["folder"], num_labels=2)
        served["features"][key] = featurize_as_indexed(store, loaded, layers, examples, batch_size=32)
    features = served["features"][key]
    scores = store_scores(store, features, layers, estimator)
    labels = np.array([label for _, label in examples])
    return (
        scores,
        np.array(store.row_ids()),
        np.array(store.deleted_row_ids()),
        features.predictions == labels,
    )


def _expected_ranking(scores, row_ids, aggregation, vote_k, correct):
    """Brute force: aggregate S (live rows), order by ascending score then row id; per layer the same."""
    from influence import aggregate

    agg = aggregate(scores, aggregation, vote_k=vote_k, correct=correct)
    order = np.lexsort((row_ids, agg))
    voters = np.arange(scores.shape[2]) if correct is None else np.flatnonzero(correct)
    layer_agg = np.stack(
        [
            aggregate(scores[:, u : u + 1, :], aggregation, vote_k=vote_k, correct=correct)
            for u in range(scores.shape[1])
        ],
        axis=1,
    )
    layer_mean = scores[:, :, voters].astype(np.float64).mean(axis=2)
    layer_rank = np.empty(layer_agg.shape, dtype=np.int64)
    for u in range(scores.shape[1]):
        layer_rank[np.lexsort((row_ids, layer_agg[:, u])), u] = np.arange(len(row_ids))
    return agg, order, layer_agg, layer_mean, layer_rank


def _check_against_library(
    served, index, audit, reference_body, estimator, aggregation, vote_k, correct_only
):
    api = served["api"]
    layers = audit["summary"]["layers"]
    examples = _reference_examples(served, reference_body)
    full, store_ids, deleted, correct = _library(served, index, layers, estimator, examples)
    live = ~np.isin(store_ids, deleted)
    scores, row_ids = full[live], store_ids[live]

    tensors, metadata = _scores(api, audit["id"])
    assert tensors["scores"].dtype == np.float32 and tensors["scores"].shape == scores.shape
    np.testing.assert_allclose(tensors["scores"], scores, rtol=1e-6, atol=1e-9)
    assert np.array_equal(tensors["row_ids"], row_ids) and tensors["row_ids"].dtype == np.int64
    assert np.array_equal(tensors["reference_correct"], correct.astype(np.uint8))
    assert json.loads(metadata["layers"]) == layers
    assert (metadata["estimator"], metadata["aggregation"], metadata["index_id"]) == (
        estimator,
        aggregation,
        index["id"],
    )
    assert "> 0 helps" in metadata["convention"]

    agg, order, layer_agg, layer_mean, layer_rank = _expected_ranking(
        scores, row_ids, aggregation, vote_k, correct if correct_only else None
    )
    rows = _all_rows(api, audit["id"])
    assert [r["row"] for r in rows] == [int(row_ids[i]) for i in order]  # the exact order
    assert [r["rank"] for r in rows] == list(range(len(rows)))
    for r, i in zip(rows, order, strict=True):
        assert r["score"] == pytest.approx(float(agg[i]), rel=1e-9, abs=1e-12)
        assert [layer["layer"] for layer in r["layers"]] == layers
        assert [layer["aggregate"] for layer in r["layers"]] == pytest.approx(layer_agg[i].tolist(), rel=1e-9)
        assert [layer["score"] for layer in r["layers"]] == pytest.approx(layer_mean[i].tolist(), rel=1e-5)
        assert [layer["rank"] for layer in r["layers"]] == layer_rank[i].tolist()
        text, label = served["rows"][r["row"]]
        assert (r["text"], r["label"], r["noisy"]) == (text, label, NOISY[r["row"]])

    summary = audit["summary"]
    m = len(examples)
    voters = int(correct.sum()) if correct_only else m
    assert (summary["num_rows"], summary["num_reference"], summary["num_voters"]) == (
        len(row_ids),
        m,
        len(layers) * voters,
    )
    assert summary["reference_accuracy"] == pytest.approx(correct.mean())
    assert summary["correct_reference"] == int(correct.sum())
    assert summary["score_tensor_bytes"] == scores.size * 4
    assert [(t["rank"], t["row"], t["score"]) for t in summary["top"]] == [
        (r["rank"], r["row"], r["score"]) for r in rows[:10]
    ]
    # Noise detection against the dataset's flags, by counting (not with the library's metrics).
    noisy = np.array([NOISY[int(row_ids[i])] for i in order])
    found = np.cumsum(noisy) / noisy.sum()
    n = len(noisy)
    noise = summary["noise"]
    assert noise["noisy_rows"] == int(noisy.sum())
    assert noise["ndr_at_30"] == pytest.approx(found[round(0.3 * n) - 1])
    assert noise["auc_ndr"] == pytest.approx(found.sum() / (noisy.sum() / 2 + (n - noisy.sum())))
    assert noise["random_ndr_at_30"] == pytest.approx(round(0.3 * n) / n)
    assert noise["random_auc_ndr"] == pytest.approx((n + 1) / 2 / (noisy.sum() / 2 + (n - noisy.sum())))
    assert noise["ndr_at"]["30"] == noise["ndr_at_30"]
    return rows


CASES = [
    # (reference, layers, estimator, aggregation, vote_k, correct_only)
    ({"limit": REFERENCE_ROWS}, None, "grad-dot", "rank", 0.2, False),
    ({"rows": [3, 1, 7, 20, 21, 22, 30, 39, 12, 5]}, "middle", "cosine", "vote", 0.1, True),
    ({"examples": EXAMPLES}, ["block.0.attn.v", "block.2.mlp.down", "head"], "datainf", "mean", 0.2, False),
    ({"limit": 12}, "role:attention", "grad-dot", "zmean", 0.2, True),
    ({"examples": EXAMPLES}, "blocks:1-2&role:mlp", "grad-dot", "median", 0.2, False),
]


@pytest.mark.parametrize(("reference", "layers", "estimator", "aggregation", "vote_k", "correct_only"), CASES)
def test_audit_equals_the_library_exact_computation(
    served, reference, layers, estimator, aggregation, vote_k, correct_only
):
    api, index = served["api"], served["index"]
    reference_body = dict(reference)
    if "examples" not in reference_body:
        reference_body["dataset_id"] = served["reference"]["id"]
    body = {
        "reference": reference_body,
        "estimator": estimator,
        "aggregation": aggregation,
        "vote_k": vote_k,
        "correct_only": correct_only,
    }
    if layers is not None:
        body["layers"] = layers
    audit = _run(api, index["id"], **body)
    if layers is None:
        assert audit["summary"]["layers"] == index["layers"]
    assert audit["job"]["done"] == audit["job"]["total"] > 0
    assert audit["params"]["layers"] == audit["summary"]["layers"]
    assert audit["rows_deleted_since_audit"] == 0
    assert audit["summary"]["index_deleted_rows_at_audit"] == 0
    _check_against_library(served, index, audit, reference_body, estimator, aggregation, vote_k, correct_only)


@pytest.fixture(scope="module")
def rank_audit(served) -> dict:
    reference = {"dataset_id": served["reference"]["id"], "limit": 20}
    return _run(served["api"], served["index"]["id"], reference=reference, layers="middle")


def test_pages_csv_and_jsonl_agree(served, rank_audit):
    api = served["api"]
    url = f"/v1/audits/{rank_audit['id']}/rows"
    everything = _all_rows(api, rank_audit["id"])
    assert len(everything) == ROWS
    pages, offset = [], 0
    while True:
        page = api.client.get(url, params={"offset": offset, "limit": 7}).json()
        assert page["total"] == ROWS and page["limit"] == 7 and page["offset"] == offset
        if not page["items"]:
            break
        pages.extend(page["items"])
        offset += 7
    assert pages == everything
    default = api.client.get(url).json()
    assert default["limit"] == 50 and default["items"] == everything[:50]
    assert default["layers"] == rank_audit["summary"]["layers"] and default["aggregation"] == "rank"
    assert_problem(api.client.get(url, params={"limit": 1001}), 422, "1000")
    assert_problem(api.client.get(url, params={"format": "xml"}), 422)

    response = api.client.get(url, params={"format": "jsonl"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson"
    assert (
        response.headers["content-disposition"]
        == f'attachment; filename="audit-{rank_audit["id"]}-rows.jsonl"'
    )
    assert [json.loads(line) for line in response.text.splitlines()] == everything

    response = api.client.get(url, params={"format": "csv"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert response.headers["content-disposition"].endswith('-rows.csv"')
    records = list(csv.DictReader(io.StringIO(response.text)))
    layers = rank_audit["summary"]["layers"]
    assert list(records[0]) == [
        "rank",
        "row",
        "score",
        "text",
        "text_pair",
        "label",
        "label_name",
        "noisy",
    ] + [f"{name}:{what}" for name in layers for what in ("score", "aggregate", "rank")]
    assert len(records) == ROWS
    for record, row in zip(records, everything, strict=True):
        assert int(record["rank"]) == row["rank"] and int(record["row"]) == row["row"]
        assert float(record["score"]) == row["score"]  # floats written to round-trip exactly
        assert record["text"] == row["text"] and int(record["label"]) == row["label"]
        assert record["noisy"] == ("true" if row["noisy"] else "false")
        assert record["text_pair"] == "" and record["label_name"] == ""
        for layer in row["layers"]:
            name = layer["layer"]
            assert float(record[f"{name}:score"]) == layer["score"]
            assert float(record[f"{name}:aggregate"]) == layer["aggregate"]
            assert int(record[f"{name}:rank"]) == layer["rank"]

    # offset / limit slice the downloads too.
    sliced = api.client.get(url, params={"format": "jsonl", "offset": 5, "limit": 10}).text.splitlines()
    assert [json.loads(line) for line in sliced] == everything[5:15]
    sliced = list(
        csv.DictReader(io.StringIO(api.client.get(url, params={"format": "csv", "offset": 115}).text))
    )
    assert [int(r["row"]) for r in sliced] == [r["row"] for r in everything[115:]]
    empty = api.client.get(url, params={"format": "csv", "offset": 500}).text
    assert empty.splitlines() == [",".join(list(records[0]))]


def test_label_names_are_shown(tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows):
    """A dataset with label names: rows carry the class name beside the stored class index."""
    api = build_api(make_settings(tmp_path, sqlite_url, default_roots))
    model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
    named = [(text, "positive" if label else "negative") for text, label in sst2_rows[:30]]
    dataset = register_dataset(api.client, named)
    assert dataset["label_names"] == ["negative", "positive"]
    index = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "head"}
    ).json()
    run_build_inline(api.settings, api.session_factory, index["job"]["id"])
    reference = {"examples": [{"text": "a fine film", "label": "positive"}, {"text": "dull", "label": 0}]}
    audit = _run(api, index["id"], reference=reference)
    rows = _all_rows(api, audit["id"])
    assert audit["summary"]["noise"] is None  # the dataset flags no noise
    for row in rows:
        assert row["label_name"] == named[row["row"]][1]
        assert row["label"] == ["negative", "positive"].index(named[row["row"]][1])
    records = list(
        csv.DictReader(
            io.StringIO(api.client.get(f"/v1/audits/{audit['id']}/rows", params={"format": "csv"}).text)
        )
    )
    assert [r["label_name"] for r in records] == [row["label_name"] for row in rows]
    assert [t["label_name"] for t in audit["summary"]["top"]] == [row["label_name"] for row in rows[:10]]

    # The audit outlives its index (a snapshot); once the dataset goes too, its rows' texts are gone: 409,
    # and the raw scores are still served.
    assert api.client.delete(f"/v1/indexes/{index['id']}").status_code == 204
    after = api.client.get(f"/v1/audits/{audit['id']}").json()
    assert after["status"] == "succeeded" and after["rows_deleted_since_audit"] is None
    assert _all_rows(api, audit["id"]) == rows
    assert api.client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert_problem(api.client.get(f"/v1/audits/{audit['id']}/rows"), 409, "dataset", "was deleted")
    assert_problem(
        api.client.get(f"/v1/audits/{audit['id']}/rows", params={"format": "jsonl"}), 409, "deleted"
    )
    assert api.client.get(f"/v1/audits/{audit['id']}/scores").status_code == 200


def test_deleted_rows_appear_nowhere_and_an_audit_is_a_snapshot(served):
    api = served["api"]
    client = api.client
    body = {
        "model_id": served["model"]["id"],
        "dataset_id": served["dataset"]["id"],
        "layers": ["block.1.attn.v", "head"],
    }
    index = client.post("/v1/indexes", json=body).json()
    run_build_inline(api.settings, api.session_factory, index["job"]["id"])
    index = client.get(f"/v1/indexes/{index['id']}").json()
    reference = {"dataset_id": served["reference"]["id"], "limit": 15}
    before = _run(api, index["id"], reference=reference, aggregation="vote")
    deleted = [0, 7, 33, 119]
    response = client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": deleted})
    assert response.status_code == 200, response.text

    # The finished audit is a snapshot: its rows and tensor keep the deleted rows, and it says how many.
    again = client.get(f"/v1/audits/{before['id']}").json()
    assert again["rows_deleted_since_audit"] == len(deleted)
    assert again["summary"]["index_deleted_rows_at_audit"] == 0
    assert {r["row"] for r in _all_rows(api, before["id"])} == set(range(ROWS))

    after = _run(api, index["id"], reference=reference, aggregation="vote")
    assert after["summary"]["num_rows"] == ROWS - len(deleted)
    assert after["summary"]["index_deleted_rows_at_audit"] == len(deleted)
    assert after["rows_deleted_since_audit"] == 0
    rows = _check_against_library(served, index, after, reference, "grad-dot", "vote", 0.2, False)
    assert not {r["row"] for r in rows} & set(deleted)
    tensors, _ = _scores(api, after["id"])
    assert not set(tensors["row_ids"].tolist()) & set(deleted) and len(tensors["row_ids"]) == ROWS - len(
        deleted
    )
    # Lists never compute the snapshot difference.
    listed = {a["id"]: a for a in client.get("/v1/audits", params={"limit": 500}).json()["items"]}
    assert listed[before["id"]]["rows_deleted_since_audit"] is None


def test_another_tenant_sees_no_audit(served, rank_audit):
    api, index = served["api"], served["index"]
    other = api.other_client()
    mine, unknown = rank_audit["id"], "0" * 32
    reference = {"examples": EXAMPLES[:1]}

    def calls(audit_id, index_id):
        return [
            other.post(f"/v1/indexes/{index_id}/audits", json={"reference": reference}),
            other.get(f"/v1/audits/{audit_id}"),
            other.delete(f"/v1/audits/{audit_id}"),
            other.get(f"/v1/audits/{audit_id}/rows"),
            other.get(f"/v1/audits/{audit_id}/rows", params={"format": "csv"}),
            other.get(f"/v1/audits/{audit_id}/rows", params={"format": "jsonl"}),
            other.get(f"/v1/audits/{audit_id}/scores"),
        ]

    for theirs, nothing in zip(calls(mine, index["id"]), calls(unknown, unknown), strict=True):
        body = assert_problem(theirs, 404, "does not exist")
        # Word for word what an unknown id gets.
        assert body["detail"].replace(mine, unknown).replace(index["id"], unknown) == nothing.json()["detail"]
    listed = other.get("/v1/audits")
    assert listed.status_code == 200 and listed.json()["total"] == 0
    assert other.get("/v1/jobs", params={"kind": "audit"}).json()["total"] == 0
    # Their dataset cannot be our reference.
    their_data = register_dataset(other, served["rows"][:10], name="theirs")
    response = _create(api, index["id"], reference={"dataset_id": their_data["id"]})
    assert_problem(response, 404, "does not exist")
    # Ours is untouched.
    assert api.client.get(f"/v1/audits/{mine}").json()["status"] == "succeeded"
    assert api.client.get(f"/v1/audits/{mine}/scores").status_code == 200
    other.close()


def test_refusals_are_4xx(served, monkeypatch, tiny_model_dir):
    api, index = served["api"], served["index"]
    client = api.client
    ref = {"dataset_id": served["reference"]["id"]}
    jobs_before = api.count(Job)
    assert_problem(_create(api, "nope", reference=ref), 404, "index")
    # Not ready: 409.
    pending = client.post(
        "/v1/indexes",
        json={"model_id": served["model"]["id"], "dataset_id": served["dataset"]["id"], "layers": "head"},
    ).json()
    assert_problem(_create(api, pending["id"], reference=ref), 409, "not ready")
    # Layers the index does not hold, bad references, bad options: 422.
    assert_problem(_create(api, index["id"], reference=ref, layers="block.42.attn.q"), 422)
    assert_problem(
        _create(api, index["id"], reference={**ref, "rows": [REFERENCE_ROWS]}), 422, "out of range"
    )
    assert_problem(_create(api, index["id"], reference={**ref, "limit": 5, "rows": [1]}), 422)
    assert_problem(_create(api, index["id"], reference={**ref, "examples": EXAMPLES}), 422)
    assert_problem(_create(api, index["id"], reference={"examples": []}), 422)
    assert_problem(
        _create(api, index["id"], reference={"examples": [{"text": "x", "label": 5}]}), 422, "[0, 2)"
    )
    assert_problem(_create(api, index["id"], reference={"examples": [{"text": "x", "label": "good"}]}), 422)
    assert_problem(
        _create(api, index["id"], reference={"dataset_id": served["dataset"]["id"]}),
        422,
        "max_reference_rows",
    )
    assert_problem(_create(api, index["id"], reference={"dataset_id": "0" * 32}), 404)
    assert_problem(_create(api, index["id"]), 422)
    assert_problem(_create(api, index["id"], reference=ref, aggregation="max"), 422)
    assert_problem(_create(api, index["id"], reference=ref, estimator="tracin"), 422)
    assert_problem(_create(api, index["id"], reference=ref, vote_k=0), 422)
    assert_problem(_create(api, index["id"], reference=ref, vote_k=1.5), 422)
    assert_problem(_create(api, index["id"], reference=ref, extra=1), 422)
    # A score tensor over the size limit: 422 naming its size.
    n, layers, m = ROWS, len(index["layers"]), REFERENCE_ROWS
    monkeypatch.setattr(api.settings, "max_score_tensor_bytes", n * layers * m * 4 - 1)
    assert_problem(_create(api, index["id"], reference=ref), 422, f"{n * layers * m * 4:,} bytes")
    monkeypatch.undo()
    # correct_only needs a classification model.
    lm_folder = str(tiny_model_dir("gpt2", "causal-lm"))
    response = client.post("/v1/models", json={"name": "gpt2-lm", "source": lm_folder, "task": "causal-lm"})
    assert response.status_code == 201, response.text
    lm = response.json()
    text = client.post(
        "/v1/datasets",
        files={"file": ("lm.tsv", tsv(served["rows"][:10]), "text/tab-separated-values")},
        data={"task": "causal-lm", "text_column": "sentence"},
    ).json()
    lm_index = client.post("/v1/indexes", json={"model_id": lm["id"], "dataset_id": text["id"]}).json()
    lm_reference = {"examples": [{"text": "a fine film", "label": None}]}
    assert_problem(
        _create(api, lm_index["id"], reference=lm_reference, correct_only=True), 422, "correct_only"
    )
    # Only the two index builds were recorded: no refused audit left a job.
    assert api.count(Job) == jobs_before + 2
    # Rows and scores of an audit that has not run: 409.
    queued = _create(api, index["id"], reference=ref).json()
    assert_problem(client.get(f"/v1/audits/{queued['id']}/rows"), 409, "queued")
    assert_problem(client.get(f"/v1/audits/{queued['id']}/rows", params={"format": "csv"}), 409, "queued")
    assert_problem(client.get(f"/v1/audits/{queued['id']}/scores"), 409, "queued")
    assert_problem(client.delete(f"/v1/audits/{queued['id']}"), 409, "cancel")
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    assert_problem(client.get("/v1/audits/nope"), 404, "audit")
    # A build job is not an audit.
    assert_problem(client.get(f"/v1/audits/{index['job']['id']}"), 404, "audit")


def test_correct_only_with_no_correct_reference_row_fails_cleanly(served):
    api, index = served["api"], served["index"]
    layers = ["head"]
    examples = [(e["text"], e["label"]) for e in EXAMPLES]
    _, _, _, correct = _library(served, index, layers, "grad-dot", examples)
    predictions = [label if ok else 1 - label for (_, label), ok in zip(examples, correct, strict=True)]
    wrong = [{"text": text, "label": 1 - p} for (text, _), p in zip(examples, predictions, strict=True)]
    created = _create(
        api, index["id"], reference={"examples": wrong}, layers=layers, correct_only=True
    ).json()
    with pytest.raises(Exception, match="predicts none"):
        run_job_inline(api.settings, api.session_factory, created["id"])
    audit = api.client.get(f"/v1/audits/{created['id']}").json()
    assert audit["status"] == "failed" and "predicts none of the reference rows" in audit["job"]["error"]
    assert audit["summary"] is None
    assert_problem(api.client.get(f"/v1/audits/{created['id']}/rows"), 409, "failed", "predicts none")
    assert_problem(api.client.get(f"/v1/audits/{created['id']}/scores"), 409, "failed")
    assert not list(job_dir(api.settings, created["id"]).glob("*.safetensors"))
    assert not list(job_dir(api.settings, created["id"]).glob(".*.tmp"))


def test_a_corrupted_or_missing_artifact_is_refused(served):
    api, index = served["api"], served["index"]
    audit = _run(api, index["id"], reference={"examples": EXAMPLES}, layers="head")
    folder = job_dir(api.settings, audit["id"])
    url = f"/v1/audits/{audit['id']}"
    for name, route, params in (
        ("ranking.npy", "/rows", {}),
        ("ranking.npy", "/rows", {"format": "csv"}),
        ("scores.safetensors", "/scores", {}),
    ):
        path = folder / name
        # Served (and verified) once first: a later corruption is still caught.
        assert api.client.get(url + route, params=params).status_code == 200
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[-1] ^= 0xFF
        path.write_bytes(bytes(damaged))
        assert_problem(api.client.get(url + route, params=params), 409, "corrupted")
        path.unlink()
        assert_problem(api.client.get(url + route, params=params), 409, "missing")
        path.write_bytes(original)
        assert api.client.get(url + route, params=params).status_code == 200
    # The audit itself still reads fine.
    assert api.client.get(url).json()["status"] == "succeeded"


def test_delete_removes_the_audit_and_its_files_and_a_queued_audit_can_be_cancelled(served):
    api, index = served["api"], served["index"]
    client = api.client
    audit = _run(api, index["id"], reference={"examples": EXAMPLES[:2]}, layers="head")
    folder = job_dir(api.settings, audit["id"])
    assert (folder / "scores.safetensors").is_file() and (folder / "ranking.npy").is_file()
    assert set(audit["job"]["result"]["artifacts"]) == {"scores.safetensors", "ranking.npy"}
    listed = client.get("/v1/audits").json()
    assert listed["items"][0]["id"] == audit["id"]  # newest first
    assert audit["id"] in {j["id"] for j in client.get("/v1/jobs", params={"kind": "audit"}).json()["items"]}
    assert client.delete(f"/v1/audits/{audit['id']}").status_code == 204
    assert not folder.exists()
    assert_problem(client.get(f"/v1/audits/{audit['id']}"), 404)
    assert_problem(client.get(f"/v1/audits/{audit['id']}/rows"), 404)
    assert_problem(client.delete(f"/v1/audits/{audit['id']}"), 404)

    queued = _create(api, index["id"], reference={"examples": EXAMPLES[:2]}, layers="head").json()
    cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    run_job_inline(api.settings, api.session_factory, queued["id"])  # a late delivery: nothing happens
    after = client.get(f"/v1/audits/{queued['id']}").json()
    assert after["status"] == "cancelled" and after["job"]["attempts"] == 0 and after["summary"] is None
    assert not (job_dir(api.settings, queued["id"]) / "scores.safetensors").exists()
    assert client.delete(f"/v1/audits/{queued['id']}").status_code == 204


def test_a_rerun_replaces_what_a_killed_attempt_left(served):
    """Temporary files of an attempt that died mid-write are removed when the audit runs again (the job's
    lock is held then, so no live process writes them); a finished audit is not run again."""
    api, index = served["api"], served["index"]
    created = _create(api, index["id"], reference={"examples": EXAMPLES[:2]}, layers="head").json()
    folder = job_dir(api.settings, created["id"])
    folder.mkdir(parents=True)
    stale = folder / ".scores.safetensors.dead1234.tmp"
    stale.write_bytes(b"half a tensor")
    run_job_inline(api.settings, api.session_factory, created["id"])
    assert not stale.exists()
    audit = api.client.get(f"/v1/audits/{created['id']}").json()
    assert audit["status"] == "succeeded" and audit["job"]["attempts"] == 1
    run_job_inline(api.settings, api.session_factory, created["id"])  # a duplicate delivery: skipped
    assert api.client.get(f"/v1/audits/{created['id']}").json()["job"]["attempts"] == 1
    assert api.client.get(f"/v1/audits/{created['id']}/scores").status_code == 200


def test_a_running_audit_stops_at_its_next_step_when_cancelled(served, monkeypatch):
    """A cancel request reaches a running audit through its progress reports: it ends cancelled, no file."""
    from app.jobs.run import JobRun

    api, index = served["api"], served["index"]
    created = _create(api, index["id"], reference={"examples": EXAMPLES}, layers="middle").json()
    original = JobRun.progress
    calls = []

    def progress(run, done, total=None):
        calls.append(done)
        if len(calls) == 2:  # mid-run: ask for the cancel the way the API does
            api.client.post(f"/v1/jobs/{run.job_id}/cancel")
        return original(run, done, total)

    # The real progress report, preceded by a cancel request once the audit is under way.
    monkeypatch.setattr(JobRun, "progress", progress)
    run_job_inline(api.settings, api.session_factory, created["id"])
    monkeypatch.undo()
    audit = api.client.get(f"/v1/audits/{created['id']}").json()
    assert audit["status"] == "cancelled" and audit["summary"] is None
    folder = job_dir(api.settings, created["id"])
    assert not list(folder.glob("*.safetensors")) and not list(folder.glob("*.npy"))
    assert not list(folder.glob(".*.tmp"))
