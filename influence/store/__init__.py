"""The feature store: append-only, chunked, memory-mapped per-layer features of training rows.

A store holds, for every training row and every layer of its manifest, one feature vector (a projected
per-sample gradient), its L2 norm, and the row's id in the dataset. It is built in chunks that independent
workers may write concurrently and in any order, then consolidated by `finalize()` into one matrix per layer;
later rows are added as new immutable segments by `append()`. Nothing is ever modified in place: every
artifact is written under a temporary name and renamed into place, so a crash leaves either the old state or
the new one, and readers never see a half-written file.

On-disk layout of a store directory::

    manifest.json                 {"format", "format_version", "manifest": StoreManifest}; written once
    store.lock                    fcntl lock taken by finalize / append / statistics writers (not readers)
    tmp/                          temporary files and directories; never read
    chunks/chunk-000007.npz       build phase: one uncompressed .npz per finished chunk (row_ids,
                                  features__<stem>, norms__<stem>; tokens__<stem>, offsets__<stem> for a
                                  tokens layer); zip CRC-32 guards each member; removed
                                  by finalize
    segments/seg-000000/          after finalize (seg-000000) and each append (seg-000001, ...):
        row_ids.npy               (r,) int64 dataset row ids
        <stem>.npy                (r, dim) float16/float32 features of one layer
        <stem>.norms.npy          (r,) float32 L2 norms, taken from the float32 values before any float16 cast
                                  a `tokens` layer (token rows, influence.tokens) instead of (r, dim):
        <stem>.npy                (e, dim) one vector per (row, token) entry, rows in order
        <stem>.tokens.npy         (e,) int32 token ids, ascending within a row
        <stem>.offsets.npy        (r + 1,) int64: row i's entries are offsets[i]:offsets[i + 1]
        <stem>.order.npy          (e,) int64 the entries in token order (the join's inverted index)
    segments.json                 the list of segments with the sha256 of every file and of manifest.json,
                                  and the list of tombstone files; its presence is what makes the store
                                  complete (readable). Every change of the readable state (finalize, append,
                                  delete_rows, compact) is one os.replace of this file
    tombstones/tomb-<sha16>.npy   deleted rows: (d,) int64 sorted dataset row ids, listed with their sha256 in
                                  segments.json. Readers exclude them (live_positions); compact() rewrites
                                  the segments without them and drops the tombstones
    statistics/<stem>.<sha>.safetensors   per-layer estimator statistics (e.g. DataInf's matrix)
    statistics.json               layer -> statistics file + sha256 + the segments it was fitted over (a
                                  compaction makes it stale: has_layer_statistics is then False)
    faiss/                        FAISS indexes (see influence.index)

`<stem>` is `layer_file_stem(layer name)`: the name with unsafe characters (dots included) replaced, plus a
hash of the full name, so distinct layer names never share a file. Only .npy, .npz and safetensors are
written; every load uses allow_pickle=False.

The package follows the data's trip: manifest.py (what a store holds, its fingerprint), build.py (create,
chunks, finalize, append), read.py (open, segments, per-layer matrices, verify), statistics.py (per-layer
estimator statistics) and deletion.py (tombstones, compaction); layout.py names the files above.
FeatureStore (feature_store.py) is their composition, StoreReader (protocol.py) what readers of a store
depend on. The file-system primitives (atomic writes, locks, checksums) are influence.files.
"""

from __future__ import annotations

from influence.lazy import lazy_package
from influence.store.manifest import (
    DTYPES,
    LAYOUTS,
    STORE_FORMAT,
    STORE_FORMAT_VERSION,
    CheckpointSpec,
    LayerSpec,
    StoreManifest,
    layer_file_stem,
)
from influence.store.protocol import StoreReader

# Public names resolved on first access (PEP 562): importing the package, or one of its modules, loads no
# other module of it than those imported above (torch and faiss come with the modules that use them).
_LAZY: dict[str, str] = {
    "FeatureStore": "influence.store.feature_store",
}

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "STORE_FORMAT",
    "STORE_FORMAT_VERSION",
    "CheckpointSpec",
    "FeatureStore",
    "LayerSpec",
    "StoreManifest",
    "StoreReader",
    "layer_file_stem",
]


__getattr__, __dir__ = lazy_package(__name__, _LAZY, globals())
