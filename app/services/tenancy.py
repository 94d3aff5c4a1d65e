"""Tenants and their API keys.

A key is `infl_` + 43 URL-safe characters (32 random bytes). The database keeps only its sha256 and its first
13 characters (`prefix`, not secret: enough to find the row without scanning); authentication looks the row
up by prefix and compares the hash in constant time. A key is shown once, when it is made, and can be revoked.

Isolation: every model, dataset, index and job carries `tenant_id`; services find objects with `owned(...)`,
which answers NotFound (404) for an object of another tenant exactly as for an id that does not exist, so an
id is never confirmed to someone who does not own it, and list them with `owned_page(...)`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import Invalid, NotFound
from app.models import ApiKey, Tenant, utcnow

TOKEN_PREFIX = "infl_"
PREFIX_CHARS = len(TOKEN_PREFIX) + 8
LOCAL_TENANT = "local"
LOCAL_KEY_FILE = "local-api-key"

T = TypeVar("T")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedKey:
    """A freshly made key: `token` is the secret (shown once), the rest is what the database keeps."""

    id: str
    tenant_id: str
    prefix: str
    token: str


def create_tenant(session: Session, name: str) -> Tenant:
    name = name.strip()
    if not name or len(name) > 200:
        raise Invalid("a tenant name has 1 to 200 characters")
    if session.scalar(select(Tenant).where(Tenant.name == name)) is not None:
        raise Invalid(f"a tenant named {name!r} exists already")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def find_tenant(session: Session, name_or_id: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name_or_id)) or session.get(Tenant, name_or_id)
    if tenant is None:
        raise NotFound(f"no tenant named {name_or_id!r}")
    return tenant


def create_key(session: Session, tenant: Tenant, name: str = "") -> IssuedKey:
    """A new key for `tenant`; only its hash and prefix are stored."""
    while True:
        token = new_token()
        prefix = token[:PREFIX_CHARS]
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
            break
    key = ApiKey(tenant_id=tenant.id, name=name[:200], prefix=prefix, key_hash=hash_token(token))
    session.add(key)
    session.flush()
    return IssuedKey(id=key.id, tenant_id=tenant.id, prefix=prefix, token=token)


def revoke_key(session: Session, prefix: str) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix[:PREFIX_CHARS]))
    if key is None:
        raise NotFound(f"no API key with prefix {prefix[:PREFIX_CHARS]!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def authenticate(session: Session, token: str) -> Tenant | None:
    """The tenant a token belongs to, None for an unknown, malformed or revoked token."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == token[:PREFIX_CHARS]))
    if key is None or key.revoked_at is not None:
        return None
    if not hmac.compare_digest(key.key_hash, hash_token(token)):
        return None
    return session.get(Tenant, key.tenant_id)


def owned(session: Session, model: type[T], object_id: str, tenant_id: str, what: str) -> T:
    """The object of `model` with this id if `tenant_id` owns it; NotFound otherwise (never 403: the id of
    another tenant's object is not confirmed)."""
    found = session.get(model, object_id)
    if found is None or found.tenant_id != tenant_id:  # type: ignore[attr-defined]
        raise NotFound(f"{what} {object_id!r} does not exist")
    return found


def owned_page(
    session: Session, model: type[T], tenant_id: str, *, offset: int, limit: int, **equal: Any
) -> tuple[Sequence[T], int]:
    """A page of this tenant's objects of `model`, newest first (ties by id), and the total matching. Each
    keyword keeps the objects whose column of that name holds the value; a None value filters nothing."""
    query = select(model).where(model.tenant_id == tenant_id)  # type: ignore[attr-defined]
    for column, value in equal.items():
        if value is not None:
            query = query.where(getattr(model, column) == value)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    newest_first = (model.created_at.desc(), model.id)  # type: ignore[attr-defined]
    return session.scalars(query.order_by(*newest_first).offset(offset).limit(limit)).all(), total


# --- the embedded runner's local key -----------------------------------------------------------------------


def ensure_local_key(session: Session, data_dir: Path) -> tuple[Path, bool]:
    """Make sure <data_dir>/local-api-key holds a valid key of the `local` tenant (made on first start, mode
    0600). Returns (path, created)."""
    path = data_dir / LOCAL_KEY_FILE
    if path.is_file():
        token = path.read_text(encoding="utf-8").strip()
        if authenticate(session, token) is not None:
            os.chmod(path, 0o600)
            return path, False
    tenant = session.scalar(select(Tenant).where(Tenant.name == LOCAL_TENANT))
    if tenant is None:
        tenant = create_tenant(session, LOCAL_TENANT)
    issued = create_key(session, tenant, name="embedded local key")
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{LOCAL_KEY_FILE}.{os.getpid()}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(issued.token + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path, True
