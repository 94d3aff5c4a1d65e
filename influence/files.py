"""File-system primitives: checksums, atomic writes, fcntl locks and tree removal (standard library only).

Every writer in the library and the service replaces files whole: new content goes to a temporary file that
is fsynced and renamed onto its target, so a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HASH_BLOCK = 1 << 20

PathLike = str | os.PathLike[str]


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: PathLike) -> None:
    """Flush a file or directory to disk, so a following rename cannot expose stale bytes after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _renamed_onto(path: Path, tmp: Path) -> Iterator[Path]:
    """Yield `tmp`; fsync it and rename it onto `path` when the block ends without error, remove it when not."""
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it (after fsync) when the block ends without error.

    The temporary file exists from the start (mkstemp: owner-only permissions, named `.<name>.<random>.tmp`)
    and the folder of `path` is created if missing; the file is removed when the block raises.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    with _renamed_onto(target, Path(tmp)) as tmp_path:
        yield tmp_path


@contextlib.contextmanager
def atomic_output(path: PathLike, tmp_dir: PathLike | None = None) -> Iterator[Path]:
    """A fresh temporary path in `tmp_dir` (default: beside `path`) for a writer that creates the file itself
    (np.save, faiss.write_index): fsynced and renamed onto `path` when the block ends without error, then the
    folder of `path` is fsynced; removed when the block raises.

    Unlike atomic_path's, the file is created by the writer, with the process's usual permissions. `tmp_dir`
    must be on the file system of `path` (a rename does not cross file systems).
    """
    target = Path(path)
    folder = target.parent if tmp_dir is None else Path(tmp_dir)
    with _renamed_onto(target, folder / f".{target.name}.{uuid.uuid4().hex}.partial") as tmp:
        yield tmp
    fsync_path(target.parent)


def write_bytes_atomic(path: PathLike, data: bytes, tmp_dir: PathLike | None = None) -> None:
    """Replace `path` with `data` atomically (see atomic_output for `tmp_dir`)."""
    with atomic_output(path, tmp_dir) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: PathLike, obj: Any, tmp_dir: PathLike | None = None) -> None:
    """Replace `path` with `obj` as indented JSON with sorted keys (NaN refused), atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), tmp_dir)


@contextlib.contextmanager
def locked(path: PathLike) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `path` (created if missing) for the block, waiting for it if need be."""
    # flock is per open file description: every caller opens its own, so threads and processes both
    # serialise, and a crashed holder releases the lock with its process.
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def try_locked(path: PathLike) -> Iterator[bool]:
    """Try to take an exclusive fcntl lock on `path` without waiting: yields True if taken (released on exit,
    or by the kernel when the process dies), False if another live process holds it. Creates the folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_tree(path: PathLike) -> None:
    """Remove a directory tree, or a file or link, tolerating files that vanish (or appear) meanwhile.

    A tree is removed best effort: what is still there after a few tries (permissions) stays, silently.
    """
    target = Path(path)
    if target.is_symlink() or not target.is_dir():
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        return
    for _ in range(3):
        shutil.rmtree(target, ignore_errors=True)
        if not target.exists():
            return


def directory_size(path: PathLike) -> int:
    """Bytes in the files under `path` (files that vanish while it is walked count as 0)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(root) / name).stat().st_size
    return total
