"""The API process imports no torch, transformers, peft or faiss: it validates, records and forwards; workers
compute. Each check runs in a fresh interpreter, since this test session has imported everything already.

Two views of `import app.main; create_app(settings)`:
- the real one: which heavy modules end up in sys.modules;
- an exact one: heavy modules replaced by permissive stand-ins, so that the import runs to the end and every
  module of ours that imports one is seen (not only the first), with the app modules where the chains enter.
What a running API does with requests (a forwarded query among them) is checked in tests/worker/test_embedded.py:
torch is never mapped into its process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "faiss")

# The library modules the API reads (names, defaults, traits, manifests), each light on its own.
LIGHT_LIBRARY_MODULES = (
    "influence",
    "influence.errors",
    "influence.lazy",
    "influence.estimators",
    "influence.aggregation",
    "influence.statistics",
    "influence.calibration",
    "influence.files",
    "influence.version",
    "influence.store",
    "influence.store.manifest",
    "influence.report",
    "influence.report.defaults",
    "influence.layers",
    "influence.finetune",
    "influence.index",
    # What the API's own checks call: tokens and projections named, folders and estimates read, kernel and
    # thread states reported; each imports torch on first use only (influence.lazy).
    "influence.kernels",
    "influence.threads",
    "influence.projection",
    "influence.tokens",
    "influence.layers.units",
    "influence.layers.selectors",
    "influence.data",
    "influence.loading",
    "influence.memory",
    "influence.store.feature_store",
)

_CREATE_APP = """
import pathlib, tempfile
import app.main
from app.config import Settings
tmp = pathlib.Path(tempfile.mkdtemp())
settings = Settings(_env_file=None, data_dir=tmp / "data", database_url=f"sqlite:///{tmp}/api.db",
                    allowed_roots=[tmp])
app.main.create_app(settings, job_queue=None, readiness_checks=())
"""

# Heavy modules become stand-ins that accept any attribute, call, subscript or subclassing; every import of
# one from a module of ours is recorded with the stack of our modules being imported at that moment.
_STAND_INS = """
import builtins, importlib.abc, importlib.machinery, json, sys, types
HEAVY = set(HEAVY_NAMES)
OURS = ("app", "influence", "worker")

class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (_StandIn,), {})
    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]  # used as a decorator
        return _Meta("instance", (_StandIn,), {})
    def __or__(cls, other): return cls
    def __ror__(cls, other): return cls
    def __getitem__(cls, item): return cls
    def __iter__(cls): return iter(())
    def __mro_entries__(cls, bases): return (object,)

class _StandIn(metaclass=_Meta):
    pass

class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (_StandIn,), {})

class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module
    def exec_module(self, module):
        pass

class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HEAVY:
            return importlib.machinery.ModuleSpec(name, _Loader(), is_package=True)
        return None

sys.meta_path.insert(0, _Finder())
_import = builtins.__import__
heavy_importers, edges = set(), {}


def _importer(frame):
    # The module of ours whose top level runs in `frame` (None for a function's body or another package).
    module = frame.f_globals.get("__name__", "")
    ours = module.split(".")[0] in OURS and frame.f_code.co_name == "<module>"
    return module if ours else None


def _targets(name, fromlist, module):
    # Our modules an import statement reads: the named one, and for each `from` name its submodule, the
    # module defining it, or (a lazy package's name) the module its _LAZY table names.
    out = [name] if name.split(".")[0] in OURS else []
    for item in fromlist or ():
        value = getattr(module, item, None)
        home = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        home = home or getattr(module, "_LAZY", {}).get(item)
        if isinstance(home, str) and home.split(".")[0] in OURS:
            out.append(home)
    return out


def _recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = _import(name, globals, locals, fromlist, level)
    importer = _importer(sys._getframe(1))
    if importer is None or level != 0:
        return module
    if name.split(".")[0] in HEAVY:
        heavy_importers.add(importer)
    else:
        edges.setdefault(importer, set()).update(t for t in _targets(name, fromlist, module) if t != importer)
    return module


builtins.__import__ = _recording_import
"""


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def _import_graph() -> tuple[set[str], dict[str, set[str]]]:
    """(modules of ours that import a heavy module at their top, our import edges) of the API's import."""
    code = (
        _STAND_INS.replace("HEAVY_NAMES", repr(HEAVY))
        + _CREATE_APP
        + "print(json.dumps([sorted(heavy_importers), {k: sorted(v) for k, v in edges.items()}]))\n"
    )
    heavy, edges = json.loads(_run(code))
    return set(heavy), {module: set(targets) for module, targets in edges.items()}


def _is_app(module: str) -> bool:
    return module.split(".")[0] == "app"


def _entries(heavy: set[str], edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """App module -> the modules outside app it imports that lead to a heavy import (its own heavy imports as
    "itself"): where the API's imports enter torch & co."""
    tainted, grew = set(heavy), True
    while grew:
        grew = False
        for module, targets in edges.items():
            if module not in tainted and targets & tainted:
                tainted.add(module)
                grew = True
    out: dict[str, list[str]] = {}
    for module, targets in edges.items():
        if _is_app(module):
            into = sorted(t for t in targets if t in tainted and not _is_app(t))
            if into:
                out[module] = into
    for module in heavy:
        if _is_app(module):
            out.setdefault(module, []).append("itself")
    return out


@pytest.fixture(scope="module")
def entries() -> dict[str, list[str]]:
    return _entries(*_import_graph())


def test_no_app_module_reaches_a_heavy_module_at_import(entries):
    assert entries == {}, f"these app modules reach torch & co. at import: {entries}"


def test_the_api_process_loads_no_heavy_module():
    loaded = json.loads(
        _run(
            _CREATE_APP + f"import json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
        )
    )
    assert loaded == []


def test_the_library_modules_the_api_reads_are_light():
    code = (
        f"import importlib, json, sys\nfor name in {LIGHT_LIBRARY_MODULES!r}:\n    importlib.import_module(name)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert json.loads(_run(code)) == []


def test_registries_and_defaults_read_without_torch():
    code = """
    import json, sys
    from influence.aggregation import aggregation_names
    from influence.estimators import estimator_class, estimator_names, fitted_estimator_names
    from influence.report import CORRECT_SUFFIX, DEFAULT_AGGREGATIONS, DEFAULT_ESTIMATORS
    out = {
        "estimators": estimator_names(),
        "one_checkpoint": estimator_names(one_checkpoint=True),
        "fitted": fitted_estimator_names(),
        "datainf_bytes": estimator_class("datainf").statistics_nbytes(3),
        "aggregations": aggregation_names(),
        "defaults": [CORRECT_SUFFIX, list(DEFAULT_AGGREGATIONS), list(DEFAULT_ESTIMATORS)],
        "torch": "torch" in sys.modules,
    }
    print(json.dumps(out))
    """
    out = json.loads(_run(code))
    assert out["torch"] is False
    assert {"grad-dot", "cosine", "datainf", "tracin-cp"} <= set(out["estimators"])
    assert "tracin-cp" not in out["one_checkpoint"] and "datainf" in out["fitted"]
    assert out["datainf_bytes"] == 3 * 3 * 8
    assert {"mean", "rank", "vote", "rrf", "zmean", "median"} <= set(out["aggregations"])
    assert out["defaults"][0] == "-c" and "rank-c" in out["defaults"][1]


def test_lazy_public_names_resolve_and_are_listed():
    code = """
    import json, sys, influence
    before = "torch" in sys.modules
    listed = set(dir(influence)) >= set(influence.__all__)
    from influence import load_model, LazyScores
    print(json.dumps([before, listed, "torch" in sys.modules, callable(load_model)]))
    """
    assert json.loads(_run(code)) == [False, True, True, True]

    import influence

    assert set(influence.__all__) == set(influence._LAZY) | {
        name for name in influence.__all__ if name not in influence._LAZY and name in vars(influence)
    }
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        influence.not_a_name  # noqa: B018 (the attribute access is the test)


def test_lazy_module_imports_on_first_attribute_read():
    code = """
    import json, sys
    from influence.lazy import lazy_module
    stand_in = lazy_module("json.tool")
    before = "json.tool" in sys.modules
    text = repr(stand_in)
    main = stand_in.main
    print(json.dumps([before, "not loaded" in text, "json.tool" in sys.modules, callable(main),
                      "loaded" in repr(stand_in) and "not" not in repr(stand_in)]))
    """
    assert json.loads(_run(code)) == [False, True, True, True, True]
