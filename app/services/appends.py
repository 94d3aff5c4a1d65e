"""Incremental append: new rows join an index without a rebuild (a batch check with `append=true` that passes).

What moves, in this order; every step is whole-or-not-at-all and a rerun skips what is done:
  1. the dataset. A new version of its rows artifact is written beside the current one,
     datasets/<id>/appends/<job_id>/{rows.jsonl, rows.offsets, meta.json}: the current rows, then the new ones,
     with their checksums and the list of appends (job id, [start, stop) of its rows). ONE database update then
     switches Dataset.path / row_count / labels to it: that commit is the switch. The `appends` record in the
     committed meta.json is how a rerun knows its rows are in, and where.
  2. the feature store. The new rows' features become one new segment (FeatureStore.append: one os.replace of
     segments.json); their row ids are their dataset rows, so a rerun finds them and skips.
  3. DataInf statistics are refitted over every row (fitted over n rows, they are stale once rows are added: a
     fit over n + b rows is what a rebuild holds), and the FAISS indexes take the new rows (sync_store_indexes;
     an index that no longer matches the store, after a compaction say, is rebuilt).
  4. the index row: num_rows and size_bytes.

Why neither Dataset.content_hash nor the store manifest changes. content_hash is the sha256 of the registered
file and the store manifest records it as the identity of the rows its features describe. An append never
changes a row that exists (rows are only added, at new positions), so every stored feature still describes its
row, and the store's row ids say which rows it holds. What has to hold at every instant is that every row id in
the store is a row of the dataset (a hit's text can always be read): growing the dataset first and the store
second keeps it. Rewriting the manifest instead would need three files switched at once (manifest.json,
segments.json and faiss/indexes.json all carry its fingerprint) and would make every other index of the dataset
refuse queries although its features are still right; other indexes simply hold fewer rows than the dataset.

A crash (kill -9) anywhere leaves a consistent, queryable index:
  - before the commit of 1: nothing changed (an unreferenced version folder is removed by the rerun);
  - between 1 and 2: the dataset has the new rows, the store not yet: queries answer over the old rows;
  - between 2 and 3: exact grad-dot / cosine queries include the new rows; DataInf and approximate queries
    answer 409 (statistics / FAISS behind the store, as the library reports them) until the rerun brings them
    up (a compaction would too: it refits and rebuilds whatever is stale);
  - between 3 and 4: the index row's num_rows lags until the rerun.
A worker that starts reruns the job (app/jobs/steps.py), and every step sees what is done. Appends to
one dataset are serialised by an fcntl lock on datasets/<id>/.append.lock (the kernel drops it if the holder dies).
Superseded versions are removed after the switch, except the previous one: a reader that loaded the dataset row
just before the switch still finds the files it names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update

from app.config import Settings
from app.db import session_scope
from app.errors import Conflict
from app.models import Dataset, Index
from app.services import datasets as dataset_files
from app.stores import open_store
from influence import build_store_indexes
from influence.errors import ManifestMismatchError, StoreCorruptedError, StoreIncompleteError
from influence.files import directory_size, fsync_path, locked, remove_tree
from influence.index import stale_store_indexes, sync_store_indexes
from influence.statistics import fit_store_statistics

log = logging.getLogger(__name__)

APPENDS_DIR = "appends"
APPEND_LOCK = ".append.lock"
# A superseded version of a dataset's rows is kept this long after it was written: a download or a job that read
# the dataset before a later append may still be reading it (longer readers get a clear 409 from its checksum).
SUPERSEDED_GRACE_S = 6 * 3600


class AppendRefused(Exception):
    """The rows cannot join (the dataset would exceed max_rows or max_dataset_bytes); nothing was changed."""


class IndexDeleted(Exception):
    """The index was deleted while rows were being appended to it (its job was cancelled by the delete)."""


@dataclass(frozen=True)
class AppendOutcome:
    dataset_rows: tuple[int, int]  # [start, stop): the dataset rows the new rows became
    index_rows: int  # rows of the index that answer queries afterwards


@contextlib.contextmanager
def dataset_append_lock(settings: Settings, dataset_id: str) -> Iterator[None]:
    """Hold the dataset's append lock (blocking): one append at a time per dataset, across processes."""
    folder = dataset_files.dataset_dir(settings, dataset_id)
    if not folder.is_dir():
        raise Conflict(f"the rows of dataset {dataset_id!r} are missing from the artifact store")
    with locked(folder / APPEND_LOCK):
        yield


def rows_meta(settings: Settings, dataset: Dataset) -> dict[str, Any]:
    """The meta.json beside the dataset's current rows file."""
    path = dataset_files.rows_path(settings, dataset).with_name(dataset_files.META_FILE)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise Conflict(
            f"the artifact of dataset {dataset.id!r} is corrupted (meta.json); register it again"
        ) from None
    if not isinstance(meta, dict):
        raise Conflict(f"the artifact of dataset {dataset.id!r} is corrupted (meta.json); register it again")
    return meta


def recorded_append(settings: Settings, dataset: Dataset, job_id: str) -> tuple[int, int] | None:
    """[start, stop) of the rows job `job_id` appended to the dataset, or None if it appended none."""
    for entry in rows_meta(settings, dataset).get("appends") or []:
        if isinstance(entry, dict) and entry.get("job_id") == job_id:
            return int(entry["start"]), int(entry["stop"])
    return None


def append_rows(
    ctx: Any,
    *,
    job_id: str,
    index_id: str,
    dataset_id: str,
    rows: Sequence[dict[str, Any]],
    features: Callable[[], Mapping[str, np.ndarray]],
) -> AppendOutcome:
    """Steps 1-4 (module docstring) under the dataset's append lock. `rows` are normalised dataset rows
    ({"text", "text_pair", "label", "noisy"}); `features()` gives their float32 features for every layer of the
    store, asked for only when the store lacks them. Idempotent per `job_id`."""
    with dataset_append_lock(ctx.settings, dataset_id):
        before = _dataset_version(ctx, dataset_id)
        start, stop = grow_dataset(ctx, dataset_id, job_id, rows)
        try:
            index_rows = grow_store(ctx, index_id, start, stop, features)
        except Exception:
            # An error, not a crash (a crash reruns the job, which finishes the append): put the dataset back as
            # it was when this call grew it and the store has not taken the rows, so nothing is half-appended and
            # the same batch can be checked again without landing in the dataset twice.
            if before is not None and before[1] == start and not _store_holds(ctx, index_id, start, stop):
                _revert_dataset(ctx, dataset_id, before, stop)
            raise
    log.info("job %s appended dataset rows [%d, %d) to index %s", job_id, start, stop, index_id)
    return AppendOutcome((start, stop), index_rows)


# ------------------------------------------------------------------------------------------ the dataset


def _dataset_version(ctx: Any, dataset_id: str) -> tuple[str, int, list[Any]] | None:
    """(rows path, row count, labels) of the dataset now; None if it is gone."""
    with session_scope(ctx.session_factory) as session:
        dataset = session.get(Dataset, dataset_id)
        return None if dataset is None else (dataset.path, int(dataset.row_count), list(dataset.labels or []))


def _revert_dataset(ctx: Any, dataset_id: str, before: tuple[str, int, list[Any]], grown_to: int) -> None:
    """Switch the dataset back to `before` if it still is the version this append made (row count `grown_to`)."""
    path, row_count, labels = before
    with session_scope(ctx.session_factory) as session:
        session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.row_count == grown_to)
            .values(path=path, row_count=row_count, labels=labels)
            .execution_options(synchronize_session=False)
        )
    log.warning("dataset %s: rows [%d, %d) taken back after a failed append", dataset_id, row_count, grown_to)


def _store_holds(ctx: Any, index_id: str, start: int, stop: int) -> bool:
    """Whether the index's store holds any of the dataset rows [start, stop) (True when it cannot be told)."""
    try:
        with session_scope(ctx.session_factory) as session:
            index = session.get(Index, index_id)
            if index is None:
                return False
            session.expunge(index)
        store = open_store(ctx.settings, index)
        return bool(np.isin(np.arange(start, stop), store.row_ids()).any())
    except Exception:
        return True


def grow_dataset(ctx: Any, dataset_id: str, job_id: str, rows: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """Step 1: the dataset's rows followed by `rows` become its current version; returns [start, stop) of the
    new rows. A dataset that holds this job's rows already answers where they are. Hold dataset_append_lock."""
    settings = ctx.settings
    with session_scope(ctx.session_factory) as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            raise Conflict(f"dataset {dataset_id!r} was deleted")
        session.expunge(dataset)
    done = recorded_append(settings, dataset, job_id)
    if done is not None:
        return done
    start, stop = dataset.row_count, dataset.row_count + len(rows)
    if stop > settings.max_rows:
        raise AppendRefused(
            f"the dataset would have {stop:,} rows, more than max_rows = {settings.max_rows:,}; nothing was appended"
        )
    grown = dataset_files.rows_path(settings, dataset).stat().st_size + sum(
        len(dataset_files.encode_row(row)) for row in rows
    )
    if grown > settings.max_dataset_bytes:  # checks queued together each passed the check at their creation
        raise AppendRefused(
            f"the dataset would take {grown:,} bytes of rows, more than max_dataset_bytes = "
            f"{settings.max_dataset_bytes:,}; nothing was appended"
        )
    folder = dataset_files.dataset_dir(settings, dataset_id) / APPENDS_DIR / job_id
    labels = _write_version(settings, dataset, rows, job_id, folder)
    new_path = str((folder / dataset_files.ROWS_FILE).relative_to(settings.resolved_artifacts_dir))
    try:
        with session_scope(ctx.session_factory) as session:
            changed = session.execute(
                update(Dataset)
                .where(Dataset.id == dataset_id, Dataset.path == dataset.path, Dataset.row_count == start)
                .values(path=new_path, row_count=stop, labels=labels)
                .execution_options(synchronize_session=False)
            ).rowcount
            if changed != 1:
                raise Conflict(
                    f"dataset {dataset_id!r} changed while rows were being appended to it; run again"
                )
    except BaseException:
        if not _switched(ctx, dataset_id, new_path):
            remove_tree(folder)
        raise
    previous = dataset_files.rows_path(settings, dataset).parent
    _drop_superseded(folder.parent, keep={folder.name, previous.name})
    return start, stop


def _switched(ctx: Any, dataset_id: str, new_path: str) -> bool:
    """Whether the dataset names `new_path` now (an error may follow a commit that reached the database).
    True when it cannot be told: an orphan folder is harmless, removing committed rows is not."""
    try:
        with session_scope(ctx.session_factory) as session:
            return session.scalar(select(Dataset.path).where(Dataset.id == dataset_id)) == new_path
    except Exception:
        return True


def _write_version(
    settings: Settings, dataset: Dataset, rows: Sequence[dict[str, Any]], job_id: str, folder: Path
) -> list[Any]:
    """Write the grown rows artifact as `folder` (staged, fsynced, renamed into place); the dataset's labels."""
    old_rows, old_offsets = dataset_files.open_rows(settings, dataset)  # checksums verified
    meta = rows_meta(settings, dataset)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    # What an attempt of this job that died before its switch left behind (nothing committed names it).
    for leftover in parent.glob(f".{job_id}.*"):
        remove_tree(leftover)
    remove_tree(folder)
    staging = parent / f".{job_id}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    start, stop = dataset.row_count, dataset.row_count + len(rows)
    try:
        digest = hashlib.sha256()
        offsets = np.empty(len(rows), dtype="<i8")
        with open(staging / dataset_files.ROWS_FILE, "wb") as out:
            with open(old_rows, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
            position = out.tell()
            for i, row in enumerate(rows):
                line = dataset_files.encode_row(row)
                offsets[i] = position
                out.write(line)
                digest.update(line)
                position += len(line)
        previous_offsets = np.fromfile(old_offsets, dtype="<i8")
        if len(previous_offsets) != start:
            raise Conflict(
                f"the artifact of dataset {dataset.id!r} is corrupted (rows.offsets holds {len(previous_offsets)} "
                f"rows, the dataset {start}); register it again"
            )
        np.concatenate([previous_offsets, offsets]).astype("<i8").tofile(staging / dataset_files.OFFSETS_FILE)
        files = {}
        for name in (dataset_files.ROWS_FILE, dataset_files.OFFSETS_FILE):
            fsync_path(staging / name)
            files[name] = dataset_files.sha256_file(staging / name)
        if dataset.task == "classification":
            labels: list[Any] = sorted({*(dataset.labels or []), *(int(row["label"]) for row in rows)})
        else:
            labels = list(dataset.labels or [])
        appends = [e for e in meta.get("appends") or [] if isinstance(e, dict)]
        appends.append({"job_id": job_id, "start": start, "stop": stop, "sha256": digest.hexdigest()})
        meta.update(row_count=stop, labels=labels, files=files, appends=appends)
        (staging / dataset_files.META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        fsync_path(staging / dataset_files.META_FILE)
        fsync_path(staging)
        os.replace(staging, folder)
        # A rename is durable only once its directory is: a crash must not bring back the old listing.
        fsync_path(parent)
    except BaseException:
        remove_tree(staging)
        raise
    return labels


def _drop_superseded(appends: Path, keep: set[str]) -> None:
    """Remove appended versions other than `keep` (and staging leftovers: every appender holds the lock, so
    they belong to dead processes) once they are older than SUPERSEDED_GRACE_S: a download or a job that read
    the dataset row before a later append may still be reading that version. The registration's own files
    stay: they are the rows as registered."""
    cutoff = time.time() - SUPERSEDED_GRACE_S
    for entry in appends.iterdir():
        if entry.name in keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.name.startswith(".") or entry.stat().st_mtime < cutoff:
                remove_tree(entry)


# -------------------------------------------------------------------------------------------- the index


def grow_store(
    ctx: Any, index_id: str, start: int, stop: int, features: Callable[[], Mapping[str, np.ndarray]]
) -> int:
    """Steps 2-4: dataset rows [start, stop) join the index's store (skipped when it holds them), statistics
    and FAISS indexes follow, the index row is updated. Returns the index's live row count."""
    settings = ctx.settings
    index = _index(ctx, index_id)
    try:
        store = open_store(settings, index)
        ids = np.arange(start, stop, dtype=np.int64)
        present = np.isin(ids, store.row_ids())
        if present.any() and not present.all():
            raise StoreCorruptedError(
                f"the store of index {index_id!r} holds {int(present.sum())} of the rows [{start}, {stop}); "
                "rebuild the index"
            )
        if not present.any():
            store.append(ids, features())
        fit_store_statistics(store)
        _sync_faiss(store, index.faiss_kind, getattr(ctx, "device", None))
        store.refresh()
        live, deleted = store.num_live_rows, int(store.deleted_row_ids().size)
        size = directory_size(store.path)
    except Exception as exc:
        if _index_gone(ctx, index_id):
            raise IndexDeleted(index_id) from exc
        raise
    with session_scope(ctx.session_factory) as session:
        changed = session.execute(
            update(Index)
            .where(Index.id == index_id)
            .values(num_rows=live, deleted_rows=deleted, size_bytes=size)
            .execution_options(synchronize_session=False)
        ).rowcount
    if not changed:
        raise IndexDeleted(index_id)
    return live


def _sync_faiss(store: Any, kind: str, device: str | None) -> None:
    """Add the appended rows to each layer's FAISS index; rebuild the indexes that no longer match the store
    (on the worker's device: a GPU builds them when it has one; the files are CPU indexes either way)."""
    with contextlib.suppress(ManifestMismatchError, StoreIncompleteError):
        sync_store_indexes(store, device=device)
    stale = stale_store_indexes(store)
    if stale:
        build_store_indexes(store, kind=kind, layers=stale, device=device)


def _index(ctx: Any, index_id: str) -> Index:
    with session_scope(ctx.session_factory) as session:
        index = session.get(Index, index_id)
        if index is None:
            raise IndexDeleted(index_id)
        session.expunge(index)
    return index


def _index_gone(ctx: Any, index_id: str) -> bool:
    with session_scope(ctx.session_factory) as session:
        return session.get(Index, index_id) is None
