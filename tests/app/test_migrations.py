"""Alembic: the schema is created from empty and removed again, on SQLite and on PostgreSQL, and what the
migrations build is exactly what the ORM declares (autogenerate finds nothing to do)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db import Base
from app.migrate import downgrade, upgrade

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"models", "datasets", "indexes", "jobs"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    _, make_database, drop_database = request.getfixturevalue("pg_admin")
    url = make_database()
    yield url
    drop_database(url)


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _diffs(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_from_empty_then_downgrade_to_base(empty_database):
    assert _tables(empty_database) == set()
    upgrade(empty_database)
    assert _tables(empty_database) == TABLES | {"alembic_version"}
    assert _diffs(empty_database) == []

    downgrade(empty_database)
    assert _tables(empty_database) == {"alembic_version"}
    upgrade(empty_database)  # and back up again from base
    assert _diffs(empty_database) == []


def test_migrate_module_is_the_one_off_step(tmp_path):
    """`python -m app.migrate` migrates the database the settings name (here via INFLUENCE_DATABASE_URL)."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "INFLUENCE_DATABASE_URL": url, "INFLUENCE_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "app.migrate"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert _tables(url) == TABLES | {"alembic_version"}
    done = subprocess.run(
        [sys.executable, "-m", "app.migrate", "--downgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert _tables(url) == {"alembic_version"}

    # Plain alembic works too, with the URL given as `-x url=...` (the settings point elsewhere here).
    env["INFLUENCE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert _tables(url) == TABLES | {"alembic_version"}
    assert not (tmp_path / "elsewhere.db").exists()


def test_importing_the_app_migrates_nothing(tmp_path):
    """Importing app.main (and building the default settings) leaves the database untouched."""
    env = {**os.environ, "INFLUENCE_DATA_DIR": str(tmp_path)}
    code = "import app.main, app.api.v1.models, app.api.v1.datasets, app.api.v1.jobs; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []
