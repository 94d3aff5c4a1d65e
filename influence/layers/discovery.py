"""Finding a model's layer units and naming them independently of its architecture (the names in
influence.layers), for plain and PEFT-wrapped HF models."""

from __future__ import annotations

import re

from torch import nn

from influence.errors import UnsupportedModelError
from influence.layers.units import Layer, block_positions, block_range_groups

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
