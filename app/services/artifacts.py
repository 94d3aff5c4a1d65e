"""Sweeping what crashed processes left in the artifacts directory.

A request that registers a dataset writes it under <artifacts>/tmp/dataset-<id>-<rand>/, renames it to
<artifacts>/datasets/<id>/ and commits the row; it holds an fcntl lock on `.registering.lock` in that folder
until its transaction ends. The kernel drops the lock when the process dies, even by kill -9, so a folder
whose lock can be taken belongs to no live request: it is removed unless a committed dataset row names it.
Index folders (<artifacts>/indexes/<id>/) whose index row is gone (deleted, with the API killed before it
removed the files) are removed too, and so are job folders (<artifacts>/jobs/<id>/: a batch check's upload
whose request died before its commit holds `.registering.lock` the same way). The API runs this when it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.models import Dataset, Index, Job
from app.services.datasets import REGISTERING_LOCK, STAGING_PREFIX
from influence.files import remove_tree

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _abandoned(folder: Path) -> Iterator[bool]:
    """True (holding its lock) when no live process holds the folder's registration lock."""
    lock_path = folder / REGISTERING_LOCK
    if not lock_path.exists():
        yield True
        return
    try:
        handle = open(lock_path, "a+")  # noqa: SIM115 - closed below
    except OSError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def sweep_orphans(settings: Settings, session_factory: sessionmaker[Session]) -> list[Path]:
    """Remove abandoned dataset staging folders, and dataset, index and job folders that no committed row names.
    Returns what was removed."""
    root = settings.resolved_artifacts_dir
    removed: list[Path] = []
    staging = root / "tmp"
    if staging.is_dir():
        for folder in staging.iterdir():
            if folder.is_dir() and folder.name.startswith(STAGING_PREFIX):
                with _abandoned(folder) as free:
                    if free:
                        remove_tree(folder)
                        removed.append(folder)
    with session_factory() as session:
        for kind, model in (("datasets", Dataset), ("indexes", Index), ("jobs", Job)):
            folder_root = root / kind
            if not folder_root.is_dir():
                continue
            for folder in folder_root.iterdir():
                if not folder.is_dir():
                    continue
                with _abandoned(folder) as free:
                    if not free:
                        continue  # a registration is in flight: its own transaction decides
                    # Checked while holding the lock: a registration that committed has released it first.
                    exists = session.scalar(select(model.id).where(model.id == folder.name)) is not None
                    session.rollback()
                    if not exists:
                        remove_tree(folder)
                        removed.append(folder)
    for path in removed:
        log.warning("removed %s, left by a process that died before it finished", path)
    return removed
