"""Locks that hold across processes and machines: one per fleet (site) for applies, one per
node for work on that node.

Each held lock is a row in ``locks`` saying who holds it (user@host pid N, run, since when,
last heartbeat); a thread refreshes the heartbeat while the lock is held.

* SQLite: the row *is* the lock. Taking it is an insert in a write transaction; a row that is
  there refuses the lock, unless its holder is gone: a pid that no longer runs on this same
  host, or (any host) a heartbeat older than ``stale_after``. Such a lock is taken over, and
  the taker says so (log warning, :attr:`Lock.notes`, a ``lock-takeover`` event).
* PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``, a stable 64-bit key
  from the lock's name) on one connection per store, held for the lock's life; the server
  releases it when the holder's session ends, so a holder that died never blocks anyone. The
  row only says who holds it; a row left by a dead holder is replaced (and said so).

A refused lock raises :class:`LockHeld`, whose message names the holder, its run, host, pid and
since when. Several locks taken in one call (:func:`node_locks`) are all taken or none.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, delete, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from provisioner.state.db import writing
from provisioner.state.lifecycle import StateError
from provisioner.state.records import Me, me
from provisioner.state.schema import locks, now
from provisioner.state.store import Store

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0  # how often a holder refreshes its locks' heartbeat
STALE_AFTER_S = 120.0  # a heartbeat this old marks a holder on another host as gone


def _since(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock, as its row says."""

    name: str
    holder: str
    user: str
    host: str
    pid: int
    run_id: str
    acquired_at: datetime
    heartbeat_at: datetime

    def describe(self) -> str:
        age = (now() - self.heartbeat_at).total_seconds()
        return (
            f"run {self.run_id} ({self.user}@{self.host} pid {self.pid}) since"
            f" {_since(self.acquired_at)} (last heartbeat {age:.0f} s ago)"
        )


class LockHeld(StateError):
    """A lock another run holds; ``holder`` is None when it has not recorded itself yet."""

    def __init__(self, name: str, holder: Holder | None) -> None:
        self.name = name
        self.holder = holder
        who = holder.describe() if holder else "another process (not recorded yet)"
        super().__init__(f"lock {name} is held by {who}")


class LockLost(StateError):
    """A lock this run held was taken over or its database session ended."""


def lock_key(name: str) -> int:
    """The PostgreSQL advisory-lock key of a lock name: stable, signed 64-bit."""
    digest = hashlib.blake2b(f"provisioner:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class Lock:
    """Locks held by one run; :meth:`check` raises :class:`LockLost` once one is lost."""

    store: Store
    names: tuple[str, ...]
    run_id: str
    me: Me
    notes: list[str] = field(default_factory=list)  # takeovers, said when taking the lock
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def check(self) -> None:
        if self.lost:
            raise LockLost(self.lost)

    def start_heartbeat(self, interval: float) -> None:
        self._thread = threading.Thread(
            target=self._beat, args=(interval,), name=f"lock-heartbeat {self.names[0]}", daemon=True
        )
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._refresh()
            except SQLAlchemyError as exc:
                log.warning("lock heartbeat failed: %s", exc)
                if self.store.postgres:
                    self.lost = f"the database session holding {', '.join(self.names)} ended"

    def _refresh(self) -> None:
        if self.store.postgres:
            with self.store.lock_mutex:
                self.store.lock_connection().execute(text("SELECT 1"))
        with writing(self.store.engine) as conn:
            done = conn.execute(update(locks).where(*self._mine()).values(heartbeat_at=now()))
        if done.rowcount < len(self.names) and not self._stop.is_set():
            self.lost = f"a lock of run {self.run_id} ({', '.join(self.names)}) was taken over"

    def _mine(self) -> tuple[Any, ...]:
        return (
            locks.c.name.in_(self.names),
            locks.c.run_id == self.run_id,
            locks.c.host == self.me.host,
            locks.c.pid == self.me.pid,
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            with writing(self.store.engine) as conn:
                conn.execute(delete(locks).where(*self._mine()))
        finally:
            if self.store.postgres:
                _advisory_unlock(self.store, self.names)


@contextmanager
def fleet_lock(
    store: Store,
    site: str,
    run_id: str,
    *,
    heartbeat: float = HEARTBEAT_S,
    stale_after: float = STALE_AFTER_S,
) -> Iterator[Lock]:
    """The site's fleet lock, held for the block (an apply or a bring-up takes it)."""
    with hold(store, [f"fleet:{site}"], run_id, heartbeat=heartbeat, stale_after=stale_after) as lk:
        yield lk


@contextmanager
def node_lock(
    store: Store,
    node: str,
    run_id: str,
    *,
    heartbeat: float = HEARTBEAT_S,
    stale_after: float = STALE_AFTER_S,
) -> Iterator[Lock]:
    """One node's lock, held for the block."""
    with hold(store, [f"node:{node}"], run_id, heartbeat=heartbeat, stale_after=stale_after) as lk:
        yield lk


@contextmanager
def node_locks(
    store: Store,
    nodes: Iterable[str],
    run_id: str,
    *,
    heartbeat: float = HEARTBEAT_S,
    stale_after: float = STALE_AFTER_S,
) -> Iterator[Lock]:
    """Several nodes' locks, all or none, held for the block."""
    names = [f"node:{node}" for node in nodes]
    with hold(store, names, run_id, heartbeat=heartbeat, stale_after=stale_after) as lk:
        yield lk


@contextmanager
def hold(
    store: Store,
    names: Sequence[str],
    run_id: str,
    *,
    heartbeat: float = HEARTBEAT_S,
    stale_after: float = STALE_AFTER_S,
) -> Iterator[Lock]:
    """Take the named locks (all or none), refresh them while the block runs, release."""
    if not names:
        raise ValueError("no lock names")
    if stale_after <= 2 * heartbeat:
        raise ValueError("stale_after must be more than two heartbeats")
    lock = Lock(store, tuple(dict.fromkeys(names)), run_id, me())
    if store.postgres:
        _take_advisory(lock)
    else:
        _take_rows(lock, stale_after)
    try:
        for note in lock.notes:
            log.warning("%s", note)
            store.event(run_id, "lock-takeover", message=note)
        lock.start_heartbeat(heartbeat)
        yield lock
    finally:
        lock.release()


def _take_rows(lock: Lock, stale_after: float) -> None:
    with writing(lock.store.engine) as conn:
        stale = []
        for row in _rows(conn, lock.names):
            why = _gone(row, lock.me, stale_after)
            if why is None:
                raise LockHeld(row.name, _holder(row))
            stale.append(row.name)
            lock.notes.append(_takeover(row, why))
        if stale:
            conn.execute(delete(locks).where(locks.c.name.in_(stale)))
        _insert(conn, lock)


def _take_advisory(lock: Lock) -> None:
    store = lock.store
    taken: list[str] = []
    try:
        with store.lock_mutex:
            conn = store.lock_connection()
            for name in lock.names:
                if name in store.advisory_held or not _try_advisory(conn, name):
                    rows = _rows(conn, [name])
                    raise LockHeld(name, _holder(rows[0]) if rows else None)
                store.advisory_held.add(name)
                taken.append(name)
        with writing(store.engine) as conn:
            rows = _rows(conn, lock.names)
            lock.notes.extend(_takeover(row, _SESSION_ENDED) for row in rows)
            conn.execute(delete(locks).where(locks.c.name.in_(lock.names)))
            _insert(conn, lock)
    except BaseException:
        _advisory_unlock(store, taken)
        raise


_SESSION_ENDED = "which is no longer running (its database session ended)"


def _try_advisory(conn: Connection, name: str) -> bool:
    query = text("SELECT pg_try_advisory_lock(CAST(:key AS BIGINT))")
    return bool(conn.execute(query, {"key": lock_key(name)}).scalar_one())


def _advisory_unlock(store: Store, names: Iterable[str]) -> None:
    query = text("SELECT pg_advisory_unlock(CAST(:key AS BIGINT))")
    with store.lock_mutex:
        for name in names:
            if name in store.advisory_held:
                store.advisory_held.discard(name)
                try:
                    store.lock_connection().execute(query, {"key": lock_key(name)})
                except SQLAlchemyError as exc:  # the session is gone, and its locks with it
                    log.warning("releasing %s: %s", name, exc)


def _rows(conn: Connection, names: Sequence[str]) -> list[Row[Any]]:
    return list(conn.execute(select(locks).where(locks.c.name.in_(names))).all())


def _insert(conn: Connection, lock: Lock) -> None:
    at = now()
    who = lock.me
    conn.execute(
        locks.insert(),
        [
            {
                "name": name,
                "holder": str(who),
                "user": who.user,
                "host": who.host,
                "pid": who.pid,
                "run_id": lock.run_id,
                "acquired_at": at,
                "heartbeat_at": at,
            }
            for name in lock.names
        ],
    )


def _holder(row: Row[Any]) -> Holder:
    return Holder(**row._asdict())


def _gone(row: Row[Any], who: Me, stale_after: float) -> str | None:
    """Why the row's holder is gone, or None when it may still be running."""
    if row.host == who.host and not pid_alive(row.pid):
        return "which is no longer running"
    age = (now() - row.heartbeat_at).total_seconds()
    if age > stale_after:
        return f"whose heartbeat stopped {age:.0f} s ago"
    return None


def _takeover(row: Row[Any], why: str) -> str:
    return (
        f"taking over the lock {row.name} of run {row.run_id} held by pid {row.pid}"
        f" on host {row.host}, {why}"
    )


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]
