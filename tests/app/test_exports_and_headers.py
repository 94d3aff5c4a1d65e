"""Exports, headers, logs and strict types (issue 13, findings 3 and 7): CSV cells a spreadsheet would evaluate
are neutralized while JSONL keeps the raw value; every download names a file; every response says nosniff,
JSON answers and the report page carry a real Content-Security-Policy header; a key in the query string is
refused and never reaches uvicorn's access log; echoed input in errors is cut short; JSON bodies are typed
strictly (form fields and query parameters stay lax)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from app.jobs.steps import run_build_inline, run_job_inline
from app.web.report_page import CONTENT_SECURITY_POLICY
from tests.app.conftest import ROOT_DIR, build_api, csv_bytes, fresh_api, make_settings
from tests.worker.support import assert_problem, free_port, register_model

FORMULA = '=HYPERLINK("http://x","y")'
# Texts, pairs and label names whose first character a spreadsheet evaluates (OWASP: = + - @ tab CR).
DANGEROUS = [FORMULA, "+1+2", "-2+3", "@SUM(A1:A2)", "\tcmd", "\r=1+1"]
LABELS = ["+pos", "-neg", "@mid"]  # label names: the dataset numbers them in sorted order
SAFE = "a gorgeous , witty , seductive movie ."
ROWS = [
    (
        DANGEROUS[i // 2 % len(DANGEROUS)] if i % 2 == 0 else f"{SAFE} {i}",
        DANGEROUS[i // 3 % len(DANGEROUS)] if i % 3 == 0 else f"pair {i}",
        LABELS[i % 3],
    )
    for i in range(18)
]
JSON_CSP = "default-src 'none'; frame-ancestors 'none'"
FIRST_DANGEROUS = tuple("=+-@\t\r")


@pytest.fixture(scope="module")
def served(tmp_path_factory, sqlite_template, tiny_model_dir):
    """An API with a tiny-BERT index over rows whose texts, pairs and label names start with formula characters,
    a finished audit (mean aggregation: negative scores) and a finished layer report."""
    built = fresh_api(tmp_path_factory, sqlite_template, "exports", max_active_jobs_per_tenant=50)
    model = register_model(built.client, tiny_model_dir("bert", "classification", num_labels=3), num_labels=3)
    response = built.client.post(
        "/v1/datasets",
        files={"file": ("evil.csv", csv_bytes(ROWS, header=("sentence", "pair", "label")), "text/csv")},
        data={"name": "evil", "text_column": "sentence", "text_pair_column": "pair", "label_column": "label"},
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["label_names"] == sorted(LABELS)
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "layers": ["block.1.mlp.down", "head"]}
    index = built.client.post("/v1/indexes", json=body).json()
    run_build_inline(built.settings, built.session_factory, index["job"]["id"])
    reference = {"examples": [{"text": SAFE, "label": "+pos"}, {"text": "dull and bleak", "label": "-neg"}]}
    created = built.client.post(
        f"/v1/indexes/{index['id']}/audits", json={"reference": reference, "aggregation": "mean"}
    ).json()
    run_job_inline(built.settings, built.session_factory, created["id"])
    report = built.client.post(
        f"/v1/indexes/{index['id']}/reports",
        json={"reference": reference, "estimators": ["grad-dot"], "aggregations": ["mean"], "cancellation_rows": 0},
    ).json()
    run_job_inline(built.settings, built.session_factory, report["id"])
    yield {"api": built, "model": model, "dataset": dataset, "index": index, "audit": created, "report": report}
    built.close()


def _neutralized(value: str) -> str:
    return "'" + value if value.startswith(FIRST_DANGEROUS) else value


# ------------------------------------------------------------------------------------------ exports


def test_csv_cells_are_neutralized_and_jsonl_keeps_the_raw_values(served):
    api, audit_id = served["api"], served["audit"]["id"]
    url = f"/v1/audits/{audit_id}/rows"
    raw = [json.loads(line) for line in api.client.get(url, params={"format": "jsonl"}).text.splitlines()]
    assert len(raw) == len(ROWS)
    # JSONL is the raw record: the formula exactly as the dataset has it.
    for record in raw:
        text, pair, label = ROWS[record["row"]]
        assert record["text"] == text and record["text_pair"] == pair
        assert record["label_name"] == label
    assert any(record["text"] == FORMULA for record in raw)

    response = api.client.get(url, params={"format": "csv"})
    assert response.status_code == 200, response.text
    records = list(csv.DictReader(io.StringIO(response.text, newline="")))
    assert len(records) == len(raw)
    negative = 0
    for cells, record in zip(records, raw, strict=True):
        assert cells["text"] == _neutralized(record["text"])
        assert cells["text_pair"] == _neutralized(record["text_pair"])
        assert cells["label_name"] == _neutralized(record["label_name"])
        assert not cells["label_name"].startswith(("+", "-", "@")) and cells["label_name"][0] == "'"
        # Numeric columns stay numbers: a negative score is written as such and parses back exactly.
        assert float(cells["score"]) == record["score"] and int(cells["label"]) == record["label"]
        assert int(cells["rank"]) == record["rank"] and int(cells["row"]) == record["row"]
        for layer in record["layers"]:
            assert float(cells[f"{layer['layer']}:score"]) == layer["score"]
            assert float(cells[f"{layer['layer']}:aggregate"]) == layer["aggregate"]
            negative += layer["score"] < 0
        negative += record["score"] < 0
    assert negative > 0, "the mean aggregation of an untrained model gives some negative scores"
    texts = {cells["text"] for cells in records}
    assert "'" + FORMULA in texts and FORMULA not in texts
    assert {"'+1+2", "'-2+3", "'@SUM(A1:A2)", "'\tcmd", "'\r=1+1"} <= texts
    # The JSON page is the raw record too.
    page = api.client.get(url, params={"limit": 1000}).json()["items"]
    assert [item["text"] for item in page] == [record["text"] for record in raw]


def test_a_carriage_return_in_a_text_cannot_split_its_csv_row(served):
    api, audit_id = served["api"], served["audit"]["id"]
    text = api.client.get(f"/v1/audits/{audit_id}/rows", params={"format": "csv"}).text
    # RFC 4180 rows: CRLF-terminated, a cell holding a bare CR is quoted, so every row parses back whole.
    lines = text.split("\r\n")
    assert lines[-1] == "" and len(lines) == 1 + len(ROWS) + 1
    assert '"\'\r=1+1"' in text
    assert len(list(csv.reader(io.StringIO(text, newline="")))) == len(ROWS) + 1


def test_every_download_names_its_file(served):
    api, audit_id, report_id = served["api"], served["audit"]["id"], served["report"]["id"]
    rows = f"/v1/audits/{audit_id}/rows"
    expected = {
        (rows, "csv"): f'attachment; filename="audit-{audit_id}-rows.csv"',
        (rows, "jsonl"): f'attachment; filename="audit-{audit_id}-rows.jsonl"',
        (f"/v1/audits/{audit_id}/scores", None): f'attachment; filename="audit-{audit_id}-scores.safetensors"',
        (f"/v1/reports/{report_id}/html", None): f'inline; filename="report-{report_id}.html"',
    }
    for (url, fmt), disposition in expected.items():
        response = api.client.get(url, params={"format": fmt} if fmt else None)
        assert response.status_code == 200, response.text
        assert response.headers["content-disposition"] == disposition


def test_the_rows_route_documents_the_neutralization(served):
    operation = served["api"].client.get("/openapi.json").json()["paths"]["/v1/audits/{audit_id}/rows"]["get"]
    assert "spreadsheet" in operation["description"] and "jsonl" in operation["description"].lower()


# ------------------------------------------------------------------------------------------ headers


def test_every_response_says_nosniff_and_json_answers_carry_a_restrictive_csp(served):
    api, audit_id = served["api"], served["audit"]["id"]
    anonymous = TestClient(api.app)
    responses = {
        "json": api.client.get("/v1/models"),
        "problem-404": api.client.get("/v1/audits/nope"),
        "problem-401": anonymous.get("/v1/models"),
        "problem-422": api.client.post("/v1/indexes", json={"model_id": 1}),
        "health": api.client.get("/healthz"),
        "openapi": api.client.get("/openapi.json"),
        "csv": api.client.get(f"/v1/audits/{audit_id}/rows", params={"format": "csv"}),
        "safetensors": api.client.get(f"/v1/audits/{audit_id}/scores"),
        "delete-204": api.client.delete(f"/v1/audits/{audit_id}-missing"),
    }
    for name, response in responses.items():
        assert response.headers.get("x-content-type-options") == "nosniff", name
        assert response.headers.get("content-security-policy") == JSON_CSP, name
    # Swagger UI and ReDoc load their scripts from a CDN: no restrictive CSP there (nosniff still).
    for page in ("/docs", "/redoc"):
        response = api.client.get(page)
        assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" not in response.headers


def test_the_report_page_sends_its_csp_as_a_header(served):
    api, report_id = served["api"], served["report"]["id"]
    response = api.client.get(f"/v1/reports/{report_id}/html")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    header = response.headers["content-security-policy"]
    assert header == f"{CONTENT_SECURITY_POLICY}; frame-ancestors 'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert 'http-equiv="Content-Security-Policy"' in response.text  # the meta tag stays, for saved copies


# ------------------------------------------------------------------------------------ keys and the log


def test_a_key_in_the_query_string_is_refused(served):
    api = served["api"]
    anonymous = TestClient(api.app)
    for query in ({"api_key": api.token}, {"token": "SECRET"}, {"access_token": "SECRET"}, {"Password": "x"}):
        for client in (anonymous, api.client):  # refused even beside a valid header key
            response = client.get("/v1/models", params=query)
            body = assert_problem(response, 400, "header")
            assert "SECRET" not in response.text and api.token not in response.text
            assert body["detail"].count(next(iter(query))) == 1  # the parameter is named, its value never
    # Parameters that merely contain "key" in their value, or an unrelated name, are fine.
    assert api.client.get("/v1/models", params={"limit": 5}).status_code == 200


def _wait_until_up(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not come up")


@pytest.mark.parametrize("started_by", ["uvicorn-factory", "embedded"])
def test_secrets_in_the_query_string_never_reach_the_access_log(tmp_path, sqlite_url, started_by):
    """A real uvicorn, started both ways the service is run; its access log is captured from its output."""
    port = free_port()
    env = {
        **os.environ,
        "INFLUENCE_DATA_DIR": str(tmp_path / "data"),
        "INFLUENCE_DATABASE_URL": sqlite_url,
        "INFLUENCE_COMPILED_SCORING": "false",
    }
    if started_by == "embedded":
        command = [sys.executable, "-m", "app.embedded", "serve", "--no-worker", "--port", str(port)]
    else:
        command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--port", str(port)]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(port, process)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/v1/models?api_key=SECRET1&limit=5").status_code == 400
        assert httpx.get(f"{base}/healthz?x=1&client_secret=SECRET2&Token=SECRET3").status_code == 400
        assert httpx.get(f"{base}/v1/models?limit=7", headers={"X-API-Key": "SECRET4"}).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    logged = log_path.read_text(errors="replace")
    assert "GET /v1/models?api_key=[redacted]&limit=5" in logged, logged
    assert "GET /healthz?x=1&client_secret=[redacted]&Token=[redacted]" in logged, logged
    assert "GET /v1/models?limit=7" in logged, logged
    assert "SECRET" not in logged, logged


# ------------------------------------------------------------------------------------ echoed input


def test_echoed_input_is_cut_short(tmp_path, sqlite_url, default_roots):
    api = build_api(make_settings(tmp_path, sqlite_url, default_roots))
    huge = "x" * 1_000_000
    cases = [
        api.client.post("/v1/indexes", json={"model_id": "m", "dataset_id": "d", huge: 1}),
        api.client.post("/v1/indexes", json={"model_id": "m", "dataset_id": "d", "layers": {huge: "a"}}),
        api.client.post("/v1/indexes/i/rows/delete", json={"row_ids": ["x"] * 200_000}),
        api.client.post("/v1/indexes", json={"model_id": "m", "dataset_id": "d", "chunk_size": [0] * 200_000}),
    ]
    for response in cases:
        assert 400 <= response.status_code < 500, response.text[:300]
        assert response.headers["content-type"] == "application/problem+json"
        assert len(response.content) < 16_000, len(response.content)
        body = response.json()
        assert len(body["detail"]) < 700
        for error in body.get("errors") or []:
            assert len(error["msg"]) < 700 and all(len(part) < 700 for part in error["loc"])
    detail = cases[0].json()["detail"]
    assert "characters dropped)" in detail and "Extra inputs" in detail
    api.close()


# ------------------------------------------------------------------------------------------ strict types


def test_json_bodies_are_strictly_typed(served):
    api, index_id = served["api"], served["index"]["id"]
    client = api.client
    query = {"examples": [{"text": SAFE, "label": 0}], "layers": "head"}
    assert client.post(f"/v1/indexes/{index_id}/query", json={**query, "top_k": 3, "vote_k": 1}).status_code == 200
    refused = {
        f"/v1/indexes/{index_id}/query": [
            {**query, "top_k": True},
            {**query, "top_k": "5"},
            {**query, "top_k": 5.0},
            {**query, "approximate": 1},
            {**query, "approximate": "true"},
            {**query, "vote_k": "0.5"},
            {**query, "examples": [{"text": SAFE, "label": True}]},
        ],
        "/v1/indexes": [
            {"model_id": served["model"]["id"], "dataset_id": served["dataset"]["id"], "chunk_size": "60"},
            {"model_id": served["model"]["id"], "dataset_id": served["dataset"]["id"], "projection": {"dim": True}},
        ],
        f"/v1/indexes/{index_id}/audits": [
            {"reference": {"examples": query["examples"]}, "correct_only": 1},
            {"reference": {"dataset_id": served["dataset"]["id"], "limit": "5"}},
        ],
        f"/v1/indexes/{index_id}/reports": [
            {"reference": {"examples": query["examples"]}, "cancellation_rows": True},
        ],
        f"/v1/indexes/{index_id}/rows/delete": [{"row_ids": [True]}, {"row_ids": ["1"]}],
        "/v1/experiments": [
            {
                "base_model_id": served["model"]["id"],
                "dataset_id": served["dataset"]["id"],
                "reference": {"examples": query["examples"]},
                "epochs": "3",
            },
            {
                "base_model_id": served["model"]["id"],
                "dataset_id": served["dataset"]["id"],
                "reference": {"examples": query["examples"]},
                "retraining": {"enabled": "true"},
            },
        ],
    }
    for url, bodies in refused.items():
        for body in bodies:
            response = client.post(url, json=body)
            assert_problem(response, 422)
            assert response.json()["type"].endswith("invalid-request"), (url, body, response.text)
