"""Loading a plugin module (one whose import registers estimators or aggregations) for one test only."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from influence.aggregation import AGGREGATORS
from influence.estimators import ESTIMATORS

TOYS = "tests.toy_extensions"


@contextmanager
def loaded_plugin(module: str = TOYS) -> Iterator[ModuleType]:
    """Import `module` afresh for the block, then remove every registration its import made (and the module,
    so that the next import registers them again)."""
    registries = (ESTIMATORS, AGGREGATORS)
    before = [set(registry) for registry in registries]
    sys.modules.pop(module, None)
    try:
        yield importlib.import_module(module)
    finally:
        for registry, names in zip(registries, before, strict=True):
            for name in set(registry) - names:
                del registry[name]
        sys.modules.pop(module, None)
