"""An index's settings follow its layer report: queries, audits and checks that name no layers, estimator or
aggregation use the latest (or the pinned) report's recommendation and say so; what a request names wins,
field by field; a report without a recommendation means the defaults, with a note; mode `defaults` ignores
reports; a pinned report cannot be deleted; GET / PUT /v1/indexes/{id}/settings and their 4xx; the targets of a
calibrated check and an audit's review prefix are 422 naming the field when they cannot work.

The recommendation is a real one: reference labels set to the model's own predictions (accuracy 1, the model
counts as above chance) and the noisy rows planted at the bottom of one ranking (as in test_reports.py), so the
recommended entry finds every noisy row first and clears the margin over a random order."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import update

from app.jobs.steps import run_build_inline, run_job_inline
from app.models import Job
from tests.app.conftest import fresh_api
from tests.worker.support import assert_problem, register_dataset, register_model, tsv

ROWS = 120
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
# The report looks at a subset, so that its recommendation differs from "every layer".
REPORT_LAYERS = ["block.1.attn.v", "block.2.attn.v", "block.2.mlp.down", "head"]
PLANTED = 24
EXAMPLE = {"text": "a gorgeous , witty , seductive movie .", "label": 1}


@dataclass
class Served:
    api: Any
    model: dict
    dataset: dict
    reference: dict
    index: dict
    examples: list[dict]  # reference examples labelled with the model's own predictions
    planted: list[int]  # the noisy rows the recommending report was measured against
    report: dict  # that report (GET /v1/reports/{id})
    rows: list
    report_body: dict  # what made it

    @property
    def client(self):
        return self.api.client

    @property
    def recommendation(self) -> dict:
        return self.report["report"]["recommendation"]


def _run_report(api, index_id: str, **body) -> dict:
    response = api.client.post(f"/v1/indexes/{index_id}/reports", json=body)
    assert response.status_code == 202, response.text
    run_job_inline(api.settings, api.session_factory, response.json()["id"])
    out = api.client.get(f"/v1/reports/{response.json()['id']}").json()
    assert out["status"] == "succeeded", out
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """A tiny-BERT index (8 layers) over 120 SST-2 rows WITHOUT a noisy column, and a succeeded layer report of
    it that recommends (cosine, rank-c, some of REPORT_LAYERS)."""
    from influence import load_model, predict
    from influence.data import Example

    api = fresh_api(tmp_path_factory, sqlite_template, "index-settings", max_active_jobs_per_tenant=50)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    model = register_model(api.client, folder)
    dataset = register_dataset(api.client, sst2_rows[:ROWS])
    reference = register_dataset(api.client, sst2_rows[200:230], name="reference")
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "layers": INDEX_LAYERS, "chunk_size": 60}
    created = api.client.post("/v1/indexes", json=body).json()
    run_build_inline(api.settings, api.session_factory, created["job"]["id"])
    index = api.client.get(f"/v1/indexes/{created['id']}").json()
    assert index["status"] == "ready" and index["layers"] == INDEX_LAYERS

    loaded = load_model(folder, num_labels=2)
    texts = [text for text, _ in sst2_rows[200:212]]
    predictions, _ = predict(loaded, [Example(t, 0) for t in texts], batch_size=32, max_length=128)
    examples = [{"text": t, "label": int(p)} for t, p in zip(texts, predictions, strict=True)]
    common = {
        "reference": {"examples": examples},
        "layers": REPORT_LAYERS,
        "estimators": ["cosine"],
        "aggregations": ["rank-c"],
        "cancellation_rows": 0,
        "top_rows": PLANTED,
    }
    first = _run_report(api, index["id"], noisy=None, **common)
    assert first["report"]["recommendation"] is None  # no mask, no recommendation
    planted = sorted(row["row_id"] for row in first["report"]["detrimental"])
    # The first report is deleted: the recommending one is then the index's only (and latest) report.
    assert api.client.delete(f"/v1/reports/{first['id']}").status_code == 204
    report = _run_report(api, index["id"], noisy={"rows": planted}, **common)
    recommendation = report["report"]["recommendation"]
    assert recommendation is not None, report["report"]["warnings"]
    assert (recommendation["estimator"], recommendation["aggregation"]) == ("cosine", "rank-c")
    assert set(recommendation["layers"]["members"]) <= set(REPORT_LAYERS)
    body = {**common, "noisy": {"rows": planted}}
    yield Served(api, model, dataset, reference, index, examples, planted, report, sst2_rows, body)
    api.close()


def _put(served: Served, index_id: str | None = None, client=None, **body):
    client = client or served.client
    return client.put(f"/v1/indexes/{index_id or served.index['id']}/settings", json=body)


def _pin(served: Served, report_id: str) -> None:
    response = _put(served, mode="pinned-report", report_id=report_id)
    assert response.status_code == 200, response.text


def _query(served: Served, **body) -> dict:
    response = served.client.post(
        f"/v1/indexes/{served.index['id']}/query", json={"examples": [EXAMPLE], "top_k": 8, **body}
    )
    assert response.status_code == 200, response.text
    return response.json()


def _audit(served: Served, run: bool = True, **body) -> dict:
    body.setdefault("reference", {"examples": served.examples})
    response = served.client.post(f"/v1/indexes/{served.index['id']}/audits", json=body)
    assert response.status_code == 202, response.text
    if not run:
        return response.json()
    run_job_inline(served.api.settings, served.api.session_factory, response.json()["id"])
    audit = served.client.get(f"/v1/audits/{response.json()['id']}").json()
    assert audit["status"] == "succeeded", audit
    return audit


def _ranking(served: Served, audit_id: str, **params) -> dict:
    response = served.client.get(f"/v1/audits/{audit_id}/rows", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    return response.json()


def _submit_check(served: Served, **form):
    data = {
        "text_column": "sentence",
        "label_column": "label",
        "reference": json.dumps({"examples": served.examples}),
    }
    data.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in form.items()})
    batch = tsv(served.rows[150:154])
    return served.client.post(
        f"/v1/indexes/{served.index['id']}/checks", files={"file": ("batch.tsv", batch)}, data=data
    )


def _cancel(served: Served, job_id: str) -> None:
    assert served.client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)


def _recommended(served: Served) -> dict:
    """The settings the recommendation means for an audit or a check (rank-c: rank over the correct rows)."""
    return {
        "layers": served.recommendation["layers"]["members"],
        "estimator": "cosine",
        "aggregation": "rank",
        "vote_k": served.report["report"]["vote_k"],
        "correct_only": True,
    }


def _in_index_order(names) -> list[str]:
    return [name for name in INDEX_LAYERS if name in names]


# ------------------------------------------------------------------------------------------ the tests


def test_a_new_index_follows_its_latest_report_and_says_so(served):
    report_id = served.report["id"]
    got = served.client.get(f"/v1/indexes/{served.index['id']}/settings")
    assert got.status_code == 200, got.text
    view = got.json()
    assert view["mode"] == "latest-report" and view["report_id"] is None
    assert view["settings_source"] == f"report {report_id}"
    settings = view["settings"]
    assert {key: settings[key] for key in _recommended(served)} == _recommended(served)
    assert settings["sources"] == dict.fromkeys(_recommended(served), f"report {report_id}")
    assert settings["report_id"] == report_id and settings["note"] is None

    # A query that names nothing uses the recommendation, without the correct-only suffix (and says why) ...
    answer = _query(served)
    assert answer["settings_source"] == f"report {report_id}"
    assert answer["layers"] == _in_index_order(served.recommendation["layers"]["members"])
    assert (answer["estimator"], answer["aggregation"]) == ("cosine", "rank")
    assert answer["settings"]["layers"] == served.recommendation["layers"]["members"]
    assert "correct_only" not in answer["settings"] and "correct_only" not in answer["settings"]["sources"]
    assert "rank-c" in answer["settings"]["note"] and "correct_only" in answer["settings"]["note"]
    # ... and answers exactly as the query that names those settings itself.
    named = _query(
        served,
        layers=served.recommendation["layers"]["members"],
        estimator="cosine",
        aggregation="rank",
        vote_k=served.report["report"]["vote_k"],
    )
    assert named["settings_source"] == "request" and named["settings"]["report_id"] is None
    assert named["settings"]["sources"] == dict.fromkeys(
        ["layers", "estimator", "aggregation", "vote_k"], "request"
    )
    assert named["results"] == answer["results"]
    # With the defaults instead, the answer differs: the report made a difference.
    defaults = _query(served, layers=None, estimator="grad-dot", aggregation="rank")
    assert defaults["layers"] == INDEX_LAYERS and defaults["results"] != answer["results"]


def test_what_a_query_names_wins_field_by_field(served):
    report_id = served.report["id"]
    answer = _query(served, estimator="grad-dot")
    assert answer["settings_source"] == f"report {report_id}"
    assert answer["settings"]["sources"] == {
        "layers": f"report {report_id}",
        "estimator": "request",
        "aggregation": f"report {report_id}",
        "vote_k": f"report {report_id}",
    }
    assert answer["estimator"] == "grad-dot" and answer["aggregation"] == "rank"
    assert answer["layers"] == _in_index_order(served.recommendation["layers"]["members"])

    # Naming the aggregation leaves vote_k to the defaults (it belongs to the report's aggregation).
    answer = _query(served, aggregation="vote")
    assert answer["aggregation"] == "vote" and answer["vote_k"] == 0.2 and answer["estimator"] == "cosine"
    assert answer["settings"]["sources"]["vote_k"] == "defaults"
    assert answer["settings"]["note"] is None  # the -c aggregation was not used, so nothing to say about it

    answer = _query(served, layers="head", estimator="datainf", aggregation="mean")
    assert answer["settings_source"] == "request" and answer["layers"] == ["head"]
    assert (answer["estimator"], answer["aggregation"]) == ("datainf", "mean")


def test_a_pinned_report_drives_audits_unless_they_name_their_own(served):
    report_id = served.report["id"]
    _pin(served, report_id)
    view = served.client.get(f"/v1/indexes/{served.index['id']}/settings").json()
    assert view["mode"] == "pinned-report" and view["report_id"] == report_id
    assert view["settings_source"] == f"report {report_id}"

    audit = _audit(served)
    params = audit["params"]
    assert audit["settings_source"] == params["settings_source"] == f"report {report_id}"
    assert params["layers"] == _in_index_order(served.recommendation["layers"]["members"])
    assert (params["estimator"], params["aggregation"], params["correct_only"]) == ("cosine", "rank", True)
    assert params["vote_k"] == served.report["report"]["vote_k"]
    settings = audit["settings"]
    assert {key: settings[key] for key in _recommended(served)} == _recommended(served)
    assert settings["sources"] == dict.fromkeys(_recommended(served), f"report {report_id}")
    summary = audit["summary"]
    assert (summary["estimator"], summary["aggregation"], summary["correct_only"]) == ("cosine", "rank", True)
    assert summary["layers"] == params["layers"]

    # The same settings named by the request: source "request", the very same ranking.
    named = _audit(served, **_recommended(served))
    assert named["settings_source"] == "request"
    assert named["settings"]["sources"] == dict.fromkeys(_recommended(served), "request")
    assert [row["row"] for row in _ranking(served, named["id"])["items"]] == [
        row["row"] for row in _ranking(served, audit["id"])["items"]
    ]

    # Mixed: the request names its aggregation; correct_only then is not the report's (it goes with rank-c).
    mixed = _audit(served, aggregation="mean", run=False)
    assert mixed["settings_source"] == f"report {report_id}"
    assert mixed["settings"]["sources"] == {
        "layers": f"report {report_id}",
        "estimator": f"report {report_id}",
        "aggregation": "request",
        "vote_k": "defaults",
        "correct_only": "defaults",
    }
    assert (mixed["params"]["aggregation"], mixed["params"]["correct_only"]) == ("mean", False)
    _cancel(served, mixed["id"])
    override = _audit(served, layers=["head"], estimator="grad-dot", aggregation="rank", run=False)
    assert override["settings_source"] == "request" and override["params"]["layers"] == ["head"]
    assert (override["params"]["estimator"], override["params"]["correct_only"]) == ("grad-dot", False)
    _cancel(served, override["id"])


def test_a_pinned_report_drives_checks_unless_they_name_their_own(served):
    report_id = served.report["id"]
    _pin(served, report_id)
    response = _submit_check(served)
    assert response.status_code == 202, response.text
    created = response.json()
    params = created["params"]
    assert created["settings_source"] == params["settings_source"] == f"report {report_id}"
    assert params["layers"] == _in_index_order(served.recommendation["layers"]["members"])
    assert (params["estimator"], params["aggregation"], params["correct_only"]) == ("cosine", "rank", True)
    assert params["threshold_percentile"] == 5.0 and params["calibration"] is None
    assert created["settings"]["sources"] == dict.fromkeys(_recommended(served), f"report {report_id}")
    run_job_inline(served.api.settings, served.api.session_factory, created["id"])
    check = served.client.get(f"/v1/checks/{created['id']}").json()
    assert check["status"] == "succeeded", check
    assert check["settings_source"] == f"report {report_id}"
    assert (check["summary"]["estimator"], check["summary"]["correct_only"]) == ("cosine", True)
    assert [layer["layer"] for layer in check["rows"][0]["layers"]] == params["layers"]

    # Named form fields win; empty ones count as not named.
    response = _submit_check(served, layers="head", estimator="grad-dot", aggregation="mean", correct_only="")
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["settings_source"] == "request"
    assert created["settings"]["sources"]["correct_only"] == "defaults"
    assert created["params"]["layers"] == ["head"] and created["params"]["correct_only"] is False
    _cancel(served, created["id"])
    response = _submit_check(served, estimator="grad-dot", threshold_percentile="20")
    created = response.json()
    assert created["settings_source"] == f"report {report_id}"
    assert created["settings"]["sources"]["estimator"] == "request"
    assert created["params"]["estimator"] == "grad-dot" and created["params"]["threshold_percentile"] == 20.0
    _cancel(served, created["id"])


def test_mode_defaults_ignores_reports(served):
    response = _put(served, mode="defaults")
    assert response.status_code == 200, response.text
    view = response.json()
    assert view["mode"] == "defaults" and view["settings_source"] == "defaults"
    assert view["settings"] == {
        "layers": None,
        "estimator": "grad-dot",
        "aggregation": "rank",
        "vote_k": 0.2,
        "correct_only": False,
        "sources": dict.fromkeys(
            ["layers", "estimator", "aggregation", "vote_k", "correct_only"], "defaults"
        ),
        "report_id": None,
        "note": None,
    }
    answer = _query(served)
    assert answer["settings_source"] == "defaults" and answer["layers"] == INDEX_LAYERS
    assert (answer["estimator"], answer["aggregation"]) == ("grad-dot", "rank")
    audit = _audit(served, run=False)
    assert audit["settings_source"] == "defaults" and audit["params"]["layers"] == INDEX_LAYERS
    _cancel(served, audit["id"])
    _put(served, mode="latest-report")


def test_a_report_without_a_recommendation_means_the_defaults_with_a_note(served):
    """A report against the real labels: the untrained model is near chance, nothing is recommended. As the
    latest report it is the one the index follows: the defaults, and every answer says why."""
    _put(served, mode="latest-report")
    near = _run_report(
        served.api,
        served.index["id"],
        reference={"dataset_id": served.reference["id"]},
        noisy={"rows": served.planted},
        layers="head",
        estimators=["grad-dot"],
        aggregations=["rank"],
        cancellation_rows=0,
    )
    assert near["report"]["recommendation"] is None and near["report"]["near_chance"] is True
    view = served.client.get(f"/v1/indexes/{served.index['id']}/settings").json()
    assert view["settings_source"] == "defaults" and view["settings"]["report_id"] is None
    note = view["settings"]["note"]
    assert note.startswith(f"report {near['id']} makes no recommendation: ") and "near chance" in note
    answer = _query(served)
    assert answer["settings_source"] == "defaults" and answer["settings"]["note"] == note
    assert answer["layers"] == INDEX_LAYERS and answer["estimator"] == "grad-dot"

    # Pinned, the recommending report is followed again; unpinned, the latest (the near-chance one) is.
    _pin(served, served.report["id"])
    assert _query(served)["settings_source"] == f"report {served.report['id']}"
    _put(served, mode="latest-report")
    assert _query(served)["settings_source"] == "defaults"
    # The latest report deleted, the one before it is the latest again.
    assert served.client.delete(f"/v1/reports/{near['id']}").status_code == 204
    assert _query(served)["settings_source"] == f"report {served.report['id']}"


def test_a_pinned_report_cannot_be_deleted(served):
    report_id = served.report["id"]
    _pin(served, report_id)
    refused = assert_problem(
        served.client.delete(f"/v1/reports/{report_id}"), 409, served.index["id"], "pinned"
    )
    assert refused["indexes"] == [served.index["id"]]
    assert served.client.get(f"/v1/reports/{report_id}").status_code == 200
    _put(served, mode="latest-report")
    assert served.client.get(f"/v1/indexes/{served.index['id']}/settings").json()["report_id"] is None


def test_settings_errors_are_4xx(served):
    index_id = served.index["id"]
    report_id = served.report["id"]
    assert_problem(_put(served, mode="pinned-report"), 422, "report_id")
    assert_problem(_put(served, mode="pinned-report", report_id=None), 422, "report_id")
    assert_problem(_put(served, mode="defaults", report_id=report_id), 422, "report_id")
    assert_problem(_put(served, mode="latest-report", report_id=report_id), 422, "report_id")
    assert_problem(_put(served, mode="newest"), 422, "mode")
    assert_problem(_put(served, report_id=report_id), 422, "mode")
    assert_problem(_put(served, mode="defaults", colour="red"), 422)
    assert_problem(_put(served, mode="pinned-report", report_id="0" * 32), 404, "does not exist")
    # An audit's id is no layer report.
    audit = _audit(served, layers=["head"], estimator="grad-dot", aggregation="rank", run=False)
    assert_problem(_put(served, mode="pinned-report", report_id=audit["id"]), 404, "layer report")
    _cancel(served, audit["id"])

    other = served.api.other_client()
    with served.api.session_factory.begin() as session:
        foreign = Job(tenant_id=other.tenant_id, kind="layer_report", status="succeeded", target_id=index_id)
        elsewhere = Job(
            tenant_id=served.api.tenant_id, kind="layer_report", status="succeeded", target_id="0" * 32
        )
        queued = Job(tenant_id=served.api.tenant_id, kind="layer_report", status="queued", target_id=index_id)
        session.add_all([foreign, elsewhere, queued])
        session.flush()
        ids = foreign.id, elsewhere.id, queued.id
    assert_problem(_put(served, mode="pinned-report", report_id=ids[0]), 404, "does not exist")
    assert_problem(_put(served, mode="pinned-report", report_id=ids[1]), 409, "report of index")
    assert_problem(_put(served, mode="pinned-report", report_id=ids[2]), 409, "queued")
    # Another tenant neither reads nor sets this index's settings.
    assert_problem(other.get(f"/v1/indexes/{index_id}/settings"), 404, "index")
    assert_problem(_put(served, client=other, mode="defaults"), 404, "index")
    # Nothing refused changed anything.
    view = served.client.get(f"/v1/indexes/{index_id}/settings").json()
    assert view["mode"] == "latest-report" and view["report_id"] is None
    with served.api.session_factory.begin() as session:
        for job_id in ids:
            session.delete(session.get(Job, job_id))


@pytest.mark.parametrize("target", ["target_recall", "target_precision"])
def test_check_targets_are_checked_and_name_their_field(served, target):
    _pin(served, served.report["id"])
    for bad in ("0", "-0.1", "1.5", "nan"):
        assert_problem(_submit_check(served, **{target: bad}), 422, target)
    other = "target_precision" if target == "target_recall" else "target_recall"
    assert_problem(_submit_check(served, **{target: "0.5", other: "0.5"}), 422, target)
    assert_problem(
        _submit_check(served, **{target: "0.5", "threshold_percentile": "5"}), 422, "threshold_percentile"
    )
    # The index's dataset has no noisy column: `dataset` is refused, naming the mask.
    assert_problem(
        _submit_check(served, **{target: "0.5", "noisy": "dataset"}), 422, "noisy", "no noisy column"
    )
    assert_problem(_submit_check(served, noisy={"rows": [1, 2]}), 422, "noisy", "only with")
    assert_problem(_submit_check(served, **{target: "0.5", "noisy": "[1, 2]"}), 422, "noisy")
    # Too small: fewer than 10 known-noisy rows, or fewer than 10 clean ones.
    small = _submit_check(served, **{target: "0.5", "noisy": {"rows": list(range(9))}})
    assert_problem(small, 422, target, "too small to calibrate", "9 known-noisy")
    most = _submit_check(served, **{target: "0.5", "noisy": {"rows": list(range(ROWS - 9))}})
    assert_problem(most, 422, target, "too small to calibrate", "9 clean")

    # No mask given: the pinned report's explicit noisy rows.
    response = _submit_check(served, **{target: "0.75"})
    assert response.status_code == 202, response.text
    params = response.json()["params"]
    assert params["calibration"] == {
        "target": target.removeprefix("target_"),
        "value": 0.75,
        "noisy": {"source": "rows", "rows": served.planted},
    }
    assert params["threshold_percentile"] is None
    _cancel(served, response.json()["id"])
    given = list(range(10, 30))
    response = _submit_check(served, **{target: "1", "noisy": {"rows": given}})
    assert response.status_code == 202, response.text
    assert response.json()["params"]["calibration"]["noisy"] == {"source": "rows", "rows": given}
    _cancel(served, response.json()["id"])

    # No report to fall back on (mode defaults), no column, nothing given: no mask, 422 naming the target.
    _put(served, mode="defaults")
    assert_problem(_submit_check(served, **{target: "0.5"}), 422, target, "no noisy mask")
    _put(served, mode="latest-report")


def test_audit_review_targets_are_checked_and_name_their_field(served):
    base = {
        "layers": ["head"],
        "estimator": "grad-dot",
        "aggregation": "rank",
        "reference": {"examples": served.examples},
    }
    url = f"/v1/indexes/{served.index['id']}/audits"
    for bad in (0, -0.1, 1.5):
        response = served.client.post(url, json={**base, "review": {"target_recall": bad}})
        assert_problem(response, 422, "review.target_recall")
    assert_problem(served.client.post(url, json={**base, "review": {}}), 422, "review.target_recall")
    # No noisy column and no rows: no mask.
    assert_problem(
        served.client.post(url, json={**base, "review": {"target_recall": 0.5}}), 422, "review.noisy"
    )
    response = served.client.post(url, json={**base, "review": {"target_recall": 0.5, "noisy": "dataset"}})
    assert_problem(response, 422, "review.noisy", "no noisy column")
    response = served.client.post(url, json={**base, "review": {"target_recall": 0.5, "noisy": None}})
    assert_problem(response, 422, "review.noisy")
    response = served.client.post(
        url, json={**base, "review": {"target_recall": 0.5, "noisy": {"rows": [ROWS]}}}
    )
    assert_problem(response, 422, "review.noisy.rows")

    response = served.client.post(
        url, json={**base, "review": {"target_recall": 0.8, "noisy": {"rows": [3, 1]}}}
    )
    assert response.status_code == 202, response.text
    assert response.json()["params"]["review"] == {
        "target_recall": 0.8,
        "noisy": {"source": "rows", "rows": [1, 3]},
    }
    _cancel(served, response.json()["id"])


def test_audit_rows_page_the_review_prefix(served):
    """GET /v1/audits/{id}/rows?review=true serves the first summary.review.rows rows of the ranking (the runner
    that measures the prefix is tested with the runner; here the summary says it) and is 409 without one."""
    audit = _audit(served, layers=["head", "block.2.attn.v"], estimator="grad-dot", aggregation="rank")
    assert audit["params"]["review"] is None
    assert_problem(
        served.client.get(f"/v1/audits/{audit['id']}/rows", params={"review": "true"}),
        409,
        "no review prefix",
    )
    everything = _ranking(served, audit["id"])["items"]
    with served.api.session_factory.begin() as session:
        job = session.get(Job, audit["id"])
        result = dict(job.result)
        result["summary"] = {**result["summary"], "review": {"rows": 7, "target_recall": 0.5}}
        session.execute(update(Job).where(Job.id == job.id).values(result=result))
    page = _ranking(served, audit["id"], review="true")
    assert page["review"] is True and page["total"] == 7 and page["items"] == everything[:7]
    page = _ranking(served, audit["id"], review="true", offset=5, limit=10)
    assert page["items"] == everything[5:7]
    jsonl = served.client.get(f"/v1/audits/{audit['id']}/rows", params={"review": "true", "format": "jsonl"})
    assert [json.loads(line)["row"] for line in jsonl.text.splitlines()] == [
        row["row"] for row in everything[:7]
    ]
    assert served.client.get(f"/v1/audits/{audit['id']}").json()["summary"]["review"]["rows"] == 7
    assert _ranking(served, audit["id"])["total"] == len(everything) == ROWS


def test_an_unreadable_report_cannot_be_pinned_and_is_passed_over_when_latest(served):
    """A report whose document fails its checksum: pinning it is refused (409, nothing changes); as the latest
    report, queries keep being answered, with the defaults, and say why."""
    other = _run_report(served.api, served.index["id"], **served.report_body)
    path = served.api.settings.resolved_artifacts_dir / "jobs" / other["id"] / "report.json"
    original = path.read_bytes()
    path.write_bytes(original.replace(b'"n_train":', b'"n_train": '))
    try:
        response = _put(served, mode="pinned-report", report_id=other["id"])
        assert_problem(response, 409, "corrupted")
        assert (
            served.client.get(f"/v1/indexes/{served.index['id']}/settings").json()["mode"] == "latest-report"
        )
        answer = _query(served)
        assert answer["settings_source"] == "defaults" and answer["layers"] == INDEX_LAYERS
        note = answer["settings"]["note"]
        assert note.startswith(f"report {other['id']} makes no recommendation: ") and "cannot be read" in note
        # Named settings need no report.
        named = _query(served, layers="head", estimator="grad-dot", aggregation="rank")
        assert named["settings_source"] == "request" and named["settings"]["note"] is None
    finally:
        path.write_bytes(original)
    assert served.client.delete(f"/v1/reports/{other['id']}").status_code == 204
    assert _query(served)["settings_source"] == f"report {served.report['id']}"
