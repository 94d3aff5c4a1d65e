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
TABLES = {"models", "datasets", "indexes", "jobs", "tenants", "api_keys"}


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


def test_rows_from_before_tenancy_go_to_the_local_tenant(empty_database):
    """0003 gives every existing model, dataset, index and job to a tenant named `local` (the one the embedded
    runner makes a key for), so an upgraded single-user installation keeps its data and can read it."""
    from sqlalchemy import text

    upgrade(empty_database, "0002")
    engine = create_engine(empty_database)
    now = "2026-11-29 00:00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO models (id, name, source, task, checkpoints, weights_hash, layers, groups, created_at)"
                " VALUES ('m1', 'm', '/m', 'classification', '[]', 'w', '[]', '{}', :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO datasets (id, name, format, task, size_bytes, columns, row_count, content_hash, path,"
                " labels, has_noisy_flag, created_at) VALUES ('d1', 'd', 'tsv', 'classification', 1, '{}', 1,"
                " 'h', 'datasets/d1/rows.jsonl', '[]', false, :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO indexes (id, model_id, dataset_id, layers, projection_kind, projection_dim,"
                " projection_seed, dtype, faiss_kind, status, store_path, num_rows, size_bytes, created_at)"
                " VALUES ('i1', 'm1', 'd1', '[]', 'factorized', 8, 0, 'float16', 'flat', 'ready', 's', 1, 0, :now)"
            ),
            {"now": now},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, kind, status, params, done, total, cancel_requested, attempts, created_at)"
                " VALUES ('j1', 'index_build', 'succeeded', '{}', 1, 1, false, 1, :now)"
            ),
            {"now": now},
        )
    engine.dispose()
    upgrade(empty_database)
    engine = create_engine(empty_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, name FROM tenants")).all() == [("local", "local")]
            for table in ("models", "datasets", "indexes", "jobs"):
                assert conn.execute(text(f"SELECT DISTINCT tenant_id FROM {table}")).all() == [("local",)]
            assert conn.execute(text("SELECT deleted_rows FROM indexes")).scalar() == 0
    finally:
        engine.dispose()
    assert _diffs(empty_database) == []
    downgrade(empty_database)
