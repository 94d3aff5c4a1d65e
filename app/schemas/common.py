"""Shared API shapes: problem details (RFC 9457), pages, UTC timestamps.

Every JSON request body model is strict (`strict=True`): JSON's types are the API's types, so `true` is not a
number and `"5"` is not an integer (a float field still takes an integer). Form fields and query parameters
arrive as text and are converted as usual.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

T = TypeVar("T")

# Largest page offset accepted (far beyond any real list; keeps every database's OFFSET in range).
MAX_OFFSET = 1_000_000_000


def _utc(moment: datetime) -> datetime:
    # SQLite returns naive datetimes; everything the service stores is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


UTCDateTime = Annotated[datetime, AfterValidator(_utc)]


def strict_body_config(*examples: dict[str, Any]) -> ConfigDict:
    """The config of a JSON request body model: strict, unknown fields refused, and the examples its OpenAPI
    schema shows."""
    config = ConfigDict(extra="forbid", strict=True)
    if examples:
        config["json_schema_extra"] = {"examples": list(examples)}
    return config


def finite(value: float) -> float:
    """A float field's validator (`field_validator(name)(finite)`): JSON's NaN and Infinity are no numbers."""
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


class Problem(BaseModel):
    """An error (RFC 9457 problem details); extension members such as `errors` may follow."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="URI of the problem type, e.g. urn:influence:problem:not-found")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = Field(None, description="The request path")
    errors: list[dict[str, Any]] | None = Field(
        None, description="Validation failures: [{loc, msg, type}] (invalid-request problems only)"
    )


class Page(BaseModel, Generic[T]):
    """One page of a list: `items` from `offset`, at most `limit`, out of `total`."""

    items: list[T]
    total: int
    offset: int
    limit: int


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the problem+json errors a route can answer with (create_app's OpenAPI
    hook files every 4xx/5xx body under application/problem+json)."""
    descriptions = {
        401: "No valid API key (send `Authorization: Bearer <key>` or `X-API-Key: <key>`)",
        403: "Path outside the allowed roots",
        404: "Unknown id",
        409: "Conflict with the current state",
        413: "Upload over the limit",
        422: "Invalid input (the detail names the field, line or column)",
        429: "Too many jobs of this tenant queued or running (max_active_jobs_per_tenant)",
        503: "A dependency is unavailable",
    }
    return {status: {"model": Problem, "description": descriptions.get(status, "Error")} for status in statuses}
