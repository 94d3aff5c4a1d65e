"""Projection fidelity in the service (app/services/fidelity.py): measured when a build finalizes and stored on the
index (GET shows it), carried by every layer report row (with warnings and the page's bars), by query and audit
answers; disabled by settings, a failed measurement and a cancel during it never leave a ready index without
its record."""

from __future__ import annotations

import io
import types
from dataclasses import dataclass
from typing import Any

import pytest

from app.jobs.steps import run_build_inline, run_job_inline
from app.services.fidelity import _held_bytes, fit_sample, sample_rows, sample_sizes
from tests.app.conftest import fresh_api
from tests.worker.support import register_dataset, register_model

N_TRAIN = 100
NOISY = [i % 5 == 0 for i in range(N_TRAIN)]
QUERY = [
    {"text": "a charming and affecting journey", "label": 1},
    {"text": "bleak and desperate", "label": 0},
]


@dataclass
class Served:
    api: Any
    model: dict
    dataset: dict
    reference: dict
    exact: dict  # auto projection, float32: every linear unit stored exactly
    tiny: dict  # factorized at dim 4: low fidelity somewhere


def _build(api, model, dataset, **body) -> dict:
    created = api.client.post(
        "/v1/indexes", json={"model_id": model["id"], "dataset_id": dataset["id"], "chunk_size": 50, **body}
    )
    assert created.status_code == 202, created.text
    run_build_inline(api.settings, api.session_factory, created.json()["job"]["id"])
    return api.client.get(f"/v1/indexes/{created.json()['id']}").json()


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    api = fresh_api(tmp_path_factory, sqlite_template, "fidelity")
    model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
    dataset = register_dataset(api.client, sst2_rows[:N_TRAIN], noisy=NOISY)
    reference = register_dataset(api.client, sst2_rows[200:224], name="reference")
    exact = _build(api, model, dataset, dtype="float32")
    tiny = _build(api, model, dataset, projection={"kind": "factorized", "dim": 4})
    yield Served(api, model, dataset, reference, exact, tiny)
    api.close()


def _lowest(index: dict) -> tuple[str, float]:
    units = index["fidelity"]["units"]
    name = min(units, key=lambda n: units[n]["spearman"])
    return name, units[name]["spearman"]


def test_get_shows_the_fidelity_of_every_unit(served):
    index = served.exact
    assert index["status"] == "ready"
    fidelity = index["fidelity"]
    assert fidelity["sample"] == {
        "train_rows": 64,
        "query_rows": 16,
        "seed": 0,
        "dtype": "float32",
        "note": None,
    }
    assert fidelity["threshold"] == 0.9 and fidelity["seconds"] >= 0 and fidelity["skipped"] is None
    assert list(fidelity["units"]) == index["layers"]
    for name, unit in fidelity["units"].items():
        assert unit["projection"]["kind"] == index["projection"]["units"][name]["kind"]
        assert set(unit) == {"projection", "spearman", "spearman_min", "rel_error", "top10_overlap"}
        if unit["projection"]["kind"] == "identity":
            assert unit["projection"]["dim"] == index["projection"]["units"][name]["features"]
            assert unit["spearman"] >= 0.999 and unit["top10_overlap"] == 1.0, (name, unit)
    assert fidelity["units"]["embed"]["projection"]["kind"] != "identity"  # auto never keeps embeddings exact
    below = [n for n, u in fidelity["units"].items() if u["spearman"] < 0.9]
    assert sorted(fidelity["below_threshold"]) == sorted(below)
    # The list shows it too.
    listed = served.api.client.get("/v1/indexes", params={"limit": 100}).json()["items"]
    assert {i["id"]: i["fidelity"] for i in listed}[index["id"]] == fidelity

    # A tiny factorized projection is measured as such: lower, some unit below the threshold, lowest first.
    tiny = served.tiny["fidelity"]
    assert all(unit["projection"]["kind"] == "factorized" for unit in tiny["units"].values())
    name, value = _lowest(served.tiny)
    assert value < 0.9 and tiny["below_threshold"][0] == name
    values = [tiny["units"][n]["spearman"] for n in tiny["below_threshold"]]
    assert values == sorted(values)


def test_a_layer_report_carries_fidelity_per_row_and_warns(served, tmp_path):
    api, index = served.api, served.tiny
    response = api.client.post(
        f"/v1/indexes/{index['id']}/reports",
        json={
            "reference": {"dataset_id": served.reference["id"]},
            "estimators": ["grad-dot"],
            "aggregations": ["mean", "rank"],
            "cancellation_rows": 0,
        },
    )
    assert response.status_code == 202, response.text
    run_job_inline(api.settings, api.session_factory, response.json()["id"])
    out = api.client.get(f"/v1/reports/{response.json()['id']}").json()
    assert out["status"] == "succeeded", out
    report = out["report"]
    units = {name: unit["spearman"] for name, unit in index["fidelity"]["units"].items()}
    assert report["fidelity"]["units"] == units and report["fidelity"]["threshold"] == 0.9
    assert report["entries"]
    for entry in report["entries"]:
        members = [units[m] for m in entry["layers"]["members"]]
        assert entry["fidelity_min"] == min(members)
        assert entry["fidelity_mean"] == pytest.approx(sum(members) / len(members))
    name, value = _lowest(index)
    warning = next(w for w in report["warnings"] if w.startswith(f"Layer unit {name}'s"))
    assert f"Spearman {value:.2f}" in warning and "AUC-NDR" in warning and "identity" in warning
    assert out["summary"]["fidelity_warnings"] == report["fidelity"]["warnings"]
    assert warning in out["summary"]["fidelity_warnings"]

    page = api.client.get(f"/v1/reports/{out['id']}/html").text
    assert 'id="fidelity"' in page and "fidelity-warning" in page and "Fidelity (min)" in page
    assert 'class="fbar low"' in page and "low-fidelity" in page
    # In a real browser: the plots still draw, the fidelity table lists the lowest unit first.
    from tests.app.test_report_page import Page, dom_of, require_chromium, run_chromium

    require_chromium()
    pages = {"fidelity": Page(report, page)}
    run_chromium(pages, tmp_path)
    dom = dom_of(pages["fidelity"])
    assert "data-plot-error" not in dom.body and int(dom.body["data-plots-drawn"]) >= 3, pages["fidelity"].log
    assert dom.find("table", cls="fidelity") and dom.find("p", cls="fidelity-warning")
    assert name in [c["text"] for c in dom.find("code")]


def test_query_and_audit_answers_carry_fidelity(served):
    api = served.api
    answer = api.client.post(f"/v1/indexes/{served.tiny['id']}/query", json={"examples": QUERY}).json()
    units = served.tiny["fidelity"]["units"]
    assert answer["fidelity"] == {name: units[name]["spearman"] for name in answer["layers"]}
    name, _ = _lowest(served.tiny)
    assert name in answer["fidelity_warning"] and "below 0.9" in answer["fidelity_warning"]

    exact = served.exact["fidelity"]["units"]
    answer = api.client.post(
        f"/v1/indexes/{served.exact['id']}/query",
        json={"examples": QUERY, "layers": ["head", "block.0.attn.v"]},
    ).json()
    assert answer["fidelity"] == {name: exact[name]["spearman"] for name in ("block.0.attn.v", "head")}
    assert answer["fidelity_warning"] is None

    created = api.client.post(
        f"/v1/indexes/{served.tiny['id']}/audits", json={"reference": {"dataset_id": served.reference["id"]}}
    )
    assert created.status_code == 202, created.text
    run_job_inline(api.settings, api.session_factory, created.json()["id"])
    audit = api.client.get(f"/v1/audits/{created.json()['id']}").json()
    assert audit["status"] == "succeeded", audit
    summary = audit["summary"]
    assert summary["fidelity"] == {layer: units[layer]["spearman"] for layer in summary["layers"]}
    assert name in summary["fidelity_warning"]


def test_the_cli_shows_a_short_fidelity_table(served):
    from influence_client.cli.indexes import FIDELITY_ROWS, _show_fidelity
    from influence_client.cli.output import Console

    out = io.StringIO()
    _show_fidelity(types.SimpleNamespace(console=Console(False, out, io.StringIO())), served.tiny)
    lines = out.getvalue().splitlines()
    units = served.tiny["fidelity"]["units"]
    below = len(served.tiny["fidelity"]["below_threshold"])
    assert lines[0].startswith(f"fidelity: {below} of {len(units)} units below 0.9")
    assert lines[1].split()[:3] == ["UNIT", "PROJECTION", "SPEARMAN"]
    assert lines[2].split()[0] == _lowest(served.tiny)[0] and "LOW" in lines[2]
    assert len(lines) == 3 + FIDELITY_ROWS and lines[-1].startswith(
        f"... and {len(units) - FIDELITY_ROWS} more"
    )


def test_an_index_without_a_measurement_says_so(served):
    """An index from before fidelity was measured: answers carry null, a report warns once."""
    from app.models import Index

    api = served.api
    index = _build(api, served.model, served.dataset, layers=["head", "pooler"])
    with api.session_factory() as session:
        session.get(Index, index["id"]).fidelity = None
        session.commit()
    assert api.client.get(f"/v1/indexes/{index['id']}").json()["fidelity"] is None
    answer = api.client.post(f"/v1/indexes/{index['id']}/query", json={"examples": QUERY}).json()
    assert answer["fidelity"] is None and answer["fidelity_warning"] is None
    response = api.client.post(
        f"/v1/indexes/{index['id']}/reports",
        json={
            "reference": {"dataset_id": served.reference["id"]},
            "estimators": ["grad-dot"],
            "aggregations": ["rank"],
            "cancellation_rows": 0,
        },
    )
    run_job_inline(api.settings, api.session_factory, response.json()["id"])
    out = api.client.get(f"/v1/reports/{response.json()['id']}").json()
    report = out["report"]
    assert report["fidelity"] is None
    assert all(e["fidelity_min"] is None and e["fidelity_mean"] is None for e in report["entries"])
    notes = [w for w in report["warnings"] if "no fidelity measurement" in w]
    assert len(notes) == 1 and out["summary"]["fidelity_warnings"] == notes


def test_disabled_failed_or_cancelled_measurements(
    tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows, monkeypatch
):
    api = fresh_api(tmp_path_factory, sqlite_template, "fidelity-off", fidelity_train_rows=0)
    try:
        model = register_model(api.client, tiny_model_dir("bert", "classification", num_labels=2))
        dataset = register_dataset(api.client, sst2_rows[:40])
        index = _build(api, model, dataset, layers=["head"])
        assert index["status"] == "ready"
        assert index["fidelity"]["skipped"].startswith("disabled") and index["fidelity"]["units"] is None

        api.settings.fidelity_train_rows = 64

        def boom(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr("app.services.fidelity.measure_fidelity", boom)
        index = _build(api, model, dataset, layers=["head"])
        assert index["status"] == "ready" and index["job"]["status"] == "succeeded"
        assert index["fidelity"] == {
            "skipped": "measuring fidelity failed: RuntimeError: boom",
            "sample": None,
            "threshold": None,
            "seconds": None,
            "units": None,
            "below_threshold": None,
        }

        # A sample over the measurement's memory limit is measured smaller, and says so: a limit that holds the
        # 32 training rows one per pass against 3 of the 8 query rows, not 4.
        monkeypatch.undo()
        from influence import discover_layers, load_model, select_layers
        from influence.data import Example, encode_examples
        from influence.memory import format_bytes

        loaded = load_model(tiny_model_dir("bert", "classification", num_labels=2), num_labels=2)
        (head,) = select_layers(discover_layers(loaded.model), ["head"])
        train_ids, query_ids = sample_rows(40, 64, 16)
        assert (len(train_ids), len(query_ids)) == (32, 8)

        def lengths(ids):
            examples = [Example(text=sst2_rows[i][0], label=sst2_rows[i][1]) for i in ids]
            encoded = encode_examples(loaded.tokenizer, examples, "classification", api.settings.max_length)
            return [len(e.input_ids) for e in encoded]

        limit = _held_bytes([head], lengths(query_ids)[:3], lengths(train_ids), 1)
        assert _held_bytes([head], lengths(query_ids)[:4], lengths(train_ids), 1) > limit
        monkeypatch.setattr("app.services.fidelity.FIDELITY_MEMORY_BYTES", limit)
        index = _build(api, model, dataset, layers=["head"])
        assert index["fidelity"]["sample"] == {
            "train_rows": 32,
            "query_rows": 3,
            "seed": 0,
            "dtype": "float16",
            "note": f"sized to the measurement's memory limit ({format_bytes(limit)}): 3 of the 8 query rows, 1 "
            "training row(s) per pass",
        }
        assert set(index["fidelity"]["units"]) == {"head"}
        monkeypatch.undo()

        # A cancel that comes in while the fidelity is measured ends the build as cancelled, never ready.
        from app.db import session_scope
        from app.models import Job

        def cancel_meanwhile(*args, **kwargs):
            with session_scope(api.session_factory) as session:
                for job in session.query(Job).filter(Job.status == "running"):
                    job.cancel_requested = True
            raise RuntimeError("not measured")

        monkeypatch.setattr("app.services.fidelity.measure_fidelity", cancel_meanwhile)
        index = _build(api, model, dataset, layers=["head"])
        assert index["status"] == "cancelled" and index["job"]["status"] == "cancelled"
        assert index["fidelity"] is None
    finally:
        api.close()


def test_a_sample_over_the_memory_limit_gives_up_batching_then_its_last_queries():
    """fit_sample against brute force: the most training rows per pass that fit with every query row; failing
    that, one per pass and the most query rows that fit; None when 1 and 1 do not fit."""
    layers = [
        types.SimpleNamespace(kind="linear", in_features=7, has_bias=True, out_features=5),
        types.SimpleNamespace(kind="embedding", in_features=1, has_bias=False, out_features=3),
    ]
    queries, train = [9, 4, 7, 12, 3], [11, 6, 8, 2, 10, 5]
    for limit in range(0, _held_bytes(layers, queries, train, 4) + 2000, 97):
        fits = {
            (q, b): _held_bytes(layers, queries[:q], train, b) <= limit
            for q in range(1, len(queries) + 1)
            for b in range(1, 5)
        }
        full = [b for b in range(1, 5) if fits[(len(queries), b)]]
        fewer = [q for q in range(1, len(queries) + 1) if fits[(q, 1)]]
        expected = (len(queries), max(full)) if full else ((max(fewer), 1) if fewer else None)
        assert fit_sample(layers, queries, train, 4, limit) == expected, limit


def test_the_sample_is_seeded_disjoint_and_shrinks_with_the_dataset():
    train, queries = sample_rows(1000, 64, 16)
    assert len(train) == 64 and len(queries) == 16 and not set(train) & set(queries)
    assert sample_rows(1000, 64, 16) == (train, queries)
    assert sample_sizes(80, 64, 16) == (64, 16)
    assert sample_sizes(10, 64, 16) == (8, 2)
    assert sample_sizes(3, 64, 16) == (2, 1)
    assert isinstance(sample_sizes(2, 64, 16), str)
    assert sample_sizes(500, 0, 16).startswith("disabled") and sample_sizes(500, 64, 0).startswith("disabled")
