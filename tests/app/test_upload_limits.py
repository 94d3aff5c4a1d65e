"""Uploads against hostile and careless files (issue 13): the decoded size of a dataset counts against
max_dataset_bytes in every format and on every way in (upload, server-side path, a batch check's file), so a
tiny compressed Parquet file cannot write hundreds of MB or hold them in memory; malformed rows answer 422
naming the line (row) and column on both POST /v1/datasets and POST /v1/indexes/{id}/checks; and the classes
of a dataset follow max_num_labels. Every refusal leaves no row and no file behind."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from app.jobs.model_cache import ModelCache
from app.models import Job
from tests.app.conftest import (
    ROOT_DIR,
    build_api,
    csv_bytes,
    fresh_api,
    jsonl_bytes,
    make_settings,
    parquet_bytes,
    tsv_bytes,
)
from tests.worker.support import assert_problem, built_index, register_dataset

MODELS = ModelCache()
MIB = 1024 * 1024
SETTING = "INFLUENCE_MAX_DATASET_BYTES"


def bomb(rows: int, chars: int = 20_000) -> bytes:
    """A Parquet file of `rows` copies of one `chars`-character text: zstd and dictionary encoding make it about
    a kilobyte, whatever `rows` is (the dictionary array is written as it is, never expanded here). Without the
    Arrow schema in its metadata, as other writers make them: a reader is not told to keep the dictionary."""
    text = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["x" * chars]))
    table = pa.table({"text": text, "label": pa.array(np.ones(rows, dtype=np.int64))})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=22, store_schema=False)
    return sink.getvalue()


def upload(api, filename: str, content: bytes, **form):
    return api.client.post("/v1/datasets", files={"file": (filename, content)}, data=form)


def written_bytes() -> int:
    """Bytes this process (every thread, the TestClient's app included) has handed to write() so far."""
    with open("/proc/self/io") as handle:
        fields = dict(line.split(": ") for line in handle.read().splitlines())
    return int(fields["wchar"])


def _limited_api(tmp_path, sqlite_url, default_roots, **settings):
    return build_api(make_settings(tmp_path, sqlite_url, default_roots, **settings))


def _rows_file_size(api, dataset_id: str) -> int:
    return (api.settings.resolved_artifacts_dir / "datasets" / dataset_id / "rows.jsonl").stat().st_size


# --- finding 2: decoded bytes count, not compressed ones ----------------------------------------------------


def test_parquet_bomb_is_refused_before_anything_is_written(tmp_path, sqlite_url, default_roots):
    content = bomb(10_000)
    assert len(content) < 2048  # 200 MB of rows once decoded
    built = _limited_api(tmp_path, sqlite_url, default_roots, max_dataset_bytes=MIB)
    before = written_bytes()
    response = upload(built, "bomb.parquet", content)
    assert written_bytes() - before < 4 * MIB
    assert_problem(response, 413, f"max_dataset_bytes = {MIB}", SETTING)
    built.assert_nothing_left()

    server_side = tmp_path / "bomb.parquet"
    server_side.write_bytes(content)
    before = written_bytes()
    response = built.client.post("/v1/datasets", data={"path": str(server_side)})
    assert written_bytes() - before < 4 * MIB
    assert_problem(response, 413, f"max_dataset_bytes = {MIB}", SETTING)
    built.assert_nothing_left()


def test_parquet_bomb_over_the_default_limit_is_refused_before_anything_is_written(api):
    assert api.settings.max_dataset_bytes == 1024**3
    content = bomb(60_000)  # 1.2 GB of rows once decoded
    assert len(content) < 2048
    before = written_bytes()
    response = upload(api, "bomb.parquet", content)
    assert written_bytes() - before < 4 * MIB
    assert_problem(response, 413, f"max_dataset_bytes = {1024**3}", SETTING)
    api.assert_nothing_left()


_MEMORY_PROBE = textwrap.dedent(
    """
    import json, re, sys, tempfile
    from pathlib import Path
    from app.migrate import upgrade
    from tests.app.conftest import build_api, make_settings, parquet_bytes

    folder = Path(tempfile.mkdtemp(dir=sys.argv[1]))
    upgrade(f"sqlite:///{folder / 'influence.db'}")
    api = build_api(make_settings(folder, f"sqlite:///{folder / 'influence.db'}", [], max_upload_bytes=1 << 20))
    content = Path(sys.argv[2]).read_bytes()
    warm_up = parquet_bytes({"text": ["a film"], "label": [1]})  # the Parquet reader's imports, made before
    warm = api.client.post("/v1/datasets", files={"file": ("warm.parquet", warm_up)})
    assert warm.status_code == 201, warm.text

    def kib(field):
        return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current size
    before = kib("VmRSS")
    response = api.client.post("/v1/datasets", files={"file": ("bomb.parquet", content)})
    print(json.dumps({"status": response.status_code, "rows": response.json().get("row_count"),
                      "peak_rise_kib": kib("VmHWM") - before}))
    """
)


def test_parquet_bomb_under_the_limit_is_read_in_small_batches(tmp_path):
    """5,000 rows of 20,000 characters (100 MB decoded, under the default limit) are registered while the
    process's peak memory rises by far less than the decoded rows: the reader never holds a large batch. Measured
    in a process of its own, so that nothing else this test session did moves the peak."""
    (tmp_path / "bomb.parquet").write_bytes(bomb(5_000))
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(tmp_path), str(tmp_path / "bomb.parquet")],
        cwd=ROOT_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["status"] == 201 and measured["rows"] == 5_000, measured
    assert measured["peak_rise_kib"] < 48 * 1024, measured


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_text_formats_count_the_normalised_bytes(tmp_path, sqlite_url, default_roots, fmt):
    """Control characters take six bytes each once normalised (\\u0001): a 25 KB file that would write 150 KB of
    rows is over a 64 KiB limit although its own size is not."""
    rows = [("a" + "\x01" * 120, i % 2) for i in range(200)]
    content = {
        "jsonl": jsonl_bytes({"text": text, "label": label} for text, label in rows),
        "csv": csv_bytes(rows, header=("text", "label")),
        "tsv": tsv_bytes(rows, header=("text", "label")),
    }[fmt]
    limit = 64 * 1024
    if fmt != "jsonl":  # JSONL escapes them in the file too
        assert len(content) < limit
    built = _limited_api(tmp_path, sqlite_url, default_roots, max_dataset_bytes=limit)
    assert_problem(upload(built, f"d.{fmt}", content), 413, f"max_dataset_bytes = {limit}", SETTING)
    built.assert_nothing_left()
    server_side = tmp_path / f"d.{fmt}"
    server_side.write_bytes(content)
    response = built.client.post("/v1/datasets", data={"path": str(server_side)})
    assert_problem(response, 413, f"max_dataset_bytes = {limit}", SETTING)
    built.assert_nothing_left()


def test_a_line_longer_than_max_dataset_bytes_is_never_held_whole(tmp_path, sqlite_url, default_roots):
    """A line is read with a bound, even when what it holds would be ignored (an unmapped field)."""
    built = _limited_api(tmp_path, sqlite_url, default_roots, max_dataset_bytes=64 * 1024)
    line = json.dumps({"text": "a film", "label": 1, "junk": "x" * 100_000}).encode() + b"\n"
    response = upload(built, "d.jsonl", b'{"text": "a play", "label": 0}\n' + line)
    assert_problem(response, 413, "line 2 is longer than max_dataset_bytes = 65536 bytes", SETTING)
    built.assert_nothing_left()


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_a_dataset_exactly_at_max_dataset_bytes_is_accepted(
    tmp_path, sqlite_url, default_roots, sst2_rows, fmt
):
    rows = sst2_rows[:200]
    content = (
        tsv_bytes(rows, header=("text", "label"))
        if fmt == "tsv"
        else parquet_bytes({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    )
    measure = _limited_api(tmp_path / "measure", sqlite_url, default_roots)
    created = upload(measure, f"d.{fmt}", content)
    assert created.status_code == 201, created.text
    size = _rows_file_size(measure, created.json()["id"])

    exact = _limited_api(tmp_path / "exact", sqlite_url, default_roots, max_dataset_bytes=size)
    assert upload(exact, f"d.{fmt}", content).status_code == 201
    below = _limited_api(tmp_path / "below", sqlite_url, default_roots, max_dataset_bytes=size - 1)
    assert_problem(upload(below, f"d.{fmt}", content), 413, f"max_dataset_bytes = {size - 1}", SETTING)
    assert below.artifact_entries() == []


# --- finding 4: malformed rows are 422 naming the line (row) and column ---------------------------------------


def _deep_line() -> str:
    return '{"text": "a film", "label": 1, "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"


def _duplicate_columns() -> bytes:
    table = pa.table(
        [pa.array(["a film", "a play"]), pa.array(["b", "c"]), pa.array([0, 1])], ["text", "text", "label"]
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


MALFORMED = [
    # (id, filename, content, fragments of the 422's detail)
    (
        "jsonl-label-of-5000-digits",
        "d.jsonl",
        b'{"text": "a film", "label": 0}\n{"text": "a play", "label": 1' + b"7" * 4999 + b"}\n",
        ["line 2", "'label'", "5000 digits"],
    ),
    (
        "csv-label-of-5000-digits",
        "d.csv",
        b"text,label\na film," + b"7" * 5000 + b"\n",
        ["line 2", "'label'"],
    ),
    (
        "tsv-label-of-5000-digits",
        "d.tsv",
        b"text\tlabel\na film\t0\na play\t" + b"7" * 5000 + b"\n",
        ["line 3", "'label'"],
    ),
    (
        "jsonl-nested-100000-deep",
        "d.jsonl",
        ('{"text": "a film", "label": 0}\n' + _deep_line() + "\n").encode(),
        ["line 2", "nested too deeply"],
    ),
    (
        "jsonl-lone-surrogate-text",
        "d.jsonl",
        b'{"text": "a film", "label": 0}\n{"text": "a \\ud800 film", "label": 1}\n',
        ["line 2", "'text'", "surrogate"],
    ),
    (
        "jsonl-lone-surrogate-label",
        "d.jsonl",
        b'{"text": "a film", "label": "good\\udc00"}\n',
        ["line 1", "'label'", "surrogate"],
    ),
    ("parquet-duplicate-column-names", "d.parquet", _duplicate_columns(), ["'text'", "2 times"]),
]


@pytest.mark.parametrize(
    ("filename", "content", "fragments"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_dataset_upload_is_422_naming_line_and_column(api, filename, content, fragments):
    assert_problem(upload(api, filename, content), 422, *fragments)
    api.assert_nothing_left()


def test_lone_surrogate_in_a_completion_is_422(api):
    content = b'{"text": "a film", "completion": "ends \\ud800"}\n'
    response = upload(api, "d.jsonl", content, task="causal-lm", label_column="completion")
    assert_problem(response, 422, "line 1", "'completion'", "surrogate")
    api.assert_nothing_left()


# --- classes follow max_num_labels ------------------------------------------------------------------------------


def test_dataset_classes_follow_max_num_labels(tmp_path, sqlite_url, default_roots):
    built = _limited_api(tmp_path, sqlite_url, default_roots, max_num_labels=3)
    response = upload(built, "d.tsv", b"text\tlabel\na\t0\nb\t3\n")
    assert_problem(response, 422, "line 3", "'label'", "below 3", "max_num_labels")
    names = b"text\tlabel\na\tw\nb\tx\nc\ty\nd\tz\n"
    assert_problem(upload(built, "d.tsv", names), 422, "line 5", "more than 3 distinct label names")
    built.assert_nothing_left()
    assert upload(built, "d.tsv", b"text\tlabel\na\t0\nb\t2\n").status_code == 201
    assert upload(built, "d.tsv", b"text\tlabel\na\tx\nb\ty\nc\tz\n").status_code == 201


# --- the same on POST /v1/indexes/{id}/checks ---------------------------------------------------------------


CHECK_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def check_env(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """A ready tiny-BERT index over 40 SST-2 rows and a reference dataset, under max_dataset_bytes = 256 KiB."""
    api = fresh_api(tmp_path_factory, sqlite_template, "upload-limits-checks", max_dataset_bytes=CHECK_LIMIT)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    _, _, index = built_index(api, folder, sst2_rows[:40], models=MODELS)
    reference = register_dataset(api.client, sst2_rows[250:260], name="reference")
    yield api, index["id"], reference["id"]
    api.close()


def submit_check(check_env, filename: str, content: bytes):
    api, index_id, reference_id = check_env
    data = {
        "text_column": "text",
        "label_column": "label",
        "reference": json.dumps({"dataset_id": reference_id}),
    }
    return api.client.post(f"/v1/indexes/{index_id}/checks", files={"file": (filename, content)}, data=data)


def checks_left(check_env) -> tuple[int, list[str]]:
    api = check_env[0]
    with api.session_factory() as session:
        count = session.scalar(select(func.count()).select_from(Job).where(Job.kind == "batch_check"))
    folder = api.settings.resolved_artifacts_dir / "jobs"
    return count, sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize(
    ("filename", "content", "fragments"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_check_batch_is_422_naming_line_and_column(check_env, filename, content, fragments):
    before = checks_left(check_env)
    assert_problem(submit_check(check_env, filename, content), 422, *fragments)
    assert checks_left(check_env) == before


def test_check_batch_counts_decoded_bytes(check_env, sst2_rows):
    before = checks_left(check_env)
    start = written_bytes()
    response = submit_check(check_env, "bomb.parquet", bomb(10_000))
    assert written_bytes() - start < 4 * MIB
    assert_problem(response, 413, f"max_dataset_bytes = {CHECK_LIMIT}", SETTING)
    big = sst2_rows * 10  # about 330 KB of rows: within the upload limit
    assert_problem(
        submit_check(check_env, "big.tsv", tsv_bytes(big, header=("text", "label"))),
        413,
        f"max_dataset_bytes = {CHECK_LIMIT}",
    )
    assert checks_left(check_env) == before
    small = submit_check(check_env, "small.tsv", tsv_bytes(sst2_rows[100:110], header=("text", "label")))
    assert small.status_code == 202, small.text


def test_an_appended_batch_may_not_grow_its_dataset_past_max_dataset_bytes(check_env):
    api, index_id, reference_id = check_env
    index = api.client.get(f"/v1/indexes/{index_id}").json()
    current = _rows_file_size(api, index["dataset_id"])
    line = len(b'{"text": "", "text_pair": null, "label": 1, "noisy": null}\n') + 1000
    rows = [(f"{i:05d} " + "w" * 994, 1) for i in range(-(-(CHECK_LIMIT - current + 2 * line) // line))]
    batch = tsv_bytes(rows, header=("text", "label"))
    assert current < 20_000 and len(rows) * line < CHECK_LIMIT  # the batch alone fits, the grown dataset does not
    before = checks_left(check_env)
    data = {"text_column": "text", "reference": json.dumps({"dataset_id": reference_id}), "append": "true"}
    response = api.client.post(f"/v1/indexes/{index_id}/checks", files={"file": ("grow.tsv", batch)}, data=data)
    assert_problem(response, 413, "appending this batch", f"max_dataset_bytes = {CHECK_LIMIT}", SETTING)
    assert checks_left(check_env) == before
    kept = api.client.post(
        f"/v1/indexes/{index_id}/checks", files={"file": ("grow.tsv", tsv_bytes(rows[:20], header=("text", "label")))},
        data=data,
    )
    assert kept.status_code == 202, kept.text
