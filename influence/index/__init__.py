"""FAISS indexes over a feature store: one inner-product index per layer, for top-k fast paths.

Every estimator is "transform the query, then inner product" (docs/architecture.md), so one index per layer
serves them all. Kinds: "flat" (exact, IndexFlatIP), "ivf" (IndexIVFFlat, approximate) and "hnsw"
(IndexHNSWFlat, approximate); `is_exact` says which answers must be reported as approximate. A new kind is
one LayerIndex subclass decorated with @register_index_kind.

On-disk layout under a store directory::

    faiss/indexes.json                    {"fingerprint": the store manifest's fingerprint, "layers": {name:
                                          {"file", "sha256", "kind", "ntotal", "params", "segments": [sha256
                                          of each store segment's features file the index covers]}}}
    faiss/<stem>.<kind>.<sha16>.faiss     one index per layer, content-addressed (faiss.write_index format)
    faiss/indexes.lock, faiss/tmp/        writers' lock and temporary files

Token-row layers (the exact embedding, influence.tokens) have no index: they are scored exactly by a join
on token id. Positions returned by search are row positions in the store (FeatureStore.row_ids() maps them
to dataset ids).
Rows deleted from the store (tombstones) stay in its indexes until a compaction; searches leave them out with
`exclude=store.deleted_positions()`. A compaction rewrites the segments, so indexes built before it no longer
match the store (ManifestMismatchError on load): rebuild them with build_store_indexes.

The package: kinds.py (LayerIndex and its registered kinds), store_indexes.py (a store's indexes on disk).
"""

from influence.index.kinds import (
    INDEX_KINDS,
    FlatLayerIndex,
    HNSWLayerIndex,
    IVFLayerIndex,
    LayerIndex,
    default_nlist,
    default_nprobe,
    faiss_threads,
    register_index_kind,
)
from influence.index.store_indexes import (
    build_store_indexes,
    indexable_layers,
    load_store_indexes,
    stale_store_indexes,
    sync_store_indexes,
)

__all__ = [
    "INDEX_KINDS",
    "FlatLayerIndex",
    "HNSWLayerIndex",
    "IVFLayerIndex",
    "LayerIndex",
    "build_store_indexes",
    "default_nlist",
    "default_nprobe",
    "faiss_threads",
    "indexable_layers",
    "load_store_indexes",
    "register_index_kind",
    "stale_store_indexes",
    "sync_store_indexes",
]
