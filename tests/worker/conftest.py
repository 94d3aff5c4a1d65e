"""Worker fixtures: the API fixtures of tests/app (throw-away PostgreSQL databases, a migrated SQLite template,
allowed roots) and a real Redis database number of our own, flushed before and after."""

from __future__ import annotations

import pytest

from tests.app.conftest import (  # noqa: F401
    allowed_root,
    default_roots,
    pg_admin,
    sqlite_template,
    sqlite_url,
    sst2_rows,
)

REDIS_DB = 11  # this suite's Redis database: flushed, so no other test may use it


@pytest.fixture
def redis_url():
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def pg_url(pg_admin):  # noqa: F811
    """A fresh, migrated PostgreSQL database for one test (dropped afterwards)."""
    from app.migrate import upgrade

    _, make_database, drop_database = pg_admin
    url = make_database()
    upgrade(url)
    yield url
    drop_database(url)
