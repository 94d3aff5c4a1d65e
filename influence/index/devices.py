"""Where a layer's faiss index is searched: on a GPU when faiss was built with GPU support (faiss-gpu), it sees
a GPU, and the caller's device is cuda; on the CPU otherwise. Files on disk always hold CPU indexes (to_cpu before
faiss.write_index), so a store's indexes open on any machine, with or without a GPU.

One function decides, to_search_device(index, device); LayerIndex calls it on every index it loads or builds
(LayerIndex.to_device) and nothing else asks where an index lives. What moves:

  flat  -> GpuIndexFlatIP with float32 vectors: float16 storage would round the rows and the queries, and a
           flat index's answers are exact
  ivf   -> GpuIndexIVFFlat, moved before training, so its k-means and its adds run on the GPU as well
  hnsw  stays on the CPU: faiss has no GPU version of it

float16 lookup tables (GpuClonerOptions.useFloat16) are asked for where faiss reads that option as lookup tables,
an IVF-PQ index; for a flat index the same option means float16 storage (above), for IVF-flat nothing.

GPU searches differ from CPU ones in two ways that LayerIndex.search handles: a GPU index ignores ID selectors
(deleted rows are filtered after an over-fetch), and returns at most GPU_MAX_K results per query. Calls into one
GPU's indexes go one at a time (gpu_lock): faiss' GPU resources (scratch memory, streams, cuBLAS handle) belong
to one device and are not meant to be used by several threads at once, and the API searches from a thread pool.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faiss
import torch

from influence.errors import InvalidInputError

log = logging.getLogger(__name__)

# faiss' largest k (and nprobe) on a GPU: GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh.
GPU_MAX_K = 2048

_GUARD = threading.Lock()
# Per GPU, for the life of the process: a GPU index holds a raw pointer to its resources, which faiss' Python
# wrapper does not keep alive for index_cpu_to_gpu.
_RESOURCES: dict[int, Any] = {}
_LOCKS: dict[int, threading.Lock] = {}


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu (no StandardGpuResources), without a GPU, or without a driver."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except RuntimeError:  # a GPU build on a host whose driver cannot be loaded
        return 0


def search_gpu(device: Any) -> int | None:
    """The GPU number on which an index for a process with `device` ("cpu", "cuda", "cuda:1", a torch.device,
    None) is searched; None: the CPU. "cuda" names the process' current CUDA device, which a worker sets to its
    own GPU (one worker process per GPU)."""
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidInputError(f"unknown device {device!r}") from None
    if target.type != "cuda":
        return None
    count = faiss_gpu_count()
    if count == 0:
        return None
    number = target.index if target.index is not None else _current_cuda_device()
    if not 0 <= number < count:
        raise InvalidInputError(f"device {device!r}: faiss sees {count} GPU(s)")
    return number


def _current_cuda_device() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _resources(gpu: int) -> Any:
    with _GUARD:
        if gpu not in _RESOURCES:
            _RESOURCES[gpu] = faiss.StandardGpuResources()
        return _RESOURCES[gpu]


def gpu_lock(gpu: int) -> threading.Lock:
    """The lock that serialises calls into the faiss indexes of one GPU."""
    with _GUARD:
        return _LOCKS.setdefault(gpu, threading.Lock())


def _movable(index: Any) -> bool:
    """Whether faiss has a GPU version of this index's class (index_cpu_to_gpu refuses the others)."""
    classes = tuple(
        getattr(faiss, name)
        for name in ("IndexFlat", "IndexIVFFlat", "IndexIVFPQ", "IndexIVFScalarQuantizer")
        if hasattr(faiss, name)
    )
    return isinstance(index, classes)


def to_search_device(index: Any, device: Any) -> Any:
    """`index` where a process with `device` searches it: a GPU copy when the GPU is usable (see the module's
    docstring) and faiss has a GPU version of the index's class, else `index` itself. The caller keeps
    whichever it gets; the CPU index may then be dropped. A GPU that cannot take the index (out of memory)
    leaves it on the CPU, with a warning: searches stay correct, only slower."""
    gpu = search_gpu(device)
    if gpu is None or not _movable(index):
        return index
    options = faiss.GpuClonerOptions()
    # float16 lookup tables for IVF-PQ; False for a flat index keeps its vectors in float32 (exact answers).
    options.useFloat16 = isinstance(index, getattr(faiss, "IndexIVFPQ", ()))
    try:
        with gpu_lock(gpu):
            return faiss.index_cpu_to_gpu(_resources(gpu), gpu, index, options)
    except RuntimeError as exc:
        log.warning("a FAISS index stays on the CPU, GPU %d refused it: %s", gpu, str(exc).splitlines()[0])
        return index


def to_cpu(index: Any, gpu: int | None) -> Any:
    """A CPU copy of an index on GPU `gpu` (for storage: files never hold GPU indexes); the index itself when
    gpu is None."""
    if gpu is None:
        return index
    with gpu_lock(gpu):
        return faiss.index_gpu_to_cpu(index)
