"""Registering a dataset (an upload or a server-side file); finding, listing and deleting registrations.

Nothing half-made survives a failure: the artifact is written under <artifacts>/tmp/, renamed into place only
after every row validated, and deleted again if the transaction that records the row rolls back. The request
holds an fcntl lock on `.registering.lock` inside the folder until its transaction ends; if the process is
killed (kill -9) the kernel drops the lock, and the next API start removes the folder (app/services/artifacts.py)
unless a committed dataset row names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, after_rollback
from app.errors import Invalid, PayloadTooLarge
from app.models import Dataset, Index, new_id
from app.services import isolation
from app.services.datasets.artifact import META_FILE, OFFSETS_FILE, ROWS_FILE, dataset_dir
from app.services.datasets.formats import read_records
from app.services.datasets.rows import RowsSummary, write_rows
from app.services.datasets.spec import DatasetSpec, check_spec, pick_format
from app.services.paths import resolve_allowed_path
from app.services.sources import delete_unless_indexed, refuse_while_indexed
from app.services.tenancy import owned
from influence.files import fsync_path, sha256_file

# An upload, copied into its staging folder for a request process to read; deleted once read.
UPLOAD_FILE = "upload"
REGISTERING_LOCK = ".registering.lock"
STAGING_PREFIX = "dataset-"
_READ_BLOCK = 1 << 20


def get_dataset(session: Session, dataset_id: str, tenant_id: str) -> Dataset:
    """A dataset of this tenant (NotFound for another tenant's, as for an unknown id)."""
    return owned(session, Dataset, dataset_id, tenant_id, "dataset")


def delete_dataset(session: Session, settings: Settings, dataset_id: str, tenant_id: str) -> None:
    """Delete a dataset and, once that commits, its normalised artifact (never a server-side source file).
    Conflict (409) while an index uses it: delete those first."""
    dataset = get_dataset(session, dataset_id, tenant_id)
    refuse_while_indexed(session, "dataset", dataset.id, Index.dataset_id)
    delete_unless_indexed(session, dataset, "dataset", dataset_id)
    folder = dataset_dir(settings, dataset_id)
    after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))


def register_upload(
    session: Session,
    settings: Settings,
    spec: DatasetSpec,
    upload: IO[bytes],
    filename: str | None,
    tenant_id: str,
) -> Dataset:
    """Register an uploaded file (any binary file object): copied into the staging folder, read from there."""
    fmt = pick_format(spec.format, filename, "the uploaded file")
    name = spec.name or (Path(filename).stem if filename else "") or "dataset"

    def source(staging: Path) -> Path:
        return copy_upload(upload, staging / UPLOAD_FILE, settings.max_upload_bytes)

    return _register(
        session, settings, spec, source, "the uploaded file", fmt, name, filename or None, tenant_id
    )


def register_path(
    session: Session, settings: Settings, spec: DatasetSpec, raw_path: str, tenant_id: str
) -> Dataset:
    """Register a server-side file under an allowed root (read in place; the upload limit does not apply)."""
    path = resolve_allowed_path(settings, raw_path, "path")
    if not path.is_file():
        raise Invalid(f"path {raw_path!r} is not an existing file")
    fmt = pick_format(spec.format, path.name, f"path {raw_path!r}")
    name = spec.name or path.stem
    return _register(
        session, settings, spec, lambda _: path, f"path {raw_path!r}", fmt, name, str(path), tenant_id
    )


def copy_upload(upload: IO[bytes], target: Path, limit: int) -> Path:
    """Copy an upload to `target` (for a request process to read), refusing more than `limit` bytes."""
    upload.seek(0)
    copied = 0
    with open(target, "wb") as out:
        for block in iter(lambda: upload.read(_READ_BLOCK), b""):
            copied += len(block)
            if copied > limit:
                raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes")
            out.write(block)
    return target


@contextlib.contextmanager
def staged_upload(settings: Settings, upload: IO[bytes]) -> Iterator[Path]:
    """The upload copied into a staging folder of its own, removed on exit. The folder is locked like a dataset
    registration's, so if this process is killed meanwhile the next start sweeps it."""
    staging = settings.resolved_artifacts_dir / "tmp" / f"{STAGING_PREFIX}upload-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        with open(staging / REGISTERING_LOCK, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield copy_upload(upload, staging / UPLOAD_FILE, settings.max_upload_bytes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def size_and_hash(handle: IO[bytes], limit: int | None) -> tuple[int, str]:
    """Bytes and hex sha256 of what is left to read of `handle` (413 past `limit` bytes)."""
    digest = hashlib.sha256()
    size = 0
    for block in iter(lambda: handle.read(_READ_BLOCK), b""):
        size += len(block)
        if limit is not None and size > limit:
            raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes")
        digest.update(block)
    return size, digest.hexdigest()


@dataclass(frozen=True)
class _Normalised:
    """What reading a file gave: its size and sha256, the rows' summary, and the sha256 of the files written."""

    size: int
    digest: str
    summary: RowsSummary
    files: dict[str, str]


def normalise_file(
    settings: Settings, spec: DatasetSpec, source: Path, what: str, fmt: str, folder: Path
) -> _Normalised:
    """Read `source`, validate every row and write rows.jsonl and rows.offsets (fsynced) into `folder`. Runs in a
    request process (app/services/isolation.py): this is the work that would stall the API's other requests."""
    try:
        handle = open(source, "rb")  # noqa: SIM115 - closed below, after two passes over one descriptor
    except OSError as exc:
        raise Invalid(f"{what} cannot be read: {exc.strerror}") from None
    with handle:
        size, digest = size_and_hash(handle, limit=None)
        if size == 0:
            raise Invalid("the file is empty")
        handle.seek(0)
        summary = write_rows(folder, read_records(handle, fmt, spec.columns, settings), spec, settings)
    files = {}
    for file_name in (ROWS_FILE, OFFSETS_FILE):
        fsync_path(folder / file_name)
        files[file_name] = sha256_file(folder / file_name)
    return _Normalised(size, digest, summary, files)


def _register(
    session: Session,
    settings: Settings,
    spec: DatasetSpec,
    source: Callable[[Path], Path],
    what: str,
    fmt: str,
    name: str,
    origin: str | None,
    tenant_id: str,
) -> Dataset:
    """Register the file that `source(staging folder)` gives (an upload is copied into the folder first)."""
    check_spec(spec)
    dataset_id = new_id()
    artifacts = settings.resolved_artifacts_dir
    staging = artifacts / "tmp" / f"{STAGING_PREFIX}{dataset_id}-{uuid.uuid4().hex[:8]}"
    final = dataset_dir(settings, dataset_id)
    staging.mkdir(parents=True)
    # Held until this request's transaction ends: a folder whose lock is free and that no committed row names
    # belongs to a request that died, and is swept (app/services/artifacts.py).
    lock = open(staging / REGISTERING_LOCK, "a+")  # noqa: SIM115 - closed by the hooks below
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
        read = isolation.run(normalise_file, settings, spec, source(staging), what, fmt, staging)
        (staging / UPLOAD_FILE).unlink(missing_ok=True)
        summary = read.summary
        meta = {
            "id": dataset_id,
            "name": name,
            "format": fmt,
            "task": spec.task,
            "columns": spec.columns.as_dict(),
            "content_hash": read.digest,
            "row_count": summary.row_count,
            "labels": summary.labels,
            "label_names": summary.label_names,
            "files": read.files,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=1))
        fsync_path(staging / META_FILE)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
    except BaseException:
        lock.close()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after the rename

    def committed() -> None:
        with contextlib.suppress(FileNotFoundError):
            (final / REGISTERING_LOCK).unlink()
        lock.close()

    def rolled_back() -> None:
        shutil.rmtree(final, ignore_errors=True)
        lock.close()

    after_commit(session, committed)
    after_rollback(session, rolled_back)
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name=name[:200],
        format=fmt,
        task=spec.task,
        source=origin,
        size_bytes=read.size,
        columns=spec.columns.as_dict(),
        row_count=summary.row_count,
        content_hash=read.digest,
        path=str((final / ROWS_FILE).relative_to(artifacts)),
        labels=summary.labels,
        label_names=summary.label_names,
        has_noisy_flag=spec.columns.noisy is not None,
    )
    session.add(dataset)
    session.flush()
    return dataset
