"""Layer discovery, names that do not depend on the architecture, selectors and the paper's groups."""

from __future__ import annotations

import re
import time

import pytest
import re2
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from influence.errors import UnknownLayerError
from influence.layers import (
    Layer,
    block_positions,
    block_range_groups,
    discover_layers,
    layer_groups,
    select_layers,
)
from influence.loading import load_model, packaged_minilm_path
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def minilm_lora_layers():
    from peft import LoraConfig, get_peft_model

    loaded = load_model(packaged_minilm_path())
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    return discover_layers(get_peft_model(loaded.model, config))


def names(layers):
    return [layer.name for layer in layers]


def test_minilm_lora_units(minilm_lora_layers):
    layers = {layer.name: layer for layer in minilm_lora_layers}
    # 6 blocks x (q, k, v, o, up, down + 4 LoRA tensors) + embed + pooler + head
    assert len(layers) == 6 * 10 + 3
    assert names(minilm_lora_layers)[0] == "embed" and names(minilm_lora_layers)[-1] == "head"
    embed = layers["embed"]
    assert (embed.kind, embed.role, embed.rows, embed.cols, embed.has_bias) == (
        "embedding",
        "embedding",
        30522,
        384,
        False,
    )
    lora_b = layers["block.3.attn.v.lora_B"]
    assert (lora_b.rows, lora_b.cols, lora_b.is_lora, lora_b.role, lora_b.block) == (
        384,
        4,
        True,
        "attention",
        3,
    )
    assert layers["block.3.attn.v.lora_A"].num_params == 4 * 384
    assert layers["block.0.mlp.up"].num_params == 1536 * 384 + 1536
    assert layers["head"].num_params == 2 * 384 + 2
    # PEFT's head wrapper: the trained copy is hooked, not the frozen original
    assert "modules_to_save.default" in layers["head"].module_path
    assert not any("original_module" in layer.module_path for layer in minilm_lora_layers)
    assert layers["pooler"].role == "head" and "CL" in layers["pooler"].groups


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        (
            "bert",
            [
                "block.0.attn.q",
                "block.0.attn.k",
                "block.0.attn.v",
                "block.0.attn.o",
                "block.0.mlp.up",
                "block.0.mlp.down",
            ],
        ),
        ("gpt2", ["block.0.attn.qkv", "block.0.attn.o", "block.0.mlp.up", "block.0.mlp.down"]),
        (
            "llama",
            [
                "block.0.attn.q",
                "block.0.attn.k",
                "block.0.attn.v",
                "block.0.attn.o",
                "block.0.mlp.gate",
                "block.0.mlp.up",
                "block.0.mlp.down",
            ],
        ),
    ],
)
def test_block_names_are_architecture_independent(arch, expected):
    config = tiny_config(arch, vocab_size=50)
    for cls in (AutoModelForSequenceClassification, AutoModelForCausalLM):
        layers = discover_layers(cls.from_config(config))
        assert [n for n in names(layers) if n.startswith("block.0.")] == expected
        assert names(layers)[0] == "embed" and names(layers)[-1] == "head"
        assert len(set(names(layers))) == len(layers)
    gpt2_kinds = {
        layer.kind for layer in discover_layers(AutoModelForCausalLM.from_config(tiny_config("gpt2", 50)))
    }
    assert "conv1d" in gpt2_kinds


def test_groups_and_positions_follow_the_paper():
    assert block_range_groups(24) == {
        f"blocks.{a:02d}-{a + 5:02d}": list(range(a, a + 6)) for a in (0, 6, 12, 18)
    }
    positions = block_positions(6)
    assert [positions[b] for b in range(6)] == ["first", "first", "middle", "middle", "last", "last"]
    assert block_positions(16)[5] == "first" and block_positions(16)[6] == "middle"


def test_layer_groups(minilm_lora_layers):
    groups = layer_groups(minilm_lora_layers)
    assert next(iter(groups)) == "WE" and list(groups)[-1] == "total"
    assert groups["WE"] == ["embed"]
    assert groups["CL"] == ["pooler", "head"]
    assert len(groups["total"]) == len(minilm_lora_layers)
    assert all(n.startswith(("block.2.", "block.3.")) for n in groups["middle"])
    assert set(groups["blocks.00-01"]) == {
        n for n in names(minilm_lora_layers) if n.startswith(("block.0.", "block.1."))
    }


def test_selectors(minilm_lora_layers):
    layers = minilm_lora_layers
    assert names(select_layers(layers, "block.3.attn.v.lora_B")) == ["block.3.attn.v.lora_B"]
    assert names(select_layers(layers, "block.*.attn.v.lora_B")) == [
        f"block.{b}.attn.v.lora_B" for b in range(6)
    ]
    assert names(select_layers(layers, r"re:attn\.v\.lora_B$")) == [
        f"block.{b}.attn.v.lora_B" for b in range(6)
    ]
    assert {layer.block for layer in select_layers(layers, "blocks:2-3")} == {2, 3}
    assert names(select_layers(layers, "role:embedding")) == ["embed"]
    assert len(select_layers(layers, "role:lora")) == 24
    assert all(layer.role == "attention" for layer in select_layers(layers, "role:attention"))
    assert all(layer.role == "mlp" for layer in select_layers(layers, "role:mlp"))
    assert names(select_layers(layers, "role:head")) == ["pooler", "head"]
    middle_attention = select_layers(layers, "position:middle&role:attention")
    assert {layer.block for layer in middle_attention} == {2, 3} and all(
        x.role == "attention" for x in middle_attention
    )
    assert names(select_layers(layers, "WE")) == ["embed"] == names(select_layers(layers, "group:WE"))
    assert names(select_layers(layers, ["WE", "CL"])) == ["embed", "pooler", "head"]
    assert select_layers(layers, None) == list(layers)
    by_dict = select_layers(layers, {"roles": ["lora"], "blocks": [4, 5], "regex": "attn.q"})
    assert names(by_dict) == [
        "block.4.attn.q.lora_A",
        "block.4.attn.q.lora_B",
        "block.5.attn.q.lora_A",
        "block.5.attn.q.lora_B",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        "block.99.attn.q",
        "role:nonsense",
        "position:centre",
        "re:(",
        "blocks:x-y",
        "weird:thing",
        {"colour": "red"},
        # Wrongly typed fields (JSON from an API caller) are refused, not a TypeError.
        {"names": 5},
        {"blocks": 5},
        {"blocks": [1, 2, 3]},
        {"blocks": ["a", "b"]},
        {"roles": [1]},
        {"regex": 7},
        {"position": ["middle"]},
    ],
)
def test_bad_selectors_are_refused_clearly(minilm_lora_layers, bad):
    with pytest.raises(UnknownLayerError):
        select_layers(minilm_lora_layers, bad)


# --- selectors are bounded in time and size (RE2, limits) -------------------------------------------------------


def _many_layers(count: int = 2000, width: int = 120) -> list[Layer]:
    """Synthetic layer units with long names, a few of them under `block.0.mlp.down`."""
    out = []
    for i in range(count):
        block = i % 50
        stem = f"block.{block}.mlp.down.{i}" if i % 100 == 0 else f"block.{block}.attn.q.lora_{i}"
        name = stem + "." + "a" * (width - len(stem) - 3) + f".{i % 7}"
        out.append(Layer(name, name, "linear", "mlp", block, 4, 4, False, False, "middle", ("total",)))
    return out


@pytest.fixture(scope="module")
def many_layers():
    return _many_layers()


def _timed(layers, selector):
    started = time.perf_counter()
    try:
        result = select_layers(layers, selector)
    except UnknownLayerError as exc:
        result = exc
    return result, time.perf_counter() - started


def test_the_reported_catastrophic_regex_is_refused_at_once(many_layers):
    # Python's re backtracks on this for minutes once a name passes the lookahead; RE2 has no lookarounds.
    pattern = r"^(?=block\.0\.mlp\.down)(?:.*.*)*!"
    for selector in (f"re:{pattern}", {"regex": pattern}, [f"re:{pattern}"]):
        result, seconds = _timed(many_layers, selector)
        assert isinstance(result, UnknownLayerError) and seconds < 0.5, (result, seconds)
        assert "RE2" in str(result) and "lookarounds" in str(result)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # Exponential for a backtracking engine on names without the final character; linear on RE2.
        (r"(?:.*.*)*!", None),
        (r"(?:a|aa)+$", None),
        (r"(a|aa)+\.[0-6]$", "all"),
        (r"(?:.*a){12}\.3$", r"\.3$"),
        (r"^block\.0\.mlp\.down(?:.*.*)*\.0$", r"^block\.0\.mlp\.down.*\.0$"),
    ],
)
def test_backtracking_regexes_run_in_linear_time(many_layers, pattern, expected):
    result, seconds = _timed(many_layers, f"re:{pattern}")
    assert seconds < 0.5, seconds
    if expected is None:
        assert isinstance(result, UnknownLayerError) and "matches no layer" in str(result)
    else:
        want = [x.name for x in many_layers if expected == "all" or re.search(expected, x.name)]
        assert names(result) == want and want


def test_backreferences_are_refused_with_the_reason(many_layers):
    result, _ = _timed(many_layers, r"re:(block)\.\1")
    assert isinstance(result, UnknownLayerError) and "backreferences" in str(result)


@pytest.mark.parametrize(
    "glob",
    ["*a" * 250 + "*b", "*" + "?" * 400 + "!", "*" + "[a-z]" * 100 + "!", "*[ab]" * 100 + "*c", "block.*.*.*.*.!"],
)
def test_adversarial_globs_run_in_linear_time(many_layers, glob):
    result, seconds = _timed(many_layers, glob)
    assert seconds < 0.5, seconds
    assert isinstance(result, UnknownLayerError) and "matches no layer" in str(result)


def test_globs_match_exactly_what_fnmatch_matches():
    import fnmatch
    import random

    from influence.layers import glob_to_re2

    random.seed(13)
    texts = ["", "a", "b", "-", "]", "!", "^", "[", "\\", "ab", "a-b", "b]a", "z!", "[a]", "a.b", "\n", "é", "aab-"]
    alphabet = ["a", "b", "z", "-", "!", "]", "[", "^", "*", "?", "\\", ".", "é"]
    checked = 0
    for _ in range(4000):
        glob = "".join(random.choice(alphabet) for _ in range(random.randint(1, 9)))
        try:
            expected = [fnmatch.fnmatchcase(text, glob) for text in texts]
        except re.error:  # fnmatch turns a few classes into invalid regexes (a reversed range)
            with pytest.raises(UnknownLayerError):
                glob_to_re2(glob)
            continue
        pattern = re2.compile(glob_to_re2(glob))
        assert [pattern.search(text) is not None for text in texts] == expected, glob
        checked += 1
    assert checked > 3500


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("re:" + "a" * 600, "at most 512 characters"),
        ({"regex": "a" * 513}, "at most 512 characters"),
        (["total&total"] * 130, "at most 256 terms"),
        ([f"block.{i}.attn.q" for i in range(300)], "at most 256 terms"),
        ({"names": ["embed"] * 1000}, "at most 256 terms"),
        ([f"re:attn.{i}" for i in range(17)], "at most 16 regex or glob terms"),
        (["block.*"] * 17, "at most 16 regex or glob terms"),
        ("re:\ud800", "not valid Unicode"),
        (5, "a string, a list or an object"),
    ],
)
def test_selector_limits_are_refused_clearly(many_layers, selector, message):
    result, seconds = _timed(many_layers, selector)
    assert isinstance(result, UnknownLayerError), result
    assert message in str(result) and seconds < 0.5


def test_a_deeply_nested_list_selector_is_refused_not_a_recursion_error(many_layers):
    selector: list = ["embed"]
    for _ in range(10_000):
        selector = [selector]
    result, seconds = _timed(many_layers, selector)
    assert isinstance(result, UnknownLayerError) and "nested at most 8 deep" in str(result)
    assert seconds < 0.5
    shallow: list = ["block.0.mlp.down*"]
    for _ in range(7):
        shallow = [shallow]
    assert len(select_layers(many_layers, shallow)) == 20


def test_many_plain_terms_on_many_layers_stay_fast(many_layers):
    chosen = [layer.name for layer in many_layers[::8]]  # 250 exact names, each found without a scan
    result, seconds = _timed(many_layers, chosen)
    assert names(result) == chosen and seconds < 0.5
