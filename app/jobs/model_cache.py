"""The models a worker process keeps loaded: one load per (model, weights, compute dtype, device), least recently
used first out. A model is loaded only after its files pass the registration checks again (safetensors only,
sizes) and its weights hash is compared with the one registered."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.errors import Conflict
from app.models import RegisteredModel
from app.services.models import check_before_load
from influence import Featurizer, ProjectionSpec, discover_layers, load_model
from influence.loading import compute_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What loading a registered model needs (a detached copy of the row, safe across sessions/threads)."""

    id: str
    source: str
    revision: str | None
    task: str
    num_labels: int
    adapter: str | None
    weights_hash: str
    layers: tuple[dict, ...]
    # The dtype the weights are loaded in (`float32` | `bfloat16`): an index's features are computed in one
    # dtype, and its queries must be featurized in the same one.
    dtype: str = "float32"

    @classmethod
    def of(cls, model: RegisteredModel, dtype: str = "float32") -> ModelSpec:
        """The spec of a registered model, loaded in `dtype` (an index's compute dtype)."""
        compute_dtype(dtype)  # an unknown name fails here, before anything is loaded
        adapter, expected = model.adapter, model.weights_hash
        if adapter is None and model.checkpoints:
            # No adapter of its own: featurize at the last checkpoint (the final model state).
            last = model.checkpoints[-1]
            adapter, expected = last["adapter"], last["weights_hash"]
        return cls(
            id=model.id,
            source=model.source,
            revision=model.revision,
            task=model.task,
            num_labels=int(model.num_labels or 2),
            adapter=adapter,
            weights_hash=expected,
            layers=tuple(model.layers),
            dtype=dtype,
        )


@dataclass
class CachedModel:
    """A loaded model with its layers; `lock` serialises featurisation (hooks are per model object)."""

    loaded: Any  # influence.LoadedModel
    layers: list  # influence.Layer, in model order
    tokenizer_id: str
    device: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    featurizers: dict[tuple, Any] = field(default_factory=dict)

    def featurizer(self, layer_names: Sequence[str], projection: dict[str, Any]):
        """The Featurizer for these layers and projection (cached: projectors hold generated matrices).

        `projection` is a mapping ProjectionSpec.from_dict takes: an index row's (indexes.projection_of) or a
        store manifest's, whose resolved per-unit choices are then honoured as recorded."""
        key = (tuple(layer_names), json.dumps(projection, sort_keys=True, default=str))
        if key not in self.featurizers:
            by_name = {layer.name: layer for layer in self.layers}
            missing = [name for name in layer_names if name not in by_name]
            if missing:
                raise Conflict(
                    f"the loaded model lacks layers {missing[:5]} that the index names; was it re-registered?"
                )
            spec = ProjectionSpec.from_dict(projection)
            self.featurizers[key] = Featurizer(self.loaded.model, [by_name[n] for n in layer_names], spec)
        return self.featurizers[key]


def tokenizer_identity(tokenizer) -> str:
    """A stable name for a tokenizer's behaviour: its class and a hash of its vocabulary and special tokens."""
    payload = {
        "class": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
    return f"{type(tokenizer).__name__}:{digest[:16]}"


class ModelCache:
    """Loaded models of this process, keyed by (model id, weights hash, compute dtype, device); the least
    recently used goes when more than `capacity` are held. Thread-safe: each key is loaded once."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple, CachedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}

    def get(self, spec: ModelSpec, device: str) -> CachedModel:
        key = (spec.id, spec.weights_hash, spec.dtype, device)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                if key in self._items:
                    return self._items[key]
            cached = self._load(spec, device)
            with self._lock:
                self._items[key] = cached
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
                self._loading.pop(key, None)
            return cached

    @staticmethod
    def _load(spec: ModelSpec, device: str) -> CachedModel:
        check_before_load(spec.source, spec.revision, [spec.adapter] if spec.adapter else [])
        started = time.perf_counter()
        loaded = load_model(
            spec.source,
            revision=spec.revision,
            task=spec.task,
            num_labels=spec.num_labels,
            adapter=spec.adapter,
            dtype=compute_dtype(spec.dtype),
            device=device,
        )
        if loaded.weights_hash != spec.weights_hash:
            raise Conflict(
                f"the weights of model {spec.id!r} changed since it was registered (sha256 "
                f"{loaded.weights_hash[:12]}..., registered {spec.weights_hash[:12]}...); register it again"
            )
        layers = discover_layers(loaded.model)
        log.info(
            "loaded model %s (%s) on %s in %.1fs", spec.id, spec.dtype, device, time.perf_counter() - started
        )
        return CachedModel(loaded, layers, tokenizer_identity(loaded.tokenizer), device)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def model_ids(self) -> set[str]:
        """The ids of the models held now."""
        with self._lock:
            return {key[0] for key in self._items}

    def drop(self, model_id: str) -> None:
        """Forget every loaded copy of a model (it was deleted)."""
        with self._lock:
            for key in [key for key in self._items if key[0] == model_id]:
                del self._items[key]
