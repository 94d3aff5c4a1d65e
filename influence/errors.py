"""The library's one error hierarchy. The service maps each class to an HTTP status (problem+json)."""

from __future__ import annotations


class InfluenceError(Exception):
    """Base of every error the library raises on purpose."""


class InvalidInputError(InfluenceError, ValueError):
    """The caller's input is malformed or out of range (HTTP 422)."""


class UnknownLayerError(InvalidInputError):
    """A layer name or selector matches nothing in the model or index (HTTP 422)."""


class UnsupportedModelError(InvalidInputError):
    """The model cannot be used: unsafe weights (pickle), remote code, or an architecture we cannot hook."""


class ManifestMismatchError(InfluenceError):
    """A query or append does not match the feature store it targets (model, projection, layers...) (HTTP 409)."""


class StoreIncompleteError(InfluenceError):
    """The feature store is still being built; nothing half-written is ever served (HTTP 409)."""


class StoreCorruptedError(InfluenceError):
    """An artifact failed its checksum or is unreadable; it is refused, never served (HTTP 500 is NOT used:
    the service reports 409 and asks for a rebuild)."""
