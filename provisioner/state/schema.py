"""The state database's tables (SQLAlchemy Core), as of the newest schema version.

:mod:`provisioner.state.migrations` builds these tables version by version; a test checks
that a database migrated from nothing has exactly the columns declared here. There is no
column for a BMC credential anywhere: the store never receives one.

Times are stored as UTC without a zone (SQLite has none) and read back as aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

#: The schema version this code reads and writes.
SCHEMA_VERSION = 3


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime, stored naive in UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("state times must be timezone-aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def now() -> datetime:
    return datetime.now(UTC)


metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("migrated_at", UtcDateTime, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(32), nullable=False),  # bring-up, configure, burnin, upgrade, ...
    Column("site", String(128), nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("finished_at", UtcDateTime),
    Column("status", String(32), nullable=False),  # running, succeeded, failed, interrupted
    Column("spec_hash", String(128)),
    Column("user", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
)

nodes = Table(
    "nodes",
    metadata,
    Column("name", String(255), primary_key=True),
    Column("site", String(128), nullable=False),
    Column("rack", String(128), nullable=False),
    Column("serial", String(128)),
    Column("state", String(32), nullable=False),
    Column("failed_in", String(32)),  # the step a failed node failed in
    Column("last_error", Text),
    Column("retries", Integer, nullable=False, default=0),  # moves out of failed
    Column("last_run_id", String(64), ForeignKey("runs.id")),
    Column("updated_at", UtcDateTime, nullable=False),  # since when in this state
    Index("ix_nodes_site_rack", "site", "rack"),
)

transitions = Table(
    "transitions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node", String(255), ForeignKey("nodes.name"), nullable=False),
    Column("from_state", String(32)),  # None for the enrollment
    Column("to_state", String(32), nullable=False),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("detail", Text),
    Column("error", Text),  # version 2
    Index("ix_transitions_node", "node", "id"),  # version 2
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("node", String(255), ForeignKey("nodes.name")),
    Column("at", UtcDateTime, nullable=False),
    Column("kind", String(64), nullable=False),
    Column("data", Text, nullable=False),  # JSON object
    Index("ix_events_run", "run_id", "id"),  # version 2
)

burnin_results = Table(
    "burnin_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("node", String(255), ForeignKey("nodes.name"), nullable=False),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("verdict", String(32), nullable=False),
    Column("level", String(32)),
    Column("document", Text, nullable=False),  # the agent's JSON document
    Column("checks", Text, nullable=False),  # the judged checks, JSON list
    UniqueConstraint("node", "run_id", name="uq_burnin_node_run"),
)

locks = Table(
    "locks",
    metadata,
    Column("name", String(255), primary_key=True),  # fleet:<site> or node:<name>
    Column("holder", String(512), nullable=False),  # user@host pid N
    Column("user", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("acquired_at", UtcDateTime, nullable=False),
    Column("heartbeat_at", UtcDateTime, nullable=False),
)

node_facts = Table(  # version 3
    "node_facts",
    metadata,
    Column("node", String(255), ForeignKey("nodes.name"), primary_key=True),
    Column("kind", String(32), primary_key=True),  # bmc, image, stack, floors, terraform
    Column("data", Text, nullable=False),  # JSON object; never a secret (references only)
    Column("run_id", String(64), ForeignKey("runs.id"), nullable=False),
    Column("at", UtcDateTime, nullable=False),
)
