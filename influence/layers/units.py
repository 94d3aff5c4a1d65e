"""What a layer unit is (Layer: its name, kind, role, block, shape, groups), the paper's groups of units,
and a unit's module and weight in a model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: naming a layer needs no torch
    import torch
    from torch import nn

ROLES = ("embedding", "attention", "mlp", "head", "lora")
POSITIONS = ("first", "middle", "last")
KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class Layer:
    """One layer unit and where it sits. Shapes are of the unit's weight in its own (parameter) layout.

    rows x cols: weight (out, in) for Linear, (in, out) for Conv1D, (vocab, dim) for Embedding.
    num_params counts weight and bias: the unit's gradient is [weight.flatten(), bias].
    """

    name: str
    module_path: str
    kind: str
    role: str
    block: int | None
    rows: int
    cols: int
    has_bias: bool
    is_lora: bool
    position: str | None = None
    groups: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_params(self) -> int:
        return self.rows * self.cols + (self.bias_size if self.has_bias else 0)

    @property
    def bias_size(self) -> int:
        """Bias length: out features (rows for Linear, cols for Conv1D)."""
        return self.cols if self.kind == "conv1d" else self.rows

    @property
    def out_features(self) -> int:
        """Size of the unit's output per token (the gradient side); embedding: its dim."""
        return self.rows if self.kind == "linear" else self.cols

    @property
    def in_features(self) -> int:
        """Size of the unit's input per token (the activation side); embedding: the vocabulary."""
        return self.cols if self.kind == "linear" else self.rows

    def matches_role(self, role: str) -> bool:
        return (role == "lora" and self.is_lora) or self.role == role

    def to_dict(self) -> dict:
        out = asdict(self)
        out["groups"] = list(self.groups)
        out["num_params"] = self.num_params
        return out


def _split_ranges(num_blocks: int, parts: int) -> list[list[int]]:
    return [list(map(int, chunk)) for chunk in np.array_split(np.arange(num_blocks), parts) if len(chunk)]


def block_range_groups(num_blocks: int) -> dict[str, list[int]]:
    """The paper's consecutive block ranges: four near-equal parts, named like `blocks.00-05`."""
    width = max(2, len(str(num_blocks - 1)))
    out = {}
    for chunk in _split_ranges(num_blocks, min(4, num_blocks)):
        low, high = f"{chunk[0]:0{width}d}", f"{chunk[-1]:0{width}d}"
        out[f"blocks.{low}-{high}" if high != low else f"blocks.{low}"] = chunk
    return out


def block_positions(num_blocks: int) -> dict[int, str]:
    """first / middle / last third of the blocks (np.array_split: the first thirds get the extra block)."""
    out = {}
    for name, chunk in zip(POSITIONS, _split_ranges(num_blocks, 3), strict=False):
        for block in chunk:
            out[block] = name
    return out


def layer_groups(layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Group name -> member layer names (only groups with members), in a stable order."""
    out: dict[str, list[str]] = {}
    for layer in layers:
        for group in layer.groups:
            out.setdefault(group, []).append(layer.name)
    order = ["WE", *sorted(g for g in out if g.startswith("blocks.")), *POSITIONS, "CL", "total"]
    return {g: out[g] for g in order if g in out}


def get_module(model: nn.Module, layer: Layer) -> nn.Module:
    """The module object of a layer unit."""
    return model.get_submodule(layer.module_path)


def layer_weight(model: nn.Module, layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) parameters of a layer unit, in their own layout."""
    module = get_module(model, layer)
    return module.weight, getattr(module, "bias", None) if layer.has_bias else None
