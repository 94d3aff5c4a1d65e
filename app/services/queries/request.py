"""A query, on the API side: what can be checked without a model, then the answer from whoever computes it.

Here: the limits (examples, top_k, text lengths), the index of this tenant (404), its readiness (409), the
settings the query runs with (the request's, else the index's: app/services/index_settings.py), and, before a
query goes to the workers, whether a worker can hold the index's model at all (503). Then the payload
(payload.py) goes to a query worker through the transport (app/jobs/query_transport.py), or, in a process built
without one (tests, `uvicorn app.main:create_app`), to the compute side in this process. Both give the same
answer; `seconds` is this side's time for the whole.

What needs the model (layer selectors, labels, the manifest's checks) is checked where it is loaded, and its
refusals come back with the same status and detail. This module imports no torch.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy.orm import Session

from app.config import Settings
from app.db import commit_unit_of_work
from app.errors import Invalid
from app.logs import current_request_id
from app.models import Index, RegisteredModel
from app.schemas.indexes import QueryRequest
from app.services.index_settings import QUERY_FIELDS, named_fields, resolve_settings
from app.services.indexes import get_index, index_sources, require_index_capacity, require_ready
from app.services.queries.payload import query_payload


class QueryTransport(Protocol):
    """Carries a payload to a query worker and its answer back (app/jobs/query_transport.py)."""

    def ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The answer dict, or the worker's refusal raised as the same ServiceError; 503 when no query worker
        is alive, 504 when none answers in time."""
        ...


# Computes a payload's answer in this process: (session, payload) -> answer.
InProcess = Callable[[Session, dict[str, Any]], dict[str, Any]]


def check_query_limits(request: QueryRequest, settings: Settings) -> None:
    """The limits a query must keep, checked before anything is loaded (422 naming the limit)."""
    if len(request.examples) > settings.max_query_examples:
        raise Invalid(
            f"{len(request.examples)} examples; a query takes at most {settings.max_query_examples} "
            "(max_query_examples)"
        )
    if request.top_k > settings.max_top_k:
        raise Invalid(f"top_k {request.top_k} is over the limit of {settings.max_top_k} (max_top_k)")
    for i, example in enumerate(request.examples):
        for part in (example.text, example.text_pair or ""):
            if len(part) > settings.max_text_chars:
                raise Invalid(
                    f"examples[{i}]: text longer than {settings.max_text_chars} characters (max_text_chars)"
                )


# Seconds a worker's capacity for a model, once found, is taken as known.
CAPACITY_TTL_S = 300.0


class CapacityChecks:
    """The (settings, model, layers) a worker was found able to hold, for CAPACITY_TTL_S: the estimate reads the
    model's config and weight headers (about 2 ms, a fifth of the hop a query may add). Refusals are not kept."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        # Keyed by the settings object's id; the entry holds the object, so the id cannot name another meanwhile.
        self._passed: OrderedDict[tuple, tuple[Settings, float]] = OrderedDict()
        self._lock = threading.Lock()

    def require(self, settings: Settings, model: RegisteredModel, index: Index) -> None:
        key = (id(settings), model.id, model.weights_hash, tuple(index.layers))
        now = time.monotonic()
        with self._lock:
            held = self._passed.get(key)
            if held is not None and held[0] is settings and now - held[1] < CAPACITY_TTL_S:
                return
        require_index_capacity(settings, model, index)
        with self._lock:
            self._passed[key] = (settings, now)
            self._passed.move_to_end(key)
            while len(self._passed) > self.capacity:
                self._passed.popitem(last=False)


CAPACITY = CapacityChecks()


def query_index(
    session: Session,
    settings: Settings,
    index_id: str,
    request: QueryRequest,
    tenant_id: str,
    *,
    transport: QueryTransport | None,
    in_process: InProcess,
) -> dict[str, Any]:
    """Answer a query of this tenant's index (the QueryResponse schema as a dict): on a query worker through
    `transport`, or with `in_process` when there is none."""
    started = time.perf_counter()
    check_query_limits(request, settings)
    index = get_index(session, index_id, tenant_id)
    require_ready(index)
    resolved = resolve_settings(session, settings, index, named_fields(request, QUERY_FIELDS), kind="query")
    payload = query_payload(index.id, tenant_id, request, resolved, current_request_id())
    if transport is None:
        answer = in_process(session, payload)
    else:
        model, _ = index_sources(session, index)
        CAPACITY.require(settings, model, index)
        # Ends this transaction (it wrote nothing) before the wait: its pooled connection serves other requests
        # meanwhile, and the worker reads the rows again in a transaction of its own.
        commit_unit_of_work(session)
        answer = transport.ask(payload)
    answer["seconds"] = round(time.perf_counter() - started, 4)
    return answer
