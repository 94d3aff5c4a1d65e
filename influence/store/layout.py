"""The names of a store directory's files and folders (the layout is described in influence.store), and how
its JSON documents and checksummed files are read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from influence.errors import StoreCorruptedError

MANIFEST_FILE = "manifest.json"
SEGMENTS_FILE = "segments.json"
STATISTICS_FILE = "statistics.json"
LOCK_FILE = "store.lock"
COMPACT_LOCK_FILE = "compact.lock"
TMP_DIR = "tmp"
CHUNKS_DIR = "chunks"
SEGMENTS_DIR = "segments"
STATISTICS_DIR = "statistics"
TOMBSTONES_DIR = "tombstones"
ROW_IDS_FILE = "row_ids.npy"
# Entries a crashed create() may leave before manifest.json exists; such a directory counts as empty.
STORE_ENTRIES = {TMP_DIR, CHUNKS_DIR, SEGMENTS_DIR, STATISTICS_DIR, LOCK_FILE}


def read_json(path: Path) -> Any:
    """A store JSON document; StoreCorruptedError when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreCorruptedError(f"{path} is unreadable: {exc}") from None


def read_verified(path: Path, sha256: str, label: str, advice: str = "") -> bytes:
    """The bytes of a file listed with its sha256; StoreCorruptedError naming `label` (then `advice` after a
    failed check) when it cannot be read or a byte changed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreCorruptedError(f"{label} are unreadable: {exc}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StoreCorruptedError(f"{label} failed their sha256 check{advice}")
    return data
