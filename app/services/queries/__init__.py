"""Queries of an index, in two halves that run in different processes:

    request.py   the API side: limits, the index and its tenant, readiness, the settings; then the answer, from
                 a query worker (a transport) or computed here when the API has none. Imports no torch.
    payload.py   the plain JSON dict one hands the other
    compute.py   the compute side: featurize, score, aggregate, answer (torch, the model and store caches)
    layers.py    which of an index's layers a selector picks (queries, audits, reports and checks)

The package names what other modules use from either half, loaded on first use, so that importing the API side
does not import the compute side.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "check_query_limits": "request",
    "query_index": "request",
    "QueryTransport": "request",
    "query_payload": "payload",
    "ForwardedQuery": "payload",
    "select_query_layers": "layers",
    "QueryRuntime": "compute",
    "StoreCache": "compute",
    "run_query": "compute",
    "index_estimators": "compute",
    "answer_fidelity": "compute",
    "shown_layer_ranks": "compute",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # The compute side imports torch: it is loaded when a name of it is first asked for, never by the API side.
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
