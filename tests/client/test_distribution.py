"""influence-client as a user installs it: its wheel in a fresh virtualenv of the base interpreter (not the
project's .venv, which has torch), where torch and numpy are not importable, `influence --help` works and a
real `influence check` of a passing batch runs against a live service with a worker.

What is installed from where: the client's wheel is built here from a copy of clients/python (`pip wheel
--no-deps --no-build-isolation`, with the project venv's setuptools: nothing downloaded); httpx, at the
version the project venv has, and its dependencies are made wheels by `pip wheel` from the configured package
index (the only download, of a few small pure-Python wheels); the virtualenv then installs the client with
`--no-index --find-links` that wheelhouse, so nothing it gets comes from anywhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from app.migrate import upgrade
from influence_client import __version__ as client_version
from tests.app.conftest import build_api, make_settings
from tests.conftest import SST2
from tests.worker.support import ApiProcess, WorkerProcess, built_index, register_dataset, tsv

ROOT = Path(__file__).resolve().parents[2]
TRAIN_ROWS, NEW_ROWS = 40, 4
# Run in the fresh virtualenv: what it installed of influence-client, and that the client imports there.
DISTRIBUTION = """
import json
from importlib.metadata import requires, version
import influence_client
assert influence_client.__version__ == version("influence-client")
print(json.dumps({"version": version("influence-client"), "requires": requires("influence-client")}))
"""


def _run(*command, **options) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **options)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh virtualenv's bin folder, the environment to run it in, an empty folder to run it from)."""
    folder = tmp_path_factory.mktemp("distribution")
    source, wheels, venv = folder / "src", folder / "wheels", folder / "venv"
    shutil.copytree(ROOT / "clients" / "python", source, ignore=shutil.ignore_patterns("*.egg-info", "build"))
    pip = [sys.executable, "-m", "pip"]
    built = _run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, source)
    assert built.returncode == 0, built.stderr
    fetched = _run(*pip, "wheel", "-q", "-w", wheels, f"httpx=={version('httpx')}")
    assert fetched.returncode == 0, fetched.stderr
    base_python = getattr(sys, "_base_executable", None) or shutil.which("python3")
    made = _run(base_python, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    put = _run(*pip, "--python", python, "install", "-q", "--no-index", "--find-links", wheels, "influence-client")
    assert put.returncode == 0, put.stderr
    # Nothing of the repository or the project venv on the path: the folder the commands run in is empty.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    empty = folder / "empty"
    empty.mkdir()
    return venv / "bin", {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}, empty


def test_the_client_installs_with_httpx_only(installed):
    bin_folder, env, folder = installed
    python = bin_folder / "python"
    for heavy in ("torch", "numpy", "influence", "app"):
        probe = _run(python, "-c", f"import {heavy}", cwd=folder, env=env)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, heavy
    said = _run(python, "-c", DISTRIBUTION, cwd=folder, env=env)
    assert said.returncode == 0, said.stderr
    assert json.loads(said.stdout) == {"version": client_version, "requires": ["httpx<1,>=0.28"]}
    helped = _run(bin_folder / "influence", "--help", cwd=folder, env=env)
    assert helped.returncode == 0 and "usage: influence" in helped.stdout and "check" in helped.stdout


def test_influence_check_of_a_passing_batch_against_a_live_service(
    installed, tmp_path, tmp_path_factory, tiny_model_dir, sst2_train
):
    """The index is built in this process; the check goes through the live API to a real worker process."""
    bin_folder, env, folder = installed
    roots = [tmp_path_factory.getbasetemp(), SST2]
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'influence.db'}", roots)
    upgrade(settings.resolved_database_url)
    api = build_api(settings)
    model_folder = tiny_model_dir("bert", "classification", num_labels=2)
    rows = [(e.text, e.label) for e in sst2_train[: TRAIN_ROWS + 8 + NEW_ROWS]]
    _, _, index = built_index(api, model_folder, rows[:TRAIN_ROWS], layers="middle", chunk_size=20)
    reference = register_dataset(api.client, rows[TRAIN_ROWS : TRAIN_ROWS + 8], name="reference")
    batch = tmp_path / "new.tsv"
    batch.write_bytes(tsv(rows[TRAIN_ROWS + 8 :]))

    worker = WorkerProcess(settings, "distribution", tmp_path / "worker.log").start()
    server = ApiProcess(settings, tmp_path / "api.log", factory="app.embedded:create_service_app").start()
    try:
        command = [bin_folder / "influence", "--url", server.url, "--api-key", api.token]
        check = [*command, "check", "create", index["id"], batch, "--text-column", "sentence", "--label-column"]
        check += ["label", "--reference-dataset", reference["id"], "--max-flagged", str(NEW_ROWS)]
        passed = _run(*check, "--json", cwd=folder, env=env)
        assert passed.returncode == 0, (passed.stderr, worker.output()[-3000:])
        answer = json.loads(passed.stdout)
        assert answer["verdict"] == "pass" and answer["job"]["status"] == "succeeded"
        assert [row["row"] for row in answer["rows"]] == list(range(NEW_ROWS))
        assert passed.stderr == ""  # the same version as the service: no warning
        shown = _run(*command, "check", "show", answer["id"], cwd=folder, env=env)
        flagged = sum(row["flagged"] for row in answer["rows"])
        assert shown.returncode == 0 and f"verdict: PASS ({flagged} of {NEW_ROWS} rows flagged" in shown.stdout
    finally:
        server.stop()
        worker.stop()
        api.close()
