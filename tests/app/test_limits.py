"""Every limit is a setting, and going over it is a clear 4xx problem naming the limit: upload bytes, request
bytes, rows, text length (rows and query examples), examples per query, top_k (concurrent jobs per tenant: see
test_tenancy.py). Nothing is registered by a refused request."""

from __future__ import annotations

import json

import pytest

from app.models import Dataset
from tests.app.conftest import build_api, make_settings, tsv_bytes
from tests.worker.support import assert_problem


def _api(tmp_path, sqlite_url, default_roots, **limits):
    return build_api(make_settings(tmp_path, sqlite_url, default_roots, **limits))


def _upload(api, content: bytes):
    return api.client.post(
        "/v1/datasets", files={"file": ("d.tsv", content)}, data={"text_column": "sentence"}
    )


def _query(api, **body):
    payload = {"examples": [{"text": "a fine film", "label": 1}], **body}
    return api.client.post("/v1/indexes/some-index/query", json=payload)


@pytest.mark.parametrize(
    ("setting", "value", "request_", "status", "fragment"),
    [
        ("max_upload_bytes", 1000, lambda api, rows: _upload(api, tsv_bytes(rows[:100])), 413, "limit of 1000"),
        ("max_rows", 10, lambda api, rows: _upload(api, tsv_bytes(rows[:11])), 413, "more than 10 rows"),
        ("max_text_chars", 12, lambda api, rows: _upload(api, tsv_bytes(rows[:5])), 422, "limit is 12"),
        (
            "max_text_chars",
            12,
            lambda api, rows: _query(api, examples=[{"text": "x" * 13, "label": 1}]),
            422,
            "max_text_chars",
        ),
        (
            "max_query_examples",
            2,
            lambda api, rows: _query(api, examples=[{"text": "x", "label": 1}] * 3),
            422,
            "max_query_examples",
        ),
        ("max_top_k", 5, lambda api, rows: _query(api, top_k=6), 422, "max_top_k"),
        (
            "max_request_bytes",
            4096,
            lambda api, rows: _query(api, examples=[{"text": "x" * 5000, "label": 1}]),
            413,
            "limit of 4096",
        ),
    ],
    ids=["upload-bytes", "rows", "row-text", "query-text", "query-examples", "top-k", "request-bytes"],
)
def test_each_limit_is_a_setting_with_a_clear_4xx(
    tmp_path, sqlite_url, default_roots, sst2_rows, setting, value, request_, status, fragment
):
    api = _api(tmp_path, sqlite_url, default_roots, **{setting: value})
    body = assert_problem(request_(api, sst2_rows), status, fragment)
    assert body["type"].startswith("urn:influence:problem:")
    assert api.count(Dataset) == 0 and api.artifact_entries() == []
    # Just under the limit is accepted (or reaches the next check: the query's index does not exist).
    relaxed = _api(tmp_path / "relaxed", sqlite_url, default_roots, **{setting: value * 100})
    assert request_(relaxed, sst2_rows).status_code in (201, 404)


def test_a_json_body_over_the_limit_is_refused_while_streaming(tmp_path, sqlite_url, default_roots):
    """Without a Content-Length (chunked), the body is counted as it arrives and refused past the limit."""
    api = _api(tmp_path, sqlite_url, default_roots, max_request_bytes=2048)
    payload = json.dumps({"examples": [{"text": "x" * 4000, "label": 1}]}).encode()

    def chunks():
        for start in range(0, len(payload), 512):
            yield payload[start : start + 512]

    response = api.client.post(
        "/v1/indexes/some-index/query", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "limit of 2048")
    # Uploads keep their own, larger limit.
    api_upload = _api(tmp_path / "u", sqlite_url, default_roots, max_request_bytes=2048)
    rows = [(f"sentence number {i} is long enough to matter", i % 2) for i in range(200)]
    assert _upload(api_upload, tsv_bytes(rows)).status_code == 201
