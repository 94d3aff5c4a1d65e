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

The package: units.py (Layer, the groups), discovery.py (finding and naming a model's units), selectors.py.
"""

from __future__ import annotations

from influence.lazy import lazy_package

# Public names resolved on first access (PEP 562): importing the package, or one of its modules, loads no
# other module of it than those imported above (torch and faiss come with the modules that use them).
_LAZY: dict[str, str] = {
    "discover_layers": "influence.layers.discovery",
    "find_blocks": "influence.layers.discovery",
    "glob_to_re2": "influence.layers.selectors",
    "MAX_PATTERN_TERMS": "influence.layers.selectors",
    "MAX_SELECTOR_CHARS": "influence.layers.selectors",
    "MAX_SELECTOR_DEPTH": "influence.layers.selectors",
    "MAX_SELECTOR_TERMS": "influence.layers.selectors",
    "RE2_MAX_MEM": "influence.layers.selectors",
    "select_layers": "influence.layers.selectors",
    "block_positions": "influence.layers.units",
    "block_range_groups": "influence.layers.units",
    "get_module": "influence.layers.units",
    "KINDS": "influence.layers.units",
    "Layer": "influence.layers.units",
    "layer_groups": "influence.layers.units",
    "layer_weight": "influence.layers.units",
    "POSITIONS": "influence.layers.units",
    "ROLES": "influence.layers.units",
}

__all__ = [
    "KINDS",
    "MAX_PATTERN_TERMS",
    "MAX_SELECTOR_CHARS",
    "MAX_SELECTOR_DEPTH",
    "MAX_SELECTOR_TERMS",
    "POSITIONS",
    "RE2_MAX_MEM",
    "ROLES",
    "Layer",
    "block_positions",
    "block_range_groups",
    "discover_layers",
    "find_blocks",
    "get_module",
    "glob_to_re2",
    "layer_groups",
    "layer_weight",
    "select_layers",
]


__getattr__, __dir__ = lazy_package(__name__, _LAZY, globals())
