"""A feature store's FAISS indexes (their layout: influence.index): built, loaded, brought up to date after
appends and found stale; built indexes are committed beside the store with one switch of indexes.json.

Each function takes the process' `device`: with a usable GPU (influence.index.devices) indexes are built and
searched there; the files are CPU indexes either way."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from influence.errors import (
    InvalidInputError,
    ManifestMismatchError,
    StoreCorruptedError,
    StoreIncompleteError,
)
from influence.files import locked, remove_tree, sha256_file, write_json_atomic
from influence.index.kinds import ADD_BLOCK_ROWS, LayerIndex, faiss_threads
from influence.store import StoreReader, layer_file_stem

_INDEX_DIR = "faiss"
_INDEX_FILE = "indexes.json"
_LOCK_FILE = "indexes.lock"
_TMP_DIR = "tmp"
# A build's temporary folder left this long ago belongs to a build that crashed.
_STALE_PENDING_S = 24 * 3600


def _read_records(store: StoreReader) -> dict[str, dict[str, Any]]:
    """Index records of `store` (empty when none were built); ManifestMismatchError if built for another."""
    path = store.path / _INDEX_DIR / _INDEX_FILE
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        fingerprint, records = document["fingerprint"], document["layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreCorruptedError(f"{path} is unreadable: {exc}") from None
    if fingerprint != store.manifest.fingerprint():
        raise ManifestMismatchError(
            f"the FAISS indexes in {path.parent} were built for another manifest than the store's: rebuild"
        )
    return dict(records)


@dataclass(frozen=True)
class _SavedIndex:
    """A layer's index written to the temporary folder, not yet in place: what its record will say."""

    tmp: Path
    sha256: str
    kind: str
    ntotal: int
    params: dict[str, Any]
    segments: list[str]


def _save_pending(
    store: StoreReader, layer_index: LayerIndex, segments: list[str], folder: Path
) -> _SavedIndex:
    """Write a built index into this build's own temporary folder (a concurrent commit never touches it)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{uuid.uuid4().hex}.faiss"
    layer_index.save(tmp)
    return _SavedIndex(
        tmp, sha256_file(tmp), layer_index.kind, layer_index.ntotal, layer_index.params, segments
    )


def _commit(store: StoreReader, built: dict[str, _SavedIndex]) -> None:
    """Move saved indexes into place and switch indexes.json to them (one os.replace)."""
    directory = store.path / _INDEX_DIR
    with locked(directory / _LOCK_FILE):
        records = _read_records(store)
        for name, saved in built.items():
            file_name = f"{layer_file_stem(name)}.{saved.kind}.{saved.sha256[:16]}.faiss"
            os.replace(saved.tmp, directory / file_name)
            records[name] = {
                "file": file_name,
                "sha256": saved.sha256,
                "kind": saved.kind,
                "ntotal": saved.ntotal,
                "params": saved.params,
                "segments": saved.segments,
            }
        document = {"fingerprint": store.manifest.fingerprint(), "layers": records}
        write_json_atomic(directory / _INDEX_FILE, document, directory / _TMP_DIR)
        # Files no record names any more (replaced indexes, crashed builds) go only after the switch.
        referenced = {record["file"] for record in records.values()}
        for entry in directory.iterdir():
            if entry.suffix == ".faiss" and entry.name not in referenced:
                entry.unlink()
        for entry in (directory / _TMP_DIR).iterdir():
            if entry.is_file():
                entry.unlink()


def _pending_folder(store: StoreReader) -> Path:
    return store.path / _INDEX_DIR / _TMP_DIR / f"build-{uuid.uuid4().hex}"


def _remove_stale_pending(store: StoreReader) -> None:
    """Temporary folders of builds that crashed (older than a day: no build runs that long per layer)."""
    cutoff = time.time() - _STALE_PENDING_S
    for entry in (store.path / _INDEX_DIR / _TMP_DIR).glob("build-*"):
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime < cutoff:
                remove_tree(entry)


def _prepare_directory(store: StoreReader) -> None:
    (store.path / _INDEX_DIR / _TMP_DIR).mkdir(parents=True, exist_ok=True)
    _remove_stale_pending(store)


def indexable_layers(store: StoreReader) -> list[str]:
    """The store's layers that have FAISS indexes: all but token-row layers (the exact embedding), which
    are scored exactly by a join on token id (influence.tokens) and need no candidate search."""
    return [name for name in store.layers if store.layer_spec(name).layout == "dense"]


def _select_layers(store: StoreReader, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return indexable_layers(store)
    if isinstance(layers, str):
        raise InvalidInputError("layers must be a sequence of layer names, not one string")
    for name in layers:
        if store.layer_spec(name).layout != "dense":  # UnknownLayerError for names the store lacks
            raise InvalidInputError(
                f"layer {name!r} holds token rows (exact, joined on token id): it has no FAISS index"
            )
    return list(layers)


def build_store_indexes(
    store: StoreReader,
    kind: str = "flat",
    layers: Sequence[str] | None = None,
    num_threads: int | None = None,
    keep: bool = True,
    device: Any = None,
    **params: Any,
) -> dict[str, LayerIndex]:
    """Build and save one index of `kind` per layer (default: all) over a complete store.

    Indexes of layers not named are kept. num_threads sets faiss' OpenMP threads for the build only. device:
    the process' device (None: the CPU); the returned indexes lie where it searches them.
    Returns layer name -> LayerIndex over store positions 0 .. num_rows - 1; with keep=False it returns {}
    and holds one layer's index in memory at a time (each is written out as soon as it is built: a flat index
    of 1M x 12 x 256 would otherwise hold 12 GB until the end).
    """
    selected = _select_layers(store, layers)
    store.refresh()
    _prepare_directory(store)
    saved: dict[str, _SavedIndex] = {}
    kept: dict[str, LayerIndex] = {}
    folder = _pending_folder(store)
    try:
        with faiss_threads(num_threads):
            for name in selected:
                segments = store.layer_checksums(name)
                layer_index = LayerIndex.build(store.layer(name), kind=kind, device=device, **params)
                saved[name] = _save_pending(store, layer_index, segments, folder)
                if keep:
                    kept[name] = layer_index
                del layer_index
        _commit(store, saved)
    finally:
        remove_tree(folder)
    return kept


def load_store_indexes(
    store: StoreReader, layers: Sequence[str] | None = None, verify: bool = True, device: Any = None
) -> dict[str, LayerIndex]:
    """Load the saved index of each layer (default: every indexed layer), checking it still fits the store,
    placed where a process with `device` searches it (None: the CPU).

    StoreIncompleteError when a layer has no index or its index misses appended rows (see
    sync_store_indexes); ManifestMismatchError when it was built over other data; StoreCorruptedError on a
    checksum failure (verify) or an unreadable file.
    """
    records = _read_records(store)
    if layers is None:
        selected = [name for name in store.layers if name in records]
        if not selected:
            raise StoreIncompleteError(f"no FAISS indexes were built for the store at {store.path}")
    else:
        selected = _select_layers(store, layers)
    loaded = {}
    for name in selected:
        record = records.get(name)
        if record is None:
            raise StoreIncompleteError(f"no FAISS index was built for layer {name!r}")
        if not _covers_all(store, name, record):
            raise StoreIncompleteError(
                f"the FAISS index of layer {name!r} covers {record['ntotal']} of {store.num_rows} rows; "
                "run sync_store_indexes after an append"
            )
        loaded[name] = _load_record(store, name, record, verify).to_device(device)
    return loaded


def _load_record(store: StoreReader, name: str, record: dict[str, Any], verify: bool) -> LayerIndex:
    path = store.path / _INDEX_DIR / record["file"]
    if verify and (not path.is_file() or sha256_file(path) != record["sha256"]):
        raise StoreCorruptedError(f"FAISS index of layer {name!r} ({path}) failed its sha256 check")
    layer_index = LayerIndex.load(path)
    if layer_index.ntotal != record["ntotal"] or layer_index.dim != store.layer_spec(name).dim:
        raise StoreCorruptedError(f"FAISS index of layer {name!r} ({path}) does not match its record")
    return layer_index


def _covers_all(store: StoreReader, name: str, record: dict[str, Any]) -> bool:
    """Whether an index covers every store row; ManifestMismatchError if its rows are not a store prefix."""
    current = store.layer_checksums(name)
    covered = list(record["segments"])
    if current[: len(covered)] != covered:
        raise ManifestMismatchError(
            f"the FAISS index of layer {name!r} was built over other data than the store holds; rebuild it"
        )
    if len(covered) == len(current) and record["ntotal"] != store.num_rows:
        raise StoreCorruptedError(
            f"the FAISS index of layer {name!r} holds {record['ntotal']} rows, the store {store.num_rows}"
        )
    return len(covered) == len(current)


def stale_store_indexes(store: StoreReader) -> list[str]:
    """Layers of the store whose FAISS index is missing or does not cover exactly its current segments (after a
    compaction, or appends not yet synced): the ones build_store_indexes must (re)build."""
    store.refresh()
    records = _read_records(store)
    return [
        name
        for name in indexable_layers(store)
        if name not in records or list(records[name]["segments"]) != store.layer_checksums(name)
    ]


def sync_store_indexes(
    store: StoreReader, layers: Sequence[str] | None = None, device: Any = None
) -> dict[str, LayerIndex]:
    """Add rows appended to the store since each index was built, then save; returns the updated indexes
    (added to where a process with `device` searches them; None: the CPU).

    IVF lists keep their trained centroids: after large appends of shifted data, rebuilding gives better
    recall.
    """
    store.refresh()
    records = _read_records(store)
    selected = [n for n in store.layers if n in records] if layers is None else _select_layers(store, layers)
    _prepare_directory(store)
    updated: dict[str, LayerIndex] = {}
    saved: dict[str, _SavedIndex] = {}
    folder = _pending_folder(store)
    for name in selected:
        record = records.get(name)
        if record is None:
            raise StoreIncompleteError(f"no FAISS index was built for layer {name!r}")
        if _covers_all(store, name, record):
            continue
        layer_index = _load_record(store, name, record, verify=True).to_device(device)
        start = layer_index.ntotal
        for offset, block in store.iter_layer_chunks(name, ADD_BLOCK_ROWS):
            if offset + len(block) > start:
                layer_index.add(block[max(0, start - offset) :])
        updated[name] = layer_index
        saved[name] = _save_pending(store, layer_index, store.layer_checksums(name), folder)
    try:
        if saved:
            _commit(store, saved)
    finally:
        remove_tree(folder)
    return updated
