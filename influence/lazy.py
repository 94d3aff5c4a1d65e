"""A module imported on first use: how light modules name torch without importing it.

The service's API process reads the registries (estimator and aggregation names, what each estimator
declares: requires_fit, needs_checkpoints, ...) but never computes, so it must not pay torch's import (hundreds
of MiB, seconds). A module whose torch use is all inside functions binds `torch = lazy_module("torch")` at the
top instead of `import torch`: defining its classes and registering them imports nothing, the first attribute
read (`torch.float64`, in a worker) imports the real module, and later reads are a plain getattr.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module `name` until an attribute is read, then forwards to it."""

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attribute)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_module(name: str) -> Any:
    """A stand-in for `import name` that imports it on the first attribute read (typed Any, as a module)."""
    return LazyModule(name)


def is_tensor(value: Any) -> bool:
    """isinstance(value, torch.Tensor), without importing torch: no tensor exists before torch is imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def lazy_package(
    name: str, table: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 `__getattr__` and `__dir__`: a public name is imported from the module `table` names
    for it on first read, then kept in the package's `namespace` (its globals()), so later reads skip this; any
    other name is read as a submodule (`influence.metrics` after a bare `import influence`), as when the package
    imported them all."""

    def __getattr__(attribute: str) -> Any:
        module = table.get(attribute)
        if module is None:
            try:
                return importlib.import_module(f"{name}.{attribute}")
            except ModuleNotFoundError as error:
                if error.name != f"{name}.{attribute}":
                    raise
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}")
        value = getattr(importlib.import_module(module), attribute)
        namespace[attribute] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
