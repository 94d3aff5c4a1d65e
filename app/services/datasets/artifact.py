"""A registered dataset's artifact: where its files are, the format of its rows, and reading them.

Under <artifacts>/datasets/<id>/ (the rows file's path, relative to the artifacts dir, in `Dataset.path`):
    rows.jsonl     one JSON object per row, in file order: {"text", "text_pair", "label", "noisy"}
                   (text_pair / noisy are null when the mapping has no such column)
    rows.offsets   little-endian int64 byte offset of every line (random access for paging)
    meta.json      what the row in the database says, for a reader without the database, and the sha256 of
                   rows.jsonl and rows.offsets: every process checks them before it first reads the rows (and
                   again whenever a file changes on disk), so a corrupted artifact is refused (409), never served
An append writes a new version of the files under appends/<job id>/ (app/services/appends.py).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from app.config import Settings
from app.errors import Conflict
from app.models import Dataset
from influence.files import sha256_file

if TYPE_CHECKING:
    from influence.data import Example

ROWS_FILE = "rows.jsonl"
OFFSETS_FILE = "rows.offsets"
META_FILE = "meta.json"


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


def open_rows(settings: Settings, dataset: Dataset) -> tuple[Path, Path]:
    """The dataset's rows and offsets files, their checksums verified unless this process verified these very
    files before (409 when they are missing or corrupted)."""
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
        raise Conflict(
            f"the artifact of dataset {dataset.id!r} is corrupted (meta.json); register it again"
        ) from None
    for name, expected in checksums.items():  # datasets registered before checksums existed have none
        if sha256_file(path.with_name(name)) != expected:
            raise Conflict(
                f"the artifact of dataset {dataset.id!r} is corrupted ({name} failed its sha256 check); "
                "register it again"
            )
    with _VERIFIED_LOCK:
        _VERIFIED[str(path)] = signature
    return path, offsets


def read_rows(settings: Settings, dataset: Dataset, offset: int, limit: int) -> list[dict[str, Any]]:
    """Rows [offset, offset + limit) as stored, each with its position `row`; seeks, never scans."""
    if offset >= dataset.row_count or limit <= 0:
        return []
    path, offsets_path = open_rows(settings, dataset)
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
    path, _ = open_rows(settings, dataset)
    with open(path, "rb") as handle:
        for line in handle:
            yield json.loads(line)


def load_examples(settings: Settings, dataset: Dataset) -> list[Example]:
    """The dataset as influence.Example objects, row i at index i (what featurisation consumes)."""
    # Here, not at the top: influence.data imports torch, which only the featurising (worker) side loads.
    from influence.data import Example

    return [
        Example(text=r["text"], label=r["label"], text_pair=r["text_pair"])
        for r in iter_rows(settings, dataset)
    ]


def encode_row(row: Mapping[str, Any]) -> bytes:
    """A normalised row as its line of rows.jsonl (what a dataset stores and a batch check holds)."""
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def fsync_handle(handle: IO) -> None:
    """Flush an open file's buffer and its bytes to disk (before the file is renamed into place)."""
    handle.flush()
    os.fsync(handle.fileno())
