"""A property-based fuzzer of uploads (hypothesis, derandomized and bounded): random bytes, truncated and deeply
nested JSON lines, odd CSV dialects (quotes, delimiters, BOMs, CR line ends, NULs, ragged rows, lone surrogates,
invalid UTF-8) and random Parquet schemas (column types, nulls, nested types, duplicate names, invalid UTF-8,
truncated files). Every file is uploaded as each of the four formats, on POST /v1/datasets and (fewer cases) as
a batch on POST /v1/indexes/{id}/checks. Every answer is 2xx or a 4xx problem+json; a registered dataset reads
back whole; and after each case (a success deleted again) no row, job or file is left. Small limits (rows, text,
decoded bytes) make the 413 and 422 paths reachable."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app.jobs.model_cache import ModelCache
from app.models import Job
from tests.app.conftest import fresh_api
from tests.worker.support import built_index, register_dataset

FORMATS = ("jsonl", "csv", "tsv", "parquet")
PROBLEM = "application/problem+json"
LIMITS = {"max_rows": 40, "max_text_chars": 400, "max_dataset_bytes": 24 * 1024, "max_num_labels": 50}
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- the files: mostly well-formed, so that the row-level checks are reached, with odd parts mixed in ---------

ODD = [*"\ud800\udfff\x00\ufeff\r\n\"',\t;\\\u2028\x85é\U0001f600a1- ", "\r\n"]
CELLS = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(ODD), max_size=8).map("".join),
    st.integers(-3, 60).map(str),
    st.sampled_from(["", " ", "7" * 5000, "9" * 30, "-0", "+1", "1e3", "NaN", "true", "x" * 600]),
)
WORDS = st.text(alphabet="abcdefgh ", min_size=1, max_size=12)
TEXTS = st.one_of(WORDS, WORDS, WORDS, CELLS)
LABELS = st.one_of(st.sampled_from(["0", "1"]), st.sampled_from(["0", "1", "pos", "neg"]), CELLS)
FLAGS = st.sampled_from(["true", "false", "0", "1", "maybe", ""])
NAMES = st.sampled_from(["text", "label", "noisy", "x", "completion", "", "text "])
HEADERS = st.one_of(
    st.just(["text", "label"]),
    st.just(["text", "label"]),
    st.permutations(["text", "label", "noisy", "x"]),
    st.lists(NAMES, max_size=5),
)
CELLS_BY_NAME = {"text": TEXTS, "label": LABELS, "noisy": FLAGS, "x": TEXTS, "completion": TEXTS}
CLEAN_LABELS = st.sampled_from([st.sampled_from(["0", "1"]), st.sampled_from(["pos", "neg", "meh"])])


def _cells(draw, clean: bool) -> dict:
    """The cell strategy of each column name: a clean file has plain words and one kind of label."""
    if not clean:
        return CELLS_BY_NAME
    return {**CELLS_BY_NAME, "text": WORDS, "x": WORDS, "label": draw(CLEAN_LABELS), "noisy": st.just("true")}


def _damaged(draw, data: bytes) -> bytes:
    """Now and then a few random bytes somewhere (invalid UTF-8, NULs, stray delimiters)."""
    if draw(st.integers(0, 2)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


@st.composite
def delimited_files(draw) -> bytes:
    clean = draw(st.booleans())
    delimiter = draw(st.sampled_from([",", "\t"] if clean else [",", "\t", ";", "|"]))
    newline = draw(st.sampled_from(["\n", "\r\n"] if clean else ["\n", "\r\n", "\r"]))
    if clean:
        quoting = "none" if delimiter == "\t" else draw(st.sampled_from(["all", "minimal"]))
    else:
        quoting = draw(st.sampled_from(["none", "minimal", "broken"]))
    header = ["text", "label"] if clean else draw(HEADERS)
    cells = _cells(draw, clean)
    rows = []
    for _ in range(draw(st.integers(0, 10))):
        row = [draw(cells.get(name, CELLS)) for name in header]
        ragged = 0 if clean else draw(st.sampled_from([0, 0, 0, -1, 1]))
        rows.append(row[:ragged] if ragged < 0 else row + [draw(CELLS)] * ragged)

    def cell(value: str) -> str:
        if quoting == "all" or (
            quoting == "minimal" and any(c in value for c in (delimiter, '"', "\n", "\r"))
        ):
            return '"' + value.replace('"', '""') + '"'
        if quoting == "broken" and value:
            return '"' + value
        return value

    text = newline.join(delimiter.join(cell(v) for v in row) for row in [header, *rows])
    text += draw(st.sampled_from(["", newline]))
    if draw(st.booleans()):
        text = "\ufeff" + text
    data = text.encode("utf-8", "surrogatepass")
    return data if clean else _damaged(draw, data)


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 60),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    CELLS,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
ODD_JSON = st.one_of(
    JSON_VALUES.map(json.dumps),
    st.sampled_from(["7" * 5000, "-" + "7" * 5000, "1e999", "-0", "1.0", "NaN", "Infinity", '"\\ud800"']),
    st.sampled_from([10, 1000, 100_000]).map(lambda depth: "[" * depth + "]" * depth),
    st.sampled_from([10, 1000, 100_000]).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
)
JSON_BY_NAME = {
    "text": st.one_of(WORDS.map(json.dumps), TEXTS.map(json.dumps), ODD_JSON),
    "label": st.one_of(st.sampled_from(["0", "1", '"pos"', '"neg"']), LABELS.map(json.dumps), ODD_JSON),
    "noisy": st.one_of(st.sampled_from(["true", "false", "0", "1"]), ODD_JSON),
}


@st.composite
def jsonl_lines(draw, clean: dict | None) -> str:
    names = ["text", "label"] if clean else draw(HEADERS)
    strategies = {name: clean[name].map(json.dumps) for name in names} if clean else JSON_BY_NAME
    fields = {name: draw(strategies.get(name, ODD_JSON)) for name in names}
    line = "{" + ", ".join(f"{json.dumps(name)}: {value}" for name, value in fields.items()) + "}"
    shape = "object" if clean else draw(st.sampled_from(["object"] * 6 + ["truncated", "value", "blank"]))
    if shape == "truncated":
        return line[: draw(st.integers(0, max(0, len(line) - 1)))]
    if shape == "value":
        return draw(ODD_JSON)
    return "" if shape == "blank" else line


@st.composite
def jsonl_files(draw) -> bytes:
    clean = draw(st.booleans())
    newline = draw(st.sampled_from(["\n", "\r\n"] if clean else ["\n", "\r\n", "\r"]))
    text = newline.join(draw(st.lists(jsonl_lines(_cells(draw, True) if clean else None), max_size=8)))
    if draw(st.booleans()):
        text = "\ufeff" + text
    data = text.encode("utf-8", "surrogatepass")
    return data if clean else _damaged(draw, data)


def _strings(draw, rows: int, element=TEXTS) -> pa.Array:
    nullable = st.none() if draw(st.integers(0, 3)) == 0 else st.nothing()
    values = draw(st.lists(st.one_of(nullable, element), min_size=rows, max_size=rows))
    # Built from bytes and viewed as strings, so lone surrogates become invalid UTF-8 inside the file.
    raw = pa.array([None if v is None else v.encode("utf-8", "surrogatepass") for v in values], pa.binary())
    return raw.view(pa.string())


KINDS = [
    "string",
    "large_string",
    "dictionary",
    "int64",
    "int8",
    "uint64",
    "float64",
    "bool",
    "binary",
    "list",
    "struct",
    "null",
    "timestamp",
    "decimal",
]
USUAL_KINDS = {"text": ["string", "string", "dictionary"], "label": ["int64", "int64", "string", "float64"]}


@st.composite
def parquet_columns(draw, name: str, rows: int, clean: bool) -> pa.Array:
    if clean:
        return pa.array(
            draw(st.lists(WORDS if name == "text" else st.integers(0, 1), min_size=rows, max_size=rows))
        )
    kind = draw(st.sampled_from(USUAL_KINDS.get(name, []) + KINDS))
    nullable = st.none() if draw(st.integers(0, 3)) == 0 else st.nothing()

    def values(element):
        return draw(st.lists(st.one_of(nullable, element), min_size=rows, max_size=rows))

    if kind == "string":
        return _strings(draw, rows, LABELS if name == "label" else TEXTS)
    if kind == "large_string":
        return _strings(draw, rows).cast(pa.large_binary()).view(pa.large_string())
    if kind == "dictionary":
        return pa.array(values(TEXTS.filter(str.isprintable))).dictionary_encode()
    if kind == "int64":
        return pa.array(values(st.integers(0, 1) | st.integers(-(2**63), 2**63 - 1)), pa.int64())
    if kind == "int8":
        return pa.array(values(st.integers(-128, 127)), pa.int8())
    if kind == "uint64":
        return pa.array(values(st.integers(0, 2**64 - 1)), pa.uint64())
    if kind == "float64":
        return pa.array(values(st.sampled_from([0.0, 1.0]) | st.floats(allow_nan=True)), pa.float64())
    if kind == "bool":
        return pa.array(values(st.booleans()), pa.bool_())
    if kind == "binary":
        return pa.array(values(st.binary(max_size=8)), pa.binary())
    if kind == "list":
        return pa.array(values(st.lists(st.text(max_size=4), max_size=3)), pa.list_(pa.string()))
    if kind == "struct":
        element = st.fixed_dictionaries({"text": st.text(max_size=4), "label": st.integers(0, 3)})
        return pa.array(values(element), pa.struct([("text", pa.string()), ("label", pa.int64())]))
    if kind == "null":
        return pa.nulls(rows)
    if kind == "timestamp":
        return pa.array(values(st.integers(0, 2**40)), pa.timestamp("ms"))
    return pa.array(values(st.decimals(-999, 999, places=2)), pa.decimal128(5, 2))


@st.composite
def parquet_files(draw) -> bytes:
    rows = draw(st.integers(0, 12))
    clean = draw(st.booleans())
    names = ["text", "label"] if clean else draw(HEADERS)  # duplicates allowed
    table = pa.Table.from_arrays([draw(parquet_columns(name, rows, clean)) for name in names], names=names)
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        compression=draw(st.sampled_from(["none", "snappy", "zstd", "gzip"])),
        use_dictionary=draw(st.booleans()),
        store_schema=draw(st.booleans()),
        row_group_size=draw(st.integers(1, 16)),
    )
    data = sink.getvalue()
    damage = "none" if clean else draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    return data


RANDOM_BYTES = st.one_of(
    st.binary(max_size=600),
    st.binary(max_size=300).map(lambda b: b"PAR1" + b + b"PAR1"),
    st.binary(max_size=300).map(lambda b: b"text,label\n" + b),
)
FILES = st.one_of(RANDOM_BYTES, jsonl_files(), delimited_files(), parquet_files())
FORMS = st.sampled_from(
    [
        *[{}] * 6,
        {"task": "causal-lm"},
        {"task": "causal-lm", "label_column": ""},
        {"noisy_column": "noisy"},
        {"text_pair_column": "x"},
        {"label_column": "x"},
        {"text_column": "x", "label_column": "text"},
    ]
)


# --- the answers --------------------------------------------------------------------------------------------


def assert_answer(response, success: int) -> None:
    """2xx, or a 4xx problem+json that says what is wrong."""
    assert response.status_code in (success, *range(400, 500)), (response.status_code, response.text[:2000])
    if response.status_code != success:
        assert response.headers["content-type"] == PROBLEM, response.text[:500]
        body = response.json()
        assert body["status"] == response.status_code and body["detail"], body


@pytest.fixture(scope="module")
def fuzz_api(tmp_path_factory, sqlite_template):
    api = fresh_api(tmp_path_factory, sqlite_template, "upload-fuzz", **LIMITS)
    yield api
    api.close()


def _one_upload(api, data: bytes, fmt: str, form: dict) -> None:
    response = api.client.post("/v1/datasets", files={"file": (f"fuzz.{fmt}", data)}, data=form)
    assert_answer(response, 201)
    if response.status_code == 201:
        dataset = response.json()
        rows = api.client.get(f"/v1/datasets/{dataset['id']}/rows", params={"limit": 1000})
        assert rows.status_code == 200, rows.text
        assert len(rows.json()["items"]) == dataset["row_count"] > 0
        assert api.client.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    api.assert_nothing_left()


@settings(FUZZ, max_examples=300)
@given(data=FILES, form=FORMS)
def test_dataset_uploads_answer_2xx_or_4xx_and_leave_nothing(fuzz_api, data, form):
    for fmt in FORMATS:
        _one_upload(fuzz_api, data, fmt, form)


# --- the same files as batch checks -------------------------------------------------------------------------

MODELS = ModelCache()


@pytest.fixture(scope="module")
def check_target(tmp_path_factory, sqlite_template, tiny_model_dir, sst2_rows):
    """A ready tiny-BERT index over 20 SST-2 rows and a reference dataset, under the same small limits."""
    api = fresh_api(tmp_path_factory, sqlite_template, "upload-fuzz-checks", **LIMITS)
    folder = tiny_model_dir("bert", "classification", num_labels=2)
    _, _, index = built_index(api, folder, sst2_rows[:20], models=MODELS)
    reference = register_dataset(api.client, sst2_rows[250:255], name="reference")
    yield api, index["id"], json.dumps({"dataset_id": reference["id"]})
    api.close()


def _checks_left(api) -> tuple[int, list[str]]:
    with api.session_factory() as session:
        count = session.scalar(select(func.count()).select_from(Job).where(Job.kind == "batch_check"))
    folder = api.settings.resolved_artifacts_dir / "jobs"
    return count or 0, sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@settings(FUZZ, max_examples=80)
@given(data=FILES, form=FORMS)
def test_check_batches_answer_2xx_or_4xx_and_leave_nothing(check_target, data, form):
    api, index_id, reference = check_target
    form = {k: v for k, v in form.items() if k not in ("task", "noisy_column")}  # not fields of a check
    for fmt in FORMATS:
        response = api.client.post(
            f"/v1/indexes/{index_id}/checks",
            files={"file": (f"fuzz.{fmt}", data)},
            data={**form, "reference": reference},
        )
        assert_answer(response, 202)
        if response.status_code == 202:
            check = response.json()["id"]
            assert api.client.post(f"/v1/jobs/{check}/cancel").status_code == 200
            assert api.client.delete(f"/v1/checks/{check}").status_code == 204
        assert _checks_left(api) == (0, [])
