"""The server's distribution as pyproject.toml declares it: its dependency ranges and the pinned lock
(requirements*.txt, what `make` and the Dockerfile install) name the same packages and every pin lies in its
range, so the two cannot drift; it ships the library, the API and the worker, never the client (a
distribution of its own, clients/python) nor the `influence` command."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]


def _name(requirement: Requirement) -> str:
    return requirement.name.lower().replace("_", "-")


def _pins(path: Path) -> dict[str, Requirement]:
    """The requirements a file lists itself (an `-r` include is read where it is checked), by name."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            pins[_name(requirement)] = requirement
    return pins


def _ranges(*groups: str) -> dict[str, Requirement]:
    """pyproject's requirements of the core (group "") and the named extras, by name."""
    listed = []
    for group in groups:
        listed += PROJECT["dependencies"] if group == "" else PROJECT["optional-dependencies"][group]
    return {_name(requirement): requirement for requirement in map(Requirement, listed)}


@pytest.mark.parametrize(
    ("lock", "groups"), [("requirements.txt", ("", "service")), ("requirements-dev.txt", ("dev",))]
)
def test_every_pin_lies_in_its_pyproject_range(lock, groups):
    pins, ranges = _pins(ROOT / lock), _ranges(*groups)
    assert sorted(pins) == sorted(ranges), f"{lock} and pyproject.toml {groups} name different packages"
    for name, pin in pins.items():
        (version,) = [spec.version for spec in pin.specifier if spec.operator == "=="]
        assert ranges[name].specifier.contains(version, prereleases=True), f"{pin} outside {ranges[name]}"
        assert pin.extras == ranges[name].extras, (pin, ranges[name])


def test_the_gpu_lock_lies_in_the_core_and_gpu_ranges():
    """requirements-gpu.txt (the GPU image: docs/gpu.md) swaps torch for a CUDA build of the same release and
    faiss-cpu for faiss-gpu; both pins lie in pyproject's ranges (torch's `==` admits the `+cu128` local label)."""
    pins, ranges = _pins(ROOT / "requirements-gpu.txt"), _ranges("", "gpu")
    assert sorted(pins) == ["faiss-gpu", "torch"]
    for name, pin in pins.items():
        (version,) = [spec.version for spec in pin.specifier if spec.operator == "=="]
        assert ranges[name].specifier.contains(version, prereleases=True), f"{pin} outside {ranges[name]}"
    assert pins["torch"].specifier != _pins(ROOT / "requirements.txt")["torch"].specifier  # a CUDA build


def test_torch_is_pinned_exactly_in_the_core():
    """A looser range lets pip pick a CUDA build of several GB (docs/decisions/0011-packages.md)."""
    assert str(_ranges("")["torch"].specifier) == str(_pins(ROOT / "requirements.txt")["torch"].specifier)
    assert str(_ranges("")["torch"].specifier).startswith("==")


def test_the_server_ships_no_client_and_no_influence_command():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=ROOT, include=include)
    assert {package.split(".")[0] for package in packages} == {"influence", "app", "worker"}
    # The client's folder at the root (where it used to be) would not be taken either.
    assert not any(fnmatch.fnmatchcase("influence_client", pattern) for pattern in include)
    assert "scripts" not in PROJECT and "influence" not in PROJECT.get("entry-points", {}).get(
        "console_scripts", {}
    )
