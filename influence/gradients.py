"""Per-sample gradients of a whole batch, per layer unit, from hooks: no loop over samples or tokens.

One forward and one backward pass per batch. A forward hook on each selected unit keeps what the projector
needs of the unit's input (activations, or token ids for the embedding) and wraps the unit's output in a
*tap*: an identity autograd node whose backward receives the output gradient d (B, T, out) and hands it,
with the kept input, to the projector (projection.py). Every tap also takes a shared scalar *anchor*, and
the backward pass is `autograd.grad(sum of per-sample losses, anchor)`: autograd then runs exactly the part
of the graph between the loss and the earliest selected unit, computes no parameter gradient at all (the
taps replace them), and works on frozen models (LoRA bases, frozen embeddings) because the anchor makes
every tapped output require grad.

Per-sample losses are summed, so the gradient reaching sample b's activations is the gradient of sample b's
own loss: samples do not interact in a transformer in eval mode (no batch norm, dropout off).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from influence.data import IGNORE_INDEX, Batch
from influence.errors import InvalidInputError
from influence.layers import Layer, get_module
from influence.metrics import CancellationAccumulator
from influence.projection import (
    IdentityProjector,
    ProjectionSpec,
    exact_linear_gradient,
    make_projector,
)
from influence.threads import ONE_THREAD, is_small_batch
from influence.tokens import TokenRows


def per_sample_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of each sample (B,) and the logits.

    classification: cross-entropy of the label. causal-lm: mean cross-entropy over the sample's completion
    tokens (labels != IGNORE_INDEX, shifted by one: token t+1 is predicted at position t); the prompt is masked.
    """
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = output.logits
    if batch.task == "classification":
        if logits.shape[-1] < 2:
            raise InvalidInputError(
                "classification needs a model with at least 2 labels (regression heads unsupported)"
            )
        return F.cross_entropy(logits, batch.labels, reduction="none"), logits
    targets = batch.labels[:, 1:]
    token_losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_losses.sum(dim=1) / counts, logits


class UnitHandler(Protocol):
    """What a tap calls: `prepare` in the forward pass, `combine` with the output gradient in the backward."""

    def prepare(self, inputs: torch.Tensor) -> Any: ...

    def combine(self, prepared: Any, grad_out: torch.Tensor) -> torch.Tensor | None: ...


class _GradTap(torch.autograd.Function):
    """Identity on `output`; its backward passes the output gradient to `callback`."""

    @staticmethod
    def forward(ctx, output, anchor, callback):
        ctx.callback = callback
        ctx.anchor_meta = (anchor.dtype, anchor.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback(grad)
        dtype, device = ctx.anchor_meta
        return grad, torch.zeros((), dtype=dtype, device=device), None


def _as_tokens(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, ..., width) -> (B, T, width): a pooled (B, width) input is one token per sample."""
    if tensor.dim() == 2 and tensor.shape[0] == batch_size and tensor.dtype.is_floating_point:
        return tensor.unsqueeze(1)
    if tensor.dim() > 3 and tensor.dtype.is_floating_point:
        return tensor.reshape(batch_size, -1, tensor.shape[-1])
    return tensor


class HookedModel:
    """Installs taps on selected layer units for the duration of a `with` block."""

    def __init__(self, model: nn.Module, layers: Sequence[Layer], handlers: Mapping[str, UnitHandler]):
        self.model = model
        self.layers = list(layers)
        self.handlers = handlers
        self._removers: list[Any] = []
        self._anchor: torch.Tensor | None = None
        self._batch_size = 0
        self.results: dict[str, torch.Tensor] = {}

    def __enter__(self) -> HookedModel:
        for layer in self.layers:
            module = get_module(self.model, layer)
            self._removers.append(module.register_forward_hook(self._forward_hook(layer.name)))
        return self

    def __exit__(self, *exc) -> None:
        for remove in self._removers:
            remove.remove()
        self._removers.clear()

    def _forward_hook(self, name: str) -> Callable:
        handler = self.handlers[name]

        def hook(module, args, output):
            if self._anchor is None:
                return None  # not inside `backward_per_sample`: leave the model untouched
            prepared = handler.prepare(_as_tokens(args[0].detach(), self._batch_size))

            def on_grad(grad: torch.Tensor) -> None:
                result = handler.combine(prepared, _as_tokens(grad, self._batch_size))
                if result is not None:
                    # A module called twice in one forward contributes the sum of both uses.
                    previous = self.results.get(name)
                    self.results[name] = result if previous is None else previous + result

            return _GradTap.apply(output, self._anchor, on_grad)

        return hook

    def backward_per_sample(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One forward + backward: ({unit: handler result}, per-sample losses (B,), logits)."""
        param = next(self.model.parameters())
        self._anchor = torch.zeros((), dtype=param.dtype, device=param.device, requires_grad=True)
        self._batch_size = len(batch)
        self.results = {}
        try:
            with torch.enable_grad():
                losses, logits = per_sample_losses(self.model, batch)
                torch.autograd.grad(losses.sum(), self._anchor, allow_unused=True)
        finally:
            self._anchor = None
        return self.results, losses.detach(), logits.detach()


def _padding_idx(model: nn.Module, layer: Layer) -> int | None:
    return getattr(get_module(model, layer), "padding_idx", None) if layer.kind == "embedding" else None


@dataclass
class FeatureBatch:
    """Projected per-sample gradients of one batch: features[unit] is (B, dim_unit), or TokenRows of B rows
    for a unit projected as `tokens` (the exact embedding)."""

    features: dict[str, torch.Tensor]
    losses: torch.Tensor
    logits: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        """Predicted class per sample (classification)."""
        return self.logits.argmax(dim=-1)


class Featurizer:
    """Projected per-sample gradients for a fixed model, layer selection and projection.

    The model is put in eval mode: influence is defined on the deterministic network (dropout off).
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer], projection: ProjectionSpec):
        if not layers:
            raise InvalidInputError("no layers selected")
        self.model = model.eval()
        self.layers = list(layers)
        # The resolved spec (every unit's projection named) is what a store's manifest records.
        self.projection = projection.resolved(self.layers)
        self.projectors = {
            layer.name: make_projector(self.projection, layer, _padding_idx(model, layer)) for layer in self.layers
        }

    @property
    def dims(self) -> dict[str, int]:
        """Feature size per unit."""
        return {name: projector.dim for name, projector in self.projectors.items()}

    def featurize(self, batch: Batch) -> FeatureBatch:
        """Features of one batch, on the model's device; units the loss does not reach get zeros.

        Small batches on CPU (a query's few examples) run on one intra-op thread where that is faster
        (influence.threads)."""
        device = next(self.model.parameters()).device
        if device.type == "cpu" and is_small_batch(*batch.input_ids.shape):
            return ONE_THREAD.run_small(self._featurize, batch, device)
        return self._featurize(batch, device)

    def _featurize(self, batch: Batch, device: torch.device) -> FeatureBatch:
        batch = batch.to(device)
        with HookedModel(self.model, self.layers, self.projectors) as hooked:
            results, losses, logits = hooked.backward_per_sample(batch)
        features = {}
        for name, projector in self.projectors.items():
            value = results.get(name)
            if value is None and projector.kind == "tokens":
                value = TokenRows.empty(len(batch), projector.dim, logits.dtype)
            elif value is None:
                value = torch.zeros(len(batch), projector.dim, dtype=logits.dtype, device=device)
            features[name] = value
        return FeatureBatch(features, losses, logits)


def per_sample_gradients(model: nn.Module, batch: Batch, layers: Sequence[Layer]) -> dict[str, torch.Tensor]:
    """Exact, unprojected per-sample gradients {unit: (B, p_unit)} in each parameter's layout
    [weight.flatten(), bias]. For checks and small models: an embedding gives B x vocab x dim numbers."""
    model.eval()
    handlers = {layer.name: IdentityProjector(layer, 0, 0, _padding_idx(model, layer)) for layer in layers}
    device = next(model.parameters()).device
    batch = batch.to(device)
    with HookedModel(model, layers, handlers) as hooked:
        results, _, logits = hooked.backward_per_sample(batch)
    return {
        layer.name: results.get(
            layer.name, torch.zeros(len(batch), layer.num_params, dtype=logits.dtype, device=device)
        )
        for layer in layers
    }


class _CancellationHandler:
    """Streams the two sums that cancellation needs (per-sample L1 norms and the gradient sum), raw space.

    Embeddings stay row-sparse: per-sample rows are formed only for (sample, token) pairs present.
    """

    def __init__(self, layer: Layer, padding_idx: int | None):
        self.layer = layer
        self.padding_idx = padding_idx
        self.l1_norms: list[torch.Tensor] = []
        self.grad_sum: torch.Tensor | None = None

    def prepare(self, inputs):
        return inputs

    def _add(self, l1: torch.Tensor, total: torch.Tensor) -> None:
        self.l1_norms.append(l1.double().cpu())
        total = total.double()
        self.grad_sum = total if self.grad_sum is None else self.grad_sum + total

    def combine(self, prepared, grad_out):
        if self.layer.kind != "embedding":
            flat = exact_linear_gradient(self.layer, prepared, grad_out)
            self._add(flat.abs().sum(dim=1), flat.sum(dim=0))
            return None
        ids = prepared
        if self.padding_idx is not None:
            grad_out = grad_out * (ids != self.padding_idx)[..., None].to(grad_out.dtype)
        batch, _, width = grad_out.shape
        sample = torch.arange(batch, device=ids.device)[:, None].expand_as(ids)
        pairs, inverse = torch.unique(sample * self.layer.rows + ids, return_inverse=True)
        rows = torch.zeros(len(pairs), width, dtype=grad_out.dtype, device=grad_out.device)
        rows.index_add_(0, inverse.reshape(-1), grad_out.reshape(-1, width))
        l1 = torch.zeros(batch, dtype=rows.dtype, device=rows.device)
        l1.index_add_(0, pairs // self.layer.rows, rows.abs().sum(dim=1))
        total = torch.zeros(self.layer.rows, width, dtype=rows.dtype, device=rows.device)
        total.index_add_(0, pairs % self.layer.rows, rows)
        self._add(l1, total.reshape(-1))
        return None


def layer_cancellation(
    model: nn.Module, layers: Sequence[Layer], batches: Iterable[Batch], max_samples: int = 1024
) -> dict:
    """Cancellation per unit (method.md §5) in raw parameter space over at most `max_samples` samples.

    Returns {unit: metrics.Cancellation}.
    """
    model.eval()
    handlers = {layer.name: _CancellationHandler(layer, _padding_idx(model, layer)) for layer in layers}
    accumulators = {layer.name: CancellationAccumulator() for layer in layers}
    device = next(model.parameters()).device
    seen = 0
    for batch in batches:
        if seen >= max_samples:
            break
        keep = min(len(batch), max_samples - seen)
        if keep < len(batch):
            batch = Batch(
                batch.input_ids[:keep],
                batch.attention_mask[:keep],
                batch.labels[:keep],
                batch.task,
                batch.row_ids[:keep],
            )
        with HookedModel(model, layers, handlers) as hooked:
            hooked.backward_per_sample(batch.to(device))
        for name, handler in handlers.items():
            if handler.grad_sum is not None:
                accumulators[name].add(torch.cat(handler.l1_norms), handler.grad_sum)
            handler.l1_norms, handler.grad_sum = [], None
        seen += keep
    return {name: accumulator.result() for name, accumulator in accumulators.items()}
