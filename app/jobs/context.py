"""What a job step gets besides ids, and the compute settings of the process that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.jobs.dispatch import Dispatcher

if TYPE_CHECKING:
    from app.jobs.model_cache import ModelCache


def resolve_device(setting: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cpu` / `cuda` as given."""
    if setting == "auto":
        # Here, not at the top: only a computing process asks, and the API's imports stay free of torch.
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def configure_compute(settings: Settings, *, compile_now: bool) -> None:
    """This process' compute settings, applied once at its start (the API's lifespan, each worker pool process).

    The one-thread worker for small featurization batches is started first, while the process has no other
    thread of ours: starting it sets torch's default thread count to 1 for an instant (influence.threads), and
    the kernel's compile thread builds for the count it sees. compile_now compiles the scoring kernel in the
    background (the API, whose queries need it); otherwise at the first call that uses it (a worker)."""
    # Here, not at the top: both import torch, which a process loads only once it computes (this call).
    from influence.kernels import enable_compiled_scoring
    from influence.threads import ONE_THREAD

    ONE_THREAD.start()
    if settings.small_batch_threads != "auto":
        ONE_THREAD.decide(one_thread=settings.small_batch_threads == "one")
    if settings.compiled_scoring:
        enable_compiled_scoring(warm_up=compile_now)


# The store manifest's `extra` key naming the dtype its features were computed in; a store without it was
# computed in float32 (before the setting existed).
COMPUTE_DTYPE_KEY = "compute_dtype"


def featurize_options(settings: Settings, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of influence.featurize_examples that bound a featurization's memory (rows and tokens per
    batch, tokens of the head's logits at once, activation checkpointing): a build job's recorded `params`
    where it has them, else this process's settings. None of them changes the features."""
    params = params or {}
    return {
        "batch_size": int(params.get("batch_size", settings.batch_size)),
        "max_tokens": int(params.get("max_tokens_per_batch", settings.max_tokens_per_batch)),
        "head_chunk_tokens": int(params.get("head_chunk_tokens", settings.head_chunk_tokens)),
        "checkpointing": bool(params.get("activation_checkpointing", settings.activation_checkpointing)),
    }


def store_compute_dtype(manifest: Any) -> str:
    """The dtype a store's features were computed in (its manifest's extra; float32 when it names none): the
    dtype its queries are featurized in, so that their features stay comparable."""
    return str((getattr(manifest, "extra", None) or {}).get(COMPUTE_DTYPE_KEY, "float32"))


@dataclass
class WorkerContext:
    """What a step needs besides ids: settings, a database, this process's models, a dispatcher, a device."""

    settings: Settings
    session_factory: sessionmaker[Session]
    models: ModelCache
    dispatcher: Dispatcher
    device: str = ""

    def __post_init__(self) -> None:
        if not self.device:
            self.device = resolve_device(self.settings.device)
