"""The state store: nodes and their moves, runs, events, burn-in results.

``open_store(url, spec_path)`` opens (and migrates) the database: ``url`` (``--state``), else
``$PROVISIONER_STATE``, else a SQLite file beside the spec (``fleet.yaml`` ->
``fleet.state.db``). ``postgresql://`` URLs use psycopg 3.

:meth:`Store.move` is the one place a node changes state: inside one transaction it reads
the node's state (locking its row), asks the transition table, and writes the node row and
the transition row together, compare-and-set on the state it read, so that of two processes
moving the same node only one can win. Workflows ask (:meth:`Store.node`,
:meth:`Store.nodes`) and move; they never write rows themselves.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Connection, Engine, Row, inspect, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from provisioner.state import schema as t
from provisioner.state.db import is_postgres, make_engine, normalize_url, reading, shown, writing
from provisioner.state.lifecycle import State, StateError, check_move
from provisioner.state.migrations import migrate
from provisioner.state.records import (
    BurninRecord,
    Enrollable,
    EventRecord,
    NodeRecord,
    RunRecord,
    TransitionRecord,
    me,
)
from provisioner.state.schema import now

ENV_VARIABLE = "PROVISIONER_STATE"
RUN_STATUSES = ("succeeded", "failed", "interrupted", "refused")


class NoStateDatabase(StateError):
    """Looking at state that was never recorded (the database does not exist yet)."""


class UnknownNode(StateError):
    """A node that is not enrolled in the store."""


class StateConflict(StateError):
    """The node is no longer in the state the caller expected: another run moved it."""


def state_url(url: str | None, spec_path: Path | None) -> str:
    """Where the state lives: ``url``, else ``$PROVISIONER_STATE``, else beside the spec."""
    chosen = url or os.environ.get(ENV_VARIABLE)
    if chosen:
        return normalize_url(chosen)
    if spec_path is None:
        raise StateError(f"no state database given: pass --state URL or set ${ENV_VARIABLE}")
    path = spec_path.absolute().with_name(f"{spec_path.stem}.state.db")
    return f"sqlite:///{path}"


def open_store(url: str | None, spec_path: Path | None, *, create: bool = True) -> Store:
    """Open the state database (migrating it to the current schema). With ``create`` False a
    database that does not exist yet is an error (:class:`NoStateDatabase`), not made."""
    resolved = state_url(url, spec_path)
    parsed = make_url(resolved)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if not create and not path.exists():
            raise NoStateDatabase(
                f"no state database at {path} yet: nothing has been recorded for it"
                " (a bring-up creates it); pass --state URL for another one"
            )
    engine = make_engine(resolved)
    try:
        if not create and _empty(engine):
            raise NoStateDatabase(f"the state database {shown(engine)} holds no state yet")
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)


def _empty(engine: Engine) -> bool:
    with reading(engine) as conn:
        return not inspect(conn).has_table("schema_version")


class Store:
    """A handle on one state database. Thread-safe; close it (or use ``with``) when done."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # PostgreSQL advisory locks (see locks.py): the session that holds them, the names it
        # holds, and a mutex for both.
        self.lock_mutex = threading.Lock()
        self.advisory_held: set[str] = set()
        self._lock_conn: Connection | None = None

    @property
    def url(self) -> str:
        return shown(self.engine)

    @property
    def postgres(self) -> bool:
        return is_postgres(self.engine)

    def lock_connection(self) -> Connection:
        """PostgreSQL: the one connection that holds this process's advisory locks (open
        until :meth:`close`; closing it releases them all). Use under :attr:`lock_mutex`."""
        if self._lock_conn is None or self._lock_conn.closed:
            conn = self.engine.connect()
            self._lock_conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        return self._lock_conn

    def close(self) -> None:
        with self.lock_mutex:
            if self._lock_conn is not None:
                # Closed for real, not pooled: the server releases its advisory locks.
                self._lock_conn.invalidate()
                self._lock_conn.close()
                self._lock_conn = None
            self.advisory_held.clear()
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ nodes

    def enroll(self, nodes: Iterable[Enrollable], *, site: str, run_id: str) -> list[str]:
        """Record the nodes; new ones enter ``enrolled`` (with a transition row). Known nodes
        keep their state; their site, rack and serial follow the spec. Returns the new names."""
        wanted = {node.name: node for node in nodes}
        at = now()
        with writing(self.engine) as conn:
            known = {row.name: row for row in conn.execute(select(t.nodes))}
            _follow_spec(conn, known, wanted, site)
            fresh = [_new_node(n, site, run_id, at) for n in wanted.values() if n.name not in known]
            if not fresh:
                return []
            insert = pg_insert if is_postgres(conn) else sqlite_insert
            # A node another process enrolled meanwhile is its, not ours: no second row.
            statement = insert(t.nodes).on_conflict_do_nothing(index_elements=["name"])
            added = set(conn.execute(statement.returning(t.nodes.c.name), fresh).scalars())
            new = [row["name"] for row in fresh if row["name"] in added]
            if new:
                conn.execute(t.transitions.insert(), [_enrolment(n, run_id, at) for n in new])
        return new

    def move(
        self,
        node: str,
        to: State,
        *,
        run_id: str,
        detail: str | None = None,
        error: str | None = None,
        expected: State | None = None,
        facts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> NodeRecord:
        """Move ``node`` to ``to``: the one function that changes a node's state.

        Refused with :class:`~provisioner.state.lifecycle.IllegalTransition` when the table
        does not allow it, with :class:`StateConflict` when ``expected`` is given and the node
        is in another state; nothing is written then. A move to ``failed`` needs ``error``
        (kept as the node's last error, with the step it failed in). ``facts`` (kind ->
        JSON object) are recorded in the same transaction: what the step that ends with this
        move established (the stack configured, the image installed)."""
        to = State(to)
        if to is State.failed and not error:
            raise StateError(f"{node}: a move to failed needs the error")
        with writing(self.engine) as conn:
            row, current = self._movable(conn, node, to, run_id, expected)
            values = _node_values(row, current, to, run_id, error)
            done = conn.execute(
                t.nodes.update()
                .where(t.nodes.c.name == node, t.nodes.c.state == current.value)
                .values(**values)
            )
            if done.rowcount != 1:  # compare-and-set; the row lock should make this unreachable
                raise StateConflict(f"{node} was moved by another run meanwhile")
            conn.execute(
                t.transitions.insert().values(
                    node=node,
                    from_state=current.value,
                    to_state=to.value,
                    run_id=run_id,
                    at=values["updated_at"],
                    detail=detail,
                    error=error,
                )
            )
            for kind, data in (facts or {}).items():
                _put_fact(conn, node, kind, data, run_id, values["updated_at"])
            moved = conn.execute(select(t.nodes).where(t.nodes.c.name == node)).one()
        return NodeRecord.from_row(moved)

    def _movable(
        self, conn: Connection, node: str, to: State, run_id: str, expected: State | None
    ) -> tuple[Row[Any], State]:
        """The node's row (locked until the transaction ends) and state, if it may move."""
        query = select(t.nodes).where(t.nodes.c.name == node).with_for_update()
        row = conn.execute(query).one_or_none()
        if row is None:
            raise UnknownNode(f"{node} is not enrolled in the state database {self.url}")
        if conn.execute(select(t.runs.c.id).where(t.runs.c.id == run_id)).first() is None:
            raise StateError(f"{node}: no run {run_id} in the state database {self.url}")
        current = State(row.state)
        if expected is not None and current != State(expected):
            raise StateConflict(
                f"{node} is {current}, not {State(expected)}: run {row.last_run_id} moved it"
            )
        failed_in = State(row.failed_in) if row.failed_in else None
        check_move(current, to, failed_in=failed_in, node=node)
        return row, current

    def node(self, name: str) -> NodeRecord | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(t.nodes).where(t.nodes.c.name == name)).one_or_none()
        return None if row is None else NodeRecord.from_row(row)

    def nodes(self, site: str | None = None, rack: str | None = None) -> list[NodeRecord]:
        query = select(t.nodes).order_by(t.nodes.c.name)
        if site is not None:
            query = query.where(t.nodes.c.site == site)
        if rack is not None:
            query = query.where(t.nodes.c.rack == rack)
        with reading(self.engine) as conn:
            return [NodeRecord.from_row(row) for row in conn.execute(query)]

    def history(self, node: str) -> list[TransitionRecord]:
        """The node's transitions, oldest first (its enrollment is the first)."""
        query = select(t.transitions).where(t.transitions.c.node == node)
        with reading(self.engine) as conn:
            rows = conn.execute(query.order_by(t.transitions.c.id)).all()
        return [TransitionRecord.from_row(row) for row in rows]

    # ------------------------------------------------------------------ facts

    def set_facts(self, kind: str, facts: Mapping[str, Mapping[str, Any]], run_id: str) -> None:
        """Record a fact of ``kind`` for each node (node -> JSON object), replacing the one it
        had; for facts that come with no move (Terraform's outputs, a BMC update)."""
        at = now()
        with writing(self.engine) as conn:
            for node, data in facts.items():
                _put_fact(conn, node, kind, data, run_id, at)

    def fact(self, node: str, kind: str) -> dict[str, Any] | None:
        """The node's recorded fact of ``kind``; None when it has none."""
        query = select(t.node_facts.c.data).where(
            t.node_facts.c.node == node, t.node_facts.c.kind == kind
        )
        with reading(self.engine) as conn:
            data = conn.execute(query).scalar_one_or_none()
        return None if data is None else dict(json.loads(data))

    def facts(self, kind: str) -> dict[str, dict[str, Any]]:
        """Every node's recorded fact of ``kind``: node -> the JSON object."""
        query = select(t.node_facts.c.node, t.node_facts.c.data).where(t.node_facts.c.kind == kind)
        with reading(self.engine) as conn:
            return {row.node: json.loads(row.data) for row in conn.execute(query)}

    # ------------------------------------------------------------------ runs and events

    def start_run(self, kind: str, site: str, spec_hash: str | None = None) -> str:
        """Record a run by this process; returns its id (``kind-UTCstamp-random``)."""
        started = now()
        run_id = f"{kind}-{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        who = me()
        with writing(self.engine) as conn:
            conn.execute(
                t.runs.insert().values(
                    id=run_id,
                    kind=kind,
                    site=site,
                    started_at=started,
                    status="running",
                    spec_hash=spec_hash,
                    user=who.user,
                    host=who.host,
                    pid=who.pid,
                )
            )
        return run_id

    def finish_run(self, run_id: str, status: str) -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}")
        with writing(self.engine) as conn:
            done = conn.execute(
                t.runs.update()
                .where(t.runs.c.id == run_id)
                .values(status=status, finished_at=now())
            )
            if done.rowcount != 1:
                raise StateError(f"no run {run_id} in the state database {self.url}")

    def run(self, run_id: str) -> RunRecord | None:
        with reading(self.engine) as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.id == run_id)).one_or_none()
        return None if row is None else RunRecord(**row._asdict())

    def event(self, run_id: str, kind: str, node: str | None = None, **data: Any) -> None:
        """Record something that happened in a run (JSON-able ``data``; never a secret)."""
        body = json.dumps(data, sort_keys=True, default=str)
        with writing(self.engine) as conn:
            conn.execute(
                t.events.insert().values(run_id=run_id, node=node, at=now(), kind=kind, data=body)
            )

    def events(self, run_id: str | None = None, node: str | None = None) -> list[EventRecord]:
        query = select(t.events).order_by(t.events.c.id)
        if run_id is not None:
            query = query.where(t.events.c.run_id == run_id)
        if node is not None:
            query = query.where(t.events.c.node == node)
        with reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [EventRecord(**{**row._asdict(), "data": json.loads(row.data)}) for row in rows]

    # ------------------------------------------------------------------ burn-in

    def save_burnin(
        self,
        node: str,
        run_id: str,
        verdict: str,
        level: str | None,
        document: Mapping[str, Any],
        checks: Sequence[Any],
    ) -> bool:
        """Keep a node's burn-in result of a run: one row per (node, run), whatever happens;
        saving again in the same run replaces it. Returns whether the row is new."""
        values = {
            "node": node,
            "run_id": run_id,
            "at": now(),
            "verdict": verdict,
            "level": level,
            "document": json.dumps(document, sort_keys=True),
            "checks": json.dumps(list(checks), sort_keys=True),
        }
        key = (t.burnin_results.c.node == node, t.burnin_results.c.run_id == run_id)
        with writing(self.engine) as conn:
            had = conn.execute(select(t.burnin_results.c.id).where(*key)).first() is not None
            insert = pg_insert if is_postgres(conn) else sqlite_insert
            statement = insert(t.burnin_results).values(**values)
            changed = {k: v for k, v in values.items() if k not in ("node", "run_id")}
            conn.execute(
                statement.on_conflict_do_update(index_elements=["node", "run_id"], set_=changed)
            )
        return not had

    def burnin_results(self, node: str) -> list[BurninRecord]:
        query = select(t.burnin_results).where(t.burnin_results.c.node == node)
        with reading(self.engine) as conn:
            rows = conn.execute(query.order_by(t.burnin_results.c.id)).all()
        return [
            BurninRecord(
                **{
                    **row._asdict(),
                    "document": json.loads(row.document),
                    "checks": json.loads(row.checks),
                }
            )
            for row in rows
        ]


def _put_fact(
    conn: Connection, node: str, kind: str, data: Mapping[str, Any], run_id: str, at: Any
) -> None:
    values = {
        "node": node,
        "kind": kind,
        "data": json.dumps(data, sort_keys=True, default=str),
        "run_id": run_id,
        "at": at,
    }
    insert = pg_insert if is_postgres(conn) else sqlite_insert
    statement = insert(t.node_facts).values(**values)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["node", "kind"],
            set_={"data": values["data"], "run_id": run_id, "at": at},
        )
    )


def _follow_spec(
    conn: Connection, known: Mapping[str, Row[Any]], wanted: Mapping[str, Enrollable], site: str
) -> None:
    """Known nodes' site, rack and serial follow the spec; their state stays."""
    for name, node in wanted.items():
        row = known.get(name)
        if row is not None and (row.site, row.rack, row.serial) != (site, node.rack, node.serial):
            conn.execute(
                t.nodes.update()
                .where(t.nodes.c.name == name)
                .values(site=site, rack=node.rack, serial=node.serial)
            )


def _new_node(node: Enrollable, site: str, run_id: str, at: Any) -> dict[str, Any]:
    return {
        "name": node.name,
        "site": site,
        "rack": node.rack,
        "serial": node.serial,
        "state": State.enrolled.value,
        "retries": 0,
        "last_run_id": run_id,
        "updated_at": at,
    }


def _enrolment(name: str, run_id: str, at: Any) -> dict[str, Any]:
    return {
        "node": name,
        "from_state": None,
        "to_state": State.enrolled.value,
        "run_id": run_id,
        "at": at,
        "detail": "enrolled",
        "error": None,
    }


def _node_values(
    row: Row[Any], current: State, to: State, run_id: str, error: str | None
) -> dict[str, Any]:
    values: dict[str, Any] = {"state": to.value, "updated_at": now(), "last_run_id": run_id}
    if to is State.failed:
        values.update(failed_in=current.value, last_error=error)
    elif current is State.failed:
        values.update(failed_in=None, retries=row.retries + 1)
    if to is State.quarantined and error:
        values["last_error"] = error
    if to is State.ready:
        values["last_error"] = None
    return values
