"""Layer units: discovery, architecture-independent names, roles, groups and selectors (method.md §1).

A *layer unit* is one module whose weight can carry influence: the input word embedding, every Linear /
GPT-2 Conv1D inside the transformer blocks, each LoRA A and B tensor, and the head. Names do not depend on
the architecture's own naming:

    embed                         the input word embedding
    block.3.attn.q                the query projection of block 3 (k, v, o, qkv for fused projections)
    block.3.attn.v.lora_B         the LoRA B tensor on that value projection
    block.3.mlp.up / down / gate  the feed-forward projections
    pooler, head, head.dense      what sits after the blocks ("head" is the layer that outputs logits)

Selectors (`select_layers`): an exact name; a glob (`block.*.attn.v.lora_B`); `re:<regex>` (re.search);
`blocks:2-4` (inclusive); `role:embedding|attention|mlp|head|lora`; `position:first|middle|last`;
`group:<name>` or a bare group name (`WE`, `CL`, `total`, `blocks.00-01`, `first`, `middle`, `last`);
terms joined by `&` intersect, a list of selectors is their union, and a dict
{names, regex, blocks, roles, position, groups} is the intersection of its criteria.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from influence.errors import UnknownLayerError, UnsupportedModelError

ROLES = ("embedding", "attention", "mlp", "head", "lora")
POSITIONS = ("first", "middle", "last")
KINDS = ("linear", "conv1d", "embedding")

# Leaf names of projections across HF architectures -> our short names.
_ATTENTION_LEAVES = {
    "query": "q",
    "q_proj": "q",
    "q_lin": "q",
    "q": "q",
    "wq": "q",
    "key": "k",
    "k_proj": "k",
    "k_lin": "k",
    "k": "k",
    "wk": "k",
    "value": "v",
    "v_proj": "v",
    "v_lin": "v",
    "v": "v",
    "wv": "v",
    "o_proj": "o",
    "out_proj": "o",
    "out_lin": "o",
    "o": "o",
    "wo": "o",
    "c_proj": "o",
    "dense": "o",
    "c_attn": "qkv",
    "query_key_value": "qkv",
    "qkv_proj": "qkv",
    "wqkv": "qkv",
    "qkv": "qkv",
}
_MLP_LEAVES = {
    "intermediate.dense": "up",
    "up_proj": "up",
    "c_fc": "up",
    "fc1": "up",
    "lin1": "up",
    "w1": "up",
    "dense_h_to_4h": "up",
    "fc_in": "up",
    "output.dense": "down",
    "down_proj": "down",
    "fc2": "down",
    "lin2": "down",
    "w2": "down",
    "dense_4h_to_h": "down",
    "fc_out": "down",
    "c_proj": "down",
    "gate_proj": "gate",
    "w3": "gate",
}
_HEAD_ATTRIBUTES = ("classifier", "score", "lm_head", "qa_outputs", "cls")
_LORA_PATTERN = re.compile(r"\.lora_([AB])\.[^.]+$")


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


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D; imported lazily to keep `influence.layers` light.
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the ModuleList of same-typed children holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, path, module)
    if best is None:
        raise UnsupportedModelError("no transformer block list (nn.ModuleList) found in the model")
    return best[1], best[2]


def _canonical_path(path: str) -> tuple[str, str | None] | None:
    """Strip PEFT wrappers from a module path: returns (path, 'A'|'B'|None), or None to skip the module."""
    if ".original_module" in path or path.endswith("lora_dropout") or ".lora_dropout." in path:
        return None
    lora = None
    match = _LORA_PATTERN.search(path)
    if match:
        lora = match.group(1)
        path = path[: match.start()]
    path = path.replace(".base_layer", "").replace(".modules_to_save.default", "")
    if path.startswith("base_model.model."):
        path = path[len("base_model.model.") :]
    return path, lora


def _leaf_name(relative: str, attention: bool) -> str:
    parts = relative.split(".")
    table = _ATTENTION_LEAVES if attention else _MLP_LEAVES
    for width in (2, 1):  # "output.dense" before "dense"
        key = ".".join(parts[-width:]).lower()
        if key in table:
            return table[key]
    return re.sub(r"[^A-Za-z0-9_]", "_", relative)


def _is_attention_path(relative: str) -> bool:
    return any("att" in part.lower() for part in relative.split("."))


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


def discover_layers(model: nn.Module) -> list[Layer]:
    """Every layer unit of a HF model (plain or PEFT-wrapped), in forward order: embed, blocks, head."""
    blocks_path, blocks = find_blocks(model)
    canonical_blocks = _canonical_path(blocks_path)
    assert canonical_blocks is not None
    blocks_prefix = canonical_blocks[0] + "."
    num_blocks = len(blocks)
    positions = block_positions(num_blocks)
    ranges = {b: name for name, members in block_range_groups(num_blocks).items() for b in members}
    embedding = model.get_input_embeddings()
    head_module = None
    if hasattr(model, "get_output_embeddings"):
        head_module = model.get_output_embeddings()

    found: list[tuple[str, Layer]] = []
    for path, module in model.named_modules():
        canonical = _canonical_path(path)
        if canonical is None:
            continue
        cpath, lora = canonical
        if isinstance(module, nn.Embedding):
            if module is not embedding:
                continue  # position / token-type embeddings are not influence units here
            found.append((path, _make_layer("embed", path, module, "embedding", None, lora, num_blocks)))
            continue
        if not isinstance(module, nn.Linear) and not _is_conv1d(module):
            continue
        if cpath.startswith(blocks_prefix):
            index_str, _, relative = cpath[len(blocks_prefix) :].partition(".")
            block = int(index_str)
            attention = _is_attention_path(relative)
            name = f"block.{block}.{'attn' if attention else 'mlp'}.{_leaf_name(relative, attention)}"
            role = "attention" if attention else "mlp"
        else:
            block = None
            role = "head"
            name = _head_name(cpath, module is head_module)
        if lora is not None:
            name = f"{name}.lora_{lora}"
        layer = _make_layer(name, path, module, role, block, lora, num_blocks)
        if block is not None:
            layer = _with_groups(layer, positions[block], ranges[block])
        found.append((path, layer))

    names = [layer.name for _, layer in found]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        # Two modules mapped to one short name: fall back to the module paths so names stay unique.
        found = [
            (
                path,
                _rename(layer, re.sub(r"[^A-Za-z0-9_.]", "_", _canonical_path(path)[0]))  # type: ignore[index]
                if layer.name in duplicates
                else layer,
            )
            for path, layer in found
        ]
    return [layer for _, layer in found]


def _head_name(cpath: str, is_output_embedding: bool) -> str:
    parts = cpath.split(".")
    if is_output_embedding:
        return "head"
    if "pooler" in parts:
        return "pooler"
    for index, part in enumerate(parts):
        if part in _HEAD_ATTRIBUTES:
            rest = parts[index + 1 :]
            if not rest or rest[-1] in ("out_proj", "decoder", "predictions"):
                return "head"
            return "head." + ".".join(rest)
    return "extra." + re.sub(r"[^A-Za-z0-9_.]", "_", cpath)


def _make_layer(name, path, module, role, block, lora, num_blocks) -> Layer:
    if isinstance(module, nn.Embedding):
        kind, (rows, cols), bias = "embedding", tuple(module.weight.shape), False
    elif isinstance(module, nn.Linear):
        kind, (rows, cols), bias = "linear", tuple(module.weight.shape), module.bias is not None
    else:
        kind, (rows, cols), bias = "conv1d", tuple(module.weight.shape), module.bias is not None
    groups = ["total"]
    if role == "embedding":
        groups.append("WE")
    if role == "head":
        groups.append("CL")
    return Layer(
        name, path, kind, role, block, int(rows), int(cols), bias, lora is not None, None, tuple(groups)
    )


def _with_groups(layer: Layer, position: str, block_range: str) -> Layer:
    return Layer(**{**_fields(layer), "position": position, "groups": (*layer.groups, block_range, position)})


def _rename(layer: Layer, name: str) -> Layer:
    return Layer(**{**_fields(layer), "name": name})


def _fields(layer: Layer) -> dict:
    return {f: getattr(layer, f) for f in Layer.__dataclass_fields__}


def layer_groups(layers: Sequence[Layer]) -> dict[str, list[str]]:
    """Group name -> member layer names (only groups with members), in a stable order."""
    out: dict[str, list[str]] = {}
    for layer in layers:
        for group in layer.groups:
            out.setdefault(group, []).append(layer.name)
    order = ["WE", *sorted(g for g in out if g.startswith("blocks.")), *POSITIONS, "CL", "total"]
    return {g: out[g] for g in order if g in out}


def _match_term(term: str, layers: Sequence[Layer]) -> list[Layer]:
    term = term.strip()
    if term in ("all", "*"):
        return list(layers)
    kind, sep, value = term.partition(":")
    if sep:
        if kind == "re":
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise UnknownLayerError(f"bad layer regex {value!r}: {exc}") from exc
            return [layer for layer in layers if pattern.search(layer.name)]
        if kind == "blocks":
            low, _, high = value.partition("-")
            try:
                lo, hi = int(low), int(high or low)
            except ValueError as exc:
                raise UnknownLayerError(f"bad block range {value!r}: expected like 2-4") from exc
            return [layer for layer in layers if layer.block is not None and lo <= layer.block <= hi]
        if kind == "role":
            if value not in ROLES:
                raise UnknownLayerError(f"unknown role {value!r}; roles: {', '.join(ROLES)}")
            return [layer for layer in layers if layer.matches_role(value)]
        if kind == "position":
            if value not in POSITIONS:
                raise UnknownLayerError(f"unknown position {value!r}; positions: {', '.join(POSITIONS)}")
            return [layer for layer in layers if layer.position == value]
        if kind == "group":
            return [layer for layer in layers if value in layer.groups]
        raise UnknownLayerError(f"unknown selector kind {kind!r} in {term!r}")
    if any(ch in term for ch in "*?["):
        return [layer for layer in layers if fnmatch.fnmatchcase(layer.name, term)]
    exact = [layer for layer in layers if layer.name == term]
    if exact:
        return exact
    return [layer for layer in layers if term in layer.groups]


def _match_string(selector: str, layers: Sequence[Layer]) -> list[Layer]:
    chosen: set[str] | None = None
    for term in selector.split("&"):
        names = {layer.name for layer in _match_term(term, layers)}
        chosen = names if chosen is None else chosen & names
    return [layer for layer in layers if layer.name in (chosen or set())]


def _match_dict(selector: Mapping, layers: Sequence[Layer]) -> list[Layer]:
    allowed = {"names", "regex", "blocks", "roles", "position", "groups"}
    unknown = set(selector) - allowed
    if unknown:
        raise UnknownLayerError(f"unknown selector fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    def strings(field: str) -> list[str]:
        value = selector[field]
        if isinstance(value, str):
            return [value]
        if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
            return list(value)
        raise UnknownLayerError(f"selector field {field!r} must be a string or a list of strings, got {value!r}")

    def text(field: str) -> str:
        value = selector[field]
        if not isinstance(value, str):
            raise UnknownLayerError(f"selector field {field!r} must be a string, got {value!r}")
        return value

    terms: list[list[str]] = []
    if selector.get("names"):
        terms.append(strings("names"))
    if selector.get("regex"):
        terms.append([f"re:{text('regex')}"])
    if selector.get("blocks") is not None:
        bounds = selector["blocks"]
        if (
            isinstance(bounds, str)
            or not isinstance(bounds, Sequence)
            or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        ):
            raise UnknownLayerError(f"selector field 'blocks' must be [first, last] block numbers, got {bounds!r}")
        low, high = bounds
        terms.append([f"blocks:{low}-{high}"])
    if selector.get("roles"):
        terms.append([f"role:{r}" for r in strings("roles")])
    if selector.get("position"):
        terms.append([f"position:{text('position')}"])
    if selector.get("groups"):
        terms.append([f"group:{g}" for g in strings("groups")])
    chosen = {layer.name for layer in layers}
    for alternatives in terms:  # within a field: union; across fields: intersection
        chosen &= {layer.name for alt in alternatives for layer in _match_string(alt, layers)}
    return [layer for layer in layers if layer.name in chosen]


def select_layers(layers: Sequence[Layer], selector: str | Sequence | Mapping | None) -> list[Layer]:
    """Layers matched by a selector (None = all), in the order of `layers`. Nothing matched -> UnknownLayerError."""
    if selector is None:
        return list(layers)
    if isinstance(selector, str):
        chosen = {layer.name for layer in _match_string(selector, layers)}
        if not chosen:
            raise UnknownLayerError(_nothing_matched(selector, layers))
    elif isinstance(selector, Mapping):
        chosen = {layer.name for layer in _match_dict(selector, layers)}
        if not chosen:
            raise UnknownLayerError(_nothing_matched(selector, layers))
    else:
        chosen = set()
        for item in selector:
            chosen |= {layer.name for layer in select_layers(layers, item)}
    return [layer for layer in layers if layer.name in chosen]


def _nothing_matched(selector, layers: Sequence[Layer]) -> str:
    sample = ", ".join(layer.name for layer in layers[:6])
    return f"layer selector {selector!r} matches no layer (available: {sample}, ... {len(layers)} in all)"


def get_module(model: nn.Module, layer: Layer) -> nn.Module:
    """The module object of a layer unit."""
    return model.get_submodule(layer.module_path)


def layer_weight(model: nn.Module, layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) parameters of a layer unit, in their own layout."""
    module = get_module(model, layer)
    return module.weight, getattr(module, "bias", None) if layer.has_bias else None
