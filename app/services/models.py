"""Model registration: validate the source cheaply, list the layer units without loading weights, record it.

Order of work, cheapest first, so a bad request fails fast and nothing heavy runs for it:
  1. the source: an absolute folder under an allowed root, or a hub id present in the local cache (the
     service never downloads); every entry of the folder must resolve (symlinks followed) inside the allowed
     roots, or inside the hub cache for a hub id; it must hold config.json, .safetensors weights (pickle is
     refused) and tokenizer files; the config's sizes (blocks, widths, vocabulary, labels) are checked as
     plain JSON against the settings, before transformers builds anything from them;
  2. the adapter and checkpoint folders (adapter_config.json + adapter_model.safetensors), their entries
     resolving inside the allowed roots too;
  3. config and tokenizer load (no remote code, ever);
  4. layers: the architecture is instantiated from its config on torch's meta device (no memory, no
     weights), the PEFT adapter config applied, then `influence.discover_layers`; only if that fails is the
     model loaded for real with `influence.load_model`; at most `max_model_layer_units` units;
  5. memory: the estimate of what a worker needs for the model at the settings' batch budget
     (influence.memory: safetensors headers, config sizes) against the worker budget; over it: 422 with both;
  6. weights hashes (sha256 over the safetensors), then the row.

The folders can change after registration: `check_before_load` repeats the containment check right before a
process loads the model (app.jobs.model_cache.ModelCache).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub.constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import StrictDataclassError
from sqlalchemy import select
from sqlalchemy.orm import Session

import influence
from app.config import Settings, get_settings
from app.db import after_commit
from app.errors import Conflict, Invalid, ServiceError, Unavailable
from app.models import Index, Job, RegisteredModel
from app.schemas.models import ModelCreate
from app.services import isolation
from app.services.paths import resolve_allowed_path
from app.services.sources import delete_unless_indexed, refuse_while_indexed
from app.services.tenancy import owned
from app.workflows.experiment import state as experiment_state
from influence.errors import InfluenceError, UnsupportedModelError
from influence.files import remove_tree
from influence.lazy import lazy_module

# Imported on first use (both import torch): by model inspection, in a request process (in the API itself when
# request_processes = 0), and by worker-capacity checks.
loading = lazy_module("influence.loading")
memory = lazy_module("influence.memory")

log = logging.getLogger(__name__)

# `name` or `org/name`, as the hub spells repository ids.
HUB_ID = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)?$"
)

# A model or adapter folder holds a config, a tokenizer and weights; the walk that checks where its entries lead
# stops at this count, so a folder of countless files cannot hold a request.
MAX_FOLDER_ENTRIES = 10_000
# A config.json is small even with a long id2label; a bigger file is refused before it is read into memory.
MAX_CONFIG_BYTES = 8 * 1024 * 1024

# Config keys by the limit that bounds them; architectures name the same size differently. Heads and head
# widths are bounded by the width limit: neither can exceed the hidden width of a sane model.
BLOCK_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "num_encoder_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)
WIDTH_KEYS = (
    "hidden_size",
    "n_embd",
    "d_model",
    "dim",
    "hidden_dim",
    "embedding_size",
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "d_ff",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "num_key_value_heads",
    "head_dim",
    "d_kv",
)
# Sub-configs of composite models (text_config, encoder, ...) carry the same keys; deeper nesting is not a
# config transformers builds from.
NESTED_CONFIG_DEPTH = 3

# What a tokenizer can be loaded from: a fast tokenizer's tokenizer.json, or a slow tokenizer's files.
TOKENIZER_FILE_SETS = (
    ("tokenizer.json",),
    ("vocab.txt",),
    ("vocab.json", "merges.txt"),
    ("tokenizer.model",),
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
    ("spm.model",),
    ("source.spm",),
)


def get_model(session: Session, model_id: str, tenant_id: str) -> RegisteredModel:
    """A model of this tenant (NotFound for another tenant's, as for an unknown id)."""
    return owned(session, RegisteredModel, model_id, tenant_id, "model")


def num_blocks(model: RegisteredModel) -> int:
    blocks = [layer["block"] for layer in model.layers if layer.get("block") is not None]
    return max(blocks) + 1 if blocks else 0


# --- validation of what the caller names ------------------------------------------------------------------


def resolve_source(settings: Settings, source: str, revision: str | None) -> tuple[Path, str | None]:
    """The model folder and the revision to record (a hub id's resolved commit)."""
    if source.startswith("/"):
        if revision is not None:
            raise Invalid("revision applies to hub ids only; a local folder is used as it is")
        folder = resolve_allowed_path(settings, source, "model source")
        if not folder.is_dir():
            raise Invalid(f"model source {source!r} is not an existing folder")
        return folder, None
    if not HUB_ID.match(source) or ".." in source:
        raise Invalid(
            f"model source {source!r} is neither an absolute folder path nor a hub id like 'org/name'"
        )
    try:
        folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises many types; all mean "not in the local cache"
        raise Invalid(
            f"model {source!r} (revision {revision or 'main'}) is not in the local hub cache; the service "
            f"does not download models ({exc.__class__.__name__})"
        ) from None
    # snapshots/<commit>: record the commit, so the registration stays pinned when the cache moves on.
    return folder, folder.name


def _real(path: str | os.PathLike) -> Path:
    # os.path.realpath, unlike Path.resolve, does not raise on a symlink loop: the loop's path is then
    # checked against the roots like any other.
    return Path(os.path.realpath(path))


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def allowed_roots(settings: Settings) -> list[Path]:
    return [_real(Path(root).expanduser()) for root in settings.allowed_roots]


def hub_cache_root() -> Path:
    return _real(huggingface_hub.constants.HF_HUB_CACHE)


def check_folder_files(folder: Path, roots: Sequence[Path], what: str, where: str) -> None:
    """Every entry under `folder` (the folder too) must resolve inside `roots`: Invalid (422) naming the first
    one that does not, without saying where it leads. Links are not followed into other folders (each link is
    itself checked), and the walk stops at MAX_FOLDER_ENTRIES."""
    if not _inside(_real(folder), roots):
        raise Invalid(f"{what} {folder} resolves outside {where}")
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            seen += 1
            if seen > MAX_FOLDER_ENTRIES:
                raise Invalid(
                    f"{what} {folder} holds more than {MAX_FOLDER_ENTRIES} files and folders; a model or adapter "
                    "folder holds its config, tokenizer and weights"
                )
            path = os.path.join(dirpath, name)
            if not _inside(_real(path), roots):
                raise Invalid(
                    f"{what} {folder}: {os.path.relpath(path, folder)!r} resolves outside {where} (a symlink); "
                    f"every file the loader may open must lie inside {where}"
                )


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_size(config: dict, key: str, where: str, limit: int, setting: str) -> None:
    value = config.get(key)
    if value is None:  # absent or null: the architecture's default
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise Invalid(
            f"config.json: {where}{key} must be a positive integer of at most {limit} ({setting}); "
            f"it is {_show(value)}"
        )


def _check_labels(config: dict, where: str, limit: int) -> None:
    _check_size(config, "num_labels", where, limit, "max_num_labels")
    for key in ("id2label", "label2id"):
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise Invalid(
                f"config.json: {where}{key} must be an object of at most {limit} classes (max_num_labels)"
            )
        if len(value) > limit:
            raise Invalid(
                f"config.json: {where}{key} names {len(value)} classes, over the limit of {limit} (max_num_labels)"
            )


def check_config_values(config: dict, settings: Settings, where: str = "", depth: int = 0) -> None:
    """The config's sizes, as plain JSON, against the settings: positive integers (not strings, booleans or
    floats) under their limits, in nested sub-configs too. Runs before transformers reads the config, so a
    config that would build a huge (or no) model costs nothing but this."""
    for key in BLOCK_KEYS:
        _check_size(config, key, where, settings.max_model_blocks, "max_model_blocks")
    for key in WIDTH_KEYS:
        _check_size(config, key, where, settings.max_model_width, "max_model_width")
    _check_size(config, "vocab_size", where, settings.max_model_vocab, "max_model_vocab")
    _check_labels(config, where, settings.max_num_labels)
    if depth >= NESTED_CONFIG_DEPTH:
        return
    for key, value in config.items():
        if isinstance(value, dict) and (key.endswith("_config") or key in ("encoder", "decoder")):
            check_config_values(value, settings, f"{where}{key}.", depth + 1)


def _read_config(config_path: Path, what: str, folder: Path) -> dict:
    try:
        size = config_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise Invalid(
                f"{what} {folder}: config.json is {size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}"
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: malformed JSON and integers beyond Python's digit limit; RecursionError: deep nesting.
        reason = str(exc)[:200] if not isinstance(exc, RecursionError) else "nested too deeply"
        raise Invalid(f"{what} {folder}: config.json is not readable JSON ({reason})") from None
    if not isinstance(config, dict):
        raise Invalid(f"{what} {folder}: config.json is not a JSON object")
    return config


def check_tokenizer_files(folder: Path, what: str) -> None:
    if any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        return
    looked_for = ", ".join(" + ".join(names) for names in TOKENIZER_FILE_SETS)
    raise Invalid(
        f"{what} {folder} has no tokenizer files: looked for {looked_for}; the service tokenizes with the "
        "model's own tokenizer"
    )


def check_model_folder(
    folder: Path, what: str, settings: Settings, roots: Sequence[Path], where: str
) -> None:
    check_folder_files(folder, roots, what, where)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise Invalid(f"{what} {folder} has no config.json")
    config = _read_config(config_path, what, folder)
    if "auto_map" in config:
        raise UnsupportedModelError(
            f"{what} {folder} needs custom code (config.json has auto_map); the service never runs remote code"
        )
    check_config_values(config, settings)
    loading.check_safetensors_only(folder)  # UnsupportedModelError (422) names pickle-only folders
    check_tokenizer_files(folder, what)


def source_roots(settings: Settings, source: str) -> tuple[list[Path], str]:
    """Where the files of a model source may lead: the allowed roots for a local folder, the hub cache for a
    hub id (its snapshot files are links into the cache's blobs)."""
    if source.startswith("/"):
        return allowed_roots(settings), "the allowed roots"
    return [hub_cache_root()], "the hub cache"


def check_adapter_folder(settings: Settings, raw: str, what: str) -> Path:
    folder = resolve_allowed_path(settings, raw, what)
    if not folder.is_dir():
        raise Invalid(f"{what} {raw!r} is not an existing folder")
    check_folder_files(folder, allowed_roots(settings), what, "the allowed roots")
    for required in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / required).is_file():
            raise Invalid(f"{what} {raw!r} has no {required} (a PEFT adapter folder saved with safetensors)")
    return folder


def check_before_load(source: str, revision: str | None, adapters: Iterable[str]) -> None:
    """The containment check again, right before this process loads a registered model: its folders may have
    changed since registration. The roots are those of this process' settings (a model cache serves requests of
    no one settings object); a local folder (and an adapter) is recorded resolved, so its own path is a root
    too, and a folder since swapped for a link resolves elsewhere and is refused."""
    roots = allowed_roots(get_settings())
    if source.startswith("/"):
        check_folder_files(Path(source), [*roots, Path(source)], "model source", "the allowed roots")
    else:
        try:
            folder = Path(snapshot_download(source, revision=revision, local_files_only=True))
        except Exception:  # not in the local cache: the loader reports that itself
            folder = None
        if folder is not None:
            check_folder_files(folder, [hub_cache_root()], "model source", "the hub cache")
    for adapter in adapters:
        check_folder_files(Path(adapter), [*roots, Path(adapter)], "adapter", "the allowed roots")


# --- layers without weights -------------------------------------------------------------------------------


def _load_config(folder: Path, task: str, num_labels: int | None):
    # transformers: seconds to import, and only a registration needs it (the API starts without it).
    from transformers import AutoConfig

    labels = {"num_labels": num_labels} if task == "classification" and num_labels is not None else {}
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False, **labels)
    except (ValueError, OSError, KeyError, TypeError, StrictDataclassError) as exc:
        # StrictDataclassError: a config field of the wrong type that the size checks do not cover.
        raise UnsupportedModelError(f"cannot read the config of {folder}: {str(exc)[:500]}") from None


def _meta_layers(config, task: str, adapter: Path | None):
    """Layer units of the architecture built on the meta device: shapes only, no memory, no weights."""
    # torch and transformers: slow imports that only a registration needs, as in _load_config.
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=False)
        if adapter is not None:
            from peft import PeftConfig, get_peft_model  # slower still; only for a model with an adapter

            model = get_peft_model(model, PeftConfig.from_pretrained(str(adapter)))
    return influence.discover_layers(model)


def _loaded_layers(folder: Path, task: str, num_labels: int | None, adapter: Path | None):
    try:
        # Looked up on the package at each call: a test replaces it to prove the meta path loads no weights.
        loaded = influence.load_model(folder, task=task, num_labels=num_labels or 2, adapter=adapter)
    except InfluenceError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(f"cannot load {folder} as a {task} model: {exc}") from None
    return influence.discover_layers(loaded.model)


def describe_layers(
    folder: Path, config, task: str, num_labels: int | None, adapter: Path | None, max_units: int
):
    """influence.Layer list of the model (with its adapter), from the config when possible; Invalid over
    `max_units` (max_model_layer_units)."""
    try:
        layers = _meta_layers(config, task, adapter)
    except InfluenceError:
        raise
    except Exception as exc:  # an architecture that cannot be built on meta: pay for a real load
        log.info("meta-device layer listing failed for %s (%s); loading the model", folder, exc)
        layers = _loaded_layers(folder, task, num_labels, adapter)
    if len(layers) > max_units:
        raise Invalid(
            f"the model lists {len(layers)} layer units, over the limit of {max_units} (max_model_layer_units)"
        )
    return layers


# --- registration -----------------------------------------------------------------------------------------


def register_model(
    session: Session, settings: Settings, spec: ModelCreate, tenant_id: str
) -> RegisteredModel:
    """Validate, describe and record a model; the row is flushed, the caller's unit of work commits it. The
    folders are inspected in a request process (app/services/isolation.py): tokenizer, config and meta-device
    model builds and weight hashes are the work that would stall the API's other requests."""
    model = RegisteredModel(tenant_id=tenant_id, **isolation.run(inspect_model, settings, spec))
    session.add(model)
    session.flush()
    return model


def inspect_model(settings: Settings, spec: ModelCreate) -> dict[str, Any]:
    """Everything a model registration checks and records, as the RegisteredModel's fields (but its tenant)."""
    if spec.task == "causal-lm" and spec.num_labels is not None:
        raise Invalid("num_labels applies to classification models only")
    if spec.num_labels is not None and spec.num_labels > settings.max_num_labels:
        raise Invalid(
            f"num_labels {spec.num_labels} is over the limit of {settings.max_num_labels} (max_num_labels)"
        )
    folder, revision = resolve_source(settings, spec.source, spec.revision)
    roots, where = source_roots(settings, spec.source)
    check_model_folder(folder, "model source", settings, roots, where)
    adapter = check_adapter_folder(settings, spec.adapter, "adapter") if spec.adapter else None
    checkpoints = []
    names: set[str] = set()
    for i, checkpoint in enumerate(spec.checkpoints):
        ckpt_folder = check_adapter_folder(settings, checkpoint.adapter, f"checkpoints[{i}].adapter")
        name = checkpoint.name or ckpt_folder.name
        if name in names:
            raise Invalid(f"checkpoints[{i}]: the name {name!r} is used twice; give each checkpoint a name")
        names.add(name)
        checkpoints.append((name, ckpt_folder, checkpoint.learning_rate))

    config = _load_config(folder, spec.task, spec.num_labels)
    num_labels = None if spec.task == "causal-lm" else int(spec.num_labels or config.num_labels)
    loading.load_tokenizer(folder)  # the worker needs it: a model without a usable tokenizer is refused now

    # The layers a featurizer sees: with the adapter, else with the first checkpoint's adapter.
    listing_adapter = adapter or (checkpoints[0][1] if checkpoints else None)
    max_units = settings.max_model_layer_units
    layers = describe_layers(folder, config, spec.task, num_labels, listing_adapter, max_units)
    adapters = [path for path in (adapter, *(ckpt for _, ckpt, _ in checkpoints)) if path is not None]
    refuse_over_budget(settings, spec.name, estimate_memory(settings, folder, adapters, spec.task, layers))
    names_listed = [layer.name for layer in layers]
    for name, ckpt_folder, _ in checkpoints:
        if ckpt_folder == listing_adapter:
            continue
        listed = describe_layers(folder, config, spec.task, num_labels, ckpt_folder, max_units)
        other = [layer.name for layer in listed]
        if other != names_listed:
            raise Invalid(
                f"checkpoint {name!r} exposes different layer units than the model "
                f"({len(other)} vs {len(names_listed)}); every checkpoint must share one adapter layout"
            )

    return dict(
        name=spec.name,
        source=str(folder) if spec.source.startswith("/") else spec.source,
        revision=revision,
        task=spec.task,
        num_labels=num_labels,
        adapter=str(adapter) if adapter else None,
        checkpoints=[
            {
                "name": name,
                "adapter": str(ckpt_folder),
                "learning_rate": rate,
                "weights_hash": loading.weights_hash(folder, ckpt_folder),
            }
            for name, ckpt_folder, rate in checkpoints
        ],
        weights_hash=loading.weights_hash(folder, adapter) if adapter else loading.weights_hash(folder),
        layers=[layer.to_dict() for layer in layers],
        groups=influence.layer_groups(layers),
    )


# --- what a worker can hold -------------------------------------------------------------------------------


def worker_budget(settings: Settings) -> tuple[int | None, str]:
    """The bytes a worker may use for one model (None: unknown) and where that number comes from."""
    if settings.worker_memory_bytes is not None:
        return settings.worker_memory_bytes, "INFLUENCE_WORKER_MEMORY_BYTES"
    budget, what = memory.default_budget(settings.device)
    return budget, f"{what}; set INFLUENCE_WORKER_MEMORY_BYTES where workers run on other machines"


def estimate_memory(settings: Settings, folder: Path, adapters, task: str, layers, **build: Any):
    """influence.memory's estimate at the settings' batch budget; `build`: an index's projection, max_length."""
    knobs = {"dtype": settings.compute_dtype, "max_tokens": settings.max_tokens_per_batch}
    knobs |= {
        "head_chunk_tokens": settings.head_chunk_tokens,
        "checkpointing": settings.activation_checkpointing,
    }
    knobs |= {"max_rows": settings.batch_size, "row_tokens": build.get("max_length") or settings.max_length}
    units = {"selected_units": layers, "projection": build.get("projection"), "adapters": adapters}
    return memory.estimate_model_memory(folder, task=task, **knobs, **units)


def registered_estimate(settings: Settings, model: RegisteredModel, layers=None, **build: Any):
    """The estimate of a registered model (all its units unless `layers`), or None when its files cannot be
    read now (a moved folder, a snapshot gone from the hub cache): loading it then fails with its own error."""
    adapters = [Path(raw) for raw in (model.adapter, *(c["adapter"] for c in model.checkpoints or ())) if raw]
    try:
        folder, _ = resolve_source(settings, model.source, model.revision)
        return estimate_memory(settings, folder, adapters, model.task, layers or model.layers, **build)
    except (ServiceError, InfluenceError, OSError) as exc:
        log.info("no memory estimate for model %s: %s", model.id, exc)
        return None


def refuse_over_budget(settings: Settings, name: str, estimate, error: type[ServiceError] = Invalid) -> None:
    """`error` (Invalid at registration and build start, Unavailable for a query) when the estimate is over
    the worker budget, naming both, the parts and what would lower them."""
    budget, source = worker_budget(settings)
    if estimate is None or budget is None or estimate.total_bytes <= budget:
        return
    advice = [
        "lower INFLUENCE_MAX_TOKENS_PER_BATCH",
        *(["lower INFLUENCE_HEAD_CHUNK_TOKENS"] if estimate.head_bytes > estimate.activations_bytes else []),
        *(["use INFLUENCE_COMPUTE_DTYPE=bfloat16"] if settings.compute_dtype == "float32" else []),
        *([] if settings.activation_checkpointing else ["set INFLUENCE_ACTIVATION_CHECKPOINTING=true"]),
    ]
    needs = f"about {memory.format_bytes(estimate.total_bytes)} in a worker ({estimate.breakdown()})"
    limit = f"{memory.format_bytes(budget)} ({source})"
    what = f"model {name!r} needs {needs}; the worker budget is {limit}"
    if error is Unavailable:
        what = f"no worker can hold model {name!r}: it needs {needs}, and the budget is {limit}"
    extensions = {"memory_estimate": estimate.to_dict(), "worker_memory_bytes": budget}
    raise error(f"{what}: {', '.join(advice)} or give the workers more memory", **extensions)


def require_worker_capacity(settings: Settings, model: RegisteredModel, layers=None) -> None:
    """Unavailable (503) when no worker can hold the model (with `layers`: a query's units) under the current
    settings, with the estimate and the budget."""
    refuse_over_budget(settings, model.name, registered_estimate(settings, model, layers), Unavailable)


# --- deletion ---------------------------------------------------------------------------------------------


def _experiments_using(session: Session, settings: Settings, model: RegisteredModel) -> list[str]:
    """Queued or running experiments of the model's tenant that fine-tune it or have registered it."""
    active = session.scalars(
        select(Job).where(
            Job.tenant_id == model.tenant_id,
            Job.kind == experiment_state.KIND,
            Job.status.in_(("queued", "running")),
        )
    ).all()
    return [
        job.id
        for job in active
        if (job.params or {}).get("base_model_id") == model.id
        or experiment_state.describe(settings, job).get("model_id") == model.id
    ]


def _service_adapters(session: Session, settings: Settings, model: RegisteredModel) -> list[Path]:
    """The adapter folders the service wrote for this model (an experiment's, under artifacts/adapters) that no
    other registration names. A folder anywhere else is the user's and is never removed."""
    home = settings.resolved_artifacts_dir / experiment_state.ADAPTERS_DIR
    named = {model.adapter, *(checkpoint.get("adapter") for checkpoint in model.checkpoints or ())}
    ours = {raw for raw in named if raw and Path(raw).parent == home and not Path(raw).is_symlink()}
    if not ours:
        return []
    for adapter, checkpoints in session.execute(
        select(RegisteredModel.adapter, RegisteredModel.checkpoints).where(RegisteredModel.id != model.id)
    ):
        ours.discard(adapter)
        for checkpoint in checkpoints or ():
            ours.discard(checkpoint.get("adapter"))
    return sorted(Path(raw) for raw in ours)


def delete_model(
    session: Session,
    settings: Settings,
    model_id: str,
    tenant_id: str,
    on_deleted: Callable[[str], None] | None = None,
) -> None:
    """Delete a model and, once that commits, the adapter folders the service wrote for it; `on_deleted(id)`
    then drops it from the caller's caches. Conflict (409) while an index or a queued or running experiment
    uses it. The model's own folders (a local source, a user's adapter) are never touched."""
    model = get_model(session, model_id, tenant_id)
    refuse_while_indexed(session, "model", model.id, Index.model_id)
    experiments = _experiments_using(session, settings, model)
    if experiments:
        raise Conflict(
            f"model {model.id!r} is used by queued or running experiment(s) {', '.join(experiments[:5])}; "
            "wait for them to finish or cancel them first",
            experiments=experiments[:5],
        )
    owned_folders = _service_adapters(session, settings, model)
    delete_unless_indexed(session, model, "model", model_id)

    def remove() -> None:
        for folder in owned_folders:
            remove_tree(folder)
        if on_deleted is not None:
            on_deleted(model_id)

    after_commit(session, remove)
