"""Layer reports over HTTP: the report equals influence.layer_report run directly on the same store, reference
features and mask; deleted rows are left out everywhere; DataInf and cosine score as queries do; without a mask
the rest is still reported; the page shows the warnings and the recommendation; 404 / 409 / 422 and tenant
isolation for every route."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from app.jobs.steps import run_build_inline, run_job_inline
from tests.app.conftest import fresh_api
from tests.app.library import featurize_as_indexed, index_store
from tests.worker.support import assert_problem, register_dataset, register_model

N_TRAIN, N_REFERENCE = 120, 24
N_CANCELLATION = 48
NOISY = [i % 5 == 0 for i in range(N_TRAIN)]


@dataclass
class Served:
    api: Any
    folder: Any
    model: dict
    dataset: dict
    reference: dict
    index: dict
    train_rows: list
    reference_rows: list


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """An API with a tiny-BERT index (all layers) over 120 SST-2 rows with a noisy column, and a reference
    dataset of 40 other rows."""
    built = fresh_api(tmp_path_factory, sqlite_template, "reports", max_top_k=200)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    model = register_model(built.client, folder)
    train_rows = sst2_rows[:N_TRAIN]
    reference_rows = sst2_rows[200 : 200 + N_REFERENCE]
    dataset = register_dataset(built.client, train_rows, noisy=NOISY)
    reference = register_dataset(built.client, reference_rows, name="reference")
    index = _build_index(built, model, dataset)
    yield Served(built, folder, model, dataset, reference, index, train_rows, reference_rows)
    built.close()


def _build_index(api, model: dict, dataset: dict, **body) -> dict:
    response = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "chunk_size": 60, **body}
    )
    assert response.status_code == 202, response.text
    index = response.json()
    run_build_inline(api.settings, api.session_factory, index["job"]["id"])
    return api.client.get(f"/v1/indexes/{index['id']}").json()


def _post(client, index_id: str, **body):
    return client.post(f"/v1/indexes/{index_id}/reports", json=body)


def _run(api, index_id: str, **body) -> dict:
    """POST a report, run its job in-process, return GET /v1/reports/{id}."""
    response = _post(api.client, index_id, **body)
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["status"] == "queued" and created["report"] is None and created["summary"] is None
    assert created["id"] in api.queue.enqueued
    run_job_inline(api.settings, api.session_factory, created["id"])
    out = api.client.get(f"/v1/reports/{created['id']}")
    assert out.status_code == 200, out.text
    return out.json()


# ------------------------------------------------------------------------------------ the brute force


def _fidelity(served: Served, index_id: str) -> dict[str, float]:
    """{unit: Spearman} of the projection fidelity the index's build measured (GET /v1/indexes/{id})."""
    units = served.api.client.get(f"/v1/indexes/{index_id}").json()["fidelity"]["units"]
    return {name: unit["spearman"] for name, unit in units.items()}


def _library(
    served: Served,
    index: dict,
    reference: list[tuple[str, Any]],
    mask: np.ndarray | None,
    *,
    cancellation_rows: int = 1000,
    stored_datainf: bool = False,
    top_rows: int = 20,
    **options,
):
    """influence.layer_report on the index's store, the reference featurized here from the model folder, the
    mask given, cancellation over the same seeded draw of live rows: the library's own computation."""
    from influence import (
        discover_layers,
        encode_examples,
        iter_batches,
        layer_cancellation,
        load_model,
        store_estimators,
    )
    from influence.data import Example, pad_token_id
    from influence.report import layer_report

    store = index_store(served.api, index["id"])
    loaded = load_model(served.folder, num_labels=2)
    layers = [layer for layer in discover_layers(loaded.model) if layer.name in index["layers"]]
    features = featurize_as_indexed(store, loaded, index["layers"], reference, batch_size=32)
    correct = features.predictions == np.array([label for _, label in reference])

    cancellation = None
    if cancellation_rows:
        live_ids = np.asarray(store.row_ids())[store.live_positions()]
        chosen = live_ids[np.random.default_rng(0).permutation(len(live_ids))[:cancellation_rows]]
        rows = [Example(*served.train_rows[int(i)]) for i in chosen]
        encoded = encode_examples(loaded.tokenizer, rows, "classification", store.manifest.max_length)
        batches = iter_batches(encoded, pad_token_id(loaded.tokenizer), "classification", 32)
        cancellation = layer_cancellation(loaded.model, layers, batches, max_samples=len(rows))

    fitted = None
    if stored_datainf:  # restored from the build's statistics (token rows: bound to the store's rows)
        fitted = {"datainf": store_estimators(store, [layer.name for layer in layers], "datainf")}
    report = layer_report(
        store,
        features.features,
        layers=layers,
        noisy=mask,
        reference_correct=correct,
        num_classes=2,
        cancellation=cancellation,
        fitted_estimators=fitted,
        top_rows=top_rows,
        # The projection fidelity the build measured, as the service passes it (app/services/fidelity.py).
        fidelity=_fidelity(served, index["id"]),
        **options,
    )
    return json.loads(json.dumps(report.to_dict())), store


# ------------------------------------------------------------------------------------------- the tests


def test_the_report_equals_the_library_on_the_same_inputs(served):
    api = served.api
    out = _run(
        api, served.index["id"], reference={"dataset_id": served.reference["id"]}, cancellation_rows=N_CANCELLATION
    )
    assert out["status"] == "succeeded" and out["index_id"] == served.index["id"]
    assert out["params"]["noisy"] == {"source": "dataset"}  # the dataset's noisy column, by default
    assert out["params"]["layers"] == served.index["layers"]
    report = out["report"]
    expected, _ = _library(
        served, served.index, served.reference_rows, np.array(NOISY), cancellation_rows=N_CANCELLATION
    )

    # Key numbers, exactly: every entry's AUC-NDR and NDR@30, every cancellation value, the detrimental rows.
    assert len(report["entries"]) == len(expected["entries"]) > 0
    for got, want in zip(report["entries"], expected["entries"], strict=True):
        assert (got["estimator"], got["aggregation"], got["layers"]["name"]) == (
            want["estimator"], want["aggregation"], want["layers"]["name"]
        )
        entry = (got["estimator"], got["aggregation"], got["layers"]["name"])
        assert got["auc_ndr"] == want["auc_ndr"] and got["ndr"]["30"] == want["ndr"]["30"], entry
    assert report["cancellation"]["layers"] == expected["cancellation"]["layers"]
    assert all(row["num_samples"] == N_CANCELLATION for row in report["cancellation"]["layers"])
    assert [(r["estimator"], r["row_id"], r["score"]) for r in report["detrimental"]] == [
        (r["estimator"], r["row_id"], r["score"]) for r in expected["detrimental"]
    ]
    # And the whole document (DataInf from the build's statistics equals the library's own fit here: no rows
    # were deleted and the fit runs over the same float64 values in one chunk).
    assert report == expected

    # What it covers: every single layer and group, every estimator and aggregation, baselines.
    assert report["estimators"] == ["grad-dot", "cosine", "datainf"]
    assert report["n_train"] == N_TRAIN and report["n_reference"] == N_REFERENCE
    assert report["n_noisy"] == sum(NOISY)
    assert {"WE", "CL", "total", "first", "middle", "last"} <= set(report["groups"])
    kinds = {(e["layers"]["kind"], e["layers"]["name"]) for e in report["entries"]}
    assert {("layer", name) for name in served.index["layers"]} <= kinds
    assert report["random_baseline"]["auc_ndr"] == pytest.approx(expected["random_baseline"]["auc_ndr"])

    # The untrained tiny model is at chance: a plain warning, no recommendation (summary says the same).
    assert report["near_chance"] is True and report["recommendation"] is None
    assert any("near chance" in w for w in report["warnings"])
    summary = out["summary"]
    assert summary["recommendation"] is None and summary["near_chance"] is True
    assert summary["reference_accuracy"] == report["reference_accuracy"]
    assert summary["warnings"] == len(report["warnings"]) >= 1
    assert summary["unavailable"] == report["unavailable"] == []
    assert summary["cancellation"] == {"rows": N_CANCELLATION, "seed": 0}

    # Progress ran through the stages: reference rows + cancellation rows + estimator x layer blocks + 1.
    job = out["job"]
    assert job["status"] == "succeeded" and job["kind"] == "layer_report"
    assert job["done"] == job["total"] == N_REFERENCE + N_CANCELLATION + 3 * len(served.index["layers"]) + 1
    assert set(job["result"]["artifacts"]) == {"report.json"}
    listed = api.client.get("/v1/jobs", params={"kind": "layer_report"}).json()
    assert out["id"] in [j["id"] for j in listed["items"]]

    # The page: the warning, the accuracy, the detrimental rows' texts; served as text/html.
    page = api.client.get(f"/v1/reports/{out['id']}/html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "near chance" in page.text and "no layers are recommended" in page.text
    first = report["detrimental"][0]["row_id"]
    assert served.train_rows[first][0].strip()[:20] in page.text


def test_explicit_noisy_rows_and_a_recommendation(served):
    """Reference labels set to the model's own predictions (accuracy 1) and the noisy rows set to the bottom of
    one ranking: that entry finds all noisy rows first, clears the margin and is recommended."""
    from influence import load_model, predict
    from influence.data import Example

    api = served.api
    loaded = load_model(served.folder, num_labels=2)
    texts = [text for text, _ in served.reference_rows[:12]]
    predictions, _ = predict(loaded, [Example(t, 0) for t in texts], batch_size=32, max_length=128)
    examples = [{"text": t, "label": int(p)} for t, p in zip(texts, predictions, strict=True)]
    common = {
        "reference": {"examples": examples},
        "estimators": ["grad-dot"],
        "aggregations": ["rank", "vote-c"],
        "cancellation_rows": 0,
        "top_rows": 24,
    }
    first = _run(api, served.index["id"], noisy=None, **common)["report"]
    assert first["unavailable"][:3] == ["ndr", "auc_ndr", "recommendation"]
    planted = sorted(r["row_id"] for r in first["detrimental"])  # the bottom 20% by rank over all layers

    out = _run(api, served.index["id"], noisy={"rows": planted}, **common)
    report = out["report"]
    assert out["params"]["noisy"] == {"source": "rows", "rows": planted}
    assert report["reference_accuracy"] == 1.0 and report["near_chance"] is False
    assert report["n_noisy"] == 24 and report["cancellation"] is None
    total = next(
        e for e in report["entries"] if (e["aggregation"], e["layers"]["name"]) == ("rank", "total")
    )
    # Every noisy row first: AUC-NDR at its maximum, ((a + 1) / 2 + n - a) / (a / 2 + n - a) (method.md §4).
    best = ((24 + 1) / 2 + N_TRAIN - 24) / (24 / 2 + N_TRAIN - 24)
    assert total["auc_ndr"] == pytest.approx(best, rel=1e-12) and total["ndr"]["20"] == 1.0
    recommendation = report["recommendation"]
    assert recommendation is not None and recommendation["auc_ndr"] == total["auc_ndr"]
    assert recommendation["auc_ndr_gain"] >= recommendation["required_gain"]
    assert out["summary"]["recommendation"]["auc_ndr"] == total["auc_ndr"]
    assert out["summary"]["recommendation"]["layers"] == recommendation["layers"]["name"]
    mask = np.isin(np.arange(N_TRAIN), planted)
    expected, _ = _library(
        served,
        served.index,
        [(e["text"], e["label"]) for e in examples],
        mask,
        cancellation_rows=0,
        estimators=["grad-dot"],
        aggregations=["rank", "vote-c"],
        top_rows=24,
    )
    assert report == expected

    page = api.client.get(f"/v1/reports/{out['id']}/html").text
    assert recommendation["layers"]["name"] in page and "above chance" in page


def test_without_a_mask_the_rest_is_still_reported(served):
    api = served.api
    out = _run(
        api,
        served.index["id"],
        reference={"dataset_id": served.reference["id"], "limit": 16},
        layers="middle",
        noisy=None,
        cancellation_rows=30,
    )
    report = out["report"]
    assert out["params"]["noisy"] is None
    assert report["n_noisy"] is None and report["entries"] == [] and report["random_baseline"] is None
    for what in ("ndr", "auc_ndr", "recommendation"):
        assert what in report["unavailable"] and "noisy mask" in report["unavailable_reasons"][what]
    assert set(out["summary"]["unavailable"]) >= {"ndr", "auc_ndr", "recommendation"}
    # The rest: cancellation per layer and group, distributions, detrimental rows (noisy unknown).
    assert [row["layer"] for row in report["cancellation"]["layers"]] == report["layers"]
    assert all(row["num_samples"] == 30 for row in report["cancellation"]["layers"])
    assert report["cancellation"]["groups"]
    assert len(report["distributions"]) == 3 * len(report["layers"])
    assert len(report["detrimental"]) == 3 * 20
    assert all(r["noisy"] is None for r in report["detrimental"])
    expected, _ = _library(
        served,
        {"id": served.index["id"], "layers": report["layers"]},
        served.reference_rows[:16],
        None,
        cancellation_rows=30,
    )
    assert report == expected
    page = api.client.get(f"/v1/reports/{out['id']}/html").text
    assert "noisy mask" in page


def test_deleted_rows_are_left_out_and_datainf_scores_as_queries_do(served):
    """On an index with deleted rows: n is the live rows, no deleted row is ranked, the mask counts live noisy
    rows, and with one reference example the report's most detrimental rows (rank over all layers) are the
    query's most harmful hits, for DataInf (from the build's statistics, which still include the deleted rows
    as the query's do) and cosine (stored norms)."""
    api = served.api
    n = 60
    noisy = NOISY[:n]
    dataset = register_dataset(api.client, served.train_rows[:n], name="small", noisy=noisy)
    index = _build_index(api, served.model, dataset)
    example = {"text": "the acting , costumes , music , cinematography and sound are all astounding", "label": 1}

    def harmful(estimator: str) -> list[tuple[int, float]]:
        response = api.client.post(
            f"/v1/indexes/{index['id']}/query",
            json={"examples": [example], "estimator": estimator, "aggregation": "rank", "top_k": 12,
                  "direction": "harmful"},
        )
        assert response.status_code == 200, response.text
        return [(hit["row"], hit["score"]) for hit in response.json()["results"][0]["harmful"]]

    # The rows that rank most harmful now are deleted (plus some noisy ones).
    deleted = sorted({row for row, _ in harmful("datainf")[:5]} | {row for row, _ in harmful("cosine")[:3]} | {0, 5})
    response = api.client.post(f"/v1/indexes/{index['id']}/rows/delete", json={"row_ids": deleted})
    assert response.status_code == 200, response.text

    body = {"reference": {"examples": [example]}, "estimators": ["datainf", "cosine"], "cancellation_rows": 20,
            "top_rows": 12}
    out = _run(api, index["id"], **body)
    report = out["report"]
    live = [i for i in range(n) if i not in deleted]
    assert report["n_train"] == len(live) and report["n_noisy"] == sum(noisy[i] for i in live)
    assert out["summary"]["noisy"]["deleted_rows_left_out"] == sum(noisy[i] for i in deleted)
    assert not {r["row_id"] for r in report["detrimental"]} & set(deleted)
    assert all(row["num_samples"] == 20 for row in report["cancellation"]["layers"])
    expected, store = _library(
        served,
        index,
        [(example["text"], example["label"])],
        np.array([noisy[i] for i in live]),
        cancellation_rows=20,
        stored_datainf=True,
        top_rows=12,
        estimators=["datainf", "cosine"],
    )
    assert store.num_live_rows == len(live)
    assert report == expected
    for estimator in ("datainf", "cosine"):
        rows = [(r["row_id"], r["score"]) for r in report["detrimental"] if r["estimator"] == estimator]
        assert rows == harmful(estimator), estimator


def test_causal_lm_reports_correct_only_aggregations_unavailable(served, tiny_model_dir, sst2_rows):
    """A causal LM has no class prediction to be correct: the -c aggregations are unavailable (not refused), the
    accuracy is unknown and nothing is recommended. Its dataset has no noisy column: no mask by default, and
    `noisy: dataset` is 422."""
    api = served.api
    folder = tiny_model_dir("gpt2", "causal-lm")
    response = api.client.post(
        "/v1/models", json={"name": "gpt2", "source": str(folder), "task": "causal-lm"}
    )
    assert response.status_code == 201, response.text
    model = response.json()
    records = "".join(
        json.dumps({"prompt": s, "completion": "positive" if y else "negative"}) + "\n" for s, y in sst2_rows[:16]
    )
    response = api.client.post(
        "/v1/datasets",
        files={"file": ("lm.jsonl", records.encode())},
        data={"task": "causal-lm", "text_column": "prompt", "label_column": "completion"},
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    index = _build_index(api, model, dataset, layers="blocks:2")
    reference = {"examples": [{"text": s, "label": "positive" if y else "negative"} for s, y in sst2_rows[30:34]]}
    assert_problem(_post(api.client, index["id"], reference=reference, noisy="dataset"), 422, "no noisy column")
    out = _run(api, index["id"], reference=reference, cancellation_rows=8)
    report = out["report"]
    assert out["status"] == "succeeded" and out["params"]["noisy"] is None
    assert {"rank-c", "vote-c", "ndr", "auc_ndr", "recommendation"} <= set(report["unavailable"])
    assert "reference_correct" in report["unavailable_reasons"]["rank-c"]
    assert report["aggregations"] == ["mean", "rank", "vote"]
    assert report["reference_accuracy"] is None and report["near_chance"] is None
    assert report["recommendation"] is None and any("accuracy" in w for w in report["warnings"])
    assert report["cancellation"] is not None and len(report["detrimental"]) == 3 * 16


def test_errors_are_4xx_never_500(served):
    api = served.api
    client = api.client
    index_id = served.index["id"]
    reference = {"dataset_id": served.reference["id"], "limit": 4}
    assert_problem(_post(client, "nope", reference=reference), 404, "index")
    assert_problem(client.get("/v1/reports/nope"), 404, "does not exist")
    assert_problem(client.get("/v1/reports/nope/html"), 404)
    assert_problem(client.delete("/v1/reports/nope"), 404)
    # Unknown estimator (schema) and aggregations (the library's registry, -c included).
    assert_problem(_post(client, index_id, reference=reference, estimators=["tracin"]), 422)
    assert_problem(_post(client, index_id, reference=reference, aggregations=["bogus"]), 422, "bogus")
    assert_problem(_post(client, index_id, reference=reference, aggregations=["rank", "rank-x"]), 422, "rank-x")
    assert_problem(_post(client, index_id, reference=reference, aggregations=["-c"]), 422)
    assert_problem(_post(client, index_id, reference=reference, aggregations=[]), 422)
    assert_problem(_post(client, index_id, reference=reference, vote_k=0), 422)
    # Noisy rows the index does not hold; layers it does not hold; a reference that does not fit.
    assert_problem(_post(client, index_id, reference=reference, noisy={"rows": [3, N_TRAIN]}), 422, str(N_TRAIN))
    assert_problem(_post(client, index_id, reference=reference, noisy={"rows": []}), 422)
    assert_problem(_post(client, index_id, reference=reference, noisy="column"), 422)
    assert_problem(_post(client, index_id, reference=reference, layers="block.42.attn.q"), 422)
    bad_reference = {"dataset_id": served.reference["id"], "rows": [N_REFERENCE]}
    assert_problem(_post(client, index_id, reference=bad_reference), 422, "out of range")
    assert_problem(_post(client, index_id, reference={"examples": [{"text": "x", "label": 7}]}), 422)
    # An index that is not ready: 409.
    pending = client.post(
        "/v1/indexes", json={"model_id": served.model["id"], "dataset_id": served.dataset["id"], "layers": "head"}
    ).json()
    assert_problem(_post(client, pending["id"], reference=reference), 409, "not ready")
    client.post(f"/v1/jobs/{pending['job']['id']}/cancel")
    # Nothing was queued by any refused request.
    with api.session_factory() as session:
        from sqlalchemy import func, select

        from app.models import Job

        reports = session.scalar(select(func.count()).select_from(Job).where(Job.kind == "layer_report"))
    listed = client.get("/v1/reports", params={"limit": 500}).json()
    assert listed["total"] == reports

    # A queued report: no page yet (409), cannot be deleted (409); the JSON has no report yet.
    created = _post(client, index_id, reference=reference, cancellation_rows=0, estimators=["grad-dot"]).json()
    assert_problem(client.get(f"/v1/reports/{created['id']}/html"), 409, "queued")
    assert_problem(client.delete(f"/v1/reports/{created['id']}"), 409, "cancel")
    got = client.get(f"/v1/reports/{created['id']}").json()
    assert got["status"] == "queued" and got["report"] is None and got["summary"] is None
    # Cancelled: the page says why; then it can be deleted.
    client.post(f"/v1/jobs/{created['id']}/cancel")
    assert_problem(client.get(f"/v1/reports/{created['id']}/html"), 409, "cancelled")
    assert client.delete(f"/v1/reports/{created['id']}").status_code == 204
    assert_problem(client.get(f"/v1/reports/{created['id']}"), 404)


def test_a_report_belongs_to_its_tenant(served):
    api = served.api
    reference = {"dataset_id": served.reference["id"], "limit": 4}
    out = _run(api, served.index["id"], reference=reference, layers="CL", estimators=["grad-dot"],
               cancellation_rows=0)
    report_id = out["id"]
    other = api.other_client()
    # Another tenant can neither report on this index, nor see, page, list or delete the report.
    assert_problem(_post(other, served.index["id"], reference=reference), 404, "index")
    assert_problem(other.get(f"/v1/reports/{report_id}"), 404)
    assert_problem(other.get(f"/v1/reports/{report_id}/html"), 404)
    assert_problem(other.delete(f"/v1/reports/{report_id}"), 404)
    assert other.get("/v1/reports").json()["total"] == 0
    assert other.get("/v1/reports", params={"index_id": served.index["id"]}).json()["items"] == []
    assert_problem(other.get(f"/v1/jobs/{report_id}"), 404)
    assert api.client.get(f"/v1/reports/{report_id}").status_code == 200

    # The owner lists it (without the heavy report), then deletes it and its files.
    listed = api.client.get("/v1/reports", params={"index_id": served.index["id"], "status": "succeeded"}).json()
    item = next(i for i in listed["items"] if i["id"] == report_id)
    assert item["report"] is None and item["summary"] == out["summary"]
    folder = api.settings.resolved_artifacts_dir / "jobs" / report_id
    assert (folder / "report.json").is_file()
    assert api.client.delete(f"/v1/reports/{report_id}").status_code == 204
    assert not folder.exists()
    assert_problem(api.client.get(f"/v1/reports/{report_id}"), 404)


def test_a_corrupted_report_is_refused_not_served(served):
    api = served.api
    out = _run(api, served.index["id"], reference={"dataset_id": served.reference["id"], "limit": 4},
               layers="CL", estimators=["cosine"], cancellation_rows=0)
    path = api.settings.resolved_artifacts_dir / "jobs" / out["id"] / "report.json"
    path.write_bytes(path.read_bytes().replace(b'"n_train":120', b'"n_train":121'))
    assert_problem(api.client.get(f"/v1/reports/{out['id']}"), 409, "corrupted")
    assert_problem(api.client.get(f"/v1/reports/{out['id']}/html"), 409, "corrupted")
