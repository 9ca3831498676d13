"""The state store against real databases: a SQLite file and a PostgreSQL server that the
session fixture starts (tests.peers.postgres). Every test runs on both unless it says why not.

Concurrency and crashes use real processes (forked): two movers race for the same nodes, a
lock holder is killed with SIGKILL, a busy writer is killed mid-stream.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text, update

from provisioner.spec import load_fleet
from provisioner.state import schema
from provisioner.state.db import make_engine, reading
from provisioner.state.lifecycle import IllegalTransition, State, StateError
from provisioner.state.locks import LockHeld, LockLost, fleet_lock, node_lock, node_locks
from provisioner.state.migrations import SchemaTooNew, migrate, version_of
from provisioner.state.store import (
    NoStateDatabase,
    StateConflict,
    Store,
    UnknownNode,
    open_store,
    state_url,
)
from tests.conftest import LAB_SPEC, RunCli
from tests.peers.postgres import PostgresServer

FORK = multiprocessing.get_context("fork")
S = State


@dataclass(frozen=True)
class N:
    name: str
    rack: str = "r1"
    serial: str | None = None


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.state.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database()


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    with open_store(url, None) as opened:
        yield opened


def _enrolled(store: Store, *names: str) -> str:
    run = store.start_run("bring-up", "lab")
    store.enroll([N(name) for name in names], site="lab", run_id=run)
    return run


def _child(target: Callable[..., None], *args: Any) -> Any:
    process = FORK.Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _killed(process: Any) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)


# --------------------------------------------------------------------------- nodes and moves


def test_enroll_is_idempotent_and_new_nodes_enter_enrolled(store: Store) -> None:
    run = store.start_run("bring-up", "lab")
    assert store.enroll([N("a"), N("b")], site="lab", run_id=run) == ["a", "b"]
    store.move("a", S.powering_on, run_id=run)
    again = store.enroll([N("a"), N("b", rack="r2", serial="SN1"), N("c")], site="lab", run_id=run)
    assert again == ["c"]
    states = {n.name: (n.state, n.rack, n.serial) for n in store.nodes()}
    assert states == {
        "a": (S.powering_on, "r1", None),
        "b": (S.enrolled, "r2", "SN1"),
        "c": (S.enrolled, "r1", None),
    }
    assert [t.to_state for t in store.history("a")] == [S.enrolled, S.powering_on]
    assert [n.name for n in store.nodes(rack="r2")] == ["b"]
    assert store.nodes(site="elsewhere") == []


def test_move_writes_the_node_and_its_transition_together(store: Store) -> None:
    run = _enrolled(store, "a")
    moved = store.move("a", S.powering_on, run_id=run, detail="chassis power on")
    last = store.history("a")[-1]
    assert (moved.state, moved.since, moved.last_run_id) == (S.powering_on, last.at, run)
    assert (last.from_state, last.to_state, last.run_id, last.detail) == (
        S.enrolled,
        S.powering_on,
        run,
        "chassis power on",
    )
    assert store.node("a") == moved


def test_an_illegal_move_is_refused_and_writes_nothing(store: Store) -> None:
    run = _enrolled(store, "a")
    before = (store.node("a"), store.history("a"))
    with pytest.raises(IllegalTransition, match=r"a: cannot move enrolled -> ready"):
        store.move("a", S.ready, run_id=run)
    with pytest.raises(StateConflict, match=r"a is enrolled, not configuring"):
        store.move("a", S.burning_in, run_id=run, expected=S.configuring)
    with pytest.raises(UnknownNode, match="nope is not enrolled"):
        store.move("nope", S.powering_on, run_id=run)
    with pytest.raises(StateError, match="needs the error"):
        store.move("a", S.failed, run_id=run)
    with pytest.raises(StateError, match="a: no run nope in the state database"):
        store.move("a", S.powering_on, run_id="nope")
    assert (store.node("a"), store.history("a")) == before


def test_facts_are_recorded_with_the_move_that_established_them(store: Store) -> None:
    run = _enrolled(store, "a", "b")
    stack = {"name": "h100-570", "hash": "abc", "versions": {"driver": "570.133.20"}}
    store.move("a", S.powering_on, run_id=run, facts={"bmc": {"endpoint": "ipmi://x"}})
    assert store.facts("bmc") == {"a": {"endpoint": "ipmi://x"}}
    # A refused move records no fact either: they go in one transaction.
    with pytest.raises(IllegalTransition):
        store.move("b", S.ready, run_id=run, facts={"stack": stack})
    assert store.facts("stack") == {}
    store.set_facts("stack", {"a": stack, "b": {**stack, "hash": "def"}}, run)
    store.set_facts("stack", {"b": stack}, run)  # replaces b's
    assert store.facts("stack") == {"a": stack, "b": stack}
    assert store.facts("image") == {}
    with pytest.raises(Exception):  # noqa: B017 - a fact needs an enrolled node (foreign key)
        store.set_facts("stack", {"nope": stack}, run)


def test_a_failed_node_is_retried_where_it_failed_and_keeps_its_error(store: Store) -> None:
    run = _enrolled(store, "a")
    for step in (S.powering_on, S.pxe_booting, S.installing, S.configuring):
        store.move("a", step, run_id=run)
    failed = store.move("a", S.failed, run_id=run, error="apt: held packages")
    assert (failed.failed_in, failed.last_error) == (S.configuring, "apt: held packages")
    with pytest.raises(IllegalTransition, match="reinstall"):
        store.move("a", S.enrolled, run_id=run)
    retried = store.move("a", S.configuring, run_id=run)
    assert (retried.failed_in, retried.retries, retried.last_error) == (
        None,
        1,
        "apt: held packages",
    )
    store.move("a", S.burning_in, run_id=run)
    assert store.move("a", S.ready, run_id=run).last_error is None
    assert store.history("a")[-4].error == "apt: held packages"


def test_history_is_oldest_first_and_chained(store: Store) -> None:
    run = _enrolled(store, "a", "b")
    path = [S.powering_on, S.pxe_booting, S.installing, S.configuring, S.burning_in, S.ready]
    for step in path:  # the two nodes' rows interleave
        store.move("a", step, run_id=run)
        store.move("b", step, run_id=run)
    store.move("b", S.retired, run_id=run)
    moves = store.history("a")
    assert [m.to_state for m in moves] == [S.enrolled, *path]
    assert moves[0].from_state is None
    assert all(m.from_state == p.to_state for p, m in itertools.pairwise(moves))
    assert [m.at for m in moves] == sorted(m.at for m in moves)
    assert [m.to_state for m in store.history("b")][-2:] == [S.ready, S.retired]


def _race(url: str, names: list[str], barrier: Any, won: Any) -> None:
    with open_store(url, None) as store:
        run = store.start_run("bring-up", "lab")
        barrier.wait(20)
        for name in names:
            try:
                store.move(name, S.powering_on, run_id=run)
                won.put(name)
            except StateError:
                pass


def test_two_processes_moving_the_same_nodes_exactly_one_wins_each(store: Store) -> None:
    names = [f"n{i:02}" for i in range(20)]
    _enrolled(store, *names)
    store.engine.dispose()
    barrier, won = FORK.Barrier(2), FORK.Queue()
    racers = [_child(_race, store.engine.url.render_as_string(False), names, barrier, won)]
    racers.append(_child(_race, store.engine.url.render_as_string(False), names, barrier, won))
    for racer in racers:
        racer.join(60)
        assert racer.exitcode == 0
    winners = sorted(won.get(timeout=5) for _ in range(len(names)))
    assert winners == names and won.empty()
    for name in names:
        assert [m.to_state for m in store.history(name)] == [S.enrolled, S.powering_on]


def _enroll(url: str, names: list[str], barrier: Any, said: Any) -> None:
    with open_store(url, None) as store:
        run = store.start_run("bring-up", "lab")
        barrier.wait(20)
        said.put(store.enroll([N(name) for name in names], site="lab", run_id=run))


def test_two_processes_enrolling_the_same_nodes_enroll_each_once(store: Store) -> None:
    names = [f"n{i:03}" for i in range(200)]
    store.engine.dispose()
    barrier, said = FORK.Barrier(2), FORK.Queue()
    url = store.engine.url.render_as_string(False)
    enrollers = [_child(_enroll, url, names, barrier, said) for _ in range(2)]
    for enroller in enrollers:
        enroller.join(60)
        assert enroller.exitcode == 0
    first, second = said.get(timeout=5), said.get(timeout=5)
    assert sorted(first + second) == names
    assert all(len(store.history(name)) == 1 for name in names)


_CYCLE = {
    S.enrolled: S.powering_on,
    S.powering_on: S.pxe_booting,
    S.pxe_booting: S.installing,
    S.installing: S.configuring,
    S.configuring: S.burning_in,
    S.burning_in: S.ready,
    S.ready: S.burning_in,
}


def _churn(url: str, names: list[str], started: Any) -> None:
    with open_store(url, None) as store:
        run = store.start_run("bring-up", "lab")
        started.set()
        while True:
            for name in names:
                record = store.node(name)
                assert record is not None
                store.move(name, _CYCLE[record.state], run_id=run, detail="churn")


def test_a_writer_killed_mid_stream_leaves_every_node_consistent(store: Store) -> None:
    """Five times: a process moves nodes as fast as it can and is killed with SIGKILL; each
    node's state is still its last transition's, and the transitions still chain."""
    names = [f"n{i}" for i in range(4)]
    _enrolled(store, *names)
    url = store.engine.url.render_as_string(False)
    total = 0
    for _ in range(5):
        store.engine.dispose()
        started = FORK.Event()
        writer = _child(_churn, url, names, started)
        assert started.wait(20)
        time.sleep(0.3)
        assert writer.is_alive(), "the writer stopped by itself"
        _killed(writer)
        total = 0
        for name in names:
            moves, record = store.history(name), store.node(name)
            assert record is not None
            assert all(m.from_state == p.to_state for p, m in itertools.pairwise(moves))
            assert (record.state, record.since) == (moves[-1].to_state, moves[-1].at)
            total += len(moves)
    assert total > 20 * len(names), "the writer made too few moves to prove anything"


# --------------------------------------------------------------------------- runs, events, burn-in


def test_runs_and_events_are_recorded(store: Store) -> None:
    run = _enrolled(store, "a")
    record = store.run(run)
    assert record is not None
    assert (record.kind, record.site, record.status, record.finished_at) == (
        "bring-up",
        "lab",
        "running",
        None,
    )
    assert (record.pid, record.host) == (os.getpid(), socket.gethostname())
    store.event(run, "power-on", node="a", attempt=1, bmc="ipmi://127.0.0.1:9001")
    store.event(run, "render", files=3)
    store.finish_run(run, "failed")
    finished = store.run(run)
    assert finished is not None and finished.status == "failed" and finished.finished_at
    events = store.events(run_id=run)
    assert [(e.kind, e.node, e.data) for e in events] == [
        ("power-on", "a", {"attempt": 1, "bmc": "ipmi://127.0.0.1:9001"}),
        ("render", None, {"files": 3}),
    ]
    assert [e.kind for e in store.events(node="a")] == ["power-on"]
    with pytest.raises(StateError, match="no run nope"):
        store.finish_run("nope", "succeeded")


def test_burnin_results_are_one_per_node_and_run(store: Store) -> None:
    first = _enrolled(store, "a")
    document = {"node": "a", "gpus": [{"index": 0}]}
    checks = [{"id": "compute.gemm", "gpu": 0, "verdict": "fail"}]
    assert store.save_burnin("a", first, "quarantined", "quick", document, checks) is True
    assert store.save_burnin("a", first, "quarantined", "quick", document, checks) is False
    assert store.save_burnin("a", first, "ready", "standard", document, []) is False
    second = store.start_run("burnin", "lab")
    assert store.save_burnin("a", second, "ready", "quick", document, []) is True
    results = store.burnin_results("a")
    assert [(r.run_id, r.verdict, r.level) for r in results] == [
        (first, "ready", "standard"),
        (second, "ready", "quick"),
    ]
    assert results[0].document == document and results[0].checks == []


# --------------------------------------------------------------------------- locks


def _hold(url: str, site: str, ready: Any, said: Any) -> None:
    with open_store(url, None) as store:
        run = store.start_run("bring-up", site)
        with fleet_lock(store, site, run, heartbeat=0.2):
            said.put(run)
            ready.set()
            time.sleep(120)


def _holder(url: str) -> tuple[Any, str]:
    ready, said = FORK.Event(), FORK.Queue()
    holder = _child(_hold, url, "lab", ready, said)
    assert ready.wait(20), "the lock holder did not start"
    return holder, said.get(timeout=5)


def test_a_second_process_is_refused_the_fleet_lock_with_the_holder_named(store: Store) -> None:
    mine = store.start_run("bring-up", "lab")
    store.engine.dispose()
    holder, theirs = _holder(store.engine.url.render_as_string(False))
    try:
        with pytest.raises(LockHeld) as refused, fleet_lock(store, "lab", mine):
            pytest.fail("the lock was granted twice")
        message = str(refused.value)
        for part in (f"run {theirs}", f"pid {holder.pid}", socket.gethostname(), "since"):
            assert part in message, message
        assert refused.value.holder is not None and refused.value.holder.run_id == theirs
        with fleet_lock(store, "other-site", mine):  # another site's lock is free
            pass
    finally:
        _killed(holder)


def test_the_lock_of_a_killed_holder_is_taken_over_and_said_so(store: Store) -> None:
    mine = store.start_run("bring-up", "lab")
    store.engine.dispose()
    holder, theirs = _holder(store.engine.url.render_as_string(False))
    _killed(holder)
    deadline = time.monotonic() + 10  # PostgreSQL: until the server notices the dead client
    while True:
        try:
            with fleet_lock(store, "lab", mine) as lock:
                notes = list(lock.notes)
            break
        except LockHeld:
            assert time.monotonic() < deadline, "the dead holder's lock was never released"
            time.sleep(0.1)
    expected = (
        f"taking over the lock fleet:lab of run {theirs} held by pid {holder.pid}"
        f" on host {socket.gethostname()}, which is no longer running"
    )
    assert len(notes) == 1 and notes[0].startswith(expected), notes
    assert [e.data["message"] for e in store.events(run_id=mine)] == notes


def test_node_locks_are_all_or_none(url: str) -> None:
    with open_store(url, None) as first, open_store(url, None) as second:
        one, two = _enrolled(first, "a", "b"), second.start_run("bring-up", "lab")
        with node_lock(first, "b", one):
            held = f"lock node:b is held by run {one}"
            with pytest.raises(LockHeld, match=held), node_locks(second, ["a", "b"], two):
                pytest.fail("granted a held lock")
            with node_lock(second, "a", two):  # a was not left taken
                pass
        with (
            node_locks(second, ["a", "b"], two),
            pytest.raises(LockHeld),
            node_lock(first, "a", one),
        ):
            pytest.fail("granted a held lock")


def test_a_lock_taken_over_is_noticed_by_its_holder(store: Store) -> None:
    mine, other = store.start_run("bring-up", "lab"), store.start_run("bring-up", "lab")
    with fleet_lock(store, "lab", mine, heartbeat=0.05) as lock:
        lock.check()
        with store.engine.begin() as conn:
            conn.execute(update(schema.locks).values(run_id=other))
        deadline = time.monotonic() + 5
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LockLost, match=f"run {mine}"):
            lock.check()


@pytest.mark.parametrize(
    ("age", "taken"), [(timedelta(seconds=5), False), (timedelta(seconds=300), True)]
)
def test_sqlite_a_lock_held_on_another_host_goes_stale_without_heartbeat(
    tmp_path: Path, age: timedelta, taken: bool
) -> None:
    """SQLite only: on PostgreSQL the server's advisory lock decides, not the heartbeat."""
    with open_store(f"sqlite:///{tmp_path / 's.db'}", None) as store:
        theirs, mine = store.start_run("bring-up", "lab"), store.start_run("bring-up", "lab")
        beat = schema.now() - age
        with store.engine.begin() as conn:
            conn.execute(
                schema.locks.insert().values(
                    name="fleet:lab",
                    holder="ops@elsewhere pid 4242",
                    user="ops",
                    host="elsewhere",
                    pid=4242,
                    run_id=theirs,
                    acquired_at=beat,
                    heartbeat_at=beat,
                )
            )
        if not taken:
            refused = pytest.raises(LockHeld, match=r"ops@elsewhere pid 4242\) since")
            with refused, fleet_lock(store, "lab", mine, stale_after=60):
                pass
            return
        with fleet_lock(store, "lab", mine, stale_after=60) as lock:
            assert lock.notes == [
                f"taking over the lock fleet:lab of run {theirs} held by pid 4242 on host"
                " elsewhere, whose heartbeat stopped 300 s ago"
            ]


# --------------------------------------------------------------------------- schema


def _insert_v1_rows(url: str) -> None:
    engine = make_engine(url)
    at = schema.now().replace(tzinfo=None)
    rows = [
        'INSERT INTO runs (id, kind, site, started_at, status, "user", host, pid) VALUES'
        " ('r1', 'bring-up', 'lab', :at, 'failed', 'ops', 'h', 1)",
        "INSERT INTO nodes (name, site, rack, state, failed_in, last_error, retries,"
        " last_run_id, updated_at) VALUES ('a', 'lab', 'r1', 'failed', 'powering_on',"
        " 'no power', 0, 'r1', :at)",
        "INSERT INTO transitions (node, from_state, to_state, run_id, at, detail) VALUES"
        " ('a', NULL, 'enrolled', 'r1', :at, 'enrolled')",
        "INSERT INTO transitions (node, from_state, to_state, run_id, at, detail) VALUES"
        " ('a', 'enrolled', 'powering_on', 'r1', :at, NULL)",
        "INSERT INTO burnin_results (node, run_id, at, verdict, level, document, checks)"
        " VALUES ('a', 'r1', :at, 'ready', 'quick', '{}', '[]')",
    ]
    try:
        with engine.begin() as conn:
            for row in rows:
                conn.execute(text(row), {"at": at})
    finally:
        engine.dispose()


def test_migrating_from_version_1_keeps_the_data(url: str) -> None:
    engine = make_engine(url)
    assert migrate(engine, target=1) == 0
    engine.dispose()
    _insert_v1_rows(url)
    with open_store(url, None) as store:
        with reading(store.engine) as conn:
            assert version_of(conn) == schema.SCHEMA_VERSION
        record = store.node("a")
        assert record is not None
        assert (record.state, record.failed_in, record.last_error) == (
            S.failed,
            S.powering_on,
            "no power",
        )
        assert [(m.to_state, m.error) for m in store.history("a")] == [
            (S.enrolled, None),
            (S.powering_on, None),
        ]
        assert [r.verdict for r in store.burnin_results("a")] == ["ready"]
        store.move("a", S.enrolled, run_id="r1")
        store.move("a", S.powering_on, run_id="r1")
        store.move("a", S.failed, run_id="r1", error="still no power")
        assert store.history("a")[-1].error == "still no power"


def test_a_fresh_database_has_exactly_the_declared_schema(store: Store) -> None:
    with reading(store.engine) as conn:
        found = inspect(conn)
        for table in schema.metadata.sorted_tables:
            columns = {column["name"] for column in found.get_columns(table.name)}
            assert columns == set(table.columns.keys()), table.name
            indexes = {index["name"] for index in found.get_indexes(table.name)}
            assert {index.name for index in table.indexes} <= indexes, table.name


def test_a_database_from_a_newer_provisioner_is_refused(url: str) -> None:
    with open_store(url, None) as store, store.engine.begin() as conn:
        conn.execute(
            schema.schema_version.insert().values(
                version=schema.SCHEMA_VERSION + 1, migrated_at=schema.now()
            )
        )
    newer = schema.SCHEMA_VERSION + 1
    with pytest.raises(SchemaTooNew, match=rf"schema version {newer}, newer than this provisioner"):
        open_store(url, None)


def test_looking_never_creates_a_database(url: str, tmp_path: Path) -> None:
    if url.startswith("sqlite"):
        path = tmp_path / "fleet.state.db"
        with pytest.raises(NoStateDatabase, match=f"no state database at {path} yet"):
            open_store(url, None, create=False)
        assert not path.exists()
    else:
        with pytest.raises(NoStateDatabase, match="holds no state yet"):
            open_store(url, None, create=False)
    open_store(url, None).close()
    open_store(url, None, create=False).close()


def test_where_the_state_lives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROVISIONER_STATE", raising=False)
    spec = tmp_path / "site" / "fleet.yaml"
    assert state_url(None, spec) == f"sqlite:///{tmp_path / 'site' / 'fleet.state.db'}"
    assert state_url("postgresql://u@db/x", spec) == "postgresql+psycopg://u@db/x"
    monkeypatch.setenv("PROVISIONER_STATE", "postgres://u@db/y")
    assert state_url(None, spec) == "postgresql+psycopg://u@db/y"
    assert state_url("sqlite:////x.db", spec) == "sqlite:////x.db"
    monkeypatch.delenv("PROVISIONER_STATE")
    with pytest.raises(StateError, match="--state URL"):
        state_url(None, None)


# --------------------------------------------------------------------------- secrets


def _everything(store: Store) -> str:
    with reading(store.engine) as conn:
        return "\n".join(
            repr(row)
            for table in schema.metadata.sorted_tables
            for row in conn.execute(select(table))
        )


def test_no_bmc_password_reaches_the_state_database(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = f"bmc-pw-{os.urandom(12).hex()}"
    fleet = load_fleet(LAB_SPEC)
    username, ref = fleet.bmc_credentials(fleet.nodes[0])
    assert ref.scheme == "env"
    monkeypatch.setenv(ref.target, password)
    assert ref.resolve() == password  # what a workflow holds in memory at the call site
    with open_store(url, None) as store:
        site = fleet.document.metadata.site
        run = store.start_run("bring-up", site, spec_hash="sha256:abc")
        store.enroll(fleet.nodes, site=site, run_id=run)
        with fleet_lock(store, site, run), node_locks(store, [n.name for n in fleet.nodes], run):
            for node in fleet.nodes:
                store.event(run, "power-on", node=node.name, bmc=node.bmc.url, user=username)
                store.move(node.name, S.powering_on, run_id=run, detail=f"via {node.bmc.url}")
                store.move(node.name, S.failed, run_id=run, error=f"{username}: auth refused")
            store.save_burnin(fleet.nodes[0].name, run, "ready", "quick", {"ok": True}, [])
        dump = _everything(store)
    assert fleet.nodes[0].name in dump and username in dump  # the search sees the data
    assert password not in dump
    if url.startswith("sqlite:///"):
        database = Path(url.removeprefix("sqlite:///"))
        for path in database.parent.glob(database.name + "*"):
            assert password.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- CLI on PostgreSQL


def test_history_reads_a_postgresql_state_database(
    postgres: PostgresServer, run_cli: RunCli
) -> None:
    url = postgres.create_database()
    with open_store(url, None) as store:
        run = _enrolled(store, "gpu-9")
        store.move("gpu-9", S.powering_on, run_id=run, detail="power on")
    result = run_cli("history", "gpu-9", "--state", url)
    assert result.returncode == 0, result.stderr
    assert "enrolled -> powering_on" in result.stdout and run in result.stdout
