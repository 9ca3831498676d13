"""Engines for the state database: SQLite (the default, a file) or PostgreSQL (psycopg 3).

SQLite connections run in WAL mode with a busy timeout and foreign keys on; the driver's own
transaction handling is turned off so that every transaction is ours: a read begins with
``BEGIN``, a write with ``BEGIN IMMEDIATE`` (it takes the database's write lock at once, so two
processes' writes queue up instead of failing halfway). PostgreSQL connections are checked
before use; writes that must not interleave lock the rows they change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

#: How long a SQLite write waits for another process's write to finish.
BUSY_TIMEOUT_MS = 30_000

_WRITE = "provisioner_write"


def normalize_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` mean psycopg 3; anything else is kept."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite") and ":memory:" not in url:
        # A workflow runs a thread per node (hundreds in a rollout window): enough pooled
        # connections that they queue on SQLite's own locks, not on the pool.
        return _sqlite_engine(url)
    engine = create_engine(normalize_url(url), pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        _sqlite_events(engine)
    return engine


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, pool_size=32, max_overflow=96)
    _sqlite_events(engine)
    return engine


def is_postgres(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "postgresql"


def shown(engine: Engine) -> str:
    """The engine's URL as a person may see it (no password)."""
    return make_url(engine.url).render_as_string(hide_password=True)


def _sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN: we begin ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction: committed when the block ends, rolled back on an exception."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE: True})
        with conn.begin():
            yield conn


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A read transaction (one consistent snapshot)."""
    with engine.connect() as conn, conn.begin():
        yield conn
