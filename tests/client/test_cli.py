"""The `influence` command line against the real app: every command's `--json` document (exactly one, parsed
here) and its table for people, job-creating commands that wait (or not), exit statuses and error messages;
the installed console script against a live uvicorn server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from influence_client.cli import main, render_table, with_default_actions
from tests.app.conftest import make_settings, make_tenant
from tests.client import AppTransport, Cli, InlineQueue, start_api
from tests.worker.support import ApiProcess, free_port, tsv


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_model_dir, sst2_train):
    """The CLI on an app whose jobs run to their end when created; a tiny BERT and 40 SST-2 rows registered."""
    folder = tmp_path_factory.mktemp("cli")
    queue = InlineQueue()
    api = start_api(folder, queue)
    run = Cli(api)
    data = folder / "train.tsv"
    data.write_bytes(tsv([(e.text, e.label) for e in sst2_train[:40]], noisy=[i % 4 == 0 for i in range(40)]))
    model_dir = tiny_model_dir("bert", "classification", num_labels=2)
    run.model = run.json(f"models register {model_dir} --name tiny-bert --num-labels 2")
    run.dataset = run.json(f"datasets upload {data} --text-column sentence --noisy-column noisy --name sst2")
    run.queue = queue
    yield run
    api.close()


@pytest.fixture(scope="module")
def index(cli):
    """An index over the middle layers, built by `indexes create` (which waits for it)."""
    return cli.json(
        f"indexes create --model {cli.model['id']} --dataset {cli.dataset['id']} --layers middle "
        "--chunk-size 20 --dim 64 --projection-unit block.1.attn.q=factorized:16"
    )


def test_models_commands(cli):
    model = cli.model
    assert model["name"] == "tiny-bert" and model["num_labels"] == 2
    assert cli.json(f"models show {model['id']}") == model
    page = cli.json("models list")
    assert page["total"] == 1 and page["items"] == [model]
    code, out, err = cli("models list")
    assert code == 0 and err == ""
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "TASK", "LABELS", "LAYERS", "SOURCE", "CREATED"]
    assert row.split()[:5] == [model["id"], "tiny-bert", "classification", "2", str(model["num_layers"])]
    assert header.index("NAME") == row.index("tiny-bert")  # aligned columns
    layers = cli.json(f"models layers {model['id']}")
    assert len(layers["layers"]) == model["num_layers"]
    code, out, _ = cli(f"models layers {model['id']}")
    assert code == 0 and out.splitlines()[0].split() == [
        "NAME",
        "ROLE",
        "BLOCK",
        "POSITION",
        "SHAPE",
        "PARAMS",
    ]
    assert any(line.startswith("head ") for line in out.splitlines()) and "groups: " in out
    code, out, _ = cli(f"models show {model['id']}")
    fields = [line.split(maxsplit=1) for line in out.splitlines()]
    assert code == 0 and ["id", model["id"]] in fields and ["weights_hash", model["weights_hash"]] in fields


def test_models_delete(cli, index, tiny_model_dir):
    spare = cli.json(f"models register {tiny_model_dir('bert', 'classification', num_labels=2)} --name spare")
    assert cli.json(f"models delete {spare['id']}") == {"deleted": spare["id"]}
    code, _, err = cli(f"models show {spare['id']}")
    assert code == 2 and "404 Not found" in err
    code, _, err = cli(f"models delete {cli.model['id']}")  # the index uses it
    assert code == 2 and "409" in err and index["id"] in err


def test_datasets_commands(cli, tmp_path, sst2_train):
    dataset = cli.dataset
    assert dataset["row_count"] == 40 and dataset["has_noisy_flag"] is True
    assert cli.json(f"datasets show {dataset['id']}") == dataset
    rows = cli.json(f"datasets rows {dataset['id']} --offset 38")
    assert rows["total"] == 40 and [r["row"] for r in rows["items"]] == [38, 39]
    code, out, _ = cli(f"datasets rows {dataset['id']} --limit 3")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ROW", "LABEL", "NOISY", "TEXT"] and len(lines) == 5
    assert lines[1].split()[:3] == ["0", str(sst2_train[0].label), "yes"]
    assert lines[-1] == "(1-3 of 40; --offset / --limit for more)"
    # A server-side path, then deleting it.
    path = tmp_path / "more.jsonl"
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in sst2_train[50:55]))
    registered = cli.json(f"datasets register-path {path} --name more")
    assert (registered["format"], registered["row_count"], registered["source"]) == ("jsonl", 5, str(path))
    code, out, _ = cli("datasets list")
    assert code == 0 and "more" in out and "sst2" in out
    assert cli.json(f"datasets delete {registered['id']}") == {"deleted": registered["id"]}
    code, _, err = cli(f"datasets show {registered['id']}")
    assert code == 2 and "404 Not found" in err and registered["id"] in err


def test_indexes_create_waits_for_the_build(cli, index):
    assert index["status"] == "ready" and index["num_rows"] == 40 and index["job"]["status"] == "succeeded"
    # The default projection (auto): the tiny model's units are all small enough to be kept exact, except the
    # one the command overrode.
    projection = index["projection"]
    assert {key: projection[key] for key in ("kind", "dim", "seed", "exact_max_params")} == {
        "kind": "auto", "dim": 64, "seed": 0, "exact_max_params": 4096,
    }
    assert list(projection["units"]) == index["layers"]
    assert projection["units"]["block.1.attn.q"] == {"kind": "factorized", "dim": 16, "features": 16}
    assert all(unit["kind"] == "identity" and unit["dim"] == unit["features"]
               for name, unit in projection["units"].items() if name != "block.1.attn.q")
    assert cli.json(f"indexes show {index['id']}") == index
    assert cli.json(f"indexes list --model {cli.model['id']} --status ready")["items"] == [index]
    code, out, _ = cli("indexes list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "STATUS", "MODEL"] and " ready " in out
    code, out, _ = cli(f"indexes show {index['id']}")
    assert code == 0 and "auto dim 64 seed 0, exact up to 4096 params (units: 1 factorized, 5 identity)" in out
    assert "succeeded 2/2" in out
    job = cli.json(f"jobs show {index['job']['id']}")
    assert job["status"] == "succeeded" and job["target_id"] == index["id"]
    assert cli.json(f"jobs wait {job['id']}") == job
    listed = cli.json(f"jobs list --kind index_build --target {index['id']}")
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    code, out, _ = cli("jobs list")
    assert code == 0 and out.splitlines()[0].split() == ["ID", "KIND", "STATUS", "DONE", "TARGET", "CREATED"]


def test_query_command(cli, index, tmp_path):
    answer = cli.json(
        f"query {index['id']} --text 'a charming and affecting journey' --text 'bleak and desperate' "
        "--label 1 --label 0 --top-k 3 --aggregation mean"
    )
    assert answer["aggregation"] == "mean" and len(answer["results"]) == 2
    assert [r["label"] for r in answer["results"]] == [1, 0]
    assert all(len(r["helpful"]) == len(r["harmful"]) == 3 for r in answer["results"])
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"text": "a fine film", "label": 1}) + "\n")
    code, out, _ = cli(f"query {index['id']} --examples {examples} --direction harmful --top-k 2")
    assert code == 0 and "example 0: 'a fine film' label 1" in out
    assert "most harmful:" in out and "most helpful:" not in out
    table = out.split("most harmful:\n")[1].splitlines()
    assert table[0].split() == ["ROW", "SCORE", "LABEL", "NOISY", "TEXT"] and len(table) == 3
    code, _, err = cli(f"query {index['id']} --text x --label 1 --layers embed")
    assert code == 2 and "422" in err
    code, _, err = cli(f"query {index['id']}")
    assert code == 2 and "--text TEXT --label LABEL" in err
    code, _, err = cli(f"query {index['id']} --text a --text b --label 1 --label 0 --label 1")
    assert code == 2 and "one --label" in err


def test_unknown_estimator_or_aggregation_is_the_services_422(cli, index):
    """The command line leaves names to the service's registries: its 422 names the field, once."""
    for option, field in (("--estimator", "estimator"), ("--aggregation", "aggregation")):
        code, out, err = cli(f"query {index['id']} --text x --label 1 {option} nope")
        assert (code, out) == (2, "")
        assert err.splitlines()[0] == "influence: error 422 Invalid request:", err
        assert len(err.splitlines()) == 2 and err.splitlines()[1].startswith(f"  body.{field}: ")
        assert "nope" in err and "Value error" not in err


def test_row_deletion_compaction_and_index_deletion(cli, index):
    built = cli.json(f"indexes create --model {cli.model['id']} --dataset {cli.dataset['id']} --layers head")
    deleted = cli.json(f"indexes delete-rows {built['id']} 1 2")
    assert (deleted["deleted"], deleted["num_rows"], deleted["deleted_rows"]) == (2, 38, 2)
    code, out, _ = cli(f"indexes delete-rows {built['id']} 2")
    assert code == 0 and out.startswith("deleted 0 rows (1 were already); 38 rows answer queries")
    job = cli.json(f"indexes compact {built['id']}")
    assert job["kind"] == "index_compact" and job["status"] == "succeeded"
    assert cli.json(f"indexes show {built['id']}")["deleted_rows"] == 0
    code, out, _ = cli(f"indexes delete {built['id']}")
    assert code == 0 and out == f"deleted {built['id']}\n"
    code, _, err = cli(f"indexes show {built['id']}")
    assert code == 2 and "404" in err


class Terminal(io.StringIO):
    """A stream that says it is a terminal (progress bars draw only there)."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(cli, index):
    job_id = index["job"]["id"]
    stdout, stderr = io.StringIO(), Terminal()
    argv = ["--url", "http://testserver", "--api-key", cli.api.token, "jobs", "wait", job_id]
    assert main(argv, transport=AppTransport(cli.api.app), stdout=stdout, stderr=stderr) == 0
    bar = stderr.getvalue()
    assert bar.startswith(f"\rjob {job_id} [{'#' * 30}] 2/2 succeeded ") and bar.endswith("\n")
    assert ["status", "succeeded"] in [line.split() for line in stdout.getvalue().splitlines()]
    code, _, err = cli(f"jobs wait {job_id}")  # not a terminal: no bar
    assert code == 0 and err == ""


def test_no_wait_and_cancel(cli):
    cli.queue.hold = True
    try:
        created = cli.json(
            f"indexes create --model {cli.model['id']} --dataset {cli.dataset['id']} --no-wait"
        )
    finally:
        cli.queue.hold = False
    assert created["status"] == "pending" and created["job"]["status"] == "queued"
    code, _, err = cli(f"jobs wait {created['job']['id']} --wait-timeout 0.2 --poll 0.05")
    assert code == 2 and "still queued" in err
    cancelled = cli.json(f"jobs cancel {created['job']['id']}")
    assert cancelled["status"] == "cancelled"
    code, out, err = cli(f"jobs wait {created['job']['id']}")
    assert (
        code == 2 and f"job {created['job']['id']} cancelled" in err and "status            cancelled" in out
    )
    code, _, err = cli(f"jobs cancel {created['job']['id']}")
    assert code == 2 and "409 Conflict" in err
    cli.json(f"indexes delete {created['id']}")


def test_errors_and_usage(cli, tmp_path):
    code, out, err = cli("--json models show nope")
    assert (code, out) == (2, "") and err.startswith("influence: error 404 Not found: ") and "nope" in err
    code, _, err = cli("models register /x --name bad --num-labels 0")
    assert code == 2 and "error 422 Invalid request" in err and "body.num_labels:" in err
    code, _, err = cli("models list", key="wrong")
    assert code == 2 and "401 Unauthorized" in err
    code, _, err = cli("frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = cli(f"datasets upload {tmp_path / 'missing.tsv'}")
    assert code == 2 and "no such file" in err
    code, _, err = cli(f"--api-key-file {tmp_path / 'absent'} models list", key="")
    assert code == 2 and "cannot read the API key file" in err
    port = free_port()  # nothing listens there
    code = main(["--url", f"http://127.0.0.1:{port}", "models", "list"], stderr=(stderr := io.StringIO()))
    assert code == 2 and f"cannot reach the service at http://127.0.0.1:{port}" in stderr.getvalue()


def test_api_key_from_a_file_or_the_environment(cli, tmp_path, monkeypatch):
    key_file = tmp_path / "local-api-key"
    key_file.write_text(cli.api.token + "\n")
    code, out, _ = cli(f"--api-key-file {key_file} --json models list", key="")
    assert code == 0 and json.loads(out)["total"] == 1
    monkeypatch.setenv("INFLUENCE_API_KEY", cli.api.token)
    code, out, _ = cli("models list --json", key="")  # options after the command work too
    assert code == 0 and json.loads(out)["total"] == 1


def test_render_table_and_default_actions():
    text = render_table(("ROW", "TEXT", "SCORE"), [[1, "a", 0.5], [10, "longer", None], [200, None, -1.25]])
    assert text.splitlines() == [
        "ROW  TEXT    SCORE",
        "  1  a         0.5",
        " 10  longer      -",
        "200  -       -1.25",
    ]
    assert with_default_actions(["audit", "IDX", "--top", "3"]) == ["audit", "create", "IDX", "--top", "3"]
    assert with_default_actions(["--url", "u", "check", "--json", "IDX", "f.csv"])[3] == "create"
    assert with_default_actions(["audit", "show", "ID"]) == ["audit", "show", "ID"]
    assert with_default_actions(["report", "--help"]) == ["report", "--help"]
    assert with_default_actions(["models", "list"]) == ["models", "list"]


def test_the_installed_console_script_against_a_live_server(tmp_path):
    script = Path(sys.executable).parent / "influence"
    helped = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0 and "usage: influence" in helped.stdout and "audit" in helped.stdout

    from app.db import make_engine, make_session_factory
    from app.migrate import upgrade

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'influence.db'}", [tmp_path])
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    _, token = make_tenant(make_session_factory(engine))
    engine.dispose()
    server = ApiProcess(settings, tmp_path / "api.log").start()
    base_url = server.url
    try:
        listed = subprocess.run(
            [script, "--json", "models", "list"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "INFLUENCE_URL": base_url, "INFLUENCE_API_KEY": token},
        )
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == {"items": [], "total": 0, "offset": 0, "limit": 50}
        refused = subprocess.run(
            [script, "--url", base_url, "--api-key", "wrong", "models", "list"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 2 and "401 Unauthorized" in refused.stderr and refused.stdout == ""
    finally:
        server.stop()
