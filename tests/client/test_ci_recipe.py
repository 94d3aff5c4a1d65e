"""The CI recipe of examples/ci/ run as written, so that it cannot rot: the GitHub Actions workflow's steps (their
`run:` scripts under the shell GitHub uses, their `${{ ... }}` expressions filled in) and the pre-commit hook, in
a git repository of their own, calling the project's `influence` entry point against the service over HTTP with
an index built on the packaged MiniLM. The verdict is set through the recipe's thresholds, so that what passes
and what fails does not hang on which rows an untrained head finds suspicious."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
import yaml

from influence.loading import packaged_minilm_path
from tests.client import InlineQueue, client_for, start_api
from tests.conftest import SST2
from tests.worker.support import free_port

RECIPE = Path(__file__).resolve().parents[2] / "examples" / "ci"
INFLUENCE = Path(sys.executable).parent / "influence"  # the project venv's entry point, not a network install
EXIT_FAIL_VERDICT, EXIT_ERROR = 1, 2
N_TRAIN, N_REFERENCE = 40, 8
FOLDER = "data/incoming"  # the recipes' default data folder
BATCH = f"{FOLDER}/batch.tsv"
# The recipe's thresholds, as a repository would set them: every row may be flagged, or a row at the 100th
# percentile is (nearly every row of a batch scores below the best of the index's rows) and none may be.
PASSING = {"INFLUENCE_CHECK_MAX_FLAGGED": "6"}
FAILING = {"INFLUENCE_CHECK_THRESHOLD_PERCENTILE": "100", "INFLUENCE_CHECK_MAX_FLAGGED": "0"}


@dataclass
class Service:
    url: str
    api_key: str
    index_id: str
    reference_id: str


@pytest.fixture(scope="module")
def service(tmp_path_factory, sst2_train, sst2_validation) -> Iterator[Service]:
    """The app served by uvicorn on 127.0.0.1 (in a thread of this process, its jobs run when created), with an
    index over SST-2 training rows built on the packaged MiniLM and validation rows as the reference dataset."""
    folder = tmp_path_factory.mktemp("ci-recipe")
    queue = InlineQueue()
    minilm = packaged_minilm_path()
    api = start_api(folder, queue, allowed_roots=[folder.parent, SST2, minilm.parent])
    try:
        with client_for(api) as client:
            model = client.register_model(str(minilm), name="minilm", task="classification", num_labels=2)
            train = upload(client, "train.tsv", sst2_train[:N_TRAIN])
            reference = upload(client, "reference.tsv", sst2_validation[:N_REFERENCE])
            index = client.create_index(
                model["id"], train["id"], layers="middle", chunk_size=20, max_length=32
            )
            assert client.get_index(index["id"])["status"] == "ready"
        with serving(api.app) as url:
            yield Service(url, api.token, index["id"], reference["id"])
    finally:
        api.close()


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` over HTTP on 127.0.0.1, by uvicorn in a thread of this process; its base URL. Without the lifespan,
    as the in-process tests run the app: its process-wide umask and request processes belong to a server process
    of its own."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def upload(client, filename: str, examples) -> dict:
    return client.upload_dataset(
        batch_tsv(examples), filename=filename, text_column="text", label_column="label"
    )


def batch_tsv(examples) -> bytes:
    """Rows under the recipes' default column names (text, label)."""
    return ("text\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in examples)).encode("utf-8")


def new_batch(sst2_train) -> bytes:
    return batch_tsv(sst2_train[200:206])


GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "ci",
    "GIT_AUTHOR_EMAIL": "ci@example.com",
    "GIT_COMMITTER_NAME": "ci",
    "GIT_COMMITTER_EMAIL": "ci@example.com",
    # The machine's and the developer's git settings (a hooks path, signing) stay out.
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True, env=GIT_ENV)
    return done.stdout.strip()


def new_repository(path: Path) -> Path:
    """A repository with a first commit: a data file already in the data folder, and a README."""
    path.mkdir()
    git(path, "init", "-q")
    (path / FOLDER).mkdir(parents=True)
    (path / FOLDER / "old.tsv").write_text("text\tlabel\nalready checked\t1\n")
    (path / "README.md").write_text("data\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "base")
    return path


def recipe_env(service: Service, tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment a recipe runs in: this process's without its INFLUENCE_* settings, the project venv's
    `influence` first on the PATH, the service's URL and key, and `settings`."""
    env = {key: value for key, value in GIT_ENV.items() if not key.startswith("INFLUENCE_")}
    env["PATH"] = f"{INFLUENCE.parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        INFLUENCE_URL=service.url,
        INFLUENCE_API_KEY=service.api_key,
        INFLUENCE_CHECK_INDEX=service.index_id,
        INFLUENCE_CHECK_REFERENCE_DATASET=service.reference_id,
        RUNNER_TEMP=str(tmp_path),
    )
    env.update(settings)
    return env


# ------------------------------------------------------------------------------------ the workflow


def load_workflow() -> dict:
    return yaml.safe_load((RECIPE / "github-actions.yml").read_text(encoding="utf-8"))


def steps_by_name(workflow: Mapping) -> dict[str, dict]:
    (job,) = workflow["jobs"].values()
    return {step["name"]: step for step in job["steps"] if "name" in step}


def filled(values: Mapping[str, str], expressions: Mapping[str, str]) -> dict[str, str]:
    """An `env:` map with each `${{ expression }}` replaced by its value in `expressions` (an expression the
    test does not know fails it: the recipe has changed under it)."""
    return {
        name: re.sub(r"\$\{\{\s*(.+?)\s*\}\}", lambda match: expressions[match.group(1)], str(value))
        for name, value in values.items()
    }


def run_step(
    step: Mapping, repo: Path, env: Mapping[str, str], tmp_path: Path
) -> subprocess.CompletedProcess:
    """A step's `run:` script as GitHub runs it under `shell: bash`: bash --noprofile --norc -eo pipefail."""
    script = tmp_path / "step.sh"
    script.write_text(step["run"], encoding="utf-8")
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
        cwd=repo,
        env={**env, **step.get("env", {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_workflow_checks_the_changed_files_of_a_pull_request(service, tmp_path, sst2_train):
    workflow = load_workflow()
    assert workflow.get("on", workflow.get(True))["pull_request"]["paths"] == [f"{FOLDER}/**"]
    assert workflow["defaults"]["run"]["shell"] == "bash"
    steps = steps_by_name(workflow)
    install = steps["Install the influence client"]["run"]
    assert (
        'pip install "influence-client @ git+https://' in install
        and "#subdirectory=clients/python" in install
    )
    assert "influence check create" in steps["Check each changed file"]["run"]

    # A pull request: a batch in the data folder, a note beside it and a file elsewhere; the base's file as it was.
    repo = new_repository(tmp_path / "repo")
    base = git(repo, "rev-parse", "HEAD")
    (repo / BATCH).write_bytes(new_batch(sst2_train))
    (repo / FOLDER / "notes.md").write_text("where the batch came from\n")
    (repo / "train.py").write_text("print('not data')\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a new batch")
    expressions = {
        "vars.INFLUENCE_CHECK_INDEX": service.index_id,
        "vars.INFLUENCE_CHECK_REFERENCE_DATASET": service.reference_id,
        "secrets.INFLUENCE_URL": service.url,
        "secrets.INFLUENCE_API_KEY": service.api_key,
        "github.event.pull_request.base.sha": base,
        "github.event.pull_request.head.sha": git(repo, "rev-parse", "HEAD"),
    }

    def run(name: str, **settings: str) -> subprocess.CompletedProcess:
        env = recipe_env(service, tmp_path, **{**filled(workflow["env"], expressions), **settings})
        return run_step(
            {**steps[name], "env": filled(steps[name].get("env", {}), expressions)}, repo, env, tmp_path
        )

    found = run("Find the changed data files")
    assert found.returncode == 0, found.stderr
    assert (tmp_path / "influence-changed-files").read_bytes() == f"{BATCH}\0".encode()

    passed = run("Check each changed file", **PASSING)
    assert passed.returncode == 0, passed.stderr
    assert "verdict: PASS" in passed.stdout and "::error" not in passed.stdout
    failed = run("Check each changed file", **FAILING)
    assert failed.returncode == EXIT_FAIL_VERDICT, failed.stderr
    assert "verdict: FAIL" in failed.stdout
    assert f"::error file={BATCH}::influence check: suspicious rows (verdict fail)" in failed.stdout
    unknown = run("Check each changed file", INFLUENCE_CHECK_INDEX="no-such-index", **PASSING)
    assert unknown.returncode == EXIT_ERROR and "404" in unknown.stderr
    assert f"::error file={BATCH}::influence check could not check this file (exit 2)" in unknown.stdout


# ------------------------------------------------------------------------------------ the pre-commit hook


def test_the_pre_commit_entry_names_the_hook_and_the_data_files():
    config = yaml.safe_load((RECIPE / "pre-commit-config.yaml").read_text(encoding="utf-8"))
    (hook,) = config["repos"][0]["hooks"]
    assert hook["entry"] == "examples/ci/pre-commit-hook.sh" and hook["language"] == "script"
    assert (RECIPE / "pre-commit-hook.sh").stat().st_mode & 0o111, "the hook must be executable"
    for name in (BATCH, f"{FOLDER}/sub/more.csv", f"{FOLDER}/rows.jsonl", f"{FOLDER}/rows.parquet"):
        assert re.search(hook["files"], name), name
    for name in (f"{FOLDER}/notes.md", "data/other/batch.tsv", "batch.tsv"):
        assert not re.search(hook["files"], name), name


def test_the_pre_commit_hook_checks_the_staged_batch(service, tmp_path, sst2_train):
    hook = RECIPE / "pre-commit-hook.sh"
    assert "influence check create" in hook.read_text(encoding="utf-8")
    repo = new_repository(tmp_path / "repo")
    (repo / BATCH).write_bytes(new_batch(sst2_train))
    git(repo, "add", BATCH)
    # The working tree moves on after staging: the commit records (and the hook checks) the staged rows.
    (repo / BATCH).write_text("not a table\n")

    def run(*files: str, **settings: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(hook), *files],
            cwd=repo,
            env=recipe_env(service, tmp_path, **settings),
            capture_output=True,
            text=True,
            timeout=300,
        )

    passed = run(**PASSING)  # as a plain git hook: it finds the staged files itself
    assert passed.returncode == 0, passed.stderr
    assert "verdict: PASS" in passed.stdout and f"influence check: {BATCH}" in passed.stderr
    failed = run(BATCH, **FAILING)  # as the pre-commit framework runs it: the files named
    assert failed.returncode == EXIT_FAIL_VERDICT, failed.stderr
    assert "verdict: FAIL" in failed.stdout and f"{BATCH} carries suspicious rows" in failed.stderr
    assert "commit stopped by the influence check" in failed.stderr
    refused = run(INFLUENCE_API_KEY="wrong", **PASSING)
    assert refused.returncode == EXIT_ERROR and "401" in refused.stderr
    nothing_staged = run(INFLUENCE_CHECK_FOLDER="data/elsewhere", **FAILING)
    assert nothing_staged.returncode == 0 and nothing_staged.stdout == ""

    # Installed as .git/hooks/pre-commit, it lets a passing batch in and stops a failing one.
    hooks = repo / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "pre-commit").write_bytes(hook.read_bytes())
    (hooks / "pre-commit").chmod(0o755)
    commit = ["git", "commit", "-q", "-m", "a new batch"]
    stopped = subprocess.run(
        commit, cwd=repo, env=recipe_env(service, tmp_path, **FAILING), capture_output=True, text=True
    )
    assert stopped.returncode != 0 and "commit stopped by the influence check" in stopped.stderr
    assert git(repo, "log", "--format=%s") == "base"
    let_in = subprocess.run(
        commit, cwd=repo, env=recipe_env(service, tmp_path, **PASSING), capture_output=True, text=True
    )
    assert let_in.returncode == 0, let_in.stderr
    assert git(repo, "log", "--format=%s").splitlines() == ["a new batch", "base"]
    assert git(repo, "show", f"HEAD:{BATCH}") == new_batch(sst2_train).decode().strip()
