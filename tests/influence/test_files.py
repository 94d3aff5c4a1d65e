"""File-system primitives on real files; the locks against a second real process."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from influence import files
from influence.files import (
    atomic_output,
    atomic_path,
    directory_size,
    locked,
    remove_tree,
    sha256_file,
    try_locked,
    write_bytes_atomic,
    write_json_atomic,
)

# A second process: takes the lock named by its arguments, prints what it got, holds it until stdin closes. It
# loads influence/files.py alone (pure stdlib): importing the influence package would load torch in each one.
_HOLDER = """
import importlib.util, sys
kind, path, source = sys.argv[1:]
spec = importlib.util.spec_from_file_location("files", source)
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
if kind == "try":
    with files.try_locked(path) as taken:
        print(taken, flush=True)
else:
    with files.locked(path):
        print("locked", flush=True)
        sys.stdin.read()
"""


def _process(kind: str, path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, kind, str(path), files.__file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _try_in_another_process(path: Path) -> bool:
    child = _process("try", path)
    out, _ = child.communicate(timeout=60)
    return {"True": True, "False": False}[out.strip()]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    small = tmp_path / "small.bin"
    small.write_bytes(b"influence\n")
    large = tmp_path / "large.bin"  # several read blocks
    large.write_bytes(os.urandom(3 * (1 << 20) + 17))
    for path in (small, large):
        assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_writes_replace_the_file_and_leave_no_temp_file(tmp_path: Path) -> None:
    target, scratch = tmp_path / "out" / "doc.json", tmp_path / "scratch"
    target.parent.mkdir()
    scratch.mkdir()
    write_json_atomic(target, {"b": 1, "a": [1.5, None]})
    assert target.read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    write_bytes_atomic(target, b"second", tmp_dir=scratch)
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["doc.json"]
    assert list(scratch.iterdir()) == []
    with pytest.raises(ValueError):
        write_json_atomic(target, {"loss": float("nan")})
    assert target.read_bytes() == b"second"


def test_atomic_writes_leave_no_temp_file_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", full_disk)
        with pytest.raises(OSError, match="No space left"):
            write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]


def test_atomic_path_renames_on_success_and_removes_on_error(tmp_path: Path) -> None:
    target = tmp_path / "new" / "folder" / "result.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".result.json.") and tmp.suffix == ".tmp"
        assert tmp.exists() and stat.S_IMODE(tmp.stat().st_mode) == 0o600
        tmp.write_text("done")
    assert target.read_text() == "done" and not tmp.exists()
    with pytest.raises(KeyError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyError("failed")
    assert target.read_text() == "done" and sorted(target.parent.iterdir()) == [target]


def test_locked_excludes_another_process_until_released(tmp_path: Path) -> None:
    lock = tmp_path / "store.lock"
    with locked(lock):
        assert lock.exists()
        assert _try_in_another_process(lock) is False
        waiter = _process("blocking", lock)
        time.sleep(0.5)
        assert waiter.poll() is None  # still waiting for the lock, nothing printed
    try:
        assert waiter.stdout.readline().strip() == "locked"  # got it once this process let go
        with try_locked(lock) as taken:
            assert taken is False  # now the other process holds it
    finally:
        waiter.communicate("", timeout=60)
    assert _try_in_another_process(lock) is True


def test_try_locked_takes_a_free_lock_and_creates_its_folder(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "finalize.lock"
    with try_locked(lock) as taken:
        assert taken is True and lock.exists()
        assert _try_in_another_process(lock) is False
    assert _try_in_another_process(lock) is True


def test_remove_tree_removes_trees_files_and_links_and_tolerates_missing_paths(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f.npy").write_bytes(b"x")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "g").write_bytes(b"y")
    link = tmp_path / "link"
    link.symlink_to(kept, target_is_directory=True)
    single = tmp_path / "single.json"
    single.write_text("{}")
    for path in (tree, link, single, tmp_path / "missing"):
        remove_tree(path)
        assert not path.exists() and not path.is_symlink()
    assert (kept / "g").read_bytes() == b"y"  # a link is removed, never what it points to


def test_directory_size_counts_every_file_below(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "one").write_bytes(b"x" * 10)
    (tmp_path / "a" / "two").write_bytes(b"x" * 100)
    (tmp_path / "a" / "b" / "three").write_text(json.dumps([1] * 5))
    assert directory_size(tmp_path) == 10 + 100 + len(json.dumps([1] * 5))
    assert directory_size(tmp_path / "missing") == 0
