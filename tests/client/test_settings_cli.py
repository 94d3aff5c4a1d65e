"""The command line follows the index's settings (issue 17): `check create INDEX FILE` without tuning flags runs
with the index's layer report's recommendation and says so; each flag given overrides its field; `--target-
precision` / `--target-recall` calibrate the threshold against a noisy mask (`--noisy`); `audit --review-recall`
marks a review prefix; `indexes settings` shows, pins, follows the latest report or the defaults. The real app
runs every job to its end when it is created (tests.client.InlineQueue).

The recommendation is a real one, made as tests/app/test_index_settings.py makes it: reference labels set to the
model's own predictions (accuracy 1: above chance) and the noisy rows given to the report are the bottom of the
ranking that report scores, so the recommended entry finds them first and clears the margin over random."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from influence_client import InfluenceAPIError, InfluenceClient
from tests.client import Cli, InlineQueue, client_for, start_api
from tests.worker.support import tsv

ROWS = 80
NOISY = [i % 4 == 0 for i in range(ROWS)]  # the dataset's noisy column: 20 known-noisy rows of 80
INDEX_LAYERS = ["embed", "block.0.attn.v", "block.1.attn.v", "block.1.mlp.down", "block.2.attn.v", "head"]
REPORT_LAYERS = ["block.1.attn.v", "block.2.attn.v", "head"]
PLANTED = 16
BATCH = 6


@dataclass
class Served:
    cli: Cli
    client: InfluenceClient
    index: dict
    report: dict  # the recommending layer report
    examples: Path  # the reference examples (JSONL), labelled with the model's predictions
    batch: Path  # new rows to check (TSV)

    @property
    def recommendation(self) -> dict:
        return self.report["report"]["recommendation"]

    def check(self, flags: str = "", expect: int = 0) -> dict:
        """`check create` of the batch with these flags (--json); every row may be flagged unless they say."""
        max_flagged = "" if "--max-flagged" in flags else f" --max-flagged {BATCH}"
        return self.cli.json(
            f"check create {self.index['id']} {self.batch} --text-column sentence --label-column label "
            f"--reference-examples {self.examples}{max_flagged} {flags}",
            expect=expect,
        )

    def mode(self, flag: str) -> dict:
        return self.cli.json(f"indexes settings {self.index['id']} {flag}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, sst2_train, sst2_validation):
    """A tiny BERT, an index (6 layers) over 80 SST-2 rows whose dataset flags every 4th noisy, and a succeeded
    layer report of it that recommends (cosine, rank-c, some of REPORT_LAYERS)."""
    from influence import load_model, predict
    from influence.data import Example

    folder = tmp_path_factory.mktemp("settings-cli")
    queue = InlineQueue()
    api = start_api(folder, queue)
    model_dir = tiny_model_dir("bert", "classification", num_labels=2)
    loaded = load_model(model_dir, num_labels=2)
    texts = [e.text for e in sst2_validation[:12]]
    predictions, _ = predict(loaded, [Example(t, 0) for t in texts], batch_size=32, max_length=128)
    examples = folder / "reference.jsonl"
    examples.write_text(
        "".join(
            json.dumps({"text": t, "label": int(p)}) + "\n" for t, p in zip(texts, predictions, strict=True)
        )
    )
    batch = folder / "batch.tsv"
    batch.write_bytes(tsv([(e.text, e.label) for e in sst2_train[200 : 200 + BATCH]]))
    with client_for(api) as client:
        model = client.register_model(str(model_dir), name="tiny-bert", num_labels=2)
        dataset = client.upload_dataset(
            tsv([(e.text, e.label) for e in sst2_train[:ROWS]], noisy=NOISY),
            filename="train.tsv",
            text_column="sentence",
            noisy_column="noisy",
        )
        index = client.create_index(model["id"], dataset["id"], layers=INDEX_LAYERS, chunk_size=40)
        index = client.get_index(index["id"])
        assert index["status"] == "ready" and index["layers"] == INDEX_LAYERS, index
        reference = {"examples": [json.loads(line) for line in examples.read_text().splitlines()]}
        common: dict[str, Any] = {
            "layers": REPORT_LAYERS,
            "estimators": ["cosine"],
            "aggregations": ["rank-c"],
            "cancellation_rows": 0,
            "top_rows": PLANTED,
        }
        # The rows the first report ranks most detrimental are the noisy rows the second is measured against.
        first = client.get_report(client.create_report(index["id"], reference, **common)["id"])
        assert first["status"] == "succeeded", first["job"]
        planted = sorted(row["row_id"] for row in first["report"]["detrimental"])
        client.delete_report(first["id"])
        made = client.create_report(index["id"], reference, noisy={"rows": planted}, **common)
        report = client.get_report(made["id"])
        recommendation = report["report"]["recommendation"]
        assert recommendation is not None, report["report"]["warnings"]
        assert (recommendation["estimator"], recommendation["aggregation"]) == ("cosine", "rank-c")
        yield Served(Cli(api), client, index, report, examples, batch)
    api.close()


def _layers_text(members: list[str]) -> str:
    """How a settings line names recommended units: up to 3 by name, else their count."""
    return ", ".join(members) if len(members) <= 3 else f"{len(members)} layers"


def _recommended_line(served: Served, how: str) -> str:
    members = served.recommendation["layers"]["members"]
    return f"settings: {_layers_text(members)} / cosine / rank-c, from report {served.report['id']}{how}"


def _recommended(served: Served) -> dict:
    """The settings the recommendation means for a check or an audit (rank-c: rank over the correct rows)."""
    return {
        "layers": served.recommendation["layers"]["members"],
        "estimator": "cosine",
        "aggregation": "rank",
        "vote_k": served.report["report"]["vote_k"],
        "correct_only": True,
    }


# ------------------------------------------------------------------------------------- index settings


def test_index_settings_show_the_latest_report_then_pin_it(served):
    cli, index_id, report_id = served.cli, served.index["id"], served.report["id"]
    view = cli.json(f"indexes settings {index_id}")
    assert view["mode"] == "latest-report" and view["report_id"] is None
    assert view["settings_source"] == f"report {report_id}"
    settings = view["settings"]
    assert {key: settings[key] for key in _recommended(served)} == _recommended(served)
    assert settings["sources"] == dict.fromkeys(_recommended(served), f"report {report_id}")
    code, out, err = cli(f"index settings {index_id}")  # `index` is `indexes`
    assert code == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].split() == ["index", index_id] and lines[1].split() == ["mode", "latest-report"]
    assert lines[2] == _recommended_line(served, " (the index's latest report)")
    table = out.split("\n\n")[1].splitlines()
    assert table[0].split() == ["FIELD", "VALUE", "SOURCE"]
    assert [line.split()[0] for line in table[1:]] == [
        "layers",
        "estimator",
        "aggregation",
        "vote_k",
        "correct_only",
    ]
    assert all(line.endswith(f"report {report_id}") for line in table[1:])

    pinned = served.mode(f"--pin {report_id}")
    assert (pinned["mode"], pinned["report_id"], pinned["settings_source"]) == (
        "pinned-report",
        report_id,
        f"report {report_id}",
    )
    assert cli.json(f"indexes settings {index_id}") == pinned
    code, out, _ = cli(f"indexes settings {index_id}")
    assert code == 0 and ["mode", "pinned-report", "(report", f"{report_id})"] == out.splitlines()[1].split()
    assert out.splitlines()[2] == _recommended_line(served, " (pinned)")
    # A pinned report cannot be deleted meanwhile.
    code, _, err = cli(f"report delete {report_id}")
    assert code == 2 and "409" in err and "pinned" in err


def test_index_settings_defaults_follow_latest_and_refusals(served):
    cli, index_id, report_id = served.cli, served.index["id"], served.report["id"]
    view = served.mode("--defaults")
    assert (view["mode"], view["report_id"], view["settings_source"]) == ("defaults", None, "defaults")
    assert {k: view["settings"][k] for k in ("layers", "estimator", "aggregation", "correct_only")} == {
        "layers": None,
        "estimator": "grad-dot",
        "aggregation": "rank",
        "correct_only": False,
    }
    code, out, _ = cli(f"indexes settings {index_id}")
    assert code == 0 and "settings: every layer / grad-dot / rank, from the defaults" in out.splitlines()
    # A check that names nothing now runs with the defaults.
    check = served.check()
    assert check["settings_source"] == "defaults" and check["summary"]["estimator"] == "grad-dot"
    assert check["params"]["layers"] == INDEX_LAYERS

    assert served.mode("--follow-latest")["settings_source"] == f"report {report_id}"
    code, _, err = cli(f"indexes settings {index_id} --pin nope")
    assert code == 2 and "404" in err
    code, _, err = cli(f"indexes settings {index_id} --pin {report_id} --defaults")
    assert code == 2 and "not allowed with argument" in err  # one mode at a time: a usage error
    with pytest.raises(InfluenceAPIError) as caught:
        served.client.set_index_settings(index_id, "pinned-report")
    assert caught.value.status == 422 and "report_id" in (caught.value.detail or "")
    assert served.client.index_settings(index_id)["mode"] == "latest-report"  # the refusals changed nothing


# ------------------------------------------------------------------------------------------------ checks


def test_check_without_flags_uses_the_pinned_reports_settings_and_says_so(served):
    report_id = served.report["id"]
    served.mode(f"--pin {report_id}")
    check = served.check()
    assert check["status"] == "succeeded" and check["verdict"] == "pass", check["job"]
    # Nothing was sent: every field is the report's, none the request's.
    assert check["settings_source"] == f"report {report_id}"
    settings = check["settings"]
    assert {key: settings[key] for key in _recommended(served)} == _recommended(served)
    assert set(settings["sources"].values()) == {f"report {report_id}"}
    assert check["params"]["estimator"] == "cosine" and check["params"]["correct_only"] is True
    assert check["params"]["layers"] == [n for n in INDEX_LAYERS if n in _recommended(served)["layers"]]
    assert check["summary"]["threshold_percentile"] == 5.0 and "calibration" not in check["summary"]
    code, out, _ = served.cli(f"check show {check['id']}")
    assert code == 0 and _recommended_line(served, " (pinned)") in out.splitlines()
    assert "verdict: PASS (" in out and "below percentile 5, " in out


def test_check_flags_override_the_index_settings_field_by_field(served):
    report_id = served.report["id"]
    served.mode(f"--pin {report_id}")
    one = served.check("--estimator grad-dot")
    assert one["settings_source"] == f"report {report_id}"
    assert one["settings"]["estimator"] == "grad-dot" and one["settings"]["sources"]["estimator"] == "request"
    assert one["settings"]["aggregation"] == "rank" and one["settings"]["correct_only"] is True
    code, out, _ = served.cli(f"check show {one['id']}")
    line = next(line for line in out.splitlines() if line.startswith("settings: "))
    assert line.endswith(f", from report {report_id} (pinned); estimator from the request")
    assert " / grad-dot / rank-c, " in line

    named = served.check("--layers head --estimator grad-dot --aggregation mean")
    assert named["settings_source"] == "request" and named["params"]["layers"] == ["head"]
    assert named["settings"]["sources"]["correct_only"] == "defaults"
    code, out, _ = served.cli(f"check show {named['id']}")
    assert (
        code == 0
        and "settings: head / grad-dot / mean, from the request; vote_k, correct_only from the defaults"
        in out
    )


def test_a_target_recall_calibrates_the_threshold_on_the_noisy_column(served):
    served.mode("--defaults")
    check = served.check("--target-recall 0.5")
    assert check["status"] == "succeeded", check["job"]
    assert check["params"]["threshold_percentile"] is None
    assert check["params"]["calibration"] == {
        "target": "recall",
        "value": 0.5,
        "noisy": {"source": "dataset"},
    }
    summary = check["summary"]
    calibration = summary["calibration"]
    assert (calibration["rows"], calibration["known_noisy"]) == (ROWS, sum(NOISY))
    assert calibration["recall"] == calibration["found"] / sum(NOISY) >= 0.5
    assert calibration["precision"] == calibration["found"] / calibration["cutoff_rows"]
    assert summary["threshold_percentile"] == calibration["threshold_percentile"]
    assert [row["flagged"] for row in check["rows"]] == [
        row["percentile"] < calibration["threshold_percentile"] for row in check["rows"]
    ]
    code, out, _ = served.cli(f"check show {check['id']}")
    c = calibration
    assert (
        code == 0
        and (
            f"calibrated: percentile {c['threshold_percentile']:.4g} (the {c['cutoff_rows']} lowest of {ROWS} existing "
            f"rows) for recall >= 0.5, on {sum(NOISY)} known noisy rows: expected precision {c['precision']:.2f} "
            f"[{c['precision_interval'][0]:.2f}, {c['precision_interval'][1]:.2f}], recall {c['recall']:.2f} "
            f"[{c['recall_interval'][0]:.2f}, {c['recall_interval'][1]:.2f}] (95% intervals)"
        )
        in out.splitlines()
    )
    assert f"below percentile {c['threshold_percentile']:.4g}, " in out


@pytest.mark.parametrize("form", ["file", "json", "comma"])
def test_noisy_rows_given_as_a_file_a_json_list_or_comma_separated(served, tmp_path, form):
    served.mode("--defaults")
    rows = [i for i in range(ROWS) if i % 5 == 0]  # 16 rows named noisy, not the dataset's column
    if form == "file":
        path = tmp_path / "noisy.txt"
        path.write_text("".join(f"{row}\n" for row in rows))
        given = str(path)
    else:
        given = json.dumps(rows) if form == "json" else ",".join(map(str, rows))
    check = served.check("--target-recall 0.75 --noisy " + shlex.quote(given))
    assert check["status"] == "succeeded", check["job"]
    assert check["params"]["calibration"]["noisy"] == {"source": "rows", "rows": rows}
    assert check["summary"]["calibration"]["known_noisy"] == len(rows)
    assert check["summary"]["calibration"]["recall"] >= 0.75


def test_bad_targets_print_the_services_422_and_exit_2(served):
    before = served.client.list_checks(index_id=served.index["id"], limit=1)["total"]
    cases = [
        ("--target-precision 1.5", "target_precision"),
        ("--target-recall 0", "target_recall"),
        ("--target-precision 0.5 --target-recall 0.5", "give one of them"),
        ("--target-recall 0.5 --threshold-percentile 5", "leave threshold_percentile out"),
        ("--noisy dataset", "noisy: only with target_precision or target_recall"),
        ("--target-recall 0.5 --noisy 1,2,3", "too small to calibrate on"),
    ]
    for flags, named in cases:
        code, out, err = served.cli(
            f"check create {served.index['id']} {served.batch} --text-column sentence --label-column label "
            f"--reference-examples {served.examples} {flags}"
        )
        assert code == 2 and out == "", flags
        assert err.startswith("influence: error 422 ") and named in err, (flags, err)
    # Not row ids: refused before anything is sent.
    code, _, err = served.cli(f"check create {served.index['id']} {served.batch} --noisy [1,x]")
    assert code == 2 and "argument --noisy: expected `dataset` or row ids" in err
    assert served.client.list_checks(index_id=served.index["id"], limit=1)["total"] == before


# ----------------------------------------------------------------------------------------- audits, query


def _review_prefix(ranked: list[int], noisy: list[bool], target: float) -> int:
    """The brute force: the shortest head of the ranking holding `target` of the noisy rows."""
    known = sum(noisy[row] for row in ranked)
    return next(
        m for m in range(1, len(ranked) + 1) if sum(noisy[row] for row in ranked[:m]) / known >= target
    )


def test_audit_with_a_review_prefix_and_the_index_settings(served, tmp_path):
    report_id = served.report["id"]
    served.mode(f"--pin {report_id}")
    doc = served.cli.json(
        f"audit {served.index['id']} --reference-examples {served.examples} --review-recall 0.5 --top 3"
    )
    audit = doc["audit"]
    assert audit["status"] == "succeeded", audit["job"]
    assert audit["settings_source"] == f"report {report_id}"
    assert audit["summary"]["estimator"] == "cosine" and audit["summary"]["correct_only"] is True
    ranked = [row["row"] for row in served.client.iter_audit_rows(audit["id"])]
    m = _review_prefix(ranked, NOISY, 0.5)
    review = audit["summary"]["review"]
    assert (review["rows"], review["total_rows"], review["known_noisy"]) == (m, ROWS, sum(NOISY))
    assert review["found"] == sum(NOISY[row] for row in ranked[:m])

    saved = tmp_path / "prefix.jsonl"
    code, out, err = served.cli(f"audit show {audit['id']} --review --top 1000 --output {saved}")
    assert code == 0 and f"saved the review prefix's rows to {saved}" in err
    assert _recommended_line(served, " (pinned)") in out.splitlines()
    assert (
        f"review: read the first {m} of {ROWS} rows ({100 * m / ROWS:.1f}%) for recall >= 0.5: they hold"
        in out
    )
    table = out.split("the review prefix (rank 0 = most detrimental):\n")[1].splitlines()
    assert len(table) == 1 + m and [int(line.split()[1]) for line in table[1:]] == ranked[:m]
    assert [json.loads(line)["row"] for line in saved.read_text().splitlines()] == ranked[:m]

    plain = served.cli.json(f"audit {served.index['id']} --reference-examples {served.examples} --top 0")[
        "audit"
    ]
    assert plain["summary"]["review"] is None
    code, _, err = served.cli(f"audit show {plain['id']} --review")
    assert code == 2 and f"audit {plain['id']} has no review prefix" in err
    code, _, err = served.cli(
        f"audit {served.index['id']} --reference-examples {served.examples} --noisy dataset"
    )
    assert code == 2 and "--noisy goes with --review-recall" in err
    code, _, err = served.cli(
        f"audit {served.index['id']} --reference-examples {served.examples} --review-recall 1.5"
    )
    assert code == 2 and "422" in err and "review.target_recall" in err


def test_query_prints_where_its_settings_came_from(served):
    report_id = served.report["id"]
    served.mode(f"--pin {report_id}")
    answer = served.cli.json(
        f"query {served.index['id']} --text 'a gorgeous , witty movie' --label 1 --top-k 2"
    )
    assert answer["settings_source"] == f"report {report_id}"
    assert answer["estimator"] == "cosine" and answer["aggregation"] == "rank"
    note = answer["settings"]["note"]
    assert note and "rank-c" in note  # a query has no correct_only: the report's -c is left out, and said so
    code, out, _ = served.cli(
        f"query {served.index['id']} --text 'a gorgeous , witty movie' --label 1 --top-k 2"
    )
    members = served.recommendation["layers"]["members"]
    assert code == 0
    assert f"settings: {_layers_text(members)} / cosine / rank, from report {report_id} (pinned)" in out
    assert f"note: {note}" in out.splitlines()
    named = served.cli.json(
        f"query {served.index['id']} --text fine --label 1 --layers head --estimator grad-dot --aggregation mean"
    )
    assert named["settings_source"] == "request" and named["settings"]["note"] is None
