"""How much memory a worker needs to featurize with a model, estimated before any weight is loaded.

`estimate_model_memory` adds four parts, for one batch of N tokens (N = max_tokens, or fewer when
max_rows x row_tokens is smaller; a row longer than max_tokens runs alone, so N >= row_tokens):

  weights      every tensor of the model's (and its adapters') safetensors files, read from each file's JSON
               header only (8-byte length + JSON: names, dtypes, shapes), no tensor loaded. Floating tensors
               count at the compute dtype (bfloat16 halves them), others at their own size. A config without
               weight files falls back to arithmetic: embeddings, blocks (attention, MLP, norms), untied head.
  activations  what autograd keeps from the forward pass for the backward pass. Per token and block:
               ACT_HIDDEN hidden-wide values (the two norms' inputs and outputs, q, k and v after the rotary
               embedding, the attention output and its reshaped copy, the backward's temporaries) and
               ACT_INTERMEDIATE intermediate-wide ones (gate, its activation, up, their product; a mixture of
               experts: for each of its num_experts_per_tok experts), at the compute dtype; plus ACT_OUTSIDE
               hidden-wide values per token outside the blocks (the embeddings' output, the final norm, the
               final hidden states and their gradient). Attention is the default SDPA, which keeps no T x T
               score matrix (eager attention would add heads x row length values per token and block). With
               activation checkpointing (per block, influence.gradients) each block keeps only its
               input (one hidden-wide value per token and block) and recomputes the rest in the backward pass,
               where the block being recomputed and the gradients flowing through it hold about
               CHECKPOINT_LIVE_BLOCKS blocks' worth: blocks x hidden + CHECKPOINT_LIVE_BLOCKS blocks, instead
               of all the blocks' sets.
  head         a causal LM's vocabulary-wide logits: the loss holds them for head_chunk_tokens tokens at a time
               (at most N), in float32, HEAD_COPIES copies (the logits, the log-softmax kept for the backward,
               and the gradient of each). A classifier's head is num_labels wide per row: next to nothing.
  gradients    what the selected units' taps form (influence.gradients): per token, each projector's captures
               (a factorized unit's input and output gradient projected to k_in + k_out values); per row of the
               batch, each unit's features in float32 (an exact unit's whole per-sample gradient, a `tokens`
               unit's vector for each of the row's tokens). No parameter gradient is ever formed.

The constants are measured, not derived. This command loads a model folder in a fresh process as a worker does
(influence.load_model, every weight touched so that it is resident), featurizes one batch of random tokens
through every layer unit (the `auto` projection, as a build does) and prints the resident-memory increase of the
load and the peak increase of the batch (Linux: VmRSS, and VmHWM reset through /proc/self/clear_refs first):

    python -m influence.memory measure FOLDER --rows 8 --row-tokens 128 [--head-chunk-tokens 256]
        [--checkpointing] [--dtype bfloat16] [--task classification]

With torch 2.13 CPU and transformers 5.23, 1,024 tokens per batch, estimate / measured (the whole process:
weights and the batch's peak):
    Llama-shaped, hidden 256, 4 blocks, vocab 8,000: head over the whole batch 1.0; in 256-token chunks 0.74;
        chunks and checkpointing 0.75; bfloat16, chunks 0.58 (small chunk tensors leave the allocator ~50 MB of
        slack that does not grow with the model, and bfloat16 weights still hand float32 copies to the taps)
    GPT-2-shaped, hidden 256, 4 blocks: whole head 0.92, chunks 0.76; a BERT classifier 1.14
    Qwen2-0.5B-shaped (hidden 896, intermediate 4,864, 14 heads, 2 KV heads): 4 blocks, vocab 4,000: 0.95,
        checkpointing 0.90, bfloat16 0.76; 2 blocks, vocab 151,936, 256-token chunks: 1.09 (the head: 3.2
        copies measured)
The weights alone measure within 0.73-0.99 (the rest is the loader's own allocations). Per token and block the
Llama shapes kept 10-22 hidden-wide values beside the four intermediate-wide ones, bimodally from run to run
(the allocator's reuse, not the model). tests/influence/test_memory.py runs the command on three models and
requires the estimate within 0.5x-2x of what it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from influence.errors import UnsupportedModelError
from influence.layers import Layer
from influence.lazy import lazy_module
from influence.projection import ProjectionSpec, factor_dims

# The estimate reads headers and configs only (the API refuses a model with it); a measurement loads torch.
torch = lazy_module("torch")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# safetensors' dtype codes: bytes per element, and whether the loader converts it to the compute dtype.
SAFETENSORS_DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True),
    "F32": (4, True),
    "F16": (2, True),
    "BF16": (2, True),
    "F8_E4M3": (1, True),
    "F8_E5M2": (1, True),
    "I64": (8, False),
    "I32": (4, False),
    "I16": (2, False),
    "I8": (1, False),
    "U64": (8, False),
    "U32": (4, False),
    "U16": (2, False),
    "U8": (1, False),
    "BOOL": (1, False),
}
# The safetensors format's own bound on a header; a larger length field is a broken (or hostile) file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Values kept per token (see the module docstring: the model and the measurements that set these numbers).
ACT_HIDDEN = 12
ACT_INTERMEDIATE = 4
ACT_OUTSIDE = 4
CHECKPOINT_LIVE_BLOCKS = 2
HEAD_COPIES = 4

# Config keys by what they size; architectures name the same size differently (as app.services.models checks
# them). The first key present wins.
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim")
BLOCK_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
# Architectures whose MLP has a gate beside up and down (three matrices), for the config arithmetic only.
GATED_MLP_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a worker needs for one model at one batch budget; total_bytes is the sum of the four parts."""

    weights_bytes: int
    activations_bytes: int
    head_bytes: int
    gradients_bytes: int
    total_bytes: int
    dtype: str
    tokens_per_batch: int
    weights_from: str  # "safetensors" (the files' headers) or "config" (arithmetic)

    def breakdown(self) -> str:
        """The parts in words: 'weights 2.1 GB bfloat16, activations 9.8 GB at 8,192 tokens per batch, ...'."""
        return (
            f"weights {format_bytes(self.weights_bytes)} {self.dtype}, activations "
            f"{format_bytes(self.activations_bytes)} at {self.tokens_per_batch:,} tokens per batch, head "
            f"{format_bytes(self.head_bytes)}, gradients {format_bytes(self.gradients_bytes)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_bytes(count: int) -> str:
    """Decimal units, one decimal: 14.2 GB, 310.0 MB, 12.5 kB, 900 bytes."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


# --- weights from safetensors headers ---------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype code, shape)} from the file's header alone (the tensors are not read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise UnsupportedModelError(
            f"{path.name} in {path.parent} has no readable safetensors header ({reason})"
        ) from None
    if not isinstance(header, dict):
        raise UnsupportedModelError(
            f"{path.name} in {path.parent}: the safetensors header is not a JSON object"
        )
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if (
            dtype not in SAFETENSORS_DTYPES
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            raise UnsupportedModelError(
                f"{path.name} in {path.parent}: tensor {str(name)[:200]!r} has no known dtype and shape"
            )
        tensors[name] = (dtype, tuple(shape))
    return tensors


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a loader reads from `folder`: a shard index's shards, else model.safetensors (or
    adapter_model.safetensors), else every *.safetensors file."""
    folder = Path(folder)
    shards: set[str] = set()
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            shards |= {str(name) for name in weight_map.values()}
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
            raise UnsupportedModelError(f"{index.name} in {folder} has no readable weight_map") from None
    if shards:
        return [folder / name for name in sorted(shards) if "/" not in name and (folder / name).is_file()]
    for single in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / single).is_file():
            return [folder / single]
    return sorted(folder.glob("*.safetensors"))


def header_weight_bytes(folders: Sequence[Path], dtype: str) -> int:
    """Bytes of every tensor in the folders' weight files once loaded at `dtype` (a tensor named in two files
    counts once)."""
    element = DTYPE_BYTES[dtype]
    sizes: dict[tuple[Path, str], int] = {}
    for folder in folders:
        for path in weight_files(Path(folder)):
            for name, (code, shape) in read_safetensors_header(path).items():
                own, floating = SAFETENSORS_DTYPES[code]
                sizes[(Path(folder), name)] = math.prod(shape) * (element if floating else own)
    return sum(sizes.values())


# --- the model's shape from its config --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    num_labels: int
    tied: bool
    gated: bool
    biased: bool  # linear layers with biases (GPT-2, BERT; not Llama)
    positions: int  # learned position embeddings (0: rotary or none)
    active_experts: int = 1  # a mixture of experts runs this many MLPs per token


def _first(config: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def read_config(folder_or_config: Any) -> dict[str, Any]:
    """A config as a plain dict: a folder's config.json, a transformers config, or a mapping."""
    if isinstance(folder_or_config, Mapping):
        config = dict(folder_or_config)
    elif hasattr(folder_or_config, "to_dict"):
        config = folder_or_config.to_dict()
    else:
        path = Path(folder_or_config) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise UnsupportedModelError(f"{path} is not a readable JSON config") from None
    if not isinstance(config, dict):
        raise UnsupportedModelError("the model's config is not a JSON object")
    # A composite model (a vision-language one) keeps its language model's sizes in text_config.
    text = config.get("text_config")
    if _first(config, HIDDEN_KEYS) is None and isinstance(text, dict):
        config = {**config, **text}
    return config


def model_shape(config: Mapping[str, Any]) -> ModelShape:
    hidden, blocks = _first(config, HIDDEN_KEYS), _first(config, BLOCK_KEYS)
    if hidden is None or blocks is None:
        raise UnsupportedModelError(
            "cannot estimate the model's memory: its config names no hidden size or block count "
            f"(looked for {', '.join(HIDDEN_KEYS)} and {', '.join(BLOCK_KEYS)})"
        )
    heads = _first(config, HEAD_KEYS) or 1
    kv_heads = _first(config, ("num_key_value_heads",)) or heads
    labels = config.get("id2label")
    model_type = str(config.get("model_type", ""))
    return ModelShape(
        hidden=hidden,
        intermediate=_first(config, INTERMEDIATE_KEYS) or 4 * hidden,
        blocks=blocks,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=_first(config, ("head_dim",)) or max(1, hidden // heads),
        vocab=_first(config, ("vocab_size",)) or 0,
        num_labels=_first(config, ("num_labels",)) or (len(labels) if isinstance(labels, dict) else 2),
        tied=bool(config.get("tie_word_embeddings", True)),
        gated=model_type in GATED_MLP_TYPES,
        biased=bool(config.get("attention_bias", model_type not in GATED_MLP_TYPES)),
        # Learned position embeddings: GPT-2's n_positions, BERT's (position_embedding_type) max positions.
        positions=_first(config, ("n_positions",))
        or (_first(config, ("max_position_embeddings",)) if "position_embedding_type" in config else None)
        or 0,
        active_experts=_first(config, ("num_experts_per_tok",)) or 1,
    )


def config_weight_count(shape: ModelShape, task: str) -> int:
    """Parameters by arithmetic, for a config without weight files: embeddings, blocks, final norm, head."""
    attention = shape.hidden * shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads)
    mlp = (3 if shape.gated else 2) * shape.hidden * shape.intermediate
    block = attention + mlp + 4 * shape.hidden  # two norms (weight and bias at most)
    if shape.biased:
        block += shape.head_dim * (2 * shape.heads + 2 * shape.kv_heads) + shape.intermediate + shape.hidden
    head = shape.vocab * shape.hidden if task == "causal-lm" else shape.num_labels * shape.hidden
    untied_head = 0 if task == "causal-lm" and shape.tied else head
    embeddings = (shape.vocab + shape.positions) * shape.hidden
    return embeddings + shape.blocks * block + 2 * shape.hidden + untied_head


# --- the estimate -----------------------------------------------------------------------------------------


def batch_tokens(max_tokens: int, max_rows: int | None, row_tokens: int | None) -> int:
    """Most tokens one batch holds: the token budget, or rows x row length when that is smaller; a single row
    longer than the budget runs alone."""
    tokens = max_tokens
    if max_rows is not None and row_tokens is not None:
        tokens = min(tokens, max_rows * row_tokens)
    return max(tokens, row_tokens or 0)


def as_layer(unit: Layer | Mapping[str, Any]) -> Layer:
    """A Layer, or one from its to_dict() record (a registration's stored layers)."""
    if isinstance(unit, Layer):
        return unit
    fields = {key: value for key, value in unit.items() if key in Layer.__dataclass_fields__}
    return Layer(**{**fields, "groups": tuple(fields.get("groups") or ())})


def tap_bytes(
    units: Sequence[Layer | Mapping[str, Any]],
    projection: ProjectionSpec,
    tokens: int,
    rows: int,
    row_tokens: int,
    element: int,
) -> int:
    """What the taps of `units` form for one batch: per-token captures at the compute dtype, per-row features
    in float32 (see the module's docstring)."""
    per_token = per_row = 0
    for layer in map(as_layer, units):
        unit = projection.for_layer(layer)
        if unit.kind == "factorized":
            in_size = layer.in_features + (1 if layer.has_bias and layer.kind != "embedding" else 0)
            k_out, k_in = factor_dims(layer.out_features, in_size, unit.dim)
            per_token += (k_in or in_size) + (k_out or layer.out_features)
            per_row += (k_out or layer.out_features) * (k_in or in_size)
        elif unit.kind == "tokens":
            width = min(unit.dim, layer.out_features)
            per_token += width
            per_row += width * row_tokens
        else:  # identity and dense projections form the unit's whole per-sample gradient
            per_row += layer.num_params + (unit.dim if unit.kind != "identity" else 0)
    return tokens * per_token * element + rows * per_row * 4


def estimate_model_memory(
    folder_or_config: Any,
    *,
    dtype: str,
    max_tokens: int,
    head_chunk_tokens: int,
    checkpointing: bool,
    selected_units: Sequence[Layer | Mapping[str, Any]] | None = None,
    projection: ProjectionSpec | None = None,
    task: str = "causal-lm",
    max_rows: int | None = None,
    row_tokens: int | None = None,
    adapters: Sequence[Path] = (),
) -> MemoryEstimate:
    """Bytes a worker needs to featurize batches of up to `max_tokens` tokens (`max_rows` rows of up to
    `row_tokens` tokens, when given) with the model in `folder_or_config` (a folder: its config.json and
    safetensors headers; a config: arithmetic), its weights at `dtype` (float32 | bfloat16), the taps on
    `selected_units` (none: no taps) projected by `projection` (default: auto). See the module docstring."""
    if dtype not in DTYPE_BYTES:
        raise UnsupportedModelError(
            f"unknown compute dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}"
        )
    element = DTYPE_BYTES[dtype]
    shape = model_shape(read_config(folder_or_config))
    is_folder = isinstance(folder_or_config, str | os.PathLike)
    if is_folder and weight_files(Path(folder_or_config)):
        weights = header_weight_bytes([Path(folder_or_config), *adapters], dtype)
        weights_from = "safetensors"
    else:
        weights = config_weight_count(shape, task) * element + header_weight_bytes(adapters, dtype)
        weights_from = "config"

    tokens = batch_tokens(max_tokens, max_rows, row_tokens)
    rows = min(max_rows or tokens, tokens)
    block = (
        ACT_HIDDEN * shape.hidden + ACT_INTERMEDIATE * shape.intermediate * shape.active_experts
    ) * element
    if checkpointing:
        kept_blocks = (
            shape.blocks * shape.hidden * element + min(shape.blocks, CHECKPOINT_LIVE_BLOCKS) * block
        )
    else:
        kept_blocks = shape.blocks * block
    activations = tokens * (kept_blocks + ACT_OUTSIDE * shape.hidden * element)
    if task == "causal-lm":
        head = min(head_chunk_tokens, tokens) * shape.vocab * 4 * HEAD_COPIES
    else:
        head = rows * shape.num_labels * 4 * HEAD_COPIES
    units = list(selected_units or ())
    gradients = tap_bytes(units, projection or ProjectionSpec(), tokens, rows, row_tokens or tokens, element)
    return MemoryEstimate(
        weights_bytes=weights,
        activations_bytes=activations,
        head_bytes=head,
        gradients_bytes=gradients,
        total_bytes=weights + activations + head + gradients,
        dtype=dtype,
        tokens_per_batch=tokens,
        weights_from=weights_from,
    )


# --- the worker device's memory ---------------------------------------------------------------------------


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_limit() -> int | None:
    """The memory limit of this process' cgroup (v2, else v1), None when unlimited: a container's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number
            return int(text)
    return None


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch where no NVIDIA driver is loaded (the API on a CPU
    machine, which never computes): without /proc/driver/nvidia there is no CUDA device to find."""
    if "torch" not in sys.modules and not Path("/proc/driver/nvidia/gpus").is_dir():
        return False
    return bool(torch.cuda.is_available())


def device_memory(device: str = "auto") -> tuple[int | None, str]:
    """(bytes, what they are) of the memory a worker on `device` (auto | cpu | cuda) featurizes in: the first
    GPU's total memory when the device is (or auto finds) CUDA, else the machine's RAM: MemTotal, or the
    cgroup's limit when lower (a container). Total, not available: the budget is a property of the worker's
    machine, while what is free at one moment depends on whatever else runs then (MemAvailable would make a
    registration pass or fail by when it ran)."""
    if device == "cuda" or (device == "auto" and _cuda_available()):
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"GPU memory ({props.name})"
        return None, "GPU memory (no GPU visible here)"
    total, limit = _meminfo_total(), _cgroup_limit()
    if limit is not None and (total is None or limit < total):
        return limit, "RAM (the cgroup's memory limit)"
    return total, "RAM (MemTotal)"


# Of the worker device's memory, the share a model may take by default: the rest is for the worker process itself
# (interpreter, torch, the tokenizer), the operating system and whatever else the machine runs.
DEFAULT_BUDGET_SHARE = 0.8


@lru_cache(maxsize=4)  # a GPU's properties are read once per process
def default_budget(device: str = "auto") -> tuple[int | None, str]:
    """(DEFAULT_BUDGET_SHARE of device_memory(device), in words), None when the memory cannot be read."""
    total, what = device_memory(device)
    budget = None if total is None else int(total * DEFAULT_BUDGET_SHARE)
    return budget, f"{DEFAULT_BUDGET_SHARE:.0%} of the worker device's {what} as this process sees it"


# --- measurement ------------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def _meta_model(folder: Path, task: str) -> None:
    # transformers: only a measurement needs it here.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        auto.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False), trust_remote_code=False)


def measure_peak(
    folder: Path,
    *,
    task: str,
    dtype: str,
    rows: int,
    row_tokens: int,
    head_chunk_tokens: int | None = None,
    checkpointing: bool = False,
    seed: int = 0,
) -> dict:
    """In this process (a fresh one: freed memory the allocator keeps would hide a later peak): the resident
    increase of loading `folder` as a worker does, and the peak increase of featurizing one batch of
    rows x row_tokens random tokens through every layer unit. Linux only (/proc/self)."""
    # The measurement runs the worker's own path; importing it at the top would make this module (read by the
    # API at every registration) import the featurization stack.
    from influence.data import Batch
    from influence.gradients import Featurizer
    from influence.layers import discover_layers
    from influence.loading import load_model, load_tokenizer

    # What the first load of an architecture costs besides its weights (transformers' modeling modules, the
    # tokenizer) is paid first, on the meta device, so that the load below measures the weights.
    load_tokenizer(folder)
    _meta_model(folder, task)
    before = _status_bytes("VmRSS")
    loaded = load_model(folder, task=task, dtype=getattr(torch, dtype))
    model = loaded.model
    with (
        torch.no_grad()
    ):  # transformers may map the weights from their files: touching them makes them resident
        for tensor in (*model.parameters(), *model.buffers()):
            tensor.sum()
    featurizer = Featurizer(model, discover_layers(model), ProjectionSpec())
    vocab = int(model.get_input_embeddings().num_embeddings)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, row_tokens), generator=generator)
    labels = ids.clone() if task == "causal-lm" else torch.zeros(rows, dtype=torch.long)
    batch = Batch(ids, torch.ones_like(ids), labels, task, torch.arange(rows))
    loaded_rss = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    featurizer.featurize(batch, head_chunk_tokens=head_chunk_tokens, checkpointing=checkpointing)
    peak = _status_bytes("VmHWM")
    return {
        "weights_bytes": loaded_rss - before,
        "batch_bytes": peak - loaded_rss,
        "tokens": rows * row_tokens,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m influence.memory", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("measure", help="measure a model's load and one batch's peak (JSON)")
    measure.add_argument("folder", type=Path)
    measure.add_argument("--task", default="causal-lm", choices=("causal-lm", "classification"))
    measure.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    measure.add_argument("--rows", type=int, default=8)
    measure.add_argument("--row-tokens", type=int, default=128)
    measure.add_argument(
        "--head-chunk-tokens", type=int, default=None, help="default: the whole batch at once"
    )
    measure.add_argument("--checkpointing", action="store_true")
    args = parser.parse_args(argv)
    options = {"head_chunk_tokens": args.head_chunk_tokens, "checkpointing": args.checkpointing}
    result = measure_peak(
        args.folder, task=args.task, dtype=args.dtype, rows=args.rows, row_tokens=args.row_tokens, **options
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
