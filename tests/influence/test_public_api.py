"""The library's public surface, and its purity: no service framework is imported by `import influence`."""

from __future__ import annotations

import inspect
import subprocess
import sys

import influence


def test_library_imports_no_service_framework():
    code = (
        "import sys, influence; bad = [m for m in ('fastapi', 'celery', 'sqlalchemy', 'app', 'worker') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_names_exist_and_are_documented():
    for name in influence.__all__:
        obj = getattr(influence, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_required_signatures():
    assert list(inspect.signature(influence.aggregate).parameters)[:2] == ["scores", "method"]
    params = inspect.signature(influence.aggregate).parameters
    assert params["vote_k"].default == 0.2 and params["correct"].default is None
    assert list(inspect.signature(influence.ndr_at).parameters)[:3] == ["agg", "noisy", "percents"]
    assert list(inspect.signature(influence.per_sample_gradients).parameters) == ["model", "batch", "layers"]
    assert set(influence.AGGREGATORS) >= {"mean", "rank", "vote", "zmean", "median", "rrf"}
    assert set(influence.ESTIMATORS) >= {"grad-dot", "cosine", "datainf", "tracin-cp"}
    assert set(influence.PROJECTORS) >= {"identity", "gaussian", "rademacher", "factorized"}
    assert set(influence.INDEX_KINDS) >= {"flat", "ivf", "hnsw"}
