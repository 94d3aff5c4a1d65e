"""The service's one error hierarchy and the handlers that turn every error into problem+json (RFC 9457).

Services raise a `ServiceError` subclass (or let an `influence.errors` exception through); routes never build
error responses themselves. Bodies: {type, title, status, detail, instance} plus extension members (`errors`
for validation failures, `checks` for readiness). 4xx means the caller can fix the request; a 500 is a bug and
says nothing about internals.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from influence import errors as lib

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:influence:problem:"
# Details and validation messages quote the request (a name, a value, a selector): each is cut at this many
# characters, so a huge bad value never comes back whole.
MAX_ECHO_CHARS = 500
# Validation failures listed in a problem's `errors` (a list of a million bad items fails a million times).
MAX_VALIDATION_ERRORS = 50


def truncated(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text`, or its first `limit` characters with an ellipsis and how many characters were dropped."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} characters dropped)"


class ServiceError(Exception):
    """An error the caller is told about: HTTP status, a stable problem type, a title and a detail. A subclass
    names its three in its class line: `class Conflict(ServiceError, status=409, type="conflict", ...)`."""

    status: int = 500
    type: str = "internal-error"
    title: str = "Internal server error"

    def __init_subclass__(
        cls, *, status: int | None = None, type: str | None = None, title: str | None = None, **kwargs: Any
    ):
        # What a subclass leaves out it inherits (a more specific Conflict is still a 409).
        super().__init_subclass__(**kwargs)
        cls.status, cls.type, cls.title = status or cls.status, type or cls.type, title or cls.title

    def __init__(self, detail: str, **extensions: Any):
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions


class BadRequest(ServiceError, status=400, type="bad-request", title="Bad request"): ...


class Unauthorized(ServiceError, status=401, type="unauthorized", title="Unauthorized"):
    """No valid API key: the response carries `WWW-Authenticate: Bearer`."""


class Forbidden(ServiceError, status=403, type="forbidden", title="Forbidden"): ...


class NotFound(ServiceError, status=404, type="not-found", title="Not found"): ...


class Conflict(ServiceError, status=409, type="conflict", title="Conflict"): ...


class PayloadTooLarge(ServiceError, status=413, type="payload-too-large", title="Payload too large"): ...


class Invalid(ServiceError, status=422, type="invalid-input", title="Invalid input"): ...


class TooManyRequests(ServiceError, status=429, type="too-many-requests", title="Too many requests"): ...


class Unavailable(ServiceError, status=503, type="unavailable", title="Service unavailable"): ...


# influence.errors -> (status, type, title); the most specific class wins (looked up along the MRO).
LIBRARY_ERRORS: dict[type[Exception], tuple[int, str, str]] = {
    lib.UnknownLayerError: (422, "unknown-layer", "Unknown layer"),
    lib.UnsupportedModelError: (422, "unsupported-model", "Unsupported model"),
    lib.InvalidInputError: (422, "invalid-input", "Invalid input"),
    lib.ManifestMismatchError: (409, "manifest-mismatch", "Index does not match"),
    lib.StoreIncompleteError: (409, "store-incomplete", "Index not ready"),
    lib.StoreCorruptedError: (409, "store-corrupted", "Index corrupted; rebuild it"),
    lib.InfluenceError: (422, "invalid-input", "Invalid input"),
}

# Statuses that Starlette/FastAPI raise as HTTPException (unknown route, wrong method, ...): one title per
# type, the same as our own classes use.
_HTTP_PROBLEMS = {
    cls.status: (cls.type, cls.title)
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        Invalid,
        TooManyRequests,
        Unavailable,
    )
}


def problem_response(
    status: int,
    type_: str,
    title: str,
    detail: str | None = None,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """A problem+json response; `type_` is a short slug (made a URN) or already a URI."""
    body: dict[str, Any] = {
        "type": type_ if ":" in type_ else PROBLEM_TYPE_PREFIX + type_,
        "title": title,
        "status": status,
    }
    if detail is not None:
        body["detail"] = truncated(detail)
    if instance is not None:
        body["instance"] = instance
    body.update(jsonable_encoder(extensions))
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _library_problem(exc: lib.InfluenceError) -> tuple[int, str, str]:
    for cls in type(exc).__mro__:
        if cls in LIBRARY_ERRORS:
            return LIBRARY_ERRORS[cls]
    return LIBRARY_ERRORS[lib.InfluenceError]


def _location(loc: Any) -> str:
    return ".".join(str(part) for part in loc)


def _validation_errors(exc: RequestValidationError) -> tuple[list[dict[str, Any]], int]:
    """The first MAX_VALIDATION_ERRORS failures ({loc, msg, type}, each part cut short) and how many there are."""
    errors = exc.errors()
    out = []
    for error in errors[:MAX_VALIDATION_ERRORS]:
        out.append(
            {
                # A location names the body's keys: an unknown key is the caller's text.
                "loc": [truncated(str(p)) for p in error.get("loc", ())],
                "msg": truncated(str(error.get("msg", ""))),
                "type": error.get("type", ""),
            }
        )
    return out, len(errors)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the app as problem+json: ours, the library's, FastAPI's and the unexpected."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return problem_response(
            exc.status, exc.type, exc.title, exc.detail, instance=request.url.path, headers=headers, **exc.extensions
        )

    @app.exception_handler(lib.InfluenceError)
    async def _library_error(request: Request, exc: lib.InfluenceError) -> JSONResponse:
        status, type_, title = _library_problem(exc)
        return problem_response(status, type_, title, str(exc), instance=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors, total = _validation_errors(exc)
        detail = "; ".join(f"{truncated(_location(e['loc']), 100)}: {truncated(e['msg'], 200)}" for e in errors[:5])
        detail = detail or "invalid request"
        if total > 5:
            listed = f"the first {len(errors)} listed in `errors`" if total > len(errors) else "see `errors`"
            detail = f"{total} problems in all ({listed}): {detail}"
        return problem_response(
            422, "invalid-request", "Invalid request", detail, instance=request.url.path, errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        known = exc.status_code in HTTPStatus._value2member_map_
        phrase = HTTPStatus(exc.status_code).phrase if known else "Error"
        type_, title = _HTTP_PROBLEMS.get(exc.status_code, ("about:blank", phrase))
        return problem_response(
            exc.status_code,
            type_,
            title,
            exc.detail if isinstance(exc.detail, str) else None,
            instance=request.url.path,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the API let through (a NUL character in text on PostgreSQL, a number
        # out of its range): the caller's input, so 422, without the database's message.
        log.info("database refused a value on %s %s: %s", request.method, request.url.path, exc.orig)
        return problem_response(
            422,
            "invalid-input",
            "Invalid input",
            "a value cannot be stored or compared (e.g. a NUL character in a text, or a number out of range)",
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug: log everything, tell the caller nothing about internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            500,
            "internal-error",
            "Internal server error",
            "an unexpected error occurred; it has been logged",
            instance=request.url.path,
        )
