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

At LLM scale two things dominate memory, and both have a switch:
- the vocabulary-wide head: its logits and their gradient for every token of the batch (B x T x V, in float32
  for the loss). A causal LM whose logits are head(trunk(x)) (`causal_lm_parts`) is run as the trunk up to its
  final hidden states h, then the head and the loss chunk by chunk over positions (<= head_chunk_tokens tokens
  each), each chunk's backward stopping at a detached copy of h; one backward of the trunk from the gradient
  gathered on h follows. The head's taps see every chunk, and their results add up (a sum over tokens).
- the blocks' activations: with `checkpointing`, each transformer block runs under torch.utils.checkpoint
  (non-reentrant, which works in eval mode, unlike transformers' own switch) and recomputes its activations in
  the backward pass; the taps ignore the recomputation, so nothing is recorded twice.
A low-precision model (bfloat16 weights) hands its handlers float32 activations and gradients: projections and
their sums are float32 whatever the weights are.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from influence.data import IGNORE_INDEX, Batch
from influence.errors import InvalidInputError
from influence.layers import Layer, find_blocks, get_module
from influence.metrics import CancellationAccumulator
from influence.projection import (
    IdentityProjector,
    ProjectionSpec,
    exact_linear_gradient,
    make_projector,
)
from influence.threads import ONE_THREAD, is_small_batch
from influence.tokens import TokenRows

# Tokens whose vocabulary-wide logits a causal LM's loss holds at once (the library's default; the service
# passes its head_chunk_tokens setting). None: the whole batch at once.
DEFAULT_HEAD_CHUNK_TOKENS = 1024
# Config fields of architectures whose logits are not the head's output as it is (a non-linear cap): their
# loss is computed from the model's own logits, unchunked.
_LOGIT_TRANSFORMS = ("final_logit_softcapping",)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype features, losses and projections are computed in: float32 for bfloat16 / float16 weights, the
    weights' own dtype otherwise (float64 checks stay float64)."""
    return torch.float32 if dtype.is_floating_point and torch.finfo(dtype).bits < 32 else dtype


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(accumulation_dtype(tensor.dtype)) if tensor.is_floating_point() else tensor


def _model_kwargs(model: nn.Module) -> dict[str, Any]:
    # No key/value cache: nothing reads it, it costs memory, and a checkpointed block would update it twice.
    return (
        {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    )


def _causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B,) sum over positions of the cross-entropy of `targets` (B, t) from `logits` (B, t, V), over `counts`."""
    token_losses = F.cross_entropy(
        _widened(logits).transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return token_losses.sum(dim=1) / counts


def _completion_counts(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def per_sample_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of each sample (B,) and the logits, from one forward of the whole model.

    classification: cross-entropy of the label. causal-lm: mean cross-entropy over the sample's completion
    tokens (labels != IGNORE_INDEX, shifted by one: token t+1 is predicted at position t); the prompt is masked.
    The loss is computed in float32 at least (bfloat16 logits are widened first).
    """
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **_model_kwargs(model))
    logits = output.logits
    if batch.task == "classification":
        if logits.shape[-1] < 2:
            raise InvalidInputError(
                "classification needs a model with at least 2 labels (regression heads unsupported)"
            )
        return F.cross_entropy(_widened(logits), batch.labels, reduction="none"), logits
    targets = batch.labels[:, 1:]
    return _causal_lm_loss(logits[:, :-1], targets, _completion_counts(targets)), logits


_PARTS: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, nn.Module] | None] = weakref.WeakKeyDictionary()


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(trunk, head) of a causal LM whose logits are head(trunk(...)[0]), else None.

    The trunk is the model's base model (transformers' `base_model_prefix`: `model` for Llama / Qwen2,
    `transformer` for GPT-2; under a PEFT wrapper, its base model's), the head its output embeddings. Models
    that transform the head's output (a logit cap or scale) or put more between the two (BERT's LM transform)
    are told apart by a probe, once per model object: the split's logits of a few tokens must equal the
    model's own."""
    if model in _PARTS:
        return _PARTS[model]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    prefix = getattr(base, "base_model_prefix", "")
    trunk = getattr(base, prefix, None) if prefix else None
    parts = None
    config = getattr(base, "config", None)
    if (
        isinstance(head, nn.Module)
        and isinstance(trunk, nn.Module)
        and trunk is not base
        and not any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS)
        and _split_matches(base, trunk, head)
    ):
        parts = (trunk, head)
    _PARTS[model] = parts
    return parts


def _split_matches(base: nn.Module, trunk: nn.Module, head: nn.Module) -> bool:
    device = next(base.parameters()).device
    vocab = int(getattr(head, "out_features", 0) or getattr(base.config, "vocab_size", 0) or 2)
    ids = (torch.arange(1, 9, device=device) % vocab)[None]
    mask = torch.ones_like(ids)
    kwargs = _model_kwargs(base)
    try:
        with torch.no_grad():
            full = base(input_ids=ids, attention_mask=mask, **kwargs).logits
            split = head(trunk(input_ids=ids, attention_mask=mask, **kwargs)[0])
    except (TypeError, ValueError, AttributeError, IndexError, RuntimeError):
        return False  # a trunk that cannot be called on its own: the whole model is used instead
    return full.shape == split.shape and bool(
        torch.allclose(split.float(), full.float(), rtol=1e-3, atol=1e-5)
    )


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Within the block, every transformer block of `model` recomputes its activations in the backward pass
    (torch.utils.checkpoint, non-reentrant: in eval mode too, and through torch.autograd.grad)."""
    _, blocks = find_blocks(model)
    missing = object()
    saved = [(block, block.__dict__.get("forward", missing)) for block in blocks]
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield
    finally:
        for block, previous in saved:
            if previous is missing:
                del block.forward
            else:
                block.forward = previous


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
    """Installs taps on selected layer units for the duration of a `with` block.

    head_chunk_tokens: a causal LM's head and loss run over chunks of at most this many tokens (module doc);
    None runs them over the whole batch. checkpointing: blocks recompute their activations in backward."""

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[Layer],
        handlers: Mapping[str, UnitHandler],
        *,
        head_chunk_tokens: int | None = DEFAULT_HEAD_CHUNK_TOKENS,
        checkpointing: bool = False,
    ):
        if head_chunk_tokens is not None and head_chunk_tokens < 1:
            raise InvalidInputError(f"head_chunk_tokens must be at least 1, got {head_chunk_tokens}")
        self.model = model
        self.layers = list(layers)
        self.handlers = handlers
        self.head_chunk_tokens = head_chunk_tokens
        self.checkpointing = checkpointing
        self._removers: list[Any] = []
        self._stack = contextlib.ExitStack()
        self._anchor: torch.Tensor | None = None
        # True while autograd runs: a checkpointed block's recomputation calls the hooks again, and they must
        # neither capture nor tap then (the backward reaches the taps of the original forward only).
        self._in_backward = False
        self._batch_size = 0
        self.results: dict[str, torch.Tensor] = {}

    def __enter__(self) -> HookedModel:
        for layer in self.layers:
            module = get_module(self.model, layer)
            self._removers.append(module.register_forward_hook(self._forward_hook(layer.name)))
        if self.checkpointing:
            self._stack.enter_context(checkpointed_blocks(self.model))
        return self

    def __exit__(self, *exc) -> None:
        for remove in self._removers:
            remove.remove()
        self._removers.clear()
        self._stack.close()

    def _forward_hook(self, name: str) -> Callable:
        handler = self.handlers[name]

        def hook(module, args, output):
            if self._anchor is None or self._in_backward:
                return None  # outside `backward_per_sample`, or a recomputation: leave the model untouched
            prepared = handler.prepare(_as_tokens(_widened(args[0].detach()), self._batch_size))

            def on_grad(grad: torch.Tensor) -> None:
                result = handler.combine(prepared, _as_tokens(_widened(grad), self._batch_size))
                if result is not None:
                    # A module called twice in one forward, or a head run chunk by chunk, contributes the sum.
                    previous = self.results.get(name)
                    self.results[name] = result if previous is None else previous + result

            return _GradTap.apply(output, self._anchor, on_grad)

        return hook

    def _grad(self, output: torch.Tensor, grad_output: torch.Tensor | None = None, inputs=()) -> tuple:
        """torch.autograd.grad of `output` to the anchor (running the taps) and to `inputs`."""
        if not output.requires_grad:
            return (None,) * (1 + len(inputs))
        self._in_backward = True
        try:
            return torch.autograd.grad(
                output, [self._anchor, *inputs], grad_outputs=grad_output, allow_unused=True
            )
        finally:
            self._in_backward = False

    def backward_per_sample(
        self, batch: Batch
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """One forward + backward: ({unit: handler result}, per-sample losses (B,), logits). The logits are
        None when a causal LM's head ran chunk by chunk (they never existed whole)."""
        param = next(self.model.parameters())
        parts = None
        if batch.task == "causal-lm" and self.head_chunk_tokens is not None:
            parts = causal_lm_parts(self.model)
        self._anchor = torch.zeros((), dtype=param.dtype, device=param.device, requires_grad=True)
        self._batch_size = len(batch)
        self.results = {}
        try:
            with torch.enable_grad():
                if parts is None:
                    losses, logits = per_sample_losses(self.model, batch)
                    self._grad(losses.sum())
                else:
                    losses, logits = self._chunked_losses(*parts, batch), None
        finally:
            self._anchor = None
        return self.results, losses.detach(), None if logits is None else logits.detach()

    def _chunked_losses(self, trunk: nn.Module, head: nn.Module, batch: Batch) -> torch.Tensor:
        """The causal-LM loss and its backward with the head's logits held for one chunk of positions at a
        time; each chunk's loss is its completion tokens' summed cross-entropy over the sample's whole count,
        so the chunks add up to the mean that per_sample_losses takes."""
        assert self.head_chunk_tokens is not None
        kwargs = _model_kwargs(self.model)
        hidden = trunk(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)[0]
        targets = batch.labels[:, 1:]
        counts = _completion_counts(targets)
        rows, positions = targets.shape
        width = max(1, self.head_chunk_tokens // rows)
        losses = torch.zeros(rows, dtype=accumulation_dtype(hidden.dtype), device=hidden.device)
        hidden_grad = torch.zeros_like(hidden) if hidden.requires_grad else None
        for start in range(0, positions, width):
            stop = min(start + width, positions)
            chunk_targets = targets[:, start:stop]
            if not bool((chunk_targets != IGNORE_INDEX).any()):
                continue  # prompt or padding only: no loss, no gradient
            inputs = hidden[:, start:stop].detach().requires_grad_(hidden_grad is not None)
            chunk = _causal_lm_loss(head(inputs), chunk_targets, counts)
            losses += chunk.detach()
            grads = self._grad(chunk.sum(), inputs=(inputs,) if hidden_grad is not None else ())
            if hidden_grad is not None and grads[1] is not None:
                hidden_grad[:, start:stop] = grads[1]
            del chunk, grads
        if hidden_grad is not None:
            self._grad(hidden, hidden_grad)
        return losses


def _padding_idx(model: nn.Module, layer: Layer) -> int | None:
    return getattr(get_module(model, layer), "padding_idx", None) if layer.kind == "embedding" else None


@dataclass
class FeatureBatch:
    """Projected per-sample gradients of one batch: features[unit] is (B, dim_unit), or TokenRows of B rows
    for a unit projected as `tokens` (the exact embedding)."""

    features: dict[str, torch.Tensor]
    losses: torch.Tensor
    logits: torch.Tensor | None  # None: a causal LM's head ran chunk by chunk (HookedModel)

    @property
    def predictions(self) -> torch.Tensor:
        """Predicted class per sample (classification)."""
        if self.logits is None:
            raise InvalidInputError("predictions are for classification; this batch kept no logits")
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
            layer.name: make_projector(self.projection, layer, _padding_idx(model, layer))
            for layer in self.layers
        }

    @property
    def dims(self) -> dict[str, int]:
        """Feature size per unit."""
        return {name: projector.dim for name, projector in self.projectors.items()}

    def featurize(
        self,
        batch: Batch,
        *,
        head_chunk_tokens: int | None = DEFAULT_HEAD_CHUNK_TOKENS,
        checkpointing: bool = False,
    ) -> FeatureBatch:
        """Features of one batch, on the model's device, float32 at least (bfloat16 weights included); units the
        loss does not reach get zeros. head_chunk_tokens and checkpointing: see HookedModel.

        Small batches on CPU (a query's few examples) run on one intra-op thread where that is faster
        (influence.threads)."""
        device = next(self.model.parameters()).device
        if device.type == "cpu" and is_small_batch(*batch.input_ids.shape):
            return ONE_THREAD.run_small(self._featurize, batch, device, head_chunk_tokens, checkpointing)
        return self._featurize(batch, device, head_chunk_tokens, checkpointing)

    def _featurize(
        self, batch: Batch, device: torch.device, head_chunk_tokens: int | None, checkpointing: bool
    ) -> FeatureBatch:
        batch = batch.to(device)
        with HookedModel(
            self.model,
            self.layers,
            self.projectors,
            head_chunk_tokens=head_chunk_tokens,
            checkpointing=checkpointing,
        ) as hooked:
            results, losses, logits = hooked.backward_per_sample(batch)
        dtype = accumulation_dtype(next(self.model.parameters()).dtype)
        features = {}
        for name, projector in self.projectors.items():
            value = results.get(name)
            if value is None and projector.kind == "tokens":
                value = TokenRows.empty(len(batch), projector.dim, dtype)
            elif value is None:
                value = torch.zeros(len(batch), projector.dim, dtype=dtype, device=device)
            features[name] = value
        return FeatureBatch(features, losses, logits)


def per_sample_gradients(model: nn.Module, batch: Batch, layers: Sequence[Layer]) -> dict[str, torch.Tensor]:
    """Exact, unprojected per-sample gradients {unit: (B, p_unit)} in each parameter's layout
    [weight.flatten(), bias]. For checks and small models: an embedding gives B x vocab x dim numbers.
    (A Featurizer with ProjectionSpec("identity") gives the same numbers under the LLM-scale switches.)"""
    model.eval()
    handlers = {layer.name: IdentityProjector(layer, 0, 0, _padding_idx(model, layer)) for layer in layers}
    param = next(model.parameters())
    batch = batch.to(param.device)
    with HookedModel(model, layers, handlers) as hooked:
        results, _, _ = hooked.backward_per_sample(batch)
    dtype = accumulation_dtype(param.dtype)
    return {
        layer.name: results.get(
            layer.name, torch.zeros(len(batch), layer.num_params, dtype=dtype, device=param.device)
        )
        for layer in layers
    }


class _CancellationHandler:
    """Streams the two sums that cancellation needs (per-sample L1 norms and the gradient sum), raw space.

    A Linear / Conv1D unit's combine returns its per-sample gradient, which HookedModel sums over the unit's
    calls (a head run chunk by chunk): the L1 norm is taken of the sum, by `add_batch`. Embeddings stay
    row-sparse: per-sample rows are formed only for (sample, token) pairs present.
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

    def add_batch(self, flat: torch.Tensor) -> None:
        """A batch's per-sample gradients (B, p) of a Linear / Conv1D unit, summed over its calls."""
        self._add(flat.abs().sum(dim=1), flat.sum(dim=0))

    def combine(self, prepared, grad_out):
        if self.layer.kind != "embedding":
            return exact_linear_gradient(self.layer, prepared, grad_out)
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
    model: nn.Module,
    layers: Sequence[Layer],
    batches: Iterable[Batch],
    max_samples: int = 1024,
    *,
    head_chunk_tokens: int | None = DEFAULT_HEAD_CHUNK_TOKENS,
    checkpointing: bool = False,
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
        with HookedModel(
            model, layers, handlers, head_chunk_tokens=head_chunk_tokens, checkpointing=checkpointing
        ) as hooked:
            results, _, _ = hooked.backward_per_sample(batch.to(device))
        for name, flat in results.items():
            handlers[name].add_batch(flat)
        for name, handler in handlers.items():
            if handler.grad_sum is not None:
                accumulators[name].add(torch.cat(handler.l1_norms), handler.grad_sum)
            handler.l1_norms, handler.grad_sum = [], None
        seen += keep
    return {name: accumulator.result() for name, accumulator in accumulators.items()}
