"""The workflow commands (audit, report, check, experiment) and their client methods against the real app, as
docs/decisions/0005-workflows.md specifies the HTTP contract: every job runs to its end through the worker's
code when it is created (tests.client.InlineQueue), so `create` + wait + print is what runs here."""

from __future__ import annotations

import csv
import json

import pytest

from influence_client import InfluenceAPIError
from tests.client import Cli, InlineQueue, client_for, start_api
from tests.worker.support import tsv

N_TRAIN = 40
N_REFERENCE = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, sst2_train, sst2_validation):
    """A tiny BERT, 40 SST-2 training rows (every 4th flagged noisy), 8 validation rows as the reference set and
    an index over the middle layers; jobs run when created."""
    queue = InlineQueue()
    api = start_api(tmp_path_factory.mktemp("workflows"), queue)
    with client_for(api) as client:
        folder = tiny_model_dir("bert", "classification", num_labels=2)
        model = client.register_model(str(folder), name="tiny-bert", num_labels=2)
        train = client.upload_dataset(
            tsv(
                [(e.text, e.label) for e in sst2_train[:N_TRAIN]], noisy=[i % 4 == 0 for i in range(N_TRAIN)]
            ),
            filename="train.tsv",
            text_column="sentence",
            noisy_column="noisy",
        )
        reference = client.upload_dataset(
            tsv([(e.text, e.label) for e in sst2_validation[:N_REFERENCE]]),
            filename="reference.tsv",
            text_column="sentence",
        )
        index = client.create_index(model["id"], train["id"], layers="middle", chunk_size=20)
        index = client.get_index(index["id"])
        assert index["status"] == "ready", index
        yield api, queue, client, Cli(api), model, train, reference, index
    api.close()


def test_audit_create_waits_prints_the_top_rows_and_downloads(served, tmp_path):
    _, _, client, cli, _, _, reference, index = served
    out_csv, scores = tmp_path / "audit.csv", tmp_path / "scores.safetensors"
    doc = cli.json(
        f"audit {index['id']} --reference-dataset {reference['id']} --top 5 --output {out_csv} --scores {scores}"
    )
    audit, rows = doc["audit"], doc["rows"]
    assert audit["index_id"] == index["id"] and audit["status"] == audit["job"]["status"] == "succeeded"
    assert audit["summary"]["num_rows"] == N_TRAIN and audit["summary"]["num_reference"] == N_REFERENCE
    assert audit["job"]["kind"] == "audit" and audit["job"]["id"] == audit["id"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3, 4]
    assert [layer["layer"] for layer in rows[0]["layers"]] == index["layers"]
    # Every row, most detrimental first, a page at a time.
    every = list(client.iter_audit_rows(audit["id"], page_size=7))
    assert [r["rank"] for r in every] == list(range(N_TRAIN))
    assert sorted(r["row"] for r in every) == list(range(N_TRAIN))
    assert [r["score"] for r in every] == sorted(r["score"] for r in every)
    assert every[:5] == rows
    # The CSV: every row, one column per layer.
    with open(out_csv, newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == N_TRAIN and [int(r["row"]) for r in table] == [r["row"] for r in every]
    header = list(table[0])
    assert all(any(layer in column for column in header) for layer in index["layers"])
    # The raw score tensor.
    from safetensors import safe_open

    with safe_open(str(scores), framework="numpy") as tensors:
        assert tensors.get_tensor("scores").shape == (N_TRAIN, len(index["layers"]), N_REFERENCE)
        assert sorted(tensors.get_tensor("row_ids").tolist()) == list(range(N_TRAIN))
        assert tensors.get_tensor("reference_correct").shape == (N_REFERENCE,)
        metadata = tensors.metadata()
    assert json.loads(metadata["layers"]) == index["layers"] and metadata["index_id"] == index["id"]
    assert metadata["estimator"] == "grad-dot"
    # JSONL through `audit show`, and the bytes through the client.
    out_jsonl = tmp_path / "audit.jsonl"
    code, _, err = cli(f"audit show {audit['id']} --top 0 --output {out_jsonl}")
    assert code == 0 and f"saved every row to {out_jsonl}" in err
    lines = [json.loads(line) for line in out_jsonl.read_text().splitlines()]
    assert [line["row"] for line in lines] == [r["row"] for r in every]
    tail = client.download_audit(audit["id"], "jsonl", offset=38, limit=5)
    assert [json.loads(line)["row"] for line in tail.splitlines()] == [r["row"] for r in every[38:]]
    # For people: the summary and a table.
    code, out, _ = cli(f"audit show {audit['id']} --top 3")
    assert code == 0 and out.splitlines()[0].split() == ["audit", audit["id"]]
    table_lines = out.split("most detrimental rows (rank 0 = most detrimental):\n")[1].splitlines()
    assert (
        table_lines[0].split() == ["RANK", "ROW", "SCORE", "LABEL", "NOISY", "TEXT"] and len(table_lines) == 4
    )
    # Listed, also among the jobs; deleted.
    assert audit["id"] in [a["id"] for a in cli.json("audit list")["items"]]
    assert audit["id"] in [j["id"] for j in cli.json("jobs list --kind audit")["items"]]
    assert cli.json(f"audit delete {audit['id']}") == {"deleted": audit["id"]}
    code, _, err = cli(f"audit show {audit['id']}")
    assert code == 2 and "404" in err


def test_audit_with_inline_reference_examples(served, tmp_path, sst2_validation):
    _, _, client, cli, _, _, _, index = served
    examples = tmp_path / "reference.jsonl"
    examples.write_text(
        "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in sst2_validation[:3])
    )
    code, out, err = cli(
        f"audit create {index['id']} --reference-examples {examples} --aggregation mean --top 2",
        "--layers",
        json.dumps(index["layers"][:1]),
    )
    assert code == 0, err
    assert "RANK" in out
    audit = client.list_audits()["items"][0]
    assert audit["params"]["aggregation"] == "mean"
    page = client.audit_rows(audit["id"], limit=2)
    assert (
        page["total"] == N_TRAIN
        and [layer["layer"] for layer in page["items"][0]["layers"]] == index["layers"][:1]
    )


def test_report_create_prints_the_recommendation_and_saves_the_page(served, tmp_path):
    _, _, client, cli, _, _, reference, index = served
    html = tmp_path / "report.html"
    report = cli.json(
        f"report {index['id']} --reference-dataset {reference['id']} --estimators grad-dot,cosine "
        f"--aggregations mean,rank --cancellation-rows 20 --html {html}"
    )
    assert report["index_id"] == index["id"] and report["job"]["status"] == "succeeded"
    body = report["report"]
    assert (
        body["n_train"] == N_TRAIN and body["n_reference"] == N_REFERENCE and body["n_noisy"] == N_TRAIN // 4
    )
    assert set(body["estimators"]) == {"grad-dot", "cosine"} and set(body["aggregations"]) == {"mean", "rank"}
    assert body["entries"]
    page = html.read_text(encoding="utf-8")
    assert "<html" in page.lower() and "<script" in page.lower()
    assert client.report_html(report["id"]) == page
    code, out, _ = cli(f"report show {report['id']} --top 3")
    assert (
        code == 0 and "recommendation: " in out and f"{N_TRAIN} training rows ({N_TRAIN // 4} noisy)" in out
    )
    header = next(line for line in out.splitlines() if line.startswith("ESTIMATOR"))
    assert header.split()[:6] == ["ESTIMATOR", "AGGREGATION", "LAYERS", "AUC-NDR", "GAIN", "Z"]
    assert report["id"] in [r["id"] for r in cli.json("report list")["items"]]
    assert cli.json(f"jobs show {report['id']}")["kind"] == "layer_report"
    cli.json(f"report delete {report['id']}")
    with pytest.raises(InfluenceAPIError) as caught:
        client.get_report(report["id"])
    assert caught.value.status == 404


def _new_rows(tmp_path, sst2_train) -> str:
    path = tmp_path / "new.tsv"
    path.write_bytes(tsv([(e.text, 1 - e.label) for e in sst2_train[200:206]]))  # labels flipped: suspicious
    return str(path)


def test_check_exit_status_follows_the_verdict(served, tmp_path, sst2_train):
    _, _, client, cli, _, _, reference, index = served
    new = _new_rows(tmp_path, sst2_train)
    check = f"check {index['id']} {new} --text-column sentence --label-column label --reference-dataset "
    check += reference["id"]
    passed = cli.json(f"{check} --max-flagged 6")
    assert passed["verdict"] == "pass" and passed["job"]["status"] == "succeeded"
    assert [r["row"] for r in passed["rows"]] == list(range(6))
    assert all(0 <= r["percentile"] <= 100 and isinstance(r["flagged"], bool) for r in passed["rows"])
    # Every existing row's score is a bar the new rows must clear: at 100 nearly everything is flagged.
    failed = cli.json(f"{check} --threshold-percentile 100", expect=1)
    assert failed["verdict"] == "fail" and failed["reasons"] and any(r["flagged"] for r in failed["rows"])
    code, out, _ = cli(f"check show {failed['id']}")
    flagged = sum(r["flagged"] for r in failed["rows"])
    assert code == 1 and f"verdict: FAIL ({flagged} of 6 rows flagged below percentile 100" in out
    flagged_lines = out.split("\n\n")[-1].splitlines()
    assert flagged_lines[0].split() == ["ROW", "SCORE", "PERCENTILE", "FLAGGED", "LABEL", "TEXT"]
    assert len(flagged_lines) == 1 + flagged
    code, out, _ = cli(f"check show {failed['id']} --all-rows")
    assert code == 1 and len(out.split("\n\n")[-1].splitlines()) == 1 + 6
    code, out, _ = cli(f"check show {passed['id']}")
    assert code == 0 and "verdict: PASS" in out
    assert {passed["id"], failed["id"]} <= {c["id"] for c in client.list_checks()["items"]}


def test_jobs_created_without_waiting_and_cancelled(served):
    _, queue, _, cli, _, _, reference, index = served
    queue.hold = True
    try:
        audit = cli.json(f"audit {index['id']} --reference-dataset {reference['id']} --no-wait")
    finally:
        queue.hold = False
    assert audit["status"] == "queued" and audit["job"]["status"] == "queued"
    assert cli.json(f"jobs cancel {audit['id']}")["status"] == "cancelled"
    code, _, err = cli(f"audit show {audit['id']}")
    assert code == 2 and f"audit {audit['id']} cancelled" in err


def test_workflows_wait_cancel_and_download(served, tmp_path):
    _, queue, client, cli, _, _, reference, index = served
    with queue.holding():
        held = cli.json(f"report {index['id']} --reference-dataset {reference['id']} --no-wait")
    code, _, err = cli(f"report wait {held['id']} --wait-timeout 0.2 --poll 0.05")
    assert code == 2 and "still queued" in err
    assert cli.json(f"report cancel {held['id']}")["status"] == "cancelled"
    code, out, err = cli(f"report wait {held['id']}")
    assert code == 2 and f"report {held['id']} cancelled" in err and ["status", "cancelled"] in [
        line.split() for line in out.splitlines()
    ]
    # A finished audit: `wait` prints what `show` prints; `download` saves its rows or its score tensor.
    audit = cli.json(f"audit {index['id']} --reference-dataset {reference['id']} --top 0 --no-wait")
    waited = cli.json(f"audit wait {audit['id']} --top 2")
    assert waited["audit"]["status"] == "succeeded" and [r["rank"] for r in waited["rows"]] == [0, 1]
    rows, scores = tmp_path / "rows.jsonl", tmp_path / "scores.safetensors"
    saved = cli.json(f"audit download {audit['id']} {rows}")
    assert saved == {"id": audit["id"], "saved": "every row", "path": str(rows)}
    assert [json.loads(line)["row"] for line in rows.read_text().splitlines()] == [
        r["row"] for r in client.iter_audit_rows(audit["id"])
    ]
    code, out, _ = cli(f"audit download {audit['id']} {scores}")
    assert code == 0 and out == f"saved the score tensor to {scores}\n" and scores.stat().st_size > 0
    code, _, err = cli(f"audit download {audit['id']} {tmp_path / 'rows.txt'}")
    assert code == 2 and "FILE must end in .csv, .jsonl" in err
    code, _, err = cli(f"audit cancel {audit['id']}")
    assert code == 2 and "409" in err
    # A report's page; experiments and checks make no file of their own.
    report = cli.json(f"report {index['id']} --reference-dataset {reference['id']} --cancellation-rows 0")
    page = tmp_path / "report.html"
    cli.json(f"report download {report['id']} {page}")
    assert page.read_text(encoding="utf-8") == client.report_html(report["id"])
    for workflow in ("check", "experiment"):  # `download` is no action of theirs: a usage error
        code, _, err = cli(f"{workflow} download {report['id']} {page}")
        assert code == 2 and err.startswith("usage: ")


def test_workflow_errors_exit_2(served, tmp_path):
    _, _, _, cli, _, _, reference, index = served
    code, _, err = cli(f"audit nope --reference-dataset {reference['id']}")
    assert code == 2 and "404" in err
    code, _, err = cli(f"audit {index['id']}")
    assert code == 2 and "give exactly one of --reference-dataset" in err
    code, _, err = cli(f"audit {index['id']} --reference-dataset nope")
    assert code == 2 and ("404" in err or "422" in err)
    code, _, err = cli(f"audit {index['id']} --reference-dataset {reference['id']} --output x.txt")
    assert code == 2 and "--output must end in .csv or .jsonl" in err
    code, _, err = cli("check show nope")
    assert code == 2 and "404" in err
    code, _, err = cli(f"report {index['id']} --reference", '{"examples": []}')
    assert code == 2 and "422" in err


def test_experiment_runs_the_protocol_as_one_job(served):
    _, _, client, cli, model, train, reference, _ = served
    experiment = cli.json(
        f"experiment --base-model {model['id']} --dataset {train['id']} --reference-dataset {reference['id']} "
        "--noise-rate 0.2 --epochs 1 --batch-size 8 --max-length 32 --learning-rate 0.05 --dtype float32 "
        """--projection '{"kind": "factorized", "dim": 32}' """
        """--report '{"estimators": ["grad-dot"], "aggregations": ["mean"], "cancellation_rows": 20}'"""
    )
    assert experiment["job"]["status"] == "succeeded" and experiment["job"]["kind"] == "experiment"
    for key in ("model_id", "dataset_id", "index_id", "report_id"):
        assert experiment[key], key
    assert client.get_index(experiment["index_id"])["status"] == "ready"
    assert client.get_report(experiment["report_id"])["report"]["n_train"] == N_TRAIN
    code, out, _ = cli(f"experiment show {experiment['id']}")
    assert code == 0 and ["index_id", experiment["index_id"]] in [line.split() for line in out.splitlines()]
    assert experiment["id"] in [e["id"] for e in client.list_experiments()["items"]]


def test_check_append_adds_the_rows_to_the_index(served, tmp_path, sst2_train):
    # Last: it changes the index the other tests read.
    _, _, client, cli, _, _, reference, index = served
    new = _new_rows(tmp_path, sst2_train)
    check = cli.json(
        f"check {index['id']} {new} --text-column sentence --label-column label "
        f"--reference-dataset {reference['id']} --max-flagged 6 --append"
    )
    assert check["verdict"] == "pass" and check["appended"] == 6 and check["append"]["status"] == "appended"
    assert [r["dataset_row"] for r in check["rows"]] == list(range(N_TRAIN, N_TRAIN + 6))
    assert client.get_index(index["id"])["num_rows"] == check["append"]["index_rows"] == N_TRAIN + 6
    code, out, _ = cli(f"check show {check['id']}")
    assert code == 0 and "append: appended, 6 rows joined" in out
