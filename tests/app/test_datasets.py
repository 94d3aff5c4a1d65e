"""Dataset registration over HTTP: real SST-2 rows in every format, server-side paths, and bad input that is
refused with the right 4xx problem and leaves no row and no file behind."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from app.models import Dataset
from tests.app.conftest import (
    build_api,
    csv_bytes,
    jsonl_bytes,
    make_settings,
    parquet_bytes,
    tsv_bytes,
)
from tests.conftest import SST2

PROBLEM = "application/problem+json"


def upload(api, filename: str, content: bytes, **form):
    return api.client.post("/v1/datasets", files={"file": (filename, content)}, data=form)


def all_rows(api, dataset_id: str, page: int = 128) -> list[dict]:
    rows, offset = [], 0
    while True:
        body = api.client.get(
            f"/v1/datasets/{dataset_id}/rows", params={"offset": offset, "limit": page}
        ).json()
        rows.extend(body["items"])
        offset += page
        if offset >= body["total"]:
            return rows


def assert_problem(response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


# --- the four formats, same real rows ---------------------------------------------------------------------


def _files(rows):
    sentences = [s for s, _ in rows]
    labels = [label for _, label in rows]
    return {
        "tsv": ("sst2.tsv", tsv_bytes(rows)),
        "csv": ("sst2.csv", csv_bytes(rows)),
        "jsonl": ("sst2.jsonl", jsonl_bytes({"sentence": s, "label": y} for s, y in rows)),
        "parquet": ("sst2.parquet", parquet_bytes({"sentence": sentences, "label": labels})),
    }


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_upload_each_format_of_real_sst2_rows(any_api, sst2_rows, fmt):
    filename, content = _files(sst2_rows)[fmt]
    response = upload(any_api, filename, content, text_column="sentence")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == fmt
    assert body["row_count"] == len(sst2_rows) == 300
    assert body["content_hash"] == hashlib.sha256(content).hexdigest()
    assert body["size_bytes"] == len(content)
    assert body["labels"] == [0, 1]
    assert body["label_names"] is None
    assert body["columns"] == {"text": "sentence", "text_pair": None, "label": "label", "noisy": None}
    assert body["name"] == "sst2"

    rows = all_rows(any_api, body["id"])
    assert [(r["text"], r["label"]) for r in rows] == sst2_rows
    assert [r["row"] for r in rows] == list(range(300))

    # Reading back through the API and through the service the worker uses give the same rows.
    from app.services.datasets import get_dataset, load_examples

    with any_api.session_factory() as session:
        dataset = get_dataset(session, body["id"], any_api.tenant_id)
        examples = load_examples(any_api.settings, dataset)
    assert [(e.text, e.label) for e in examples] == sst2_rows
    assert any_api.client.get(f"/v1/datasets/{body['id']}").json() == body
    listed = any_api.client.get("/v1/datasets").json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == body["id"]


def test_rows_paging_edges(api, sst2_rows):
    body = upload(api, "sst2.tsv", tsv_bytes(sst2_rows[:10]), text_column="sentence").json()
    page = api.client.get(f"/v1/datasets/{body['id']}/rows", params={"offset": 8, "limit": 5}).json()
    assert [r["row"] for r in page["items"]] == [8, 9]
    assert page["total"] == 10
    assert api.client.get(f"/v1/datasets/{body['id']}/rows", params={"offset": 10}).json()["items"] == []
    assert_problem(api.client.get(f"/v1/datasets/{body['id']}/rows", params={"limit": 1001}), 422, "limit")
    assert_problem(api.client.get(f"/v1/datasets/{body['id']}/rows", params={"offset": -1}), 422, "offset")


def test_label_names_are_numbered_in_sorted_order(api, sst2_rows):
    names = {0: "negative", 1: "positive"}
    rows = [(s, names[y]) for s, y in sst2_rows[:50]]
    body = upload(api, "named.csv", csv_bytes(rows), text_column="sentence").json()
    assert body["label_names"] == ["negative", "positive"]
    assert body["labels"] == [0, 1]
    got = all_rows(api, body["id"])
    assert [(r["label"], r["label_name"]) for r in got] == [(y, names[y]) for _, y in sst2_rows[:50]]


def test_text_pair_and_noisy_columns(any_api, sst2_rows):
    records = [
        {"premise": s, "hypothesis": s[::-1], "y": y, "flipped": i % 7 == 0}
        for i, (s, y) in enumerate(sst2_rows[:40])
    ]
    response = upload(
        any_api,
        "pairs.jsonl",
        jsonl_bytes(records),
        text_column="premise",
        text_pair_column="hypothesis",
        label_column="y",
        noisy_column="flipped",
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["has_noisy_flag"] is True
    rows = all_rows(any_api, body["id"])
    assert [(r["text"], r["text_pair"], r["label"], r["noisy"]) for r in rows] == [
        (r["premise"], r["hypothesis"], r["y"], r["flipped"]) for r in records
    ]


def test_noisy_flag_spellings_in_tsv(api, sst2_rows):
    flags = ["1", "0", "true", "False", "yes", "no"]
    rows = [(s, y, flags[i % len(flags)]) for i, (s, y) in enumerate(sst2_rows[:12])]
    body = upload(
        api,
        "n.tsv",
        tsv_bytes(rows, header=("sentence", "label", "noisy")),
        text_column="sentence",
        noisy_column="noisy",
    ).json()
    assert [r["noisy"] for r in all_rows(api, body["id"])] == [True, False, True, False, True, False] * 2


def test_causal_lm_completions_and_plain_text(api, sst2_rows):
    records = [{"prompt": s, "completion": "positive" if y else "negative"} for s, y in sst2_rows[:20]]
    body = upload(
        api,
        "lm.jsonl",
        jsonl_bytes(records),
        task="causal-lm",
        text_column="prompt",
        label_column="completion",
    ).json()
    assert body["task"] == "causal-lm" and body["labels"] == [] and body["label_names"] is None
    assert [r["label"] for r in all_rows(api, body["id"])] == [r["completion"] for r in records]

    plain = upload(
        api, "plain.tsv", tsv_bytes(sst2_rows[:5]), task="causal-lm", text_column="sentence"
    ).json()
    assert plain["columns"]["label"] is None
    assert [r["label"] for r in all_rows(api, plain["id"])] == [None] * 5


def test_server_side_path_under_an_allowed_root(any_api):
    path = SST2 / "validation.tsv"
    response = any_api.client.post("/v1/datasets", data={"path": str(path), "text_column": "sentence"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["row_count"] == 872
    assert body["source"] == str(path.resolve())
    assert body["content_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body["name"] == "validation"


def test_artifact_is_normalised_jsonl_under_the_artifacts_dir(api, sst2_rows):
    body = upload(api, "x.tsv", tsv_bytes(sst2_rows[:3]), text_column="sentence", name="three").json()
    with api.session_factory() as session:
        dataset = session.get(Dataset, body["id"])
        assert not os.path.isabs(dataset.path)
    folder = api.settings.resolved_artifacts_dir / "datasets" / body["id"]
    lines = (folder / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"text": s, "text_pair": None, "label": y, "noisy": None} for s, y in sst2_rows[:3]
    ]
    assert json.loads((folder / "meta.json").read_text())["content_hash"] == body["content_hash"]
    assert body["name"] == "three"
    assert [p.name for p in (api.settings.resolved_artifacts_dir / "tmp").iterdir()] == []


# --- bad input: the right 4xx, nothing left behind ----------------------------------------------------------

GOOD_ROWS = [("a fine film", 1), ("a dull film", 0), ("great", 1), ("poor", 0)]


def _jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


BAD_UPLOADS = [
    # (id, filename, content, form, status, fragments)
    ("missing-text-column", "d.csv", csv_bytes(GOOD_ROWS), {}, 422, ["'text'", "sentence, label"]),
    ("missing-label-column", "d.tsv", tsv_bytes(GOOD_ROWS, header=("text", "y")), {}, 422, ["'label'"]),
    (
        "wrong-label-mapping",
        "d.csv",
        csv_bytes(GOOD_ROWS),
        {"text_column": "sentence", "label_column": "lbl"},
        422,
        ["'lbl'"],
    ),
    (
        "invalid-json",
        "d.jsonl",
        _jsonl('{"text": "a", "label": 1}', '{"text": "b", "label": 0}', '{"text": "c",'),
        {},
        422,
        ["line 3", "invalid JSON"],
    ),
    (
        "json-not-object",
        "d.jsonl",
        _jsonl('{"text": "a", "label": 1}', '["b", 0]'),
        {},
        422,
        ["line 2", "JSON object"],
    ),
    (
        "jsonl-row-missing-label",
        "d.jsonl",
        _jsonl('{"text": "a", "label": 1}', "", '{"text": "b"}'),
        {},
        422,
        ["line 3", "'label'"],
    ),
    ("csv-wrong-field-count", "d.csv", b"text,label\na,1\nb,0,extra\n", {}, 422, ["line 3", "3 fields"]),
    ("tsv-mixed-labels", "d.tsv", b"text\tlabel\na\t1\nb\tpositive\n", {}, 422, ["line 3", "line 2"]),
    ("negative-label", "d.tsv", b"text\tlabel\na\t1\nb\t-1\n", {}, 422, ["line 3", "negative"]),
    (
        "fractional-label",
        "d.jsonl",
        _jsonl('{"text": "a", "label": 1.5}'),
        {},
        422,
        ["line 1", "whole number"],
    ),
    ("boolean-label", "d.jsonl", _jsonl('{"text": "a", "label": true}'), {}, 422, ["line 1", "label"]),
    ("empty-text", "d.tsv", b"text\tlabel\na\t1\n  \t0\n", {}, 422, ["line 3", "empty"]),
    ("text-not-string", "d.jsonl", _jsonl('{"text": 5, "label": 1}'), {}, 422, ["line 1", "string"]),
    ("empty-label", "d.csv", b"text,label\na,1\nb,\n", {}, 422, ["line 3", "empty"]),
    ("empty-file", "d.csv", b"", {}, 422, ["empty"]),
    ("header-only", "d.csv", b"text,label\n", {}, 422, ["no data rows"]),
    ("blank-jsonl", "d.jsonl", b"\n\n", {}, 422, ["no data rows"]),
    ("not-utf8", "d.tsv", b"text\tlabel\na\t1\n\xff\xfe bad\t0\n", {}, 422, ["line 3", "UTF-8"]),
    ("bad-quoting", "d.csv", b'text,label\n"a "b" c,1\n', {}, 422, ["line 2"]),
    ("bad-noisy", "d.tsv", b"text\tlabel\tn\na\t1\tmaybe\n", {"noisy_column": "n"}, 422, ["line 2", "'n'"]),
    ("unknown-extension", "d.txt", tsv_bytes(GOOD_ROWS), {}, 422, ["format"]),
    ("not-parquet", "d.parquet", b"PAR1 this is not parquet", {}, 422, ["Parquet"]),
    (
        "parquet-int-text",
        "d.parquet",
        parquet_bytes({"text": [1, 2], "label": [0, 1]}),
        {},
        422,
        ["'text'", "int64"],
    ),
    (
        "parquet-missing-column",
        "d.parquet",
        parquet_bytes({"sentence": ["a"], "label": [0]}),
        {},
        422,
        ["'text'", "sentence"],
    ),
    (
        "parquet-null-label",
        "d.parquet",
        parquet_bytes({"text": ["a", "b"], "label": [0, None]}),
        {},
        422,
        ["row 2", "label"],
    ),
    ("label-too-large", "d.tsv", b"text\tlabel\na\t1\nb\t10000\n", {}, 422, ["line 3", "below 10000"]),
    (
        "duplicate-mapping",
        "d.csv",
        csv_bytes(GOOD_ROWS),
        {"text_column": "sentence", "label_column": "sentence"},
        422,
        ["more than one role"],
    ),
]


@pytest.mark.parametrize(
    ("filename", "content", "form", "status", "fragments"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_bad_upload_is_refused_and_leaves_nothing(api, filename, content, form, status, fragments):
    assert_problem(upload(api, filename, content, **form), status, *fragments)
    api.assert_nothing_left()


@pytest.mark.parametrize("case", ["invalid-json", "missing-text-column", "parquet-null-label"])
def test_bad_upload_on_both_databases(any_api, case):
    _, filename, content, form, status, fragments = next(c for c in BAD_UPLOADS if c[0] == case)
    assert_problem(upload(any_api, filename, content, **form), status, *fragments)
    any_api.assert_nothing_left()


def test_bad_row_after_many_good_ones_leaves_no_partial_artifact(api, sst2_rows):
    rows = [*sst2_rows, ("broken", "x")]  # 300 integer labels, then a name
    assert_problem(upload(api, "late.tsv", tsv_bytes(rows), text_column="sentence"), 422, "line 302")
    api.assert_nothing_left()


def test_text_longer_than_the_limit(tmp_path, sqlite_url, default_roots):
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots, max_text_chars=10))
    response = upload(built, "d.tsv", b"text\tlabel\nshort\t1\nmuch longer than ten\t0\n")
    assert_problem(response, 422, "line 3", "20 characters", "limit is 10")
    built.assert_nothing_left()


def test_more_rows_than_the_limit_is_413(tmp_path, sqlite_url, default_roots, sst2_rows):
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots, max_rows=100))
    assert_problem(upload(built, "d.tsv", tsv_bytes(sst2_rows), text_column="sentence"), 413, "100 rows")
    columns = {"sentence": [s for s, _ in sst2_rows], "label": [y for _, y in sst2_rows]}
    response = upload(built, "d.parquet", parquet_bytes(columns), text_column="sentence")
    assert_problem(response, 413, "300 rows; the limit is 100")
    built.assert_nothing_left()


def test_file_and_path_are_exclusive(api, sst2_rows):
    assert_problem(api.client.post("/v1/datasets", data={"text_column": "sentence"}), 422, "exactly one")
    response = api.client.post(
        "/v1/datasets",
        files={"file": ("d.tsv", tsv_bytes(sst2_rows[:3]))},
        data={"path": str(SST2 / "dev.tsv"), "text_column": "sentence"},
    )
    assert_problem(response, 422, "exactly one")
    api.assert_nothing_left()


def test_form_fields_are_validated(api):
    response = api.client.post(
        "/v1/datasets", files={"file": ("d.tsv", tsv_bytes(GOOD_ROWS))}, data={"format": "xlsx"}
    )
    body = assert_problem(response, 422, "format")
    assert body["errors"][0]["loc"] == ["body", "format"]
    response = api.client.post(
        "/v1/datasets", files={"file": ("d.tsv", tsv_bytes(GOOD_ROWS))}, data={"task": "regression"}
    )
    assert_problem(response, 422, "task")
    api.assert_nothing_left()


# --- server-side paths --------------------------------------------------------------------------------------


def test_server_side_paths_are_confined_to_the_allowed_roots(api, allowed_root, tmp_path):
    inside = allowed_root / "paths-test"
    inside.mkdir(exist_ok=True)
    (inside / "ok.tsv").write_bytes(tsv_bytes(GOOD_ROWS))
    escape_link = inside / "etc-link"
    if not escape_link.exists():
        escape_link.symlink_to("/etc")
    outside_file = inside / "outside.tsv"
    if not outside_file.exists():
        outside_file.symlink_to("/etc/hostname")

    def post(path):
        return api.client.post("/v1/datasets", data={"path": path})

    assert_problem(post("/etc/passwd"), 403, "outside the allowed roots")
    assert_problem(post(f"{inside}/../../../../../etc/passwd"), 403, "outside the allowed roots")
    assert_problem(post(f"{escape_link}/passwd"), 403, "outside the allowed roots")
    assert_problem(post(str(outside_file)), 403, "outside the allowed roots")
    assert_problem(post("relative/ok.tsv"), 422, "absolute")
    assert_problem(post(str(inside / "missing.tsv")), 422, "not an existing file")
    assert_problem(post(str(inside)), 422, "not an existing file")
    api.assert_nothing_left()
    ok = api.client.post("/v1/datasets", data={"path": str(inside / "ok.tsv"), "text_column": "sentence"})
    assert ok.status_code == 201, ok.text


def test_no_allowed_roots_refuses_every_path(tmp_path, sqlite_url):
    built = build_api(make_settings(tmp_path, sqlite_url, []))
    response = built.client.post(
        "/v1/datasets", data={"path": str(SST2 / "dev.tsv"), "text_column": "sentence"}
    )
    assert_problem(response, 403, "INFLUENCE_ALLOWED_ROOTS")


# --- upload size limits -------------------------------------------------------------------------------------


def test_upload_over_the_limit_is_413(tmp_path, sqlite_url, default_roots):
    limit = 64 * 1024
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots, max_upload_bytes=limit))
    line = b"a perfectly ordinary sentence about a film\t1\n"
    just_over = b"text\tlabel\n" + line * (limit // len(line) + 1)
    assert limit < len(just_over) < limit + 4096

    # The file is a little over: the body passes the framing allowance, the service counts the file.
    assert_problem(upload(built, "d.tsv", just_over), 413, f"limit of {limit} bytes")

    # Far over: refused from Content-Length before the body is read.
    huge = b"text\tlabel\n" + line * (3 * 1024 * 1024 // len(line))
    response = upload(built, "d.tsv", huge)
    assert_problem(response, 413, "exceeds the limit")

    # No Content-Length (chunked): counted while streaming.
    boundary = "xyzzy"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.tsv"\r\n'
        "Content-Type: text/tab-separated-values\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks():
        yield head
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]
        yield tail

    response = built.client.post(
        "/v1/datasets",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "exceeds the limit")
    built.assert_nothing_left()

    # Exactly at the limit is accepted.
    at_limit = b"text\tlabel\n" + line * ((limit - 11) // len(line))
    at_limit += b"x" * (limit - len(at_limit) - 3) + b"\t1\n"
    assert len(at_limit) == limit
    assert upload(built, "d.tsv", at_limit).status_code == 201


# --- unknown ids, and a database failure ---------------------------------------------------------------------


def test_unknown_dataset_ids_are_404(any_api):
    assert_problem(any_api.client.get("/v1/datasets/nope"), 404, "'nope'")
    assert_problem(any_api.client.get("/v1/datasets/nope/rows"), 404, "'nope'")


def test_database_failure_removes_the_artifact(tmp_path, any_db_url, default_roots, sst2_rows):
    """A row that cannot be stored (here: a real trigger refusing inserts) takes its artifact with it.

    On PostgreSQL the trigger is deferred, so the failure comes from the COMMIT itself."""
    from sqlalchemy import create_engine, text

    built = build_api(make_settings(tmp_path, any_db_url, default_roots))
    engine = create_engine(any_db_url)
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    "CREATE TRIGGER refuse BEFORE INSERT ON datasets BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON datasets DEFERRABLE INITIALLY DEFERRED "
                    "FOR EACH ROW EXECUTE FUNCTION refuse()"
                )
            )
    try:
        from fastapi.testclient import TestClient

        client = TestClient(built.app, raise_server_exceptions=False, headers=dict(built.client.headers))
        response = client.post(
            "/v1/datasets",
            files={"file": ("d.tsv", tsv_bytes(sst2_rows[:20]))},
            data={"text_column": "sentence"},
        )
        body = assert_problem(response, 500, "unexpected")
        assert "refused" not in json.dumps(body)  # no internals
        built.assert_nothing_left()
    finally:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "DROP TRIGGER refuse"
                    if engine.dialect.name == "sqlite"
                    else "DROP TRIGGER refuse ON datasets"
                )
            )
            if engine.dialect.name != "sqlite":
                conn.execute(text("DROP FUNCTION refuse()"))
        engine.dispose()
