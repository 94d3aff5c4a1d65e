"""What a job step gets besides ids, and the compute settings of the process that runs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.jobs.dispatch import Dispatcher
from app.jobs.model_cache import ModelCache
from influence.kernels import enable_compiled_scoring
from influence.threads import ONE_THREAD


def resolve_device(setting: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cpu` / `cuda` as given."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def configure_compute(settings: Settings, *, compile_now: bool) -> None:
    """This process' compute settings, applied once at its start (the API's lifespan, each worker pool process).

    The one-thread worker for small featurization batches is started first, while the process has no other
    thread of ours: starting it sets torch's default thread count to 1 for an instant (influence.threads), and
    the kernel's compile thread builds for the count it sees. compile_now compiles the scoring kernel in the
    background (the API, whose queries need it); otherwise at the first call that uses it (a worker)."""
    ONE_THREAD.start()
    if settings.small_batch_threads != "auto":
        ONE_THREAD.decide(one_thread=settings.small_batch_threads == "one")
    if settings.compiled_scoring:
        enable_compiled_scoring(warm_up=compile_now)


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
