"""Layer units: discovery, architecture-independent names, roles, groups and selectors (method.md §1).

A *layer unit* is one module whose weight can carry influence: the input word embedding, every Linear /
GPT-2 Conv1D inside the transformer blocks, each LoRA A and B tensor, and the head. Names do not depend on
the architecture's own naming:

    embed                         the input word embedding
    block.3.attn.q                the query projection of block 3 (k, v, o, qkv for fused projections)
    block.3.attn.v.lora_B         the LoRA B tensor on that value projection
    block.3.mlp.up / down / gate  the feed-forward projections
    pooler, head, head.dense      what sits after the blocks ("head" is the layer that outputs logits)

Selectors (`select_layers`): an exact name; a glob (`block.*.attn.v.lora_B`, fnmatch's syntax); `re:<regex>`
(a search, in RE2 syntax: linear time, so no lookarounds or backreferences);
`blocks:2-4` (inclusive); `role:embedding|attention|mlp|head|lora`; `position:first|middle|last`;
`group:<name>` or a bare group name (`WE`, `CL`, `total`, `blocks.00-01`, `first`, `middle`, `last`);
terms joined by `&` intersect, a list of selectors is their union, and a dict
{names, regex, blocks, roles, position, groups} is the intersection of its criteria. Every selector is held to
limits before it runs: MAX_SELECTOR_CHARS (512) characters per string or regex, MAX_SELECTOR_TERMS terms,
MAX_PATTERN_TERMS regexes and globs, lists nested MAX_SELECTOR_DEPTH deep.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import re2
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


# Selector limits: every selector is checked against them before any of it runs, so its cost is bounded by
# (terms x layers x name length) whatever the model and whatever the caller sends.
MAX_SELECTOR_CHARS = 512  # one selector string, one `regex` field
MAX_SELECTOR_TERMS = 256  # terms in all: `&` parts of every string, other list items, object fields
MAX_PATTERN_TERMS = 16  # of which regexes and globs, the terms that scan every layer name
MAX_SELECTOR_DEPTH = 8  # lists within lists
# RE2 compiles a pattern to an automaton within this budget (a pattern over it is refused, never slow).
RE2_MAX_MEM = 4 << 20
_NEVER = r"[^\x00-\x{10FFFF}]"  # an empty class: RE2 has no `(?!)`


def _is_pattern(term: str) -> bool:
    term = term.strip()
    if term in ("all", "*"):
        return False
    kind, sep, _ = term.partition(":")
    return kind == "re" if sep else any(ch in term for ch in "*?[")


def _check_limits(selector) -> None:
    """Refuse a selector over the limits before any of it is evaluated. Iterative, so any nesting is safe."""
    terms = patterns = 0
    stack = [(selector, 0)]
    while stack:
        item, depth = stack.pop()
        texts: list[tuple[str, bool]] = []  # (string, is a regex field)
        children: list = []
        if isinstance(item, str):
            texts.append((item, False))
        elif isinstance(item, Mapping):
            terms += len(item)
            for key, value in item.items() if len(item) <= MAX_SELECTOR_TERMS else ():
                if isinstance(value, str):
                    texts.append((value, key == "regex"))
                elif _is_list(value):
                    children.extend(value)
        elif _is_list(item):
            if depth >= MAX_SELECTOR_DEPTH:
                raise UnknownLayerError(
                    f"layer selector lists may be nested at most {MAX_SELECTOR_DEPTH} deep"
                )
            children.extend(item)
        if len(children) > MAX_SELECTOR_TERMS:
            raise UnknownLayerError(f"a layer selector may have at most {MAX_SELECTOR_TERMS} terms")
        for child in children:
            if isinstance(child, str):
                texts.append((child, False))
                continue
            terms += 1
            if not isinstance(item, Mapping):  # in an object's field it is refused as a wrong type
                stack.append((child, depth + 1))
        for text, is_regex in texts:
            if len(text) > MAX_SELECTOR_CHARS:
                raise UnknownLayerError(
                    f"a layer selector string may have at most {MAX_SELECTOR_CHARS} characters, "
                    f"got one of {len(text)}"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise UnknownLayerError(
                    "a layer selector string is not valid Unicode (a lone surrogate)"
                ) from None
            parts = [text] if is_regex else text.split("&")
            terms += len(parts)
            patterns += sum(1 for part in parts if is_regex or _is_pattern(part))
        if terms > MAX_SELECTOR_TERMS:
            raise UnknownLayerError(f"a layer selector may have at most {MAX_SELECTOR_TERMS} terms")
        if patterns > MAX_PATTERN_TERMS:
            raise UnknownLayerError(
                f"a layer selector may have at most {MAX_PATTERN_TERMS} regex or glob terms, got {patterns}"
            )


def _is_list(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _compile_re2(pattern: str, shown: str):
    options = re2.Options()
    options.log_errors = False  # a bad pattern is the caller's error, answered; nothing for stderr
    options.max_mem = RE2_MAX_MEM
    options.never_capture = True  # only "does it match" is asked: the DFA answers that alone
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = (
            exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        )
        raise UnknownLayerError(
            f"bad layer {shown}: {reason}; layer regexes are RE2 syntax (linear time), which has no lookarounds "
            "such as (?=...) or (?!...) and no backreferences such as \\1"
        ) from None


def _re2_literal(char: str) -> str:
    return char if char.isascii() and char.isalnum() else f"\\x{{{ord(char):x}}}"


def glob_to_re2(glob: str) -> str:
    """fnmatch's glob syntax (`*`, `?`, `[seq]`, `[!seq]`, case-sensitive, the whole name) as an RE2 pattern.

    Reads a glob exactly as fnmatch.translate does (brackets without a closing `]` are literal, a `]` first in
    a class is a member, reversed ranges are empty), but runs in linear time on RE2 without fnmatch's cache.
    """
    parts: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        i += 1
        if char == "*":
            if not parts or parts[-1] != ".*":
                parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                parts.append(_re2_literal("["))
            else:
                parts.append(_glob_class(glob[i:j]))
                i = j + 1
        else:
            parts.append(_re2_literal(char))
    return r"\A(?s:" + "".join(parts) + r")\z"


def _glob_class(content: str) -> str:
    """One `[...]` of a glob (without its brackets) as an RE2 class, read as fnmatch reads it."""
    negate = content.startswith("!")
    body = content[1:] if negate else content
    # fnmatch splits the class at the hyphens that make ranges, then drops the ranges whose ends are reversed.
    chunks: list[str] = []
    start, k = 0, 1
    while (k := body.find("-", k)) >= 0:
        chunks.append(body[start:k])
        start, k = k + 1, k + 3
    if body[start:]:
        chunks.append(body[start:])
    else:
        chunks[-1] += "-"
    for k in range(len(chunks) - 1, 0, -1):
        if chunks[k - 1][-1] > chunks[k][0]:
            chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
            del chunks[k]
    # Python's class parser then reads "chunk-chunk-..." left to right: a member, a range operator, a member.
    tokens: list[tuple[str, bool]] = []  # (character, is a range operator)
    for index, chunk in enumerate(chunks):
        if index:
            tokens.append(("-", True))
        tokens.extend((char, False) for char in chunk)
    items: list[str] = []
    t = 0
    while t < len(tokens):
        low = tokens[t][0]
        if t + 2 < len(tokens) and tokens[t + 1][1]:
            high = tokens[t + 2][0]
            if high < low:
                raise UnknownLayerError(f"bad layer glob class [{content}]: range {low}-{high} is reversed")
            items.append(f"{_re2_literal(low)}-{_re2_literal(high)}")
            t += 3
        else:
            items.append(_re2_literal(low))
            t += 1
    if not items:
        return "." if negate else _NEVER
    return f"[{'^' if negate else ''}{''.join(items)}]"


class _Catalog:
    """The layers a selector runs over, indexed once per call: names and groups cost no scan, and a term that
    appears twice is evaluated once."""

    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)
        self.names = {layer.name for layer in self.layers}
        self.groups: dict[str, set[str]] = {}
        for layer in self.layers:
            for group in layer.groups:
                self.groups.setdefault(group, set()).add(layer.name)
        self.memo: dict[object, frozenset[str]] = {}

    def where(self, keep) -> frozenset[str]:
        return frozenset(layer.name for layer in self.layers if keep(layer))

    def matching(self, pattern) -> frozenset[str]:
        return frozenset(name for name in self.names if pattern.search(name))

    def blocks(self, low: int, high: int) -> frozenset[str]:
        key = ("blocks", low, high)
        if key not in self.memo:
            self.memo[key] = self.where(lambda layer: layer.block is not None and low <= layer.block <= high)
        return self.memo[key]


def _match_term(term: str, catalog: _Catalog) -> frozenset[str]:
    term = term.strip()
    if term not in catalog.memo:
        catalog.memo[term] = _evaluate_term(term, catalog)
    return catalog.memo[term]


def _evaluate_term(term: str, catalog: _Catalog) -> frozenset[str]:
    if term in ("all", "*"):
        return frozenset(catalog.names)
    kind, sep, value = term.partition(":")
    if sep:
        if kind == "re":
            return catalog.matching(_compile_re2(value, f"regex {value!r}"))
        if kind == "blocks":
            low, _, high = value.partition("-")
            try:
                lo, hi = int(low), int(high or low)
            except ValueError as exc:
                raise UnknownLayerError(f"bad block range {value!r}: expected like 2-4") from exc
            return catalog.blocks(lo, hi)
        if kind == "role":
            if value not in ROLES:
                raise UnknownLayerError(f"unknown role {value!r}; roles: {', '.join(ROLES)}")
            return catalog.where(lambda layer: layer.matches_role(value))
        if kind == "position":
            if value not in POSITIONS:
                raise UnknownLayerError(f"unknown position {value!r}; positions: {', '.join(POSITIONS)}")
            return catalog.where(lambda layer: layer.position == value)
        if kind == "group":
            return frozenset(catalog.groups.get(value, ()))
        raise UnknownLayerError(f"unknown selector kind {kind!r} in {term!r}")
    if any(ch in term for ch in "*?["):
        return catalog.matching(_compile_re2(glob_to_re2(term), f"glob {term!r}"))
    if term in catalog.names:
        return frozenset((term,))
    return frozenset(catalog.groups.get(term, ()))


def _match_string(selector: str, catalog: _Catalog) -> set[str]:
    chosen: set[str] | None = None
    for term in selector.split("&"):
        names = _match_term(term, catalog)
        chosen = set(names) if chosen is None else chosen & names
    return chosen or set()


def _match_dict(selector: Mapping, catalog: _Catalog) -> set[str]:
    allowed = {"names", "regex", "blocks", "roles", "position", "groups"}
    unknown = set(selector) - allowed
    if unknown:
        raise UnknownLayerError(
            f"unknown selector fields {sorted(map(str, unknown))}; allowed: {sorted(allowed)}"
        )

    def strings(field: str) -> list[str]:
        value = selector[field]
        if isinstance(value, str):
            return [value]
        if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
            return list(value)
        raise UnknownLayerError(
            f"selector field {field!r} must be a string or a list of strings, got {value!r}"
        )

    def text(field: str) -> str:
        value = selector[field]
        if not isinstance(value, str):
            raise UnknownLayerError(f"selector field {field!r} must be a string, got {value!r}")
        return value

    criteria: list[set[str] | frozenset[str]] = []  # within a field: union; across fields: intersection
    if selector.get("names"):
        criteria.append(set().union(*(_match_string(name, catalog) for name in strings("names"))))
    if selector.get("regex"):
        pattern = text("regex")
        key = ("regex", pattern)
        if key not in catalog.memo:
            catalog.memo[key] = catalog.matching(_compile_re2(pattern, f"regex {pattern!r}"))
        criteria.append(catalog.memo[key])
    if selector.get("blocks") is not None:
        bounds = selector["blocks"]
        if (
            isinstance(bounds, str)
            or not isinstance(bounds, Sequence)
            or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        ):
            raise UnknownLayerError(
                f"selector field 'blocks' must be [first, last] block numbers, got {bounds!r}"
            )
        criteria.append(catalog.blocks(bounds[0], bounds[1]))
    if selector.get("roles"):
        criteria.append(set().union(*(_match_term(f"role:{r}", catalog) for r in strings("roles"))))
    if selector.get("position"):
        criteria.append(_match_term(f"position:{text('position')}", catalog))
    if selector.get("groups"):
        criteria.append(set().union(*(_match_term(f"group:{g}", catalog) for g in strings("groups"))))
    chosen = set(catalog.names)
    for names in criteria:
        chosen &= names
    return chosen


def select_layers(layers: Sequence[Layer], selector: str | Sequence | Mapping | None) -> list[Layer]:
    """Layers matched by a selector (None = all), in the order of `layers`. Nothing matched -> UnknownLayerError.

    Limits (each refused with UnknownLayerError before anything is matched): MAX_SELECTOR_CHARS characters per
    string, MAX_SELECTOR_TERMS terms in all, MAX_PATTERN_TERMS of them regexes or globs, lists nested at most
    MAX_SELECTOR_DEPTH deep. Regexes are RE2 (linear time: no lookarounds, no backreferences).
    """
    if selector is None:
        return list(layers)
    _check_limits(selector)
    catalog = _Catalog(layers)
    chosen = _select(selector, catalog)
    return [layer for layer in catalog.layers if layer.name in chosen]


def _select(selector, catalog: _Catalog) -> set[str]:
    if isinstance(selector, str):
        chosen = _match_string(selector, catalog)
    elif isinstance(selector, Mapping):
        chosen = _match_dict(selector, catalog)
    elif _is_list(selector):
        chosen = set()
        for item in selector:
            chosen |= _select(item, catalog)
        return chosen
    else:
        raise UnknownLayerError(
            f"a layer selector is a string, a list or an object, got {type(selector).__name__}"
        )
    if not chosen:
        raise UnknownLayerError(_nothing_matched(selector, catalog.layers))
    return chosen


def _nothing_matched(selector, layers: Sequence[Layer]) -> str:
    sample = ", ".join(layer.name for layer in layers[:6])
    shown = repr(selector)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return f"layer selector {shown} matches no layer (available: {sample}, ... {len(layers)} in all)"


def get_module(model: nn.Module, layer: Layer) -> nn.Module:
    """The module object of a layer unit."""
    return model.get_submodule(layer.module_path)


def layer_weight(model: nn.Module, layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) parameters of a layer unit, in their own layout."""
    module = get_module(model, layer)
    return module.weight, getattr(module, "bias", None) if layer.has_bias else None
