"""Server-side paths a caller may name: absolute, and inside one of `settings.allowed_roots`.

Containment is checked on the fully resolved path (symlinks followed, `..` collapsed) before anything about
the path is revealed, so neither a `..` nor a symlink escapes a root, and a refused path says nothing about
whether it exists.
"""

from __future__ import annotations

from pathlib import Path

from app.config import Settings
from app.errors import Forbidden, Invalid


def resolve_allowed_path(settings: Settings, raw: str, what: str) -> Path:
    """`raw` resolved, if it lies inside an allowed root: Invalid (422) if malformed, Forbidden (403) if not."""
    if "\x00" in raw:
        raise Invalid(f"{what} contains a NUL character")
    path = Path(raw)
    if not path.is_absolute():
        raise Invalid(f"{what} {raw!r} must be an absolute path on the server")
    roots = [Path(root).expanduser().resolve() for root in settings.allowed_roots]
    if not roots:
        raise Forbidden(
            f"{what} {raw!r} refused: no server-side folders are allowed (set INFLUENCE_ALLOWED_ROOTS)"
        )
    try:
        resolved = path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # symlink loops, unreadable components
        raise Invalid(f"{what} {raw!r} cannot be resolved: {exc.__class__.__name__}") from None
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise Forbidden(f"{what} {raw!r} is outside the allowed roots")
    return resolved
