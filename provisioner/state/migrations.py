"""Versioned schema migrations: an ordered list of steps, each one schema version.

:func:`migrate` brings a database of any older version (an empty one is version 0) to
:data:`~provisioner.state.schema.SCHEMA_VERSION` in one transaction, and refuses a database
written by a newer provisioner. Steps are frozen once released: a change to the schema is a
new step here plus the same change in :mod:`provisioner.state.schema`, never an edit of an
old step (a test checks that migrating from nothing gives exactly schema.py's columns).

* version 1: the first schema (runs, nodes, transitions, events, burn-in results, locks).
* version 2: ``transitions.error`` (the error of a move to failed or quarantined, apart from
  its detail) and indexes for a node's history and a run's events.
* version 3: ``node_facts``: per node and kind (bmc, image, stack, floors, terraform) what
  the step that established it recorded, which plans compare with the spec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    inspect,
    select,
    text,
)

from provisioner.state.db import is_postgres, shown, writing
from provisioner.state.lifecycle import StateError
from provisioner.state.schema import SCHEMA_VERSION, now, schema_version


class SchemaTooNew(StateError):
    """The database was written by a newer provisioner."""


@dataclass(frozen=True, slots=True)
class Step:
    version: int
    summary: str
    apply: Callable[[Connection], None]


# Version 1's tables, frozen as released (do not edit: add a step).
_V1 = MetaData()
Table(
    "schema_version",
    _V1,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("migrated_at", DateTime, nullable=False),
)
Table(
    "runs",
    _V1,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("site", String(128), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("status", String(32), nullable=False),
    Column("spec_hash", String(128)),
    Column("user", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
)
Table(
    "nodes",
    _V1,
    Column("name", String(255), primary_key=True),
    Column("site", String(128), nullable=False),
    Column("rack", String(128), nullable=False),
    Column("serial", String(128)),
    Column("state", String(32), nullable=False),
    Column("failed_in", String(32)),
    Column("last_error", Text),
    Column("retries", Integer, nullable=False),
    Column("last_run_id", String(64), ForeignKey("runs.id")),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_nodes_site_rack", "site", "rack"),
)
Table(
    "transitions",
    _V1,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node", String(255), ForeignKey("nodes.name"), nullable=False),
    Column("from_state", String(32)),
    Column("to_state", String(32), nullable=False),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("detail", Text),
)
Table(
    "events",
    _V1,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("node", String(255), ForeignKey("nodes.name")),
    Column("at", DateTime, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("data", Text, nullable=False),
)
Table(
    "burnin_results",
    _V1,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node", String(255), ForeignKey("nodes.name"), nullable=False),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("verdict", String(32), nullable=False),
    Column("level", String(32)),
    Column("document", Text, nullable=False),
    Column("checks", Text, nullable=False),
    UniqueConstraint("node", "run_id", name="uq_burnin_node_run"),
)
Table(
    "locks",
    _V1,
    Column("name", String(255), primary_key=True),
    Column("holder", String(512), nullable=False),
    Column("user", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("acquired_at", DateTime, nullable=False),
    Column("heartbeat_at", DateTime, nullable=False),
)


def _v1(conn: Connection) -> None:
    _V1.create_all(conn)


def _v2(conn: Connection) -> None:
    conn.execute(text("ALTER TABLE transitions ADD COLUMN error TEXT"))
    conn.execute(text("CREATE INDEX ix_transitions_node ON transitions (node, id)"))
    conn.execute(text("CREATE INDEX ix_events_run ON events (run_id, id)"))


def _v3(conn: Connection) -> None:
    facts = MetaData()
    Table("nodes", facts, Column("name", String(255), primary_key=True))
    Table("runs", facts, Column("id", String(64), primary_key=True))
    Table(
        "node_facts",
        facts,
        Column("node", String(255), ForeignKey("nodes.name"), primary_key=True),
        Column("kind", String(32), primary_key=True),
        Column("data", Text, nullable=False),
        Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
        Column("at", DateTime, nullable=False),
    )
    facts.tables["node_facts"].create(conn)


STEPS: tuple[Step, ...] = (
    Step(1, "the first schema", _v1),
    Step(2, "transitions.error; indexes for history and events", _v2),
    Step(3, "node_facts: what each node was last given, per kind", _v3),
)
assert [s.version for s in STEPS] == list(range(1, SCHEMA_VERSION + 1))

# Concurrent migrations on PostgreSQL queue on this transaction-level advisory lock.
_MIGRATE_KEY = int.from_bytes(
    hashlib.blake2b(b"provisioner:migrate", digest_size=8).digest(), "big", signed=True
)


def version_of(conn: Connection) -> int:
    """The database's schema version; 0 when it has none yet."""
    if not inspect(conn).has_table("schema_version"):
        return 0
    return int(conn.execute(select(func.max(schema_version.c.version))).scalar_one() or 0)


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to ``target`` (default: the newest); returns the version it had."""
    with writing(engine) as conn:
        if is_postgres(conn):
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_KEY})
        found = version_of(conn)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the state database {shown(engine)} is at schema version {found}, newer than"
                f" this provisioner knows (up to {SCHEMA_VERSION}): upgrade provisioner"
            )
        for step in STEPS[found:target]:
            step.apply(conn)
            conn.execute(schema_version.insert().values(version=step.version, migrated_at=now()))
    return found
