"""Projection fidelity: how well each unit's stored features keep its exact grad-dot scores (method.md §2).

On a sample of training rows z_i and query rows x_j, per layer unit u:

    exact      S[i, j] = <G_u(z_i), G_u(x_j)>, without ever forming G (so any unit size is affordable):
                   Linear / Conv1D  G = sum_t d_t a_t^T       =>  S = sum_{t in z_i, s in x_j} (d_t . d_s)(a_t . a_s)
                   Embedding        G = sum_t e_{id_t} d_t^T  =>  S = sum_{t, s} [id_t = id_s] (d_t . d_s)
               with a_t the unit's input at token t ([a_t, 1] when it has a bias), d_t its output gradient,
               and positions where d_t = 0 dropped (padding: they add nothing). Kernels in float64.
    projected  P[i, j] = F_u(z_i) . F_u(x_j), the unit's features under the store's projection, cast to the
               store's dtype as the store keeps them (float16 by default), dot in float64.

and three numbers per unit: `spearman`, the mean over queries of Spearman's rank correlation between P[:, j]
and S[:, j] (the ranking a query answer shows); `rel_error` = ||P - S||_F / ||S||_F; `top10_overlap`, the mean
share of the exact 10 highest-scoring rows of a query that are among the projected 10 highest. A unit stored
exactly (identity) scores 1 up to the dtype's rounding.

Both sides come from one forward and backward pass per batch: the hooks keep every unit's (inputs, output
gradients), the exact kernels use them as they are and the unit's projector turns them into features, so the
two are computed from the very same numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from influence.data import Example, encode_examples, iter_batches, pad_token_id
from influence.errors import InvalidInputError
from influence.gradients import DEFAULT_HEAD_CHUNK_TOKENS, HookedModel, _padding_idx
from influence.layers import Layer
from influence.projection import ProjectionSpec, make_projector
from influence.tokens import TokenRows

TOP_K = 10
# Below this Spearman a unit's rankings (and the AUC-NDR of comparisons that use it) are uncertain.
FIDELITY_WARNING = 0.9


@dataclass(frozen=True)
class UnitFidelity:
    """Agreement of one unit's projected scores with its exact scores on the sample."""

    spearman: float
    spearman_min: float
    rel_error: float
    top10_overlap: float

    def to_dict(self) -> dict[str, float]:
        return {key: round(value, 6) for key, value in asdict(self).items()}


@dataclass
class _Tokens:
    """One unit's kept tokens of a set of rows: inputs (n, in) or token ids (n,), output gradients (n, out),
    and the row (0 .. rows-1) each token belongs to."""

    inputs: torch.Tensor
    grads: torch.Tensor
    rows: torch.Tensor


class _Capture:
    """A tap handler that keeps a unit's inputs and output gradients and returns its projected features."""

    def __init__(self, layer: Layer, projector, padding_idx: int | None):
        self.layer = layer
        self.projector = projector
        self.padding_idx = padding_idx
        self.kept: _Tokens | None = None

    def prepare(self, inputs):
        return inputs

    def combine(self, inputs, grad_out):
        if self.layer.kind == "embedding" and self.padding_idx is not None:
            grad_out = grad_out * (inputs != self.padding_idx)[..., None].to(grad_out.dtype)
        batch = grad_out.shape[0]
        keep = grad_out.reshape(-1, grad_out.shape[-1]).abs().amax(dim=1) > 0
        rows = torch.arange(batch, device=grad_out.device).repeat_interleave(grad_out.shape[1])[keep]
        flat_inputs = inputs.reshape(batch * inputs.shape[1], *inputs.shape[2:])[keep]
        if self.layer.kind != "embedding" and self.layer.has_bias:
            ones = torch.ones(len(flat_inputs), 1, dtype=flat_inputs.dtype, device=flat_inputs.device)
            flat_inputs = torch.cat([flat_inputs, ones], dim=1)
        tokens = _Tokens(flat_inputs.double(), grad_out.reshape(-1, grad_out.shape[-1])[keep].double(), rows)
        # A module called twice in one forward: both uses are kept, as the gradient sums them.
        if self.kept is None:
            self.kept = tokens
        else:
            self.kept = _Tokens(
                torch.cat([self.kept.inputs, tokens.inputs]),
                torch.cat([self.kept.grads, tokens.grads]),
                torch.cat([self.kept.rows, tokens.rows]),
            )
        return self.projector.combine(self.projector.prepare(inputs), grad_out)


def exact_scores(layer: Layer, left: _Tokens, right: _Tokens, n_left: int, n_right: int) -> torch.Tensor:
    """S[i, j] = <G(row i of left), G(row j of right)> (float64) from the rows' tokens, per the kernels above."""
    grad_kernel = left.grads @ right.grads.T
    if layer.kind == "embedding":
        input_kernel = (left.inputs[:, None] == right.inputs[None, :]).to(grad_kernel.dtype)
    else:
        input_kernel = left.inputs @ right.inputs.T
    tokens = grad_kernel * input_kernel  # (tokens of left, tokens of right)
    by_right = torch.zeros(len(left.rows), n_right, dtype=tokens.dtype)
    by_right.index_add_(1, right.rows.cpu(), tokens.cpu())
    out = torch.zeros(n_left, n_right, dtype=tokens.dtype)
    out.index_add_(0, left.rows.cpu(), by_right)
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    # scipy.stats is imported lazily: only a fidelity measurement needs it, not every import of influence.
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def agreement(projected: np.ndarray, exact: np.ndarray, k: int = TOP_K) -> UnitFidelity:
    """The three numbers of one unit from its (train rows, queries) projected and exact score matrices."""
    k = min(k, exact.shape[0])
    rhos, overlaps = [], []
    for j in range(exact.shape[1]):
        rho = _spearman(projected[:, j], exact[:, j])
        if rho == rho:
            rhos.append(rho)
        top_exact = set(np.argsort(-exact[:, j], kind="stable")[:k].tolist())
        top_projected = set(np.argsort(-projected[:, j], kind="stable")[:k].tolist())
        overlaps.append(len(top_exact & top_projected) / k)
    norm = float(np.linalg.norm(exact))
    return UnitFidelity(
        spearman=statistics.fmean(rhos) if rhos else 0.0,
        spearman_min=min(rhos) if rhos else 0.0,
        rel_error=float(np.linalg.norm(projected - exact)) / norm if norm > 0 else 0.0,
        top10_overlap=statistics.fmean(overlaps),
    )


def _pass(
    model: nn.Module,
    layers: Sequence[Layer],
    handlers: dict[str, _Capture],
    batch,
    memory: dict[str, Any] | None = None,
):
    """One forward + backward of `batch`: (kept tokens per unit, projected features per unit (B, dim))."""
    for handler in handlers.values():
        handler.kept = None
    with HookedModel(model, layers, handlers, **(memory or {})) as hooked:
        features, _, _ = hooked.backward_per_sample(batch)
    return {name: handler.kept for name, handler in handlers.items()}, features


def _empty(layer: Layer) -> _Tokens:
    width = 0 if layer.kind == "embedding" else layer.in_features + int(layer.has_bias)
    shape = (0,) if layer.kind == "embedding" else (0, width)
    return _Tokens(
        torch.zeros(shape, dtype=torch.float64),
        torch.zeros(0, layer.out_features, dtype=torch.float64),
        torch.zeros(0, dtype=torch.int64),
    )


def measure_fidelity(
    model: nn.Module,
    tokenizer,
    layers: Sequence[Layer],
    projection: ProjectionSpec,
    train: Sequence[Example],
    queries: Sequence[Example],
    task: str,
    *,
    max_length: int = 128,
    dtype: str = "float16",
    batch_size: int = 16,
    head_chunk_tokens: int | None = DEFAULT_HEAD_CHUNK_TOKENS,
    checkpointing: bool = False,
) -> dict[str, UnitFidelity]:
    """Per-unit fidelity of `projection` on a sample: `train` rows scored against `queries` (module doc).
    head_chunk_tokens and checkpointing bound the memory of each pass as in featurization (the features do not
    change)."""
    if len(train) < 2 or not queries:
        raise InvalidInputError("fidelity needs at least 2 training rows and 1 query row")
    if dtype not in ("float16", "float32"):
        raise InvalidInputError(f"dtype must be float16 or float32, got {dtype!r}")
    model.eval()
    spec = projection.resolved(layers)
    device = next(model.parameters()).device
    handlers = {
        layer.name: _Capture(
            layer, make_projector(spec, layer, _padding_idx(model, layer)), _padding_idx(model, layer)
        )
        for layer in layers
    }
    pad = pad_token_id(tokenizer)
    store_dtype = np.dtype(dtype)
    memory = {"head_chunk_tokens": head_chunk_tokens, "checkpointing": checkpointing}

    def batches(examples):
        encoded = encode_examples(tokenizer, examples, task, max_length)
        return iter_batches(encoded, pad, task, batch_size, sort_by_length=False)

    # Queries first: their tokens are kept for the whole run (rows x tokens x (in + out) per unit).
    query_tokens: dict[str, list[_Tokens]] = {layer.name: [] for layer in layers}
    query_features: dict[str, list[Any]] = {layer.name: [] for layer in layers}
    offset = 0
    for batch in batches(queries):
        kept, features = _pass(model, layers, handlers, batch.to(device), memory)
        for layer in layers:
            tokens = kept[layer.name] or _empty(layer)
            query_tokens[layer.name].append(_Tokens(tokens.inputs, tokens.grads, tokens.rows + offset))
            query_features[layer.name].append(
                _stored(features.get(layer.name), len(batch), handlers[layer.name], store_dtype)
            )
        offset += len(batch)
    right = {
        name: _Tokens(*(torch.cat([getattr(t, part) for t in parts]) for part in ("inputs", "grads", "rows")))
        for name, parts in query_tokens.items()
    }
    right_features = {
        name: TokenRows.concat(parts) if isinstance(parts[0], TokenRows) else np.concatenate(parts)
        for name, parts in query_features.items()
    }

    exact = {layer.name: np.zeros((len(train), len(queries))) for layer in layers}
    projected = {layer.name: np.zeros((len(train), len(queries))) for layer in layers}
    offset = 0
    for batch in batches(train):
        kept, features = _pass(model, layers, handlers, batch.to(device), memory)
        rows = slice(offset, offset + len(batch))
        for layer in layers:
            tokens = kept[layer.name] or _empty(layer)
            exact[layer.name][rows] = exact_scores(
                layer, tokens, right[layer.name], len(batch), len(queries)
            ).numpy()
            mine = _stored(features.get(layer.name), len(batch), handlers[layer.name], store_dtype)
            if isinstance(mine, TokenRows):
                projected[layer.name][rows] = mine.dot(right_features[layer.name], torch.float64).numpy()
            else:
                projected[layer.name][rows] = mine @ right_features[layer.name].T
        offset += len(batch)
    return {layer.name: agreement(projected[layer.name], exact[layer.name]) for layer in layers}


def _stored(features: Any, rows: int, handler: _Capture, dtype: np.dtype) -> Any:
    """Features as the store keeps them (float32, then the store's dtype), as float64."""
    if isinstance(features, TokenRows):
        return TokenRows(
            features.offsets, features.tokens, _stored(features.values, 0, handler, dtype), check=False
        )
    if features is None:
        return np.zeros((rows, handler.projector.dim))
    return features.detach().to(torch.float32).cpu().numpy().astype(dtype).astype(np.float64)
