"""A check's batch file in the API: read and validated exactly as a dataset registration reads one
(app/services/datasets.py: formats, column mapping, text and size limits), its labels mapped to the index
dataset's classes, written as normalised rows (rows.jsonl lines) and moved into the job's folder, where the
runner reads it back (its sha256 is in the job's params).

The reading runs in a request process (app/services/isolation.py, which preloads this module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, after_rollback
from app.errors import Invalid
from app.models import Dataset, RegisteredModel
from app.services import datasets as dataset_files
from app.services import isolation
from app.stores import job_dir
from influence.files import remove_tree

BATCH_FILE = "batch.jsonl"


@dataclass(frozen=True)
class Batch:
    path: Path  # the normalised rows, as rows.jsonl lines
    rows: int
    bytes: int  # of `path`
    sha256: str  # of `path`
    file_size: int  # of the file sent
    file_sha256: str


def parse_batch(
    settings: Settings,
    dataset: Dataset,
    model: RegisteredModel,
    columns: dataset_files.ColumnSpec,
    given_format: str | None,
    staged: Path,
    filename: str | None,
) -> tuple[Batch, dict[str, Any]]:
    """The batch file `staged` (an upload copied into its staging folder) read and validated by the dataset
    registration's own readers, in a request process (app/services/isolation.py), and written beside it as
    normalised rows (rows.jsonl lines: {"text", "text_pair", "label", "noisy"}, labels in the index dataset's
    numbering); and a description of the file. `given_format`: None to go by the file name's extension."""
    fmt = dataset_files.pick_format(given_format, filename, "the uploaded file")
    if columns.label is None and dataset.task == "classification":
        columns = dataclasses.replace(columns, label="label")
    spec = dataset_files.DatasetSpec(columns=columns, task=dataset.task)
    dataset_files.check_spec(spec)
    pairs = bool((dataset.columns or {}).get("text_pair"))
    if pairs != (columns.text_pair is not None):
        raise Invalid(
            "the index's dataset has a text_pair in every row: give text_pair_column"
            if pairs
            else "the index's dataset has no text_pair: leave text_pair_column out"
        )
    classes = int(model.num_labels or 2) if dataset.task == "classification" else None
    target = staged.with_name(BATCH_FILE)
    batch = isolation.run(read_batch, settings, spec, staged, fmt, dataset.label_names, classes, target)
    source = {
        "filename": (filename or "")[:200] or None,
        "format": fmt,
        "size_bytes": batch.file_size,
        "upload_sha256": batch.file_sha256,
        "rows": batch.rows,
        "columns": columns.as_dict(),
    }
    return batch, source


def read_batch(
    settings: Settings,
    spec: dataset_files.DatasetSpec,
    source: Path,
    fmt: str,
    label_names: list[str] | None,
    classes: int | None,
    target: Path,
) -> Batch:
    """Read and validate a batch file and write its normalised rows to `target`, counted against
    max_dataset_bytes; classification labels become the index dataset's class indices (`label_names`: its
    names, or None when it numbers its classes; `classes`: the model's)."""
    by_name = {name: i for i, name in enumerate(label_names or [])}
    validator = dataset_files.RowValidator(spec, settings)
    written = dataset_files.ByteBudget(settings.max_dataset_bytes, "the batch's rows")
    digest = hashlib.sha256()
    with open(source, "rb") as handle, open(target, "wb") as out:
        size, file_digest = dataset_files.size_and_hash(handle, limit=None)
        if size == 0:
            raise Invalid("the file is empty")
        handle.seek(0)
        for where, record in dataset_files.read_records(handle, fmt, spec.columns, settings):
            row = validator.normalise(where, record)
            if classes is not None:
                row["label"] = _class_index(row["label"], where, label_names, by_name, classes)
            line = dataset_files.encode_row(row)
            written.charge(len(line), where)
            digest.update(line)
            out.write(line)
        dataset_files.fsync_handle(out)
    if validator.count == 0:
        raise Invalid("the file has no data rows")
    return Batch(target, validator.count, written.used, digest.hexdigest(), size, file_digest)


def _class_index(
    label: Any, where: str, names: list[str] | None, by_name: dict[str, int], classes: int
) -> int:
    """A batch row's label as the index dataset's class index: a name mapped by name, an integer kept."""
    if names is not None:
        if not isinstance(label, str):
            raise Invalid(
                f"{where}: label {label!r} is a class index, but the index's dataset names its classes "
                f"({', '.join(names[:10])}); give label names"
            )
        if label not in by_name:
            raise Invalid(
                f"{where}: label {label!r} is not a label of the index's dataset ({', '.join(names[:10])})"
            )
        label = by_name[label]
    elif isinstance(label, str):
        raise Invalid(
            f"{where}: label {label!r} is a name, but the index's dataset numbers its classes; give class indices"
        )
    if not 0 <= label < classes:
        raise Invalid(f"{where}: label {label} is not a class of the model [0, {classes})")
    return label


def store_batch(session: Session, settings: Settings, job_id: str, batch: Path) -> None:
    """Move the normalised batch into the job's folder now; the folder goes if the transaction rolls back.

    Like a dataset registration, the request holds an fcntl lock on `.registering.lock` in the folder until its
    transaction ends, so a sweep can tell a folder left by a killed request from one still being made."""

    directory = job_dir(settings, job_id)
    directory.mkdir(parents=True, exist_ok=False)
    lock = open(directory / dataset_files.REGISTERING_LOCK, "a+")  # noqa: SIM115 - closed by the hooks below
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
        os.replace(batch, directory / BATCH_FILE)  # both under the artifacts folder: a rename
    except BaseException:
        lock.close()
        remove_tree(directory)
        raise

    def committed() -> None:
        with contextlib.suppress(FileNotFoundError):
            (directory / dataset_files.REGISTERING_LOCK).unlink()
        lock.close()

    def rolled_back() -> None:
        remove_tree(directory)
        lock.close()

    after_commit(session, committed)
    after_rollback(session, rolled_back)
