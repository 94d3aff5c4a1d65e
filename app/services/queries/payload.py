"""What the API hands the query computation: one plain JSON dict, the same whether it runs in the API process or
on a query worker (app/jobs/query_transport.py carries it over Celery).

    {"version", "index_id", "tenant_id", "request_id",
     "query":    the QueryRequest with the settings it runs with (layers, estimator, aggregation, vote_k),
     "settings": {"source": ..., "answer": ...}   what the answer says about them (app/services/index_settings.py)}

The API resolves everything that needs no model (the index, its tenant, readiness, the settings); the computation
trusts none of it blindly: it reads the index again, of this tenant, and checks it is still ready.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import Unavailable
from app.schemas.indexes import QueryRequest
from app.services.index_settings import ResolvedSettings

# Bumped when the dict changes: a worker of another version refuses it (503) rather than misreading it.
PAYLOAD_VERSION = 1


def query_payload(
    index_id: str, tenant_id: str, request: QueryRequest, resolved: ResolvedSettings, request_id: str | None
) -> dict[str, Any]:
    """The payload of a query whose settings are resolved: `request` as sent, with what it did not name taken
    from `resolved`."""
    query = request.model_dump(mode="json")
    query.update(
        {
            "layers": resolved.layers,
            "estimator": resolved.estimator,
            "aggregation": resolved.aggregation,
            "vote_k": resolved.vote_k,
        }
    )
    return {
        "version": PAYLOAD_VERSION,
        "index_id": index_id,
        "tenant_id": tenant_id,
        "request_id": request_id,
        "query": query,
        "settings": {"source": resolved.source, "answer": resolved.as_dict()},
    }


@dataclass(frozen=True)
class ForwardedQuery:
    """A payload read back: the query to answer and what its answer says about its settings."""

    index_id: str
    tenant_id: str
    request_id: str | None
    request: QueryRequest
    settings_source: str
    settings: dict[str, Any]

    @classmethod
    def of(cls, payload: dict[str, Any]) -> ForwardedQuery:
        if payload.get("version") != PAYLOAD_VERSION:
            raise Unavailable(
                f"the query worker runs another version of the service (payload version {payload.get('version')!r}, "
                f"it reads {PAYLOAD_VERSION}); run API and workers of the same version"
            )
        return cls(
            index_id=str(payload["index_id"]),
            tenant_id=str(payload["tenant_id"]),
            request_id=payload.get("request_id"),
            request=QueryRequest.model_validate(payload["query"]),
            settings_source=str(payload["settings"]["source"]),
            settings=dict(payload["settings"]["answer"]),
        )
