"""Extension points through HTTP: an estimator with fitted state and an aggregation, each registered by one line
in one file (tests/toy_extensions.py), are fitted by an index build, restored by queries and audits, and
accepted by the API, which names the field and the registered names when a name is unknown."""

from __future__ import annotations

import numpy as np
import pytest

from app.jobs.steps import run_build_inline, run_job_inline
from influence import load_model
from tests.app.conftest import fresh_api
from tests.app.library import featurize_as_indexed, index_store
from tests.plugins import loaded_plugin
from tests.worker.support import assert_problem, register_dataset, register_model

ROWS = 60
# The exact embedding (token rows, which the toy refuses) is built too: the toy is fitted around it.
INDEX_LAYERS = ["embed", "block.1.attn.v", "block.2.mlp.down", "head"]
DENSE_LAYERS = INDEX_LAYERS[1:]
EXAMPLES = [
    {"text": "it 's a charming and often affecting journey . ", "label": 1},
    {"text": "unflinchingly bleak and desperate ", "label": 0},
]
TOYS = {"estimator": "toy-diag", "aggregation": "toy-agg", "layers": DENSE_LAYERS}


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """The toys registered for this module only, and a tiny-BERT index built while they are."""
    with loaded_plugin():
        built = fresh_api(tmp_path_factory, sqlite_template, "extensions", max_top_k=ROWS)
        folder = tiny_model_dir("bert", "classification", num_labels=2)
        model = register_model(built.client, folder)
        dataset = register_dataset(built.client, sst2_rows[:ROWS])
        body = {
            "model_id": model["id"],
            "dataset_id": dataset["id"],
            "layers": INDEX_LAYERS,
            "chunk_size": 25,
        }
        index = built.client.post("/v1/indexes", json=body).json()
        run_build_inline(built.settings, built.session_factory, index["job"]["id"])
        yield built, folder, index
        built.close()


def _brute_force(served) -> tuple[np.ndarray, np.ndarray]:
    """The toy's scores (rows, layers, examples) from the store's rows and the examples featurized by the
    library, the toy's scaling 1 / (1 + mean square) taken over the stored rows here; and the row ids."""
    built, folder, index = served
    store = index_store(built, index["id"])
    examples = [(e["text"], e["label"]) for e in EXAMPLES]
    features = featurize_as_indexed(store, load_model(folder, num_labels=2), DENSE_LAYERS, examples, batch_size=8)
    scores = []
    for name in DENSE_LAYERS:
        rows = np.asarray(store.layer(name), dtype=np.float64)
        queries = np.asarray(features.features[name], dtype=np.float64)
        scores.append(rows @ (queries / (1.0 + (rows**2).mean(axis=0))).T)
    return np.stack(scores, axis=1), np.asarray(store.row_ids())


def test_a_registered_estimator_and_aggregation_answer_a_query(served):
    built, _, index = served
    body = {"examples": EXAMPLES, "top_k": 5, "direction": "both", **TOYS}
    response = built.client.post(f"/v1/indexes/{index['id']}/query", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["estimator"] == "toy-diag" and answer["layers"] == DENSE_LAYERS
    scores, row_ids = _brute_force(served)
    position = {int(row): i for i, row in enumerate(row_ids)}
    for j, result in enumerate(answer["results"]):
        lowest = scores[:, :, j].min(axis=1)  # toy-agg: a row's worst vote
        harmful, helpful = np.sort(lowest)[:5], np.sort(lowest)[::-1][:5]
        for hits, expected in ((result["harmful"], harmful), (result["helpful"], helpful)):
            assert [hit["score"] for hit in hits] == pytest.approx(expected, rel=1e-4, abs=1e-6)
            for hit in hits:
                i = position[hit["row"]]
                assert hit["score"] == pytest.approx(lowest[i], rel=1e-4, abs=1e-6)
                assert [layer["score"] for layer in hit["layers"]] == pytest.approx(
                    scores[i, :, j], rel=1e-4, abs=1e-6
                )


def test_an_audit_with_them_ranks_as_the_brute_force(served):
    built, _, index = served
    response = built.client.post(
        f"/v1/indexes/{index['id']}/audits", json={"reference": {"examples": EXAMPLES}, **TOYS}
    )
    assert response.status_code == 202, response.text
    run_job_inline(built.settings, built.session_factory, response.json()["id"])
    rows = built.client.get(f"/v1/audits/{response.json()['id']}/rows", params={"limit": ROWS}).json()[
        "items"
    ]
    scores, row_ids = _brute_force(served)
    lowest = scores.min(axis=(1, 2))  # toy-agg over every (layer, reference example)
    assert sorted(hit["row"] for hit in rows) == sorted(int(row) for row in row_ids)
    assert [hit["score"] for hit in rows] == pytest.approx(np.sort(lowest), rel=1e-4, abs=1e-6)
    by_row = dict(zip((int(row) for row in row_ids), lowest, strict=True))
    assert [hit["score"] for hit in rows] == pytest.approx(
        [by_row[hit["row"]] for hit in rows], rel=1e-4, abs=1e-6
    )


def test_a_token_row_layer_says_the_toy_refuses_it(served):
    built, _, index = served
    body = {"examples": EXAMPLES, "estimator": "toy-diag", "layers": ["embed"]}
    assert_problem(
        built.client.post(f"/v1/indexes/{index['id']}/query", json=body), 422, "dense features only"
    )


def test_unknown_names_are_422_naming_the_field_and_the_registered_names(served):
    built, _, index = served
    query = f"/v1/indexes/{index['id']}/query"
    unknown = built.client.post(query, json={"examples": EXAMPLES, "estimator": "nope"})
    assert_problem(unknown, 422, "estimator", "'nope'", "grad-dot", "datainf", "toy-diag")
    unknown = built.client.post(query, json={"examples": EXAMPLES, "aggregation": "nope"})
    assert_problem(unknown, 422, "aggregation", "'nope'", "rank", "toy-agg")
    checkpoints = built.client.post(query, json={"examples": EXAMPLES, "estimator": "tracin-cp"})
    assert_problem(checkpoints, 422, "estimator", "per-checkpoint")
    audit = {"reference": {"examples": EXAMPLES}, "estimator": "nope"}
    assert_problem(
        built.client.post(f"/v1/indexes/{index['id']}/audits", json=audit), 422, "estimator", "'nope'"
    )
    check = built.client.post(
        f"/v1/indexes/{index['id']}/checks",
        files={"file": ("batch.csv", b"text,label\nfine,1\n")},
        data={"reference": '{"examples": [{"text": "a", "label": 1}]}', "aggregation": "nope"},
    )
    assert_problem(check, 422, "aggregation", "'nope'")
    report = {"reference": {"examples": EXAMPLES}, "estimators": ["grad-dot", "nope"]}
    assert_problem(
        built.client.post(f"/v1/indexes/{index['id']}/reports", json=report), 422, "estimators", "'nope'"
    )
    schema = built.client.get("/openapi.json").json()["components"]["schemas"]["QueryRequest"]
    assert "grad-dot, cosine, datainf" in schema["properties"]["estimator"]["description"]
