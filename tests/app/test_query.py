"""Queries over HTTP: the answer equals the library's exact computation; approximate answers say so; 404 / 409 /
422 for unknown ids, indexes that are not ready and layers or labels the index cannot take; never 500."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from app.jobs.steps import run_build_inline
from tests.app.conftest import build_api, fresh_api, make_settings
from tests.app.library import featurize_as_indexed, index_store, store_scores
from tests.worker.support import assert_problem, built_index, register_dataset, register_model

EXAMPLES = [
    {"text": "it 's a charming and often affecting journey . ", "label": 1},
    {"text": "unflinchingly bleak and desperate ", "label": 0},
    {"text": "the acting , costumes , music , cinematography and sound are all astounding", "label": 0},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """An API with one tiny-BERT index (all layers, float16) over 120 SST-2 rows, built in-process."""
    built = fresh_api(tmp_path_factory, sqlite_template, "query", max_top_k=200)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    model = register_model(built.client, folder)
    noisy = [i % 7 == 0 for i in range(120)]
    dataset = register_dataset(built.client, sst2_rows[:120], noisy=noisy)
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "chunk_size": 50}
    index = built.client.post("/v1/indexes", json=body).json()
    run_build_inline(built.settings, built.session_factory, index["job"]["id"])
    yield built, folder, model, dataset, index
    built.close()


def _query(client, index_id, **body):
    return client.post(f"/v1/indexes/{index_id}/query", json={"examples": EXAMPLES, **body})


def _library(served, layers, estimator, aggregation, vote_k=0.2):
    """The library's exact computation on the same inputs: the index's store, the examples, the model."""
    from influence import aggregate, average_ranks, load_model, top_k

    built, folder, _, _, index = served
    store = index_store(built, index["id"])
    examples = [(e["text"], e["label"]) for e in EXAMPLES]
    features = featurize_as_indexed(store, load_model(folder, num_labels=2), layers, examples, batch_size=32)
    scores = store_scores(store, features, layers, estimator)
    out = []
    for j in range(len(EXAMPLES)):
        agg = aggregate(scores[:, :, j : j + 1], aggregation, vote_k=vote_k)
        ranks = average_ranks(torch.from_numpy(np.ascontiguousarray(scores[:, :, j]))).numpy()
        out.append((agg, scores[:, :, j], ranks, top_k(agg, 5, "helpful"), top_k(agg, 5, "harmful"),
                    features.predictions[j], features.losses[j]))
    return out, store.row_ids()


@pytest.mark.parametrize(
    ("layers", "estimator", "aggregation"),
    [
        ("middle", "grad-dot", "rank"),
        (None, "cosine", "vote"),
        (["block.0.attn.v", "block.2.mlp.down", "head"], "datainf", "mean"),
        ("role:attention", "grad-dot", "zmean"),
        ("blocks:1-2&role:mlp", "cosine", "median"),
        ("WE", "grad-dot", "rrf"),
    ],
)
def test_http_answer_equals_the_library_exact_computation(served, layers, estimator, aggregation):
    built, _, _, _, index = served
    body = {"top_k": 5, "estimator": estimator, "aggregation": aggregation, "direction": "both"}
    if layers is not None:
        body["layers"] = layers
    response = _query(built.client, index["id"], **body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["approximate"] is False and answer["approximation"] is None
    assert answer["num_rows"] == 120 and answer["estimator"] == estimator
    expected, row_ids = _library(served, answer["layers"], estimator, aggregation)
    if layers is None:
        assert answer["layers"] == index["layers"]
    for result, (agg, scores, ranks, helpful, harmful, prediction, loss) in zip(
        answer["results"], expected, strict=True
    ):
        assert result["candidates"] == 120
        assert result["prediction"] == prediction and result["loss"] == pytest.approx(loss, rel=1e-12)
        for hits, chosen in ((result["helpful"], helpful), (result["harmful"], harmful)):
            assert [hit["row"] for hit in hits] == [int(row_ids[i]) for i in chosen]
            for hit, i in zip(hits, chosen, strict=True):
                assert hit["score"] == float(agg[i])  # bit for bit
                assert [layer["layer"] for layer in hit["layers"]] == answer["layers"]
                assert [layer["score"] for layer in hit["layers"]] == [float(s) for s in scores[i]]
                assert [layer["rank"] for layer in hit["layers"]] == [float(r) for r in ranks[i]]


def test_hits_carry_the_rows_and_the_direction_asked_for(served):
    built, _, _, dataset, index = served
    rows = built.client.get(f"/v1/datasets/{dataset['id']}/rows", params={"limit": 200}).json()["items"]
    answer = _query(built.client, index["id"], top_k=3, direction="harmful", layers="CL").json()
    for result in answer["results"]:
        assert result["helpful"] is None and len(result["harmful"]) == 3
        scores = [hit["score"] for hit in result["harmful"]]
        assert scores == sorted(scores)  # most harmful (lowest) first
        for hit in result["harmful"]:
            row = rows[hit["row"]]
            assert (hit["text"], hit["label"], hit["noisy"]) == (row["text"], row["label"], row["noisy"])
            assert 0 <= hit["layers"][0]["rank"] <= 119
    helpful = _query(built.client, index["id"], top_k=2, direction="helpful").json()["results"][0]
    assert helpful["harmful"] is None and len(helpful["helpful"]) == 2


def test_approximate_answers_say_so(served):
    built, _, _, _, index = served
    exact = _query(built.client, index["id"], top_k=4, layers="middle").json()
    # Every row a candidate: the approximate path must reproduce the exact answer (flat FAISS search).
    everything = _query(
        built.client, index["id"], top_k=4, layers="middle", approximate=True, candidates_per_layer=120
    ).json()
    assert everything["approximate"] is True
    assert everything["approximation"]["faiss_kind"] == "flat"
    assert everything["approximation"]["faiss_exact_search"] is True
    for a, b in zip(exact["results"], everything["results"], strict=True):
        assert b["candidates"] == 120
        assert [h["row"] for h in a["helpful"]] == [h["row"] for h in b["helpful"]]
        assert [h["row"] for h in a["harmful"]] == [h["row"] for h in b["harmful"]]
        assert [h["score"] for h in a["harmful"]] == pytest.approx([h["score"] for h in b["harmful"]])
    few = _query(built.client, index["id"], top_k=2, layers="middle", approximate=True, candidates_per_layer=3)
    answer = few.json()
    assert answer["approximate"] is True and "candidates" in answer["approximation"]["what"]
    exact_scores = {}
    for result in _query(built.client, index["id"], top_k=120, layers="middle").json()["results"][0]["helpful"]:
        exact_scores[result["row"]] = [layer["score"] for layer in result["layers"]]
    first = answer["results"][0]
    assert first["candidates"] < 120
    for hit in first["helpful"] + first["harmful"]:
        # Candidates are scored exactly; only what is ranked against differs.
        assert [layer["score"] for layer in hit["layers"]] == pytest.approx(exact_scores[hit["row"]])
        assert all(layer["rank"] < first["candidates"] for layer in hit["layers"])


def test_approximate_queries_score_the_exact_embedding_exactly(served):
    """The word embedding is stored as token rows (no FAISS index): an approximate query scores it over every row
    and adds its own top rows to the candidates; with every row a candidate the answer is the exact one, and a
    query of the embedding alone is answered exactly (and says so)."""
    built, _, _, _, index = served
    assert index["projection"]["units"]["embed"]["kind"] == "tokens"
    exact = _query(built.client, index["id"], top_k=4, layers=["embed", "head"]).json()
    everything = _query(
        built.client, index["id"], top_k=4, layers=["embed", "head"], approximate=True, candidates_per_layer=120
    ).json()
    assert everything["approximate"] is True and "token-row layers" in everything["approximation"]["what"]
    for a, b in zip(exact["results"], everything["results"], strict=True):
        assert b["candidates"] == 120
        assert [h["row"] for h in a["helpful"]] == [h["row"] for h in b["helpful"]]
        assert [h["score"] for h in a["harmful"]] == pytest.approx([h["score"] for h in b["harmful"]])
    few = _query(
        built.client, index["id"], top_k=2, layers=["embed", "head"], approximate=True, candidates_per_layer=3
    ).json()["results"][0]
    embed_scores = {
        hit["row"]: hit["layers"][0]["score"]
        for hit in _query(built.client, index["id"], top_k=120, layers=["embed"]).json()["results"][0]["helpful"]
    }
    assert 3 <= few["candidates"] < 120  # the embedding's own top 3 per direction, with the head's
    for hit in few["helpful"] + few["harmful"]:  # candidates are scored exactly, the embedding by its join
        assert hit["layers"][0]["score"] == pytest.approx(embed_scores[hit["row"]])
    alone = _query(built.client, index["id"], top_k=2, layers=["embed"], approximate=True).json()
    assert alone["approximate"] is False and alone["approximation"] is None
    assert alone["results"] == _query(built.client, index["id"], top_k=2, layers=["embed"]).json()["results"]


def test_query_errors_are_4xx_never_500(served):
    built, _, model, dataset, index = served
    client = built.client
    assert_problem(_query(client, "nope"), 404, "index")
    # Not ready yet: 409 with the job to follow.
    pending = client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "head"}
    ).json()
    assert_problem(_query(client, pending["id"]), 409, "not ready", pending["job"]["id"])
    # An index over the middle layers only: other layers are 422, whatever the selector.
    middle = client.post(
        "/v1/indexes",
        json={"model_id": model["id"], "dataset_id": dataset["id"], "layers": "position:middle", "chunk_size": 60},
    ).json()
    run_build_inline(built.settings, built.session_factory, middle["job"]["id"])
    assert _query(client, middle["id"], layers="block.1.attn.v").status_code == 200
    assert_problem(_query(client, middle["id"], layers="embed"), 422, "layers the index holds")
    assert_problem(_query(client, middle["id"], layers=["block.1.attn.v", "head"]), 422)
    assert_problem(_query(client, middle["id"], layers="role:head"), 422)
    assert_problem(_query(client, middle["id"], layers="block.42.attn.q"), 422)
    # Labels, sizes, options.
    bad_label = [{"text": "fine", "label": 5}]
    assert_problem(client.post(f"/v1/indexes/{index['id']}/query", json={"examples": bad_label}), 422, "[0, 2)")
    named = [{"text": "fine", "label": "positive"}]
    assert_problem(client.post(f"/v1/indexes/{index['id']}/query", json={"examples": named}), 422, "label name")
    no_label = [{"text": "fine", "label": None}]
    assert_problem(client.post(f"/v1/indexes/{index['id']}/query", json={"examples": no_label}), 422)
    assert_problem(_query(client, index["id"], top_k=201), 422, "top_k")
    assert_problem(_query(client, index["id"], top_k=0), 422)
    assert_problem(_query(client, index["id"], estimator="tracin"), 422)
    assert_problem(_query(client, index["id"], aggregation="max"), 422)
    assert_problem(_query(client, index["id"], vote_k=1.5), 422)
    assert_problem(client.post(f"/v1/indexes/{index['id']}/query", json={"examples": []}), 422)
    mixed = [{"text": "a", "text_pair": "b", "label": 1}, {"text": "c", "label": 0}]
    assert_problem(client.post(f"/v1/indexes/{index['id']}/query", json={"examples": mixed}), 422, "text_pair")


def test_an_index_whose_model_changed_is_409(tmp_path, sqlite_url, default_roots, tiny_model_dir, sst2_rows):
    from safetensors.torch import load_file, save_file

    built = build_api(make_settings(tmp_path, sqlite_url, default_roots))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert", "classification", num_labels=2), folder)
    _, _, index = built_index(built, folder, sst2_rows[:20], layers="head")
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert_problem(_query(built.client, index["id"]), 409, "changed since it was registered")
