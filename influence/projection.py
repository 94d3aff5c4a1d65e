"""Random projections of per-sample gradients, computed from hook captures (method.md §2, last bullet).

Every unit's per-sample gradient is a sum of outer products over tokens t:
    Linear / Conv1D:  G = sum_t d_t a_t^T        (d_t: output gradient, a_t: input activation [, 1 for the bias])
    Embedding:        G = sum_t e_{id_t} d_t^T    (row-sparse: only the rows of tokens present)
A projector turns (inputs captured in the forward pass, output gradients captured in the backward pass)
into a (B, k) feature per sample; the choice is per unit (ProjectionSpec.for_layer; the default `auto` keeps
small units exact, as the paper's code does, and projects the rest):
    identity     vec(G) in the parameter layout [weight.flatten(), bias] (exact; small units)
    gaussian     P vec(G), P of k x p with N(0, 1/k) entries       } dense: E[P^T P] = I, so inner products
    rademacher   P vec(G), P of k x p with +-1/sqrt(k) entries     } are preserved in expectation (JL)
    factorized   P_out G P_in^T = sum_t (P_out d_t)(P_in a_t)^T  (LoGra): never forms G; for embeddings the
                 input side is a column gather P_row[:, id_t]. A side no larger than its share of k is kept
                 exact (identity) and the other side gets the rest of the budget.
    tokens       embeddings only: G itself, row-sparse, as token rows (influence.tokens): per row, its distinct
                 tokens with the summed d_t of each (exact), or each of those sketched to k numbers by one
                 seeded Gaussian (k x width) matrix; inner products join on token id
Random entries come from a counter-based hash of (seed, layer name, row, column), so a projection is the
same on every device and any slice of P can be generated on its own (no k x p matrix is stored for the
dense row-sparse embedding path).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from influence.errors import InvalidInputError
from influence.layers import Layer
from influence.lazy import lazy_module
from influence.tokens import TokenRows

torch = lazy_module("torch")

DEFAULT_DIM = 256
# Bumped whenever the same spec would produce different numbers; part of every store's fingerprint.
PROJECTION_FORMAT = 1
# Above this many features an identity projection is refused: the store would hold p numbers per row.
MAX_IDENTITY_DIM = 1 << 20
# Dense projection matrices up to this many entries are cached; bigger ones are generated per batch.
_DENSE_CACHE_ENTRIES = 1 << 24


# `auto` stores a unit exactly (identity) when its gradient has at most this many numbers: LoRA matrices of
# rank <= 4 on models up to 1,024 wide (rank <= 8 up to 512), a classification head of up to 5 classes on a
# 768-wide model. Two costs bound it: 2 bytes per number per row in float16 (8 KiB per row for the largest
# such unit), and DataInf's k x k matrix of the unit, fitted at build time in float64 (128 MiB at k = 4,096,
# growing with k squared). The word embedding is stored exactly as token rows (kind `tokens`: its gradient is
# row-sparse); the rest of the model's units are projected to `dim` (factorized).
AUTO_EXACT_MAX_PARAMS = 4096
# A `tokens` override without a dim: the embedding's full width (resolved() records the actual width).
TOKENS_EXACT = 1 << 20
PROJECTION_KINDS = ("auto", "identity", "gaussian", "rademacher", "factorized")


@dataclass(frozen=True)
class UnitProjection:
    """How one layer unit is projected: a concrete kind (never auto) and its target dimension."""

    kind: str
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim}


@dataclass(frozen=True)
class ProjectionSpec:
    """What a feature store records about its projection: kind, target dimension per layer, seed, and the
    per-unit choices.

    kind `auto` resolves per unit (`for_layer`): token rows at full width for embeddings, identity for units
    with at most `exact_max_params` numbers, factorized at `dim` for the others. `units` names per-unit
    choices that override the spec's kind; a Featurizer records the resolved choice of every unit of an
    `auto` spec there, so a store's manifest says how each unit was projected and later code reproduces it
    whatever the rule becomes.
    """

    kind: str = "auto"
    dim: int = DEFAULT_DIM
    seed: int = 0
    units: Mapping[str, UnitProjection] = field(default_factory=dict, hash=False)
    exact_max_params: int = AUTO_EXACT_MAX_PARAMS

    def __post_init__(self) -> None:
        if self.kind not in PROJECTION_KINDS:
            raise InvalidInputError(
                f"unknown projection {self.kind!r}; expected one of {', '.join(PROJECTION_KINDS)}"
            )
        _check_positive(self.dim, "projection dim")
        _check_positive(self.exact_max_params, "projection exact_max_params")
        units = {}
        for name, unit in dict(self.units).items():
            if isinstance(unit, Mapping):
                unknown = sorted(set(unit) - {"kind", "dim"})
                if unknown:
                    raise InvalidInputError(f"projection of unit {name!r}: unknown fields {unknown}")
                kind = unit.get("kind", "")
                # `tokens` without a dim keeps the embedding's width (exact); resolved() records it.
                unit = UnitProjection(kind, unit.get("dim", TOKENS_EXACT if kind == "tokens" else self.dim))
            if not isinstance(unit, UnitProjection):
                raise InvalidInputError(f"projection of unit {name!r} must be a mapping {{kind, dim}}")
            if unit.kind not in PROJECTORS:
                raise InvalidInputError(
                    f"projection of unit {name!r}: unknown kind {unit.kind!r}; expected one of "
                    f"{', '.join(PROJECTORS)}"
                )
            _check_positive(unit.dim, f"projection dim of unit {name!r}")
            units[str(name)] = UnitProjection(unit.kind, int(unit.dim))
        object.__setattr__(self, "units", dict(sorted(units.items())))

    def for_layer(self, layer: Layer) -> UnitProjection:
        """The projection of one unit, with the dimension it really has: its override, else the spec's kind
        (auto: by the unit's size). Identity keeps every number, and a per-token dim at or above the
        embedding's width is that width (exact), whatever dim was asked for."""
        if layer.name in self.units:
            unit = self.units[layer.name]
        elif self.kind != "auto":
            unit = UnitProjection(self.kind, self.dim)
        elif layer.kind == "embedding":
            unit = UnitProjection("tokens", layer.out_features)
        elif layer.num_params <= self.exact_max_params:
            unit = UnitProjection("identity", layer.num_params)
        else:
            unit = UnitProjection("factorized", self.dim)
        if unit.kind == "identity":
            return UnitProjection("identity", layer.num_params)
        if unit.kind == "tokens":
            return UnitProjection("tokens", min(unit.dim, layer.out_features))
        return unit

    def resolved(self, layers: Sequence[Layer]) -> ProjectionSpec:
        """This spec with every unit of `layers` recorded in `units` (auto specs; others are returned as
        they are, so manifests of stores built before per-unit projections keep their form)."""
        if self.kind != "auto" and not self.units:
            return self
        units = dict(self.units)
        for layer in layers:
            if self.kind == "auto" or layer.name in units:
                units[layer.name] = self.for_layer(layer)
        return replace(self, units=units)

    def check_units(self, names: Sequence[str]) -> None:
        """Refuse overrides naming units that are not among `names` (the selected layers)."""
        unknown = sorted(set(self.units) - set(names))
        if unknown:
            raise InvalidInputError(
                f"projection.units names units that are not selected: {unknown[:5]}"
                + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
            )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "format": PROJECTION_FORMAT,
        }
        if self.kind == "auto":
            out["exact_max_params"] = self.exact_max_params
        if self.units:
            out["units"] = {name: unit.to_dict() for name, unit in self.units.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProjectionSpec:
        """The spec a manifest's (or a request's) projection mapping describes."""
        if not isinstance(data, Mapping):
            raise InvalidInputError("a projection must be a mapping {kind, dim, seed, ...}")
        unknown = sorted(set(data) - {"kind", "dim", "seed", "format", "units", "exact_max_params"})
        if unknown:
            raise InvalidInputError(f"projection: unknown fields {unknown}")
        if data.get("format", PROJECTION_FORMAT) != PROJECTION_FORMAT:
            raise InvalidInputError(
                f"projection format {data.get('format')!r} is not this library's ({PROJECTION_FORMAT}): "
                "rebuild the index with this version"
            )
        units = data.get("units") or {}
        if not isinstance(units, Mapping):
            raise InvalidInputError("projection.units must be a mapping {unit name: {kind, dim}}")
        return cls(
            kind=data.get("kind", "auto"),
            dim=data.get("dim", DEFAULT_DIM),
            seed=data.get("seed", 0),
            units=units,
            exact_max_params=data.get("exact_max_params", AUTO_EXACT_MAX_PARAMS),
        )


def _check_positive(value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"{what} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Counter-based random numbers: entry (j, c) of a layer's P is a pure function of (seed, layer, j, c).

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # Logical shift on int64: the arithmetic shift copies the sign bit, so mask it away.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def stream_key(seed: int, layer_name: str, part: str) -> int:
    """A 63-bit key for one random stream: (seed, layer, which matrix)."""
    digest = hashlib.sha256(f"{seed}\x00{layer_name}\x00{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def hashed_normal(key: int, rows: torch.Tensor, cols: torch.Tensor, dtype=None) -> torch.Tensor:
    """Standard normal entries N[j, c] for j in rows (R,), c in cols (C,) -> (R, C), by Box-Muller (dtype:
    float32 unless given)."""
    bits = _hash_grid(key, rows, cols)
    high = _shift_right(bits, 32).to(torch.float64)
    low = (bits & 0xFFFFFFFF).to(torch.float64)
    u1 = (high + 1.0) / 4294967297.0  # in (0, 1): log is finite
    u2 = low / 4294967296.0
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype or torch.float32)


def hashed_signs(key: int, rows: torch.Tensor, cols: torch.Tensor, dtype=None) -> torch.Tensor:
    """Rademacher entries (+1 / -1) for rows x cols (dtype: float32 unless given)."""
    bits = _hash_grid(key, rows, cols)
    return ((bits >> 40) & 1).to(dtype or torch.float32) * 2 - 1


def _hash_grid(key: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    row_keys = _splitmix64(rows.to(torch.int64) + key)
    return _splitmix64(row_keys[:, None] ^ cols.to(torch.int64)[None, :])


def random_matrix(key: int, rows: int, cols: int, kind: str, dtype, device) -> torch.Tensor:
    """A (rows, cols) matrix with entries of variance 1/rows (so E[P^T P] = I)."""
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    values = hashed_signs(key, r, c, dtype) if kind == "rademacher" else hashed_normal(key, r, c, dtype)
    return values / math.sqrt(rows)


# ---------------------------------------------------------------------------------------------------------
# Projectors: one per layer unit.


class Projector(ABC):
    """Turns hook captures of one layer unit into per-sample features (B, dim)."""

    kind: ClassVar[str]

    def __init__(self, layer: Layer, dim: int, seed: int):
        self.layer = layer
        self.target_dim = dim
        self.seed = seed

    @property
    @abstractmethod
    def dim(self) -> int:
        """Feature size of this unit."""

    @abstractmethod
    def prepare(self, inputs: torch.Tensor) -> Any:
        """Forward-time capture: inputs (B, T, in) activations, or (B, T) token ids for an embedding."""

    @abstractmethod
    def combine(self, prepared: Any, grad_out: torch.Tensor) -> torch.Tensor:
        """Backward-time: output gradients (B, T, out) -> features (B, dim)."""


def _flat_param_layout(layer: Layer, g_weight: torch.Tensor, g_bias: torch.Tensor | None) -> torch.Tensor:
    """Per-sample (B, out, in) weight gradient (+ (B, out) bias) -> (B, p) in the parameter's own layout."""
    if layer.kind == "conv1d":
        g_weight = g_weight.transpose(1, 2)  # Conv1D stores its weight as (in, out)
    flat = g_weight.reshape(g_weight.shape[0], -1)
    return torch.cat([flat, g_bias], dim=1) if g_bias is not None else flat


def exact_linear_gradient(layer: Layer, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """vec(G) per sample for a Linear/Conv1D unit: a (B, T, in), d (B, T, out) -> (B, p)."""
    g_weight = torch.einsum("bto,bti->boi", d, a)
    g_bias = d.sum(dim=1) if layer.has_bias else None
    return _flat_param_layout(layer, g_weight, g_bias)


def exact_embedding_gradient(layer: Layer, ids: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """vec(G) per sample for an embedding: ids (B, T), d (B, T, dim) -> (B, vocab * dim). Dense: small models."""
    batch, _, dim = d.shape
    grad = torch.zeros(batch, layer.rows, dim, dtype=d.dtype, device=d.device)
    sample = torch.arange(batch, device=d.device)[:, None].expand_as(ids)
    grad.index_put_((sample, ids), d, accumulate=True)
    return grad.reshape(batch, -1)


def _padding_mask(ids: torch.Tensor, padding_idx: int | None) -> torch.Tensor | None:
    return None if padding_idx is None else (ids != padding_idx)


class IdentityProjector(Projector):
    kind = "identity"

    def __init__(self, layer: Layer, dim: int, seed: int, padding_idx: int | None = None):
        super().__init__(layer, dim, seed)
        self.padding_idx = padding_idx

    @property
    def dim(self) -> int:
        return self.layer.num_params

    def prepare(self, inputs):
        return inputs

    def combine(self, prepared, grad_out):
        if self.layer.kind == "embedding":
            mask = _padding_mask(prepared, self.padding_idx)
            if mask is not None:
                grad_out = grad_out * mask[..., None].to(
                    grad_out.dtype
                )  # nn.Embedding: no grad at padding_idx
            return exact_embedding_gradient(self.layer, prepared, grad_out)
        return exact_linear_gradient(self.layer, prepared, grad_out)


class DenseProjector(Projector):
    """P vec(G) with a dense seeded Gaussian or Rademacher P (k x p). Costs k x p per sample: for small units,
    or for research against the factorized default. Embeddings take a row-sparse path: only the columns of
    P that belong to rows (tokens) present in the batch are generated."""

    kind = "gaussian"
    _cache: dict[tuple, torch.Tensor]

    def __init__(
        self, layer: Layer, dim: int, seed: int, padding_idx: int | None = None, kind: str = "gaussian"
    ):
        super().__init__(layer, dim, seed)
        self.kind = kind
        self.padding_idx = padding_idx
        self.key = stream_key(seed, layer.name, f"dense-{kind}")
        self._cache = {}

    @property
    def dim(self) -> int:
        return self.target_dim

    def _columns(self, cols: torch.Tensor, dtype) -> torch.Tensor:
        """P[:, cols] as (k, len(cols)), entries of variance 1/k."""
        rows = torch.arange(self.target_dim, device=cols.device)
        make = hashed_signs if self.kind == "rademacher" else hashed_normal
        return make(self.key, rows, cols, dtype) / math.sqrt(self.target_dim)

    def _full(self, dtype, device) -> torch.Tensor | None:
        p = self.layer.num_params
        if p * self.target_dim > _DENSE_CACHE_ENTRIES:
            return None
        cache_key = (dtype, str(device))
        if cache_key not in self._cache:
            self._cache[cache_key] = self._columns(torch.arange(p, device=device), dtype)
        return self._cache[cache_key]

    def prepare(self, inputs):
        return inputs

    def combine(self, prepared, grad_out):
        if self.layer.kind == "embedding":
            return self._combine_embedding(prepared, grad_out)
        flat = exact_linear_gradient(self.layer, prepared, grad_out)  # (B, p)
        full = self._full(flat.dtype, flat.device)
        if full is not None:
            return flat @ full.T
        out = torch.zeros(flat.shape[0], self.target_dim, dtype=flat.dtype, device=flat.device)
        step = max(1, _DENSE_CACHE_ENTRIES // self.target_dim)
        for start in range(0, flat.shape[1], step):  # generate P in column blocks: bounded memory
            cols = torch.arange(start, min(start + step, flat.shape[1]), device=flat.device)
            out += flat[:, start : start + len(cols)] @ self._columns(cols, flat.dtype).T
        return out

    def _combine_embedding(self, ids, grad_out):
        batch, _, width = grad_out.shape
        mask = _padding_mask(ids, self.padding_idx)
        if mask is not None:
            grad_out = grad_out * mask[..., None].to(grad_out.dtype)
        present, inverse = torch.unique(ids, return_inverse=True)  # rows of G that can be non-zero
        rows_grad = torch.zeros(batch, len(present), width, dtype=grad_out.dtype, device=grad_out.device)
        sample = torch.arange(batch, device=ids.device)[:, None].expand_as(ids)
        rows_grad.index_put_((sample, inverse), grad_out, accumulate=True)
        cols = (present[:, None] * width + torch.arange(width, device=ids.device)[None, :]).reshape(-1)
        return rows_grad.reshape(batch, -1) @ self._columns(cols, grad_out.dtype).T


def factor_dims(rows: int, cols: int, dim: int) -> tuple[int | None, int | None]:
    """Split a feature budget `dim` between the two sides of a rows x cols gradient.

    None means that side stays exact. A side no wider than its square-root share is kept exact and gives
    its budget to the other side; a unit with rows * cols <= dim is not projected at all.
    """
    if rows * cols <= dim:
        return None, None
    share = max(1, math.isqrt(dim))
    if rows <= share:
        return None, min(cols, max(1, dim // rows))
    if cols <= share:
        return min(rows, max(1, dim // cols)), None
    return share, max(1, dim // share)


class FactorizedProjector(Projector):
    """LoGra-style Kronecker projection: features = P_out G P_in^T without forming G."""

    kind = "factorized"

    def __init__(self, layer: Layer, dim: int, seed: int, padding_idx: int | None = None):
        super().__init__(layer, dim, seed)
        self.padding_idx = padding_idx
        in_size = layer.in_features + (1 if layer.has_bias and layer.kind != "embedding" else 0)
        self.k_out, self.k_in = factor_dims(layer.out_features, in_size, dim)
        self.in_size = in_size
        self._matrices: dict[tuple, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    @property
    def dim(self) -> int:
        return (self.k_out or self.layer.out_features) * (self.k_in or self.in_size)

    def matrices(self, dtype, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P_out (k_out, out), P_in (k_in, in [+1 for bias])); None for a side kept exact."""
        key = (dtype, str(device))
        if key not in self._matrices:
            p_out = p_in = None
            if self.k_out is not None:
                p_out = random_matrix(
                    stream_key(self.seed, self.layer.name, "out"),
                    self.k_out,
                    self.layer.out_features,
                    "gaussian",
                    dtype,
                    device,
                )
            if self.k_in is not None:
                p_in = random_matrix(
                    stream_key(self.seed, self.layer.name, "in"),
                    self.k_in,
                    self.in_size,
                    "gaussian",
                    dtype,
                    device,
                )
            self._matrices[key] = (p_out, p_in)
        return self._matrices[key]

    def prepare(self, inputs):
        if self.layer.kind == "embedding":
            return self._prepare_ids(inputs)
        _, p_in = self.matrices(inputs.dtype, inputs.device)
        if p_in is None:
            if self.layer.has_bias:
                ones = torch.ones(*inputs.shape[:-1], 1, dtype=inputs.dtype, device=inputs.device)
                return torch.cat([inputs, ones], dim=-1)
            return inputs
        if self.layer.has_bias:
            # [a, 1] @ P_in^T = a @ P_in[:, :-1]^T + P_in[:, -1]: no concatenated copy of the activations.
            return torch.addmm(p_in[:, -1], inputs.reshape(-1, inputs.shape[-1]), p_in[:, :-1].T).reshape(
                *inputs.shape[:-1], -1
            )
        return inputs @ p_in.T

    def _prepare_ids(self, ids):
        # The "input" of an embedding is the one-hot of its token, and P_in one_hot = a column of P_in: the
        # gather happens in combine, where the gradient's dtype is known.
        return ids

    def combine(self, prepared, grad_out):
        p_out, p_in = self.matrices(grad_out.dtype, grad_out.device)
        if self.layer.kind == "embedding":
            ids = prepared
            if p_in is None:
                raise InvalidInputError(
                    "factorized projection of an embedding needs a projected vocabulary side"
                )
            left = p_in.T[ids]  # (B, T, k_in): P_in[:, id_t]
            mask = _padding_mask(ids, self.padding_idx)
            if mask is not None:
                left = left * mask[..., None].to(left.dtype)
        else:
            left = prepared
        right = grad_out if p_out is None else grad_out @ p_out.T  # (B, T, k_out)
        return torch.einsum("bto,bti->boi", right, left).reshape(grad_out.shape[0], -1)


class TokensProjector(Projector):
    """The embedding's exact row-sparse gradient as token rows (influence.tokens): per row, its distinct
    tokens with the summed output gradient of each. dim >= the embedding width keeps the vectors exact;
    a smaller dim sketches every token's vector with one seeded Gaussian (dim x width) matrix."""

    kind = "tokens"

    def __init__(self, layer: Layer, dim: int, seed: int, padding_idx: int | None = None):
        if layer.kind != "embedding":
            raise InvalidInputError(f"projection `tokens` is for embeddings; {layer.name} is a {layer.kind}")
        super().__init__(layer, dim, seed)
        self.padding_idx = padding_idx
        self.sketch = dim < layer.out_features
        self.key = stream_key(seed, layer.name, "tokens")
        self._matrices: dict[tuple, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.target_dim if self.sketch else self.layer.out_features

    def prepare(self, inputs):
        return inputs

    def combine(self, prepared, grad_out):
        mask = _padding_mask(prepared, self.padding_idx)
        if mask is not None:
            grad_out = grad_out * mask[..., None].to(grad_out.dtype)
        if self.sketch:
            key = (grad_out.dtype, str(grad_out.device))
            if key not in self._matrices:
                self._matrices[key] = random_matrix(
                    self.key,
                    self.target_dim,
                    self.layer.out_features,
                    "gaussian",
                    grad_out.dtype,
                    grad_out.device,
                )
            grad_out = grad_out @ self._matrices[key].T
        return TokenRows.from_positions(prepared, grad_out)


PROJECTORS: dict[str, type[Projector]] = {
    "tokens": TokensProjector,
    "identity": IdentityProjector,
    "gaussian": DenseProjector,
    "rademacher": DenseProjector,
    "factorized": FactorizedProjector,
}


def make_projector(spec: ProjectionSpec, layer: Layer, padding_idx: int | None = None) -> Projector:
    """The projector of one layer unit; deterministic from (spec.seed, layer.name) and the unit's choice."""
    unit = spec.for_layer(layer)
    cls = PROJECTORS[unit.kind]
    if cls is DenseProjector:
        projector: Projector = DenseProjector(layer, unit.dim, spec.seed, padding_idx, kind=unit.kind)
    else:
        projector = cls(layer, unit.dim, spec.seed, padding_idx)  # type: ignore[call-arg]
    if unit.kind == "identity" and projector.dim > MAX_IDENTITY_DIM:
        raise InvalidInputError(
            f"identity projection of {layer.name} would store {projector.dim} numbers per row "
            f"(limit {MAX_IDENTITY_DIM}); use a factorized or dense projection"
        )
    return projector
