"""Database engine and sessions (SQLAlchemy 2.0). The app never migrates on import: `migrate` does."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

log = logging.getLogger(__name__)

# Named constraints: migrations can drop and alter them by name on every backend (SQLite batch mode included).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every ORM model."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL and a busy timeout so the API and workers can share the file."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - exercised by every sqlite test
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


# Work that must wait for the outcome of the unit of work: enqueue a job only once its row is committed,
# delete an artifact written for a row that was rolled back. The owner of the transaction (the request's
# session dependency, `session_scope`) runs these hooks; services only register them.
_AFTER_COMMIT = "after_commit_hooks"
_AFTER_ROLLBACK = "after_rollback_hooks"


def after_commit(session: Session, hook: Callable[[], None]) -> None:
    """Run `hook` once the unit of work commits (skipped if it rolls back)."""
    session.info.setdefault(_AFTER_COMMIT, []).append(hook)


def after_rollback(session: Session, hook: Callable[[], None]) -> None:
    """Run `hook` if the unit of work rolls back, its commit included (skipped once it commits)."""
    session.info.setdefault(_AFTER_ROLLBACK, []).append(hook)


def run_after_commit_hooks(session: Session) -> None:
    """Run the commit hooks in order (an exception propagates: the caller reports it)."""
    session.info.pop(_AFTER_ROLLBACK, None)
    hooks = session.info.pop(_AFTER_COMMIT, [])
    for hook in hooks:
        hook()


def run_after_rollback_hooks(session: Session) -> None:
    """Run every rollback hook; one failing does not stop the others (they only clean up)."""
    session.info.pop(_AFTER_COMMIT, None)
    for hook in session.info.pop(_AFTER_ROLLBACK, []):
        try:
            hook()
        except Exception:  # a failed clean-up must not hide the error that caused the rollback
            log.exception("rollback hook failed")


def commit_unit_of_work(session: Session) -> None:
    """Commit, then run the commit hooks; on a failed commit roll back and run the rollback hooks."""
    try:
        session.commit()
    except BaseException:
        rollback_unit_of_work(session)
        raise
    run_after_commit_hooks(session)


def rollback_unit_of_work(session: Session) -> None:
    try:
        session.rollback()
    finally:
        run_after_rollback_hooks(session)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A unit of work outside a request (workers, scripts): commit on success, rollback on error."""
    session = factory()
    try:
        try:
            yield session
        except BaseException:
            rollback_unit_of_work(session)
            raise
        commit_unit_of_work(session)
    finally:
        session.close()
