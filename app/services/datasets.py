"""Dataset registration: parse an uploaded (or server-side) file, validate every row, write a normalised artifact.

The artifact (under <artifacts>/datasets/<id>/, path relative to the artifacts dir in `Dataset.path`):
    rows.jsonl     one JSON object per row, in file order: {"text", "text_pair", "label", "noisy"}
                   (text_pair / noisy are null when the mapping has no such column)
    rows.offsets   little-endian int64 byte offset of every line (random access for paging)
    meta.json      what the row in the database says, for a reader without the database, and the sha256 of
                   rows.jsonl and rows.offsets: every process checks them before it first reads the rows (and
                   again whenever a file changes on disk), so a corrupted artifact is refused (409), never served

Labels. classification: a class index per row. A file may give integers (JSON numbers, or digits in CSV/TSV)
or label names (any other strings); names are numbered in sorted order (Python string order): label i is
`label_names[i]`. A file mixing the two is refused. causal-lm: the label column is optional and holds the
completion (strings; numbers are turned into their text); without one the row is plain language modelling.

Size. Every format is read as a stream and what it decodes to is counted against `max_dataset_bytes`: the
normalised rows.jsonl bytes as they are written (so a refused file never writes more than the limit), every line
of a text format (so no line is held whole beyond it), and for Parquet the decoded bytes of the mapped columns in
a first pass that keeps string columns dictionary-encoded (a few KB of zstd and dictionary pages can decode to
GBs: such a file is refused before a row is written), after a cheaper refusal from the row groups' declared
sizes. Rows reach Python in slices of a few MB, never a whole batch of decoded text.

Nothing half-made survives a failure: the artifact is written under <artifacts>/tmp/, renamed into place only
after every row validated, and deleted again if the transaction that records the row rolls back. The request
holds an fcntl lock on `.registering.lock` inside the folder until its transaction ends; if the process is
killed (kill -9) the kernel drops the lock, and the next API start removes the folder (app/services/artifacts.py)
unless a committed dataset row names it.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import uuid
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import after_commit, after_rollback
from app.errors import Conflict, Invalid, PayloadTooLarge
from app.models import Dataset, new_id
from app.services import isolation
from app.services.paths import resolve_allowed_path
from app.services.tenancy import owned
from influence.data import Example

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "tsv", "parquet")
TASKS = ("classification", "causal-lm")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
ROWS_FILE = "rows.jsonl"
OFFSETS_FILE = "rows.offsets"
META_FILE = "meta.json"
# An upload, copied into its staging folder for a request process to read; deleted once read.
UPLOAD_FILE = "upload"
REGISTERING_LOCK = ".registering.lock"
STAGING_PREFIX = "dataset-"
_READ_BLOCK = 1 << 20
_INTEGER = re.compile(r"^[+-]?\d+$")
# More digits than any class index has; int() of a longer string is refused by Python (4300 digits) anyway.
_MAX_LABEL_DIGITS = 18
# A lone surrogate is valid in JSON text ("\ud800") and in a Python str, but has no UTF-8 form.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Decoded Parquet bytes turned into Python objects at once, and the most rows Arrow decodes at once.
_PARQUET_SLICE_BYTES = 4 << 20
_PARQUET_MAX_BATCH_ROWS = 8192
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


@dataclass(frozen=True)
class ColumnSpec:
    """Source column (JSONL field) of each part of a row; label None: none (causal-lm only)."""

    text: str
    text_pair: str | None = None
    label: str | None = None
    noisy: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"text": self.text, "text_pair": self.text_pair, "label": self.label, "noisy": self.noisy}

    def mapped(self) -> list[tuple[str, str]]:
        """(role, column) of the mapped parts."""
        return [(role, column) for role, column in self.as_dict().items() if column is not None]


@dataclass(frozen=True)
class DatasetSpec:
    """What the caller asked for, besides the bytes."""

    columns: ColumnSpec
    task: str = "classification"
    name: str | None = None
    format: str | None = None


# --- queries ----------------------------------------------------------------------------------------------


def get_dataset(session: Session, dataset_id: str, tenant_id: str) -> Dataset:
    """A dataset of this tenant (NotFound for another tenant's, as for an unknown id)."""
    return owned(session, Dataset, dataset_id, tenant_id, "dataset")


def list_datasets(
    session: Session, *, tenant_id: str, offset: int = 0, limit: int = 50
) -> tuple[Sequence[Dataset], int]:
    mine = Dataset.tenant_id == tenant_id
    total = session.scalar(select(func.count()).select_from(Dataset).where(mine)) or 0
    rows = session.scalars(
        select(Dataset).where(mine).order_by(Dataset.created_at.desc(), Dataset.id).offset(offset).limit(limit)
    ).all()
    return rows, total


def delete_dataset(session: Session, settings: Settings, dataset_id: str, tenant_id: str) -> None:
    """Delete a dataset and, once that commits, its normalised artifact (never a server-side source file).
    Conflict (409) while an index uses it: delete those first."""
    from sqlalchemy.exc import IntegrityError

    from app.models import Index

    dataset = get_dataset(session, dataset_id, tenant_id)
    users = session.scalars(select(Index.id).where(Index.dataset_id == dataset.id).limit(6)).all()
    if users:
        raise Conflict(
            f"dataset {dataset.id!r} is used by index(es) {', '.join(users[:5])}; delete them first",
            indexes=list(users[:5]),
        )
    session.delete(dataset)
    try:
        session.flush()
    except IntegrityError:  # an index referencing it was committed meanwhile (the foreign key refuses)
        raise Conflict(f"dataset {dataset_id!r} is used by an index; delete it first") from None
    folder = dataset_dir(settings, dataset_id)
    after_commit(session, lambda: shutil.rmtree(folder, ignore_errors=True))


def dataset_dir(settings: Settings, dataset_id: str) -> Path:
    return settings.resolved_artifacts_dir / "datasets" / dataset_id


def rows_path(settings: Settings, dataset: Dataset) -> Path:
    """The normalised rows file (Dataset.path is relative to the artifacts dir; absolute paths are kept)."""
    return settings.resolved_artifacts_dir / dataset.path


# Artifacts this process has checked: rows path -> the (inode, mtime, size) of its files when they passed.
_VERIFIED: dict[str, tuple] = {}
_VERIFIED_LOCK = threading.Lock()


def _signature(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _open_rows(settings: Settings, dataset: Dataset) -> tuple[Path, Path]:
    path = rows_path(settings, dataset)
    offsets = path.with_name(OFFSETS_FILE)
    meta = path.with_name(META_FILE)
    try:
        signature = (_signature(path), _signature(offsets), _signature(meta))
    except FileNotFoundError:
        raise Conflict(
            f"the rows of dataset {dataset.id!r} are missing from the artifact store; register it again"
        ) from None
    with _VERIFIED_LOCK:
        if _VERIFIED.get(str(path)) == signature:
            return path, offsets
    try:
        checksums = json.loads(meta.read_text(encoding="utf-8")).get("files") or {}
    except (OSError, ValueError, AttributeError):
        raise Conflict(f"the artifact of dataset {dataset.id!r} is corrupted (meta.json); register it again") from None
    for name, expected in checksums.items():  # datasets registered before checksums existed have none
        if sha256_file(path.with_name(name)) != expected:
            raise Conflict(
                f"the artifact of dataset {dataset.id!r} is corrupted ({name} failed its sha256 check); "
                "register it again"
            )
    with _VERIFIED_LOCK:
        _VERIFIED[str(path)] = signature
    return path, offsets


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(settings: Settings, dataset: Dataset, offset: int, limit: int) -> list[dict[str, Any]]:
    """Rows [offset, offset + limit) as stored, each with its position `row`; seeks, never scans."""
    import numpy as np

    if offset >= dataset.row_count or limit <= 0:
        return []
    path, offsets_path = _open_rows(settings, dataset)
    stop = min(dataset.row_count, offset + limit)
    starts = np.fromfile(offsets_path, dtype="<i8", count=1, offset=offset * 8)
    out = []
    with open(path, "rb") as handle:
        handle.seek(int(starts[0]))
        for position in range(offset, stop):
            row = json.loads(handle.readline())
            row["row"] = position
            out.append(row)
    return out


def iter_rows(settings: Settings, dataset: Dataset) -> Iterator[dict[str, Any]]:
    """Every stored row in order: {"text", "text_pair", "label", "noisy"} (label: class index or completion)."""
    path, _ = _open_rows(settings, dataset)
    with open(path, "rb") as handle:
        for line in handle:
            yield json.loads(line)


def load_examples(settings: Settings, dataset: Dataset) -> list[Example]:
    """The dataset as influence.Example objects, row i at index i (what featurisation consumes)."""
    return [
        Example(text=r["text"], label=r["label"], text_pair=r["text_pair"])
        for r in iter_rows(settings, dataset)
    ]


# --- registration -----------------------------------------------------------------------------------------


def register_upload(
    session: Session,
    settings: Settings,
    spec: DatasetSpec,
    upload: IO[bytes],
    filename: str | None,
    tenant_id: str,
) -> Dataset:
    """Register an uploaded file (any binary file object): copied into the staging folder, read from there."""
    fmt = _pick_format(spec.format, filename, "the uploaded file")
    name = spec.name or (Path(filename).stem if filename else "") or "dataset"

    def source(staging: Path) -> Path:
        return copy_upload(upload, staging / UPLOAD_FILE, settings.max_upload_bytes)

    return _register(session, settings, spec, source, "the uploaded file", fmt, name, filename or None, tenant_id)


def register_path(
    session: Session, settings: Settings, spec: DatasetSpec, raw_path: str, tenant_id: str
) -> Dataset:
    """Register a server-side file under an allowed root (read in place; the upload limit does not apply)."""
    path = resolve_allowed_path(settings, raw_path, "path")
    if not path.is_file():
        raise Invalid(f"path {raw_path!r} is not an existing file")
    fmt = _pick_format(spec.format, path.name, f"path {raw_path!r}")
    name = spec.name or path.stem
    return _register(session, settings, spec, lambda _: path, f"path {raw_path!r}", fmt, name, str(path), tenant_id)


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


def _pick_format(given: str | None, filename: str | None, what: str) -> str:
    if given is not None:
        if given not in FORMATS:
            raise Invalid(f"unknown format {given!r}; expected one of {', '.join(FORMATS)}")
        return given
    suffix = Path(filename or "").suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[suffix]
    raise Invalid(f"cannot tell the format of {what} from its name; pass format = {' | '.join(FORMATS)}")


def _size_and_hash(handle: IO[bytes], limit: int | None) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    for block in iter(lambda: handle.read(_READ_BLOCK), b""):
        size += len(block)
        if limit is not None and size > limit:
            raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes")
        digest.update(block)
    return size, digest.hexdigest()


def _check_spec(spec: DatasetSpec) -> None:
    if spec.task not in TASKS:
        raise Invalid(f"unknown task {spec.task!r}; expected one of {', '.join(TASKS)}")
    if spec.task == "classification" and spec.columns.label is None:
        raise Invalid("classification data needs a label column (label_column)")
    used = [column for _, column in spec.columns.mapped()]
    duplicates = sorted({c for c in used if used.count(c) > 1})
    if duplicates:
        raise Invalid(f"column {duplicates[0]!r} is mapped to more than one role")


@dataclass(frozen=True)
class _Normalised:
    """What reading a file gave: its size and sha256, the rows' summary, and the sha256 of the files written."""

    size: int
    digest: str
    summary: _Summary
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
        size, digest = _size_and_hash(handle, limit=None)
        if size == 0:
            raise Invalid("the file is empty")
        handle.seek(0)
        summary = _write_rows(folder, read_records(handle, fmt, spec.columns, settings), spec, settings)
    files = {}
    for file_name in (ROWS_FILE, OFFSETS_FILE):
        _fsync(folder / file_name)
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
    _check_spec(spec)
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
        _fsync(staging / META_FILE)
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


# --- reading the formats: (where, record) pairs; `where` names the line (text formats) or row (Parquet) ---


class _ManyDigits:
    """A JSON integer with more digits than Python turns into an int: kept as its digits, so the row's
    validation can name the column that holds it (and an unmapped field with one stays harmless)."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"an integer of {len(self.digits.lstrip('-'))} digits"


def _json_int(digits: str) -> int | _ManyDigits:
    return int(digits) if len(digits) <= _MAX_LABEL_DIGITS else _ManyDigits(digits)


class _Budget:
    """Bytes counted against max_dataset_bytes; over it, 413 naming the limit and its setting."""

    def __init__(self, limit: int, what: str = "the dataset's rows"):
        self.limit = limit
        self.what = what
        self.used = 0

    def charge(self, size: int, where: str) -> None:
        self.used += size
        if self.used > self.limit:
            raise PayloadTooLarge(_too_large(self.what, self.limit, where))


def _too_large(what: str, limit: int, where: str) -> str:
    return (
        f"{what} take more than max_dataset_bytes = {limit} bytes once decoded (at {where}); the limit is the "
        "setting INFLUENCE_MAX_DATASET_BYTES"
    )


def read_records(
    handle: IO[bytes], fmt: str, columns: ColumnSpec, settings: Settings
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The file's records as a stream of (where, {column: value}), each line or batch bounded in size."""
    if fmt == "jsonl":
        return _jsonl_records(handle, settings.max_dataset_bytes)
    if fmt in ("csv", "tsv"):
        return _delimited_records(handle, fmt, columns, settings.max_dataset_bytes)
    return _parquet_records(handle, columns, settings)


def _text_lines(handle: IO[bytes], max_line: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its ending), refusing what is not UTF-8 with the line's number. A line is
    read with a bound, so a file without line ends is never held whole."""
    number = 0
    while True:
        raw = handle.readline(max_line + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_line:
            raise PayloadTooLarge(
                f"line {number} is longer than max_dataset_bytes = {max_line} bytes; the limit is the setting "
                "INFLUENCE_MAX_DATASET_BYTES"
            )
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid(f"line {number}: not UTF-8 text (byte {exc.start} of the line)") from None
        if number == 1 and line.startswith("\ufeff"):
            line = line[1:]
        yield number, line


def _jsonl_records(handle: IO[bytes], max_line: int) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for number, line in _text_lines(handle, max_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as exc:
            raise Invalid(f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise Invalid(f"line {number}: invalid JSON: nested too deeply") from None
        except ValueError as exc:
            raise Invalid(f"line {number}: invalid JSON: {str(exc)[:200]}") from None
        if not isinstance(record, dict):
            raise Invalid(f"line {number}: expected a JSON object, got {_json_type(record)}")
        yield f"line {number}", record


def _delimited_records(
    handle: IO[bytes], fmt: str, columns: ColumnSpec, max_line: int
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    # CSV: RFC 4180 quoting. TSV: no quoting at all (fields hold no tabs or newlines), as GLUE writes it.
    lines = (line for _, line in _text_lines(handle, max_line))
    if fmt == "csv":
        reader = csv.reader(lines, delimiter=",", strict=True)
    else:
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
    try:
        header = next(reader, None)
        while header is not None and not header:
            header = next(reader, None)
        if header is None:
            raise Invalid("the file has no header line")
        header = [name.strip() for name in header]
        missing = [(role, column) for role, column in columns.mapped() if column not in header]
        if missing:
            role, column = missing[0]
            raise Invalid(
                f"column {column!r} (the {role} column) is not in the header; columns: {', '.join(header)}"
            )
        for _, column in columns.mapped():
            if header.count(column) > 1:
                raise Invalid(f"column {column!r} appears {header.count(column)} times in the header")
        positions = {column: header.index(column) for _, column in columns.mapped()}
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue
            if len(fields) != len(header):
                raise Invalid(
                    f"line {reader.line_num}: {len(fields)} fields, but the header has {len(header)}"
                )
            yield f"line {reader.line_num}", {column: fields[i] for column, i in positions.items()}
    except csv.Error as exc:
        raise Invalid(f"line {reader.line_num}: unreadable {fmt.upper()}: {exc}") from None


def _is_text_type(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _parquet_records(
    handle: IO[bytes], columns: ColumnSpec, settings: Settings
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        metadata = parquet.metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise Invalid(f"not a readable Parquet file: {str(exc)[:300]}") from None
    names = schema.names
    if metadata.num_rows > settings.max_rows:
        raise PayloadTooLarge(f"the file has {metadata.num_rows} rows; the limit is {settings.max_rows}")
    for role, column in columns.mapped():
        if column not in names:
            raise Invalid(
                f"column {column!r} (the {role} column) is not in the file; columns: {', '.join(names)}"
            )
        if names.count(column) > 1:
            raise Invalid(f"column {column!r} appears {names.count(column)} times in the file")
        kind = schema.field(column).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if role in ("text", "text_pair") and not _is_text_type(kind):
            raise Invalid(f"column {column!r} (the {role} column) has type {kind}; expected strings")
        if role == "label" and not (
            pa.types.is_integer(kind) or _is_text_type(kind) or pa.types.is_floating(kind)
        ):
            raise Invalid(
                f"column {column!r} (the label column) has type {kind}; expected integers or strings"
            )
        if role == "noisy" and not (pa.types.is_boolean(kind) or pa.types.is_integer(kind)):
            raise Invalid(f"column {column!r} (the noisy column) has type {kind}; expected booleans or 0/1")
    roles = {column: role for role, column in columns.mapped()}
    wanted = sorted(roles)
    texts = [c for c in wanted if _is_text_type(_value_type(schema.field(c).type))]
    declared, batch_rows = _declared_sizes(metadata, wanted)
    if declared > settings.max_dataset_bytes:
        limit = settings.max_dataset_bytes
        raise PayloadTooLarge(_too_large("the file's mapped columns", limit, "the sizes its row groups declare"))
    try:
        # Text columns stay dictionary-encoded in Arrow: repeated values are decoded once, not once per row.
        parquet = pq.ParquetFile(handle, read_dictionary=texts, metadata=metadata)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise Invalid(f"not a readable Parquet file: {str(exc)[:300]}") from None
    return _parquet_rows(parquet, wanted, texts, roles, batch_rows, settings)


def _value_type(kind: Any) -> Any:
    import pyarrow as pa

    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _declared_sizes(metadata: Any, wanted: list[str]) -> tuple[int, int]:
    """The uncompressed bytes the row groups declare for the wanted columns, and Arrow batch rows that keep a
    batch of plain-encoded values near _PARQUET_SLICE_BYTES by that declaration (a hint only: metadata can lie,
    the decoded bytes are counted as they are read)."""
    leaves = [j for j in range(metadata.num_columns) if metadata.schema.column(j).path in wanted]
    total, widest = 0, 1.0
    for r in range(metadata.num_row_groups):
        group = metadata.row_group(r)
        size = sum(max(0, group.column(j).total_uncompressed_size) for j in leaves)
        total += size
        if group.num_rows > 0:
            widest = max(widest, size / group.num_rows)
    return total, int(min(_PARQUET_MAX_BATCH_ROWS, max(16, _PARQUET_SLICE_BYTES // widest)))


def _byte_lengths(array: Any) -> Any:
    """UTF-8 bytes of every value of a string column (0 for null), without decoding a dictionary's values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(array.type):
        lengths = pc.take(pc.binary_length(array.dictionary), array.indices)
    else:
        if pa.types.is_string_view(array.type):
            array = array.cast(pa.large_string())
        lengths = pc.binary_length(array)
    return lengths.fill_null(0).to_numpy(zero_copy_only=False).astype("int64")


def _parquet_rows(
    parquet: Any,
    wanted: list[str],
    texts: list[str],
    roles: dict[str, str],
    batch_rows: int,
    settings: Settings,
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import numpy as np
    import pyarrow as pa

    # A first pass counts the decoded bytes of the text columns from their lengths alone (cheap: dictionaries
    # are never expanded), so a file that decodes past the limit is refused before any row is written.
    budget = _Budget(settings.max_dataset_bytes, "the file's mapped columns")
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
            sizes = sum((_byte_lengths(batch.column(c)) for c in texts), np.zeros(batch.num_rows, "int64"))
            budget.charge(int(sizes.sum()), f"row {number + batch.num_rows}")
            number += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise Invalid(f"row {number + 1}: unreadable Parquet data: {str(exc)[:300]}") from None

    # Every mapped string is at most max_text_chars characters, so at most 4 bytes each: a longer value is
    # refused before it is turned into a Python object.
    longest = 4 * settings.max_text_chars
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
            lengths = {c: _byte_lengths(batch.column(c)) for c in texts}
            stop, too_long = batch.num_rows, None
            for column, sizes in lengths.items():
                over = np.flatnonzero(sizes > longest)
                if over.size and over[0] < stop:
                    stop, too_long = int(over[0]), column
            row_bytes = sum(lengths.values(), np.zeros(batch.num_rows, "int64"))
            start = 0
            while start < stop:
                cumulative = np.cumsum(row_bytes[start:stop])
                fit = int(np.searchsorted(cumulative, _PARQUET_SLICE_BYTES, side="right"))
                end = start + max(1, fit)
                piece = batch.slice(start, end - start)
                values = {c: _python_values(piece.column(c), c, number) for c in wanted}
                for i in range(end - start):
                    number += 1
                    yield f"row {number}", {c: values[c][i] for c in wanted}
                start = end
            if too_long is not None:
                limit = settings.max_text_chars
                raise Invalid(
                    f"row {number + 1}: column {too_long!r} (the {roles[too_long]}) has more than "
                    f"{limit} characters; the limit is {limit}"
                )
    except (pa.ArrowException, OSError) as exc:
        raise Invalid(f"row {number + 1}: unreadable Parquet data: {str(exc)[:300]}") from None


def _python_values(array: Any, column: str, before: int) -> list[Any]:
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        for i in range(len(array)):
            try:
                array[i].as_py()
            except UnicodeDecodeError:
                raise Invalid(f"row {before + i + 1}: column {column!r} is not UTF-8 text") from None
        raise Invalid(f"rows {before + 1} to {before + len(array)}: column {column!r} is not UTF-8 text") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float, _ManyDigits)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --- validating and writing rows --------------------------------------------------------------------------


@dataclass
class _Summary:
    row_count: int
    labels: list[int]
    label_names: list[str] | None


class _Rows:
    """Validates raw records into normalised rows; remembers what it needs to describe the dataset."""

    def __init__(self, spec: DatasetSpec, settings: Settings):
        self.columns = spec.columns
        self.task = spec.task
        self.max_chars = settings.max_text_chars
        self.max_rows = settings.max_rows
        self.max_classes = settings.max_num_labels
        self.count = 0
        self.label_kind: tuple[str, str] | None = None  # ("integer" | "name", where first seen)
        self.integers: set[int] = set()
        self.names: set[str] = set()

    def normalise(self, where: str, record: Mapping[str, Any]) -> dict[str, Any]:
        self.count += 1
        if self.count > self.max_rows:
            raise PayloadTooLarge(f"the file has more than {self.max_rows} rows (the limit)")
        cols = self.columns
        row: dict[str, Any] = {
            "text": self._text(where, record, cols.text, "text"),
            "text_pair": self._text(where, record, cols.text_pair, "text_pair") if cols.text_pair else None,
            "label": None,
            "noisy": self._noisy(where, record, cols.noisy) if cols.noisy else None,
        }
        if cols.label is not None:
            row["label"] = (
                self._class_label(where, record, cols.label)
                if self.task == "classification"
                else self._completion(where, record, cols.label)
            )
        return row

    def _value(self, where: str, record: Mapping[str, Any], column: str) -> Any:
        if column not in record:
            fields = ", ".join(map(str, list(record)[:20]))
            raise Invalid(f"{where}: no {column!r} field (fields: {fields})")
        return record[column]

    def _text(self, where: str, record: Mapping[str, Any], column: str, role: str) -> str:
        value = self._value(where, record, column)
        if not isinstance(value, str):
            raise Invalid(
                f"{where}: column {column!r} (the {role}) must be a string, got {_json_type(value)}"
            )
        if not value.strip():
            raise Invalid(f"{where}: column {column!r} (the {role}) is empty")
        return self._checked_text(where, column, role, value)

    def _checked_text(self, where: str, column: str, role: str, value: str) -> str:
        if len(value) > self.max_chars:
            raise Invalid(
                f"{where}: column {column!r} (the {role}) has {len(value)} characters; "
                f"the limit is {self.max_chars}"
            )
        surrogate = _SURROGATE.search(value)
        if surrogate is not None:
            raise Invalid(
                f"{where}: column {column!r} (the {role}) holds a lone surrogate (U+{ord(surrogate.group()):04X} "
                f"at character {surrogate.start() + 1}), which is not text"
            )
        return value

    def _class_label(self, where: str, record: Mapping[str, Any], column: str) -> int | str:
        value = self._value(where, record, column)
        if isinstance(value, _ManyDigits):
            value = value.digits
        if isinstance(value, str):
            value = value.strip()
        kind: str
        if isinstance(value, bool) or value is None or value == "":
            raise Invalid(
                f"{where}: column {column!r} (the label) must be a class index or a label name, "
                f"got {_json_type(value) if value != '' else 'an empty value'}"
            )
        if isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise Invalid(f"{where}: column {column!r} (the label) {value!r} is not a whole number")
            value = int(value)
        if isinstance(value, int) or (isinstance(value, str) and _INTEGER.match(value)):
            digits = str(value).lstrip("+-").lstrip("0")
            if len(digits) > _MAX_LABEL_DIGITS and not str(value).startswith("-"):
                raise Invalid(
                    f"{where}: column {column!r} (the label) is an integer of {len(digits)} digits, not a class "
                    f"index below {self.max_classes} (max_num_labels)"
                )
            kind, label = "integer", int(value) if len(digits) <= _MAX_LABEL_DIGITS else -1
            if label < 0:
                raise Invalid(
                    f"{where}: column {column!r} (the label) {str(value)[:40]} is negative; classes count from 0"
                )
        elif isinstance(value, str):
            kind, label = "name", self._checked_text(where, column, "label", value)
        else:
            raise Invalid(
                f"{where}: column {column!r} (the label) must be a class index or a label name, "
                f"got {_json_type(value)}"
            )
        if self.label_kind is None:
            self.label_kind = (kind, where)
        elif self.label_kind[0] != kind:
            first_kind, first_where = self.label_kind
            raise Invalid(
                f"{where}: label {value!r} is {'an integer' if kind == 'integer' else 'a name'}, but the label "
                f"at {first_where} was {'an integer' if first_kind == 'integer' else 'a name'}; labels must be "
                "all class indices or all names"
            )
        if kind == "integer":
            if int(label) >= self.max_classes:
                raise Invalid(
                    f"{where}: column {column!r} (the label) {label} is not a class index below "
                    f"{self.max_classes} (max_num_labels)"
                )
            self.integers.add(int(label))
        else:
            self.names.add(str(label))
            if len(self.names) > self.max_classes:
                raise Invalid(
                    f"{where}: column {column!r} has more than {self.max_classes} distinct label names "
                    "(max_num_labels); is it the label column?"
                )
        return label

    def _completion(self, where: str, record: Mapping[str, Any], column: str) -> str | None:
        value = self._value(where, record, column)
        if value is None:
            return None
        if isinstance(value, _ManyDigits):
            value = value.digits
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise Invalid(
                f"{where}: column {column!r} (the completion) must be text, got {_json_type(value)}"
            )
        text = value if isinstance(value, str) else json.dumps(value)
        return self._checked_text(where, column, "completion", text)

    def _noisy(self, where: str, record: Mapping[str, Any], column: str) -> bool:
        value = self._value(where, record, column)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise Invalid(f"{where}: column {column!r} (the noisy flag) must be true/false or 1/0, got {value!r}")

    def summary(self) -> _Summary:
        if self.task != "classification":
            return _Summary(self.count, [], None)
        if self.names:
            names = sorted(self.names)
            return _Summary(self.count, list(range(len(names))), names)
        return _Summary(self.count, sorted(self.integers), None)


def _write_rows(
    folder: Path, records: Iterator[tuple[str, Mapping[str, Any]]], spec: DatasetSpec, settings: Settings
) -> _Summary:
    rows = _Rows(spec, settings)
    budget = _Budget(settings.max_dataset_bytes)
    offsets = array("q")
    path = folder / ROWS_FILE
    with open(path, "wb") as out:
        position = 0
        for where, record in records:
            line = encode_row(rows.normalise(where, record))
            budget.charge(len(line), where)
            offsets.append(position)
            out.write(line)
            position += len(line)
    if rows.count == 0:
        raise Invalid("the file has no data rows")
    summary = rows.summary()
    if summary.label_names is not None:
        offsets = _number_label_names(path, summary.label_names, _Budget(settings.max_dataset_bytes))
    _write_offsets(folder / OFFSETS_FILE, offsets)
    return summary


def encode_row(row: Mapping[str, Any]) -> bytes:
    """A normalised row as its line of rows.jsonl (what a dataset stores and a batch check holds)."""
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def _number_label_names(path: Path, names: list[str], budget: _Budget) -> array:
    """Rewrite the rows with class indices in place of label names (names sorted); the new offsets."""
    index = {name: i for i, name in enumerate(names)}
    offsets = array("q")
    numbered = path.with_suffix(".numbered")
    with open(path, "rb") as source, open(numbered, "wb") as out:
        position = 0
        for number, raw in enumerate(source, start=1):
            row = json.loads(raw)
            row["label"] = index[row["label"]]
            line = encode_row(row)
            budget.charge(len(line), f"row {number}")
            offsets.append(position)
            out.write(line)
            position += len(line)
    os.replace(numbered, path)
    return offsets


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        _fsync_handle(handle)


def _fsync_handle(handle: IO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _write_offsets(path: Path, offsets: array) -> None:
    if sys.byteorder != "little":  # pragma: no cover - the file format is little-endian everywhere
        offsets.byteswap()
    with open(path, "wb") as out:
        offsets.tofile(out)
