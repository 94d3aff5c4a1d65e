"""The repository on its own: its files copied into an empty folder, with no sibling folders (what a clone
holds), have every data file the demo, the scripts, the benchmarks and this suite read, and no code reaches
outside it for data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each module's data folder constant, read in the clone's own interpreter session.
PROBE = """
import importlib.util, json, sys
sys.path.insert(0, ".")
from tests.conftest import SST2 as tests_sst2
from bench.common import SST2 as bench_sst2
found = {"tests": str(tests_sst2), "bench": str(bench_sst2)}
for name in ("demo", "reproduce_paper", "experiment_retraining", "report_to_ci"):
    spec = importlib.util.spec_from_file_location(name, f"scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # module level only: each script runs its work under __main__
    found[name] = str(module.SST2)
print(json.dumps(found))
"""


def test_a_clone_in_an_empty_folder_has_every_data_path(tmp_path):
    alone = tmp_path / "empty"
    alone.mkdir()
    clone = alone / "repo"
    # What a clone of this tree holds: every file git tracks or would track (ignored ones, like .venv, are not).
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            target = clone / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    assert sorted(p.name for p in alone.iterdir()) == ["repo"]  # nothing beside it

    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=clone, capture_output=True, text=True, timeout=300, check=True
    )
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert set(found) == {
        "tests",
        "bench",
        "demo",
        "reproduce_paper",
        "experiment_retraining",
        "report_to_ci",
    }
    for who, folder in found.items():
        folder = Path(folder).resolve()
        assert folder.is_relative_to(clone.resolve()), (who, folder)
        for split, rows in (("train", 60_614), ("validation", 872), ("dev", 6_735)):
            path = folder / f"{split}.tsv"
            assert path.is_file(), (who, path)
            assert sum(1 for _ in path.open(encoding="utf-8")) == rows + 1, (who, path)  # + the header
    assert (clone / "data" / "sst2" / "README.md").is_file()  # provenance and licence beside the data

    # No code in the clone joins a path to a folder beside the repository.
    # A folder beside the repository is reached through the parent of its root, however that root is named.
    outside = re.compile(r"""\bparents\[\d+\]\.parent\b|\b(?:REPO|ROOT)\.parent\b""")
    offenders = [
        str(path.relative_to(clone))
        for path in clone.rglob("*.py")
        if ".venv" not in path.parts and outside.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
