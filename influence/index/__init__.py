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

With faiss-gpu, a usable GPU and the process' device cuda, indexes are built and searched on the GPU and
saved as CPU indexes (devices.py: to_search_device decides); build, load and sync take the device.

The package: kinds.py (LayerIndex and its registered kinds), store_indexes.py (a store's indexes on disk),
devices.py (where an index is searched).
"""

from __future__ import annotations

from influence.lazy import lazy_package

# Public names resolved on first access (PEP 562): importing the package, or one of its modules, loads no
# other module of it than those imported above (torch and faiss come with the modules that use them).
_LAZY: dict[str, str] = {
    "faiss_gpu_count": "influence.index.devices",
    "to_search_device": "influence.index.devices",
    "default_nlist": "influence.index.kinds",
    "default_nprobe": "influence.index.kinds",
    "faiss_threads": "influence.index.kinds",
    "FlatLayerIndex": "influence.index.kinds",
    "HNSWLayerIndex": "influence.index.kinds",
    "INDEX_KINDS": "influence.index.kinds",
    "IVFLayerIndex": "influence.index.kinds",
    "LayerIndex": "influence.index.kinds",
    "register_index_kind": "influence.index.kinds",
    "build_store_indexes": "influence.index.store_indexes",
    "indexable_layers": "influence.index.store_indexes",
    "load_store_indexes": "influence.index.store_indexes",
    "stale_store_indexes": "influence.index.store_indexes",
    "sync_store_indexes": "influence.index.store_indexes",
}

__all__ = [
    "INDEX_KINDS",
    "FlatLayerIndex",
    "HNSWLayerIndex",
    "IVFLayerIndex",
    "LayerIndex",
    "build_store_indexes",
    "default_nlist",
    "default_nprobe",
    "faiss_gpu_count",
    "faiss_threads",
    "indexable_layers",
    "load_store_indexes",
    "register_index_kind",
    "stale_store_indexes",
    "sync_store_indexes",
    "to_search_device",
]


__getattr__, __dir__ = lazy_package(__name__, _LAZY, globals())
