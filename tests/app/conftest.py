"""API fixtures: an app from create_app(Settings(...)) over a migrated SQLite file or a throw-away PostgreSQL
database, a TestClient that authenticates as a tenant of its own (`Api.client`; `Api.other_client` is another
tenant's), real SST-2 rows, and helpers that check a failed request left nothing behind.

PostgreSQL: one database `influence_test_<random>` per test session on 127.0.0.1:5432 (trust auth), migrated
once, emptied (TRUNCATE) before each test that uses it, dropped at the end.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.conftest import SST2

ROOT_DIR = Path(__file__).resolve().parents[2]
PG_HOST = os.environ.get("INFLUENCE_TEST_PG_HOST", "127.0.0.1")
PG_ADMIN_DB = "test"
TABLES = ("indexes", "jobs", "datasets", "models", "api_keys", "tenants")
# A reference set (or a query) of two reviews, one of each label.
TWO_REVIEWS = {
    "examples": [
        {"text": "a gorgeous , witty , seductive movie .", "label": 1},
        {"text": "unflinchingly bleak and desperate", "label": 0},
    ]
}


class RecordingQueue:
    """A JobQueue that remembers what it was handed (the Celery queue is the worker's, tested there)."""

    def __init__(self, fail: bool = False):
        self.enqueued: list[str] = []
        self.fail = fail

    def enqueue(self, job) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.enqueued.append(job.id)


def _pg_user() -> str:
    import psycopg

    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG_HOST, user=user, dbname=PG_ADMIN_DB, connect_timeout=5):
                return user
        except psycopg.OperationalError:
            continue
    raise RuntimeError(f"PostgreSQL on {PG_HOST}:5432 accepts neither user postgres nor root")


@pytest.fixture(scope="session")
def pg_admin():
    """(user, make_database, drop_database): throw-away databases on the real PostgreSQL server."""
    import psycopg

    user = _pg_user()
    made: list[str] = []

    def make_database() -> str:
        name = f"influence_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=PG_HOST, user=user, dbname=PG_ADMIN_DB, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"postgresql+psycopg://{user}@{PG_HOST}:5432/{name}"

    def drop_database(url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(host=PG_HOST, user=user, dbname=PG_ADMIN_DB, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in made:
            made.remove(name)

    yield user, make_database, drop_database
    for name in list(made):
        drop_database(f"postgresql+psycopg://{user}@{PG_HOST}:5432/{name}")


@pytest.fixture(scope="session")
def pg_url(pg_admin) -> str:
    """One migrated PostgreSQL database for the API tests of this session."""
    from app.migrate import upgrade

    _, make_database, _ = pg_admin
    url = make_database()
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    """A migrated SQLite file, copied for every test (migrating once is the slow part)."""
    from app.migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-template") / "influence.db"
    upgrade(f"sqlite:///{path}")
    return path


def _empty_postgres(url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path, sqlite_template) -> str:
    path = tmp_path / "influence.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path, sqlite_template) -> str:
    """The key API tests run against both databases."""
    if request.param == "sqlite":
        path = tmp_path / "influence.db"
        shutil.copy(sqlite_template, path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_url")
    _empty_postgres(url)
    return url


@pytest.fixture(scope="session")
def allowed_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("allowed")


def make_settings(tmp_path: Path, url: str, allowed: list[Path], **overrides):
    from app.config import Settings

    values = {
        "data_dir": tmp_path / "data",
        "database_url": url,
        "allowed_roots": allowed,
        "max_upload_bytes": 2 * 1024 * 1024,
        **overrides,
    }
    return Settings(_env_file=None, **values)


@pytest.fixture
def default_roots(tmp_path_factory, allowed_root) -> list[Path]:
    """Allowed roots: a session folder, the pytest temp tree (tiny models), the SST-2 folder, the MiniLM."""
    from influence import packaged_minilm_path

    return [allowed_root, tmp_path_factory.getbasetemp(), SST2, packaged_minilm_path().parent]


def make_tenant(session_factory, name: str | None = None) -> tuple[str, str]:
    """A tenant with one API key on the app's database: (tenant id, key)."""
    from app.db import session_scope
    from app.services import tenancy

    with session_scope(session_factory) as session:
        tenant = tenancy.create_tenant(session, name or f"tenant-{uuid.uuid4().hex[:8]}")
        issued = tenancy.create_key(session, tenant, name="tests")
        return tenant.id, issued.token


class Api:
    """A TestClient over an app, authenticated as a tenant of its own, with the settings the app was built from
    and a session factory on its database."""

    def __init__(self, app, settings, queue, authenticate: bool = True):
        from fastapi.testclient import TestClient

        self.app = app
        self.settings = settings
        self.queue = queue
        self.session_factory = app.state.session_factory
        if authenticate:
            self.tenant_id, self.token = make_tenant(self.session_factory)
            self.client = TestClient(app, headers={"Authorization": f"Bearer {self.token}"})
        else:  # e.g. an unmigrated database: no tenant can be made
            self.client = TestClient(app)

    def other_client(self, name: str | None = None):
        """A client authenticated as another, new tenant (with its id and key as attributes)."""
        from fastapi.testclient import TestClient

        tenant_id, token = make_tenant(self.session_factory, name)
        client = TestClient(self.app, headers={"X-API-Key": token})
        client.tenant_id, client.token = tenant_id, token  # type: ignore[attr-defined]
        return client

    def close(self) -> None:
        """Close the client and the app's database connections (a fixture's teardown)."""
        self.client.close()
        self.app.state.engine.dispose()

    def count(self, model) -> int:
        from sqlalchemy import func, select

        with self.session_factory() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0

    def artifact_entries(self) -> list[Path]:
        root = self.settings.resolved_artifacts_dir
        out: list[Path] = []
        for folder in (root / "datasets", root / "tmp"):
            if folder.exists():
                out.extend(folder.iterdir())
        return out

    def assert_nothing_left(self) -> None:
        from app.models import Dataset, Index, Job, RegisteredModel

        counts = {m.__tablename__: self.count(m) for m in (Dataset, RegisteredModel, Index, Job)}
        assert counts == dict.fromkeys(counts, 0), counts
        assert self.artifact_entries() == []


def build_api(settings, queue=None, readiness_checks=(), authenticate: bool = True) -> Api:
    from app.main import create_app

    queue = queue if queue is not None else RecordingQueue()
    app = create_app(settings, job_queue=queue, readiness_checks=readiness_checks)
    return Api(app, settings, queue, authenticate=authenticate)


def fresh_api(tmp_path_factory, sqlite_template: Path, name: str, **overrides) -> Api:
    """An API of its own for a module's (or a test's) fixture: a copy of the migrated SQLite template in a new
    folder `name`, the test session's folders, the SST-2 rows and the packaged model allowed as server paths."""
    from influence import packaged_minilm_path

    folder = tmp_path_factory.mktemp(name)
    shutil.copy(sqlite_template, folder / "influence.db")
    roots = [tmp_path_factory.getbasetemp(), SST2, packaged_minilm_path().parent]
    return build_api(make_settings(folder, f"sqlite:///{folder / 'influence.db'}", roots, **overrides))


@pytest.fixture
def api(tmp_path, sqlite_url, default_roots) -> Iterator[Api]:
    """The API over a migrated SQLite database."""
    built = build_api(make_settings(tmp_path, sqlite_url, default_roots))
    yield built
    built.close()


@pytest.fixture
def any_api(tmp_path, any_db_url, default_roots) -> Iterator[Api]:
    """The API over SQLite and over PostgreSQL (parametrized)."""
    built = build_api(make_settings(tmp_path, any_db_url, default_roots))
    yield built
    built.close()


# --- real data ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sst2_rows() -> list[tuple[str, int]]:
    """The first 300 rows of SST-2 train, as (sentence, label), exactly as the file has them."""
    rows = []
    with open(SST2 / "train.tsv", encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        for sentence, label in reader:
            rows.append((sentence, int(label)))
            if len(rows) == 300:
                break
    return rows


def tsv_bytes(rows, header=("sentence", "label")) -> bytes:
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode("utf-8")


def csv_bytes(rows, header=("sentence", "label")) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def jsonl_bytes(records) -> bytes:
    import json

    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def parquet_bytes(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()
