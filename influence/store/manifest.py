"""What a store holds: its manifest (model, data, layers, projection, dtype), fingerprinted for matching
queries against it, and the input checks the store's modules share."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from influence.errors import InvalidInputError, ManifestMismatchError
from influence.version import __version__

STORE_FORMAT = "influence-feature-store"
STORE_FORMAT_VERSION = 1
DTYPES: tuple[str, ...] = ("float16", "float32")
LAYOUTS = ("dense", "tokens")


def layer_file_stem(name: str) -> str:
    """A file-name-safe, collision-free stem for a layer name (e.g. `block.3.attn.v.lora_B`)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:80] or "layer"
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:10]
    return f"{readable}-{digest}"


# ------------------------------------------------------------------------------------------ input checks


def is_int(value: Any) -> bool:
    """Whether `value` is a Python or numpy integer (bool excluded)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def as_numpy(value: Any, what: str) -> np.ndarray:
    """A numpy view of an array-like; torch tensors are detached and moved to CPU (bfloat16 widened)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} is not an array: {exc}") from None


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the stable form hashed by fingerprints."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)


def _json_value(value: Any, what: str) -> Any:
    """`value` as plain JSON types (tuples become lists), refusing what JSON cannot hold."""
    try:
        return json.loads(canonical_json(value))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be JSON-serialisable: {exc}") from None


# --------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class LayerSpec:
    """One layer unit in the store: its name, feature dimension (after projection), parameter count, and
    layout: "dense" (one (dim,) vector per row) or "tokens" (token rows, influence.tokens: per row, its
    distinct tokens with a (dim,) vector each; the exact embedding)."""

    name: str
    dim: int
    num_params: int
    layout: str = "dense"

    def to_dict(self) -> dict[str, Any]:
        # "dense" is left out: manifests written before layouts existed keep their fingerprint.
        out = asdict(self)
        if self.layout == "dense":
            del out["layout"]
        return out


@dataclass(frozen=True)
class CheckpointSpec:
    """One training checkpoint the features were taken at, with its learning rate (TracIn-CP weight)."""

    name: str
    learning_rate: float


def _layer_spec(value: Any) -> LayerSpec:
    if isinstance(value, LayerSpec):
        spec = value
    elif isinstance(value, Mapping):
        try:
            spec = LayerSpec(
                name=value["name"],
                dim=value["dim"],
                num_params=value["num_params"],
                layout=value.get("layout", "dense"),
            )
        except KeyError as exc:
            raise InvalidInputError(f"layer spec {dict(value)!r} lacks {exc}") from None
    else:
        raise InvalidInputError(f"a layer must be a LayerSpec or a mapping, got {type(value).__name__}")
    if not isinstance(spec.name, str) or not spec.name:
        raise InvalidInputError(f"layer name must be a non-empty string, got {spec.name!r}")
    if not is_int(spec.dim) or spec.dim <= 0:
        raise InvalidInputError(f"layer {spec.name!r}: dim must be a positive integer, got {spec.dim!r}")
    if not is_int(spec.num_params) or spec.num_params < 0:
        raise InvalidInputError(f"layer {spec.name!r}: num_params must be >= 0, got {spec.num_params!r}")
    if spec.layout not in LAYOUTS:
        raise InvalidInputError(f"layer {spec.name!r}: layout must be one of {LAYOUTS}, got {spec.layout!r}")
    return LayerSpec(name=spec.name, dim=int(spec.dim), num_params=int(spec.num_params), layout=spec.layout)


def _checkpoint_spec(value: Any) -> CheckpointSpec:
    if isinstance(value, CheckpointSpec):
        spec = value
    elif isinstance(value, Mapping):
        try:
            spec = CheckpointSpec(name=value["name"], learning_rate=value["learning_rate"])
        except KeyError as exc:
            raise InvalidInputError(f"checkpoint spec {dict(value)!r} lacks {exc}") from None
    else:
        raise InvalidInputError(
            f"a checkpoint must be a CheckpointSpec or a mapping, got {type(value).__name__}"
        )
    if not isinstance(spec.name, str) or not spec.name:
        raise InvalidInputError(f"checkpoint name must be a non-empty string, got {spec.name!r}")
    try:
        rate = float(spec.learning_rate)
    except (TypeError, ValueError):
        raise InvalidInputError(f"checkpoint {spec.name!r}: learning_rate must be a number") from None
    if not math.isfinite(rate):
        raise InvalidInputError(f"checkpoint {spec.name!r}: learning_rate must be finite")
    return CheckpointSpec(name=spec.name, learning_rate=rate)


@dataclass(kw_only=True)
class StoreManifest:
    """Everything that determines the features in a store; a query must match all of it but num_rows/extra.

    layers: the stored layer units in order. projection: {"kind", "dim", "seed", ...}. dtype: storage dtype of
    features ("float16" | "float32"; norms are always float32). num_rows: rows planned for the build (appends
    add more later). checkpoints: [(name, learning_rate)], empty when features come from one model state.
    """

    model_id: str
    revision: str
    weights_hash: str
    tokenizer: str
    dataset_hash: str
    layers: list[LayerSpec]
    projection: dict[str, Any]
    dtype: str = "float16"
    library_version: str = __version__
    num_rows: int
    chunk_size: int = 1024
    task: str = "classification"
    max_length: int = 128
    checkpoints: list[CheckpointSpec] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    # Fields excluded from the fingerprint: the planned row count grows with appends, extra is free-form, and
    # the library version is informative only (what changes features is the projection spec, which carries
    # its own format version).
    UNFINGERPRINTED = ("num_rows", "extra", "library_version")

    def __post_init__(self) -> None:
        for name in (
            "model_id",
            "revision",
            "weights_hash",
            "tokenizer",
            "dataset_hash",
            "task",
            "library_version",
        ):
            if not isinstance(getattr(self, name), str):
                raise InvalidInputError(f"manifest field {name} must be a string")
        self.layers = [_layer_spec(layer) for layer in self.layers]
        if not self.layers:
            raise InvalidInputError("a feature store needs at least one layer")
        names = [layer.name for layer in self.layers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InvalidInputError(f"duplicate layer names: {duplicates}")
        if not isinstance(self.projection, Mapping) or "kind" not in self.projection:
            raise InvalidInputError("projection must be a mapping with at least a 'kind' (and dim, seed)")
        self.projection = _json_value(dict(self.projection), "projection")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name, minimum in (("num_rows", 0), ("chunk_size", 1), ("max_length", 1)):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise InvalidInputError(
                    f"manifest field {name} must be an integer >= {minimum}, got {value!r}"
                )
            setattr(self, name, int(value))
        self.checkpoints = [_checkpoint_spec(c) for c in self.checkpoints]
        if not isinstance(self.extra, Mapping):
            raise InvalidInputError("manifest field extra must be a mapping")
        self.extra = _json_value(dict(self.extra), "extra")

    # -- JSON round trip

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON types."""
        data = asdict(self)
        data["layers"] = [layer.to_dict() for layer in self.layers]
        return _json_value(data, "manifest")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoreManifest:
        """Rebuild a manifest from `to_dict()` output; unknown or missing fields are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"unknown manifest fields: {unknown}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise InvalidInputError(f"invalid manifest: {exc}") from None

    def to_json(self) -> str:
        """The manifest as an indented JSON document."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> StoreManifest:
        """Parse `to_json()` output."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InvalidInputError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidInputError("manifest JSON must be an object")
        return cls.from_dict(data)

    # -- matching

    @classmethod
    def fingerprint_fields(cls) -> tuple[str, ...]:
        """Names of the fields a query must match (all but num_rows and extra)."""
        return tuple(f.name for f in fields(cls) if f.name not in cls.UNFINGERPRINTED)

    def _fingerprint_payload(self) -> dict[str, Any]:
        data = self.to_dict()
        return {name: data[name] for name in self.fingerprint_fields()}

    def fingerprint(self) -> str:
        """A stable sha256 (hex) over the fingerprinted fields and the store format version."""
        payload = {"store_format_version": STORE_FORMAT_VERSION, **self._fingerprint_payload()}
        return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()

    def check_compatible(self, other: StoreManifest | Mapping[str, Any]) -> None:
        """Raise ManifestMismatchError naming every fingerprinted field where `other` differs.

        `other` is a whole manifest (all fingerprinted fields compared) or a mapping of some fingerprinted
        fields (only those compared; layers/checkpoints may be given as specs or dicts).
        """
        mine = self._fingerprint_payload()
        if isinstance(other, StoreManifest):
            theirs = other._fingerprint_payload()
        elif isinstance(other, Mapping):
            unknown = sorted(set(other) - set(mine))
            if unknown:
                raise InvalidInputError(
                    f"not fields a query must match: {unknown}; expected some of {sorted(mine)}"
                )
            theirs = {}
            for name, value in other.items():
                if name == "layers":
                    value = [_layer_spec(v).to_dict() for v in value]
                elif name == "checkpoints":
                    value = [asdict(_checkpoint_spec(v)) for v in value]
                theirs[name] = _json_value(value, f"field {name}")
        else:
            raise InvalidInputError(f"cannot compare a manifest with {type(other).__name__}")
        differing = [name for name in theirs if canonical_json(mine[name]) != canonical_json(theirs[name])]
        if differing:
            details = "; ".join(
                f"{name}: store has {_short(mine[name])}, got {_short(theirs[name])}" for name in differing
            )
            raise ManifestMismatchError(f"manifest mismatch in field(s) {', '.join(differing)} ({details})")


def _short(value: Any, limit: int = 160) -> str:
    text = canonical_json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
