"""The bring-up workflow (:class:`provisioner.workflows.bring_up.BringUp`) at its public
interface: a real SQLite state store in the test's folder, the lab's fleet spec (one rack of
four nodes) loaded with ``load_fleet``, and :class:`FakeSteps` in place of the BMCs, the boot
server and Ansible. Burn-in outcomes are real verdicts: hand-made agent documents
(tests/data/burnin/documents) judged against what the spec expects of the node.

Short caps and timeouts keep each test well under two seconds. Where a test needs nodes to
arrive together (batching, stagger) they first meet at a barrier; the two tests that measure
time (the stagger's interval, a batch's settle time) leave margins of 0.1 s or more.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.bmc.fanout import Stagger
from provisioner.burnin.floors import expectation_for
from provisioner.burnin.judge import judge
from provisioner.spec import Fleet, load_fleet
from provisioner.state.lifecycle import BRING_UP, State
from provisioner.state.locks import LockHeld
from provisioner.state.store import Store, open_store
from provisioner.workflows.bring_up import (
    KILL_ENV,
    BringUp,
    BurninOutcome,
    Caps,
    Move,
    Outcome,
    StepFailed,
    Timeouts,
    kill_point,
)
from tests.conftest import DATA, LAB_SPEC, REPO

S = State
SITE = "lab"
NODES = ("gpu-lab-01", "gpu-lab-02", "gpu-lab-03", "gpu-lab-04")
BAD = "gpu-lab-03"
DOCUMENTS = DATA / "burnin" / "documents"
CAPS = Caps(settle=0.05)
# Every wait a healthy fake node makes is answered on its first poll; only a node the test
# made silent waits out a timeout.
TIMEOUTS = Timeouts(boot=0.3, install=0.3, ssh=0.3, poll=0.01)
WAIT = 10.0  # the most a test waits for a thread of its own (a hang fails, never blocks)
# Each step of a node, as FakeSteps records it, when everything goes well.
ALL_STEPS = ["check_bmc", "network_boot", "configure", "fetched", "burn_in"]


# --------------------------------------------------------------------------- the fake


def judged(fleet: Fleet, node: str, document: str = "healthy") -> BurninOutcome:
    """A burn-in outcome as the real steps make it: the hand-made agent document ``document``
    (its node renamed to ``node``) judged against what the spec expects of ``node``."""
    raw = json.loads((DOCUMENTS / f"{document}.json").read_text(encoding="utf-8"))
    raw["node"] = node
    return BurninOutcome(judge(raw, expectation_for(fleet, fleet.by_name[node])), raw)


@dataclass(frozen=True)
class Call:
    step: str
    nodes: tuple[str, ...]
    at: float  # time.monotonic()
    since: float | None = None  # fetched(): the time it was asked about


class FakeSteps:
    """A fake :class:`~provisioner.workflows.bring_up.Steps` standing in for the BMCs, the
    boot server and Ansible; the real ones (``SiteSteps``) are exercised on the lab by
    tests/integration/test_bring_up.py.

    A node network-booted here fetches its boot files and its installer calls back at once;
    SSH answers; site.yml succeeds; burn-in judges the healthy agent document. The test says
    otherwise per node with the attributes below. Every call but the polls (``booted``,
    ``installed``, ``reachable``) is recorded, in order, with its time."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.bmc_errors: dict[str, str] = {}  # check_bmc raises StepFailed(message)
        self.no_boot: set[str] = set()  # never fetches its boot files
        self.no_callback: set[str] = set()  # boots, but its installer never calls back
        self.unreachable: set[str] = set()  # SSH never answers
        self.configure_errors: dict[str, str] = {}  # site.yml fails on the node
        self.configure_raises: str | None = None  # the whole site.yml run raises
        self.documents: dict[str, str] = {}  # the agent document burn-in judges
        self.burn_errors: dict[str, str] = {}  # burn-in has no outcome for the node
        self.unsaved: dict[str, BurninOutcome] = {}  # fetched() finds one
        self.gate: threading.Barrier | None = None  # check_bmc and reachable meet here
        self.ssh_after: dict[str, float] = {}  # seconds past the gate SSH starts answering
        self.playbook_seconds = 0.0  # how long a configure or burn_in run takes
        self.hold: threading.Event | None = None  # check_bmc waits for it
        self.holding = threading.Event()  # set when check_bmc waits for hold
        self.booted_at: dict[str, float] = {}  # Unix times, as the boot server records
        self.called_back_at: dict[str, float] = {}
        self.calls: list[Call] = []
        self.most_at_once: dict[str, int] = {}  # playbook runs going at once, per playbook
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ what the tests read

    def record(self, step: str, nodes: Sequence[str], since: float | None = None) -> None:
        with self._lock:
            self.calls.append(Call(step, tuple(nodes), time.monotonic(), since))

    def steps_of(self, node: str) -> list[str]:
        return [call.step for call in self.calls if node in call.nodes]

    def batches(self, step: str) -> list[tuple[str, ...]]:
        return [call.nodes for call in self.calls if call.step == step]

    def called(self, step: str) -> list[str]:
        return [node for batch in self.batches(step) for node in batch]

    # ------------------------------------------------------------ the Steps protocol

    def check_bmc(self, node: str) -> str:
        self.record("check_bmc", [node])
        if self.gate is not None:
            self.gate.wait(WAIT)
        if self.hold is not None:
            self.holding.set()
            assert self.hold.wait(WAIT), "the test never let the held run go on"
        if node in self.bmc_errors:
            raise StepFailed(self.bmc_errors[node])
        return str(self.fleet.by_name[node].serial)

    def network_boot(self, node: str) -> str:
        self.record("network_boot", [node])
        now = time.time()
        if node not in self.no_boot:
            self.booted_at[node] = now
            if node not in self.no_callback:
                self.called_back_at[node] = now
        return "network boot once, power on"

    def booted(self, node: str, since: float) -> bool:
        return node in self.booted_at and self.booted_at[node] >= since

    def installed(self, node: str, since: float) -> bool:
        return node in self.called_back_at and self.called_back_at[node] >= since

    def reachable(self, node: str) -> bool:
        if self.gate is not None:
            self.gate.wait(WAIT)
        time.sleep(self.ssh_after.get(node, 0.0))
        return node not in self.unreachable

    def configure(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        self.record("configure", nodes)
        with self._playbook("configure"):
            if self.configure_raises is not None:
                raise StepFailed(self.configure_raises)
            return {node: self.configure_errors.get(node) for node in nodes}

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        self.record("burn_in", nodes)
        with self._playbook("burn_in"):
            return {
                node: self.burn_errors.get(node)
                or judged(self.fleet, node, self.documents.get(node, "healthy"))
                for node in nodes
            }

    def recover(self) -> None:
        self.record("recover", [])

    def fetched(self, node: str, since: float) -> BurninOutcome | None:
        self.record("fetched", [node], since)
        return self.unsaved.get(node)

    @contextmanager
    def _playbook(self, step: str) -> Iterator[None]:
        """Counts a run of ``step``'s playbook as going while the block runs."""
        with self._lock:
            self._running[step] = going = self._running.get(step, 0) + 1
            self.most_at_once[step] = max(self.most_at_once.get(step, 0), going)
        try:
            time.sleep(self.playbook_seconds)
            yield
        finally:
            with self._lock:
                self._running[step] -= 1


# --------------------------------------------------------------------------- fixtures


def lab_fleet(folder: Path, count: int = 2, interval: float = 0.0) -> Fleet:
    """The lab spec (site ``lab``, rack lab1, gpu-lab-01..04) with the given power-on stagger
    and no injected GPU faults."""
    text = LAB_SPEC.read_text(encoding="utf-8")
    old = "power_on_stagger: {count: 2, interval: 1}"
    assert old in text, "the lab spec's stagger changed: update this test"
    text = text.replace(old, f"power_on_stagger: {{count: {count}, interval: {interval}}}")
    text = text.split("\nlab:\n", 1)[0] + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fleet.yaml").write_text(text, encoding="utf-8")
    return load_fleet(folder / "fleet.yaml")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """The lab spec with no power-on stagger (interval 0)."""
    return lab_fleet(tmp_path_factory.mktemp("spec"))


def _url(folder: Path) -> str:
    return f"sqlite:///{folder / 'fleet.state.db'}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(_url(tmp_path), None) as opened:
        yield opened


@pytest.fixture
def steps(fleet: Fleet) -> FakeSteps:
    return FakeSteps(fleet)


def _bring_up(
    fleet: Fleet,
    store: Store,
    steps: FakeSteps,
    *,
    caps: Caps = CAPS,
    moves: list[Move] | None = None,
) -> BringUp:
    return BringUp(
        fleet,
        fleet.nodes,
        store,
        steps,
        caps=caps,
        timeouts=TIMEOUTS,
        on_move=None if moves is None else moves.append,
    )


def _states(outcome: Outcome) -> dict[str, State]:
    return {node.name: node.state for node in outcome.nodes}


def _put(store: Store, fleet: Fleet, node: str, state: State, error: str = "") -> str:
    """Leave ``node`` where an earlier run that died would have: moved along the bring-up
    path to ``state`` (or, with ``error``, failed in ``state``) by a run of its own."""
    run = store.start_run("bring-up", SITE)
    store.enroll(fleet.nodes, site=SITE, run_id=run)
    for step in BRING_UP[1 : BRING_UP.index(state) + 1]:
        store.move(node, step, run_id=run)
    if error:
        store.move(node, S.failed, run_id=run, error=error)
    return run


def _save(store: Store, node: str, run: str, outcome: BurninOutcome) -> None:
    """Save a burn-in result the way the workflow does."""
    verdict = outcome.verdict
    checks = [check.as_dict() for check in verdict.checks]
    store.save_burnin(node, run, verdict.verdict, verdict.level, outcome.document, checks)


def _new_rows(store: Store, node: str, run: str) -> list[tuple[State | None, State]]:
    return [(t.from_state, t.to_state) for t in store.history(node) if t.run_id == run]


# --------------------------------------------------------------------------- the happy path


def test_every_node_walks_the_lifecycle_to_ready_and_is_burned_in_once(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    moves: list[Move] = []
    outcome = _bring_up(fleet, store, steps, moves=moves).run()

    assert outcome.ok and outcome.count(S.ready) == len(NODES)
    assert _states(outcome) == dict.fromkeys(NODES, S.ready)
    run = store.run(outcome.run_id)
    assert run is not None and run.status == "succeeded" and run.finished_at is not None
    for node in NODES:
        history = store.history(node)
        assert [t.to_state for t in history] == list(BRING_UP), node
        assert [t.from_state for t in history] == [None, *BRING_UP[:-1]], node
        assert {t.run_id for t in history} == {outcome.run_id}
        results = store.burnin_results(node)
        assert [(r.run_id, r.verdict) for r in results] == [(outcome.run_id, "ready")]
        assert results[0].document["node"] == node
        assert steps.steps_of(node) == ALL_STEPS, node
        serial = fleet.by_name[node].serial
        fru = [e.data for e in store.events(outcome.run_id, node) if e.kind == "fru"]
        assert fru == [{"serial": serial}], node
        said = [(m.source, m.target) for m in moves if m.node == node]
        assert said == [(t.from_state, t.to_state) for t in history[1:]], node
    assert steps.batches("recover") == [()]


# --------------------------------------------------------------------------- one bad node


@pytest.mark.parametrize(
    ("spoil", "failed_in", "error", "reached"),
    [
        pytest.param(
            lambda f: f.bmc_errors.update({BAD: "BMC 127.0.0.1:9003: FRU: timeout (3 attempts)"}),
            S.powering_on,
            "BMC 127.0.0.1:9003: FRU: timeout (3 attempts)",
            ["check_bmc"],
            id="dead-bmc",
        ),
        pytest.param(
            lambda f: f.no_boot.add(BAD),
            S.pxe_booting,
            "no network boot within 0.3 s",
            ["check_bmc", "network_boot"],
            id="never-network-boots",
        ),
        pytest.param(
            lambda f: f.no_callback.add(BAD),
            S.installing,
            "no install callback within 0.3 s",
            ["check_bmc", "network_boot"],
            id="never-calls-back",
        ),
        pytest.param(
            lambda f: f.unreachable.add(BAD),
            S.configuring,
            "SSH does not answer within 0.3 s",
            ["check_bmc", "network_boot"],
            id="no-ssh",
        ),
        pytest.param(
            lambda f: f.configure_errors.update({BAD: "site.yml: nvidia_driver: apt failed"}),
            S.configuring,
            "site.yml: nvidia_driver: apt failed",
            ["check_bmc", "network_boot", "configure"],
            id="site-yml-fails",
        ),
        pytest.param(
            lambda f: f.burn_errors.update({BAD: "no burn-in document was fetched"}),
            S.burning_in,
            "burn-in: no burn-in document was fetched",
            ALL_STEPS,
            id="no-burnin-document",
        ),
    ],
)
def test_one_bad_node_fails_in_its_step_with_its_error_and_the_rest_reach_ready(
    fleet: Fleet,
    store: Store,
    steps: FakeSteps,
    spoil: Callable[[FakeSteps], object],
    failed_in: State,
    error: str,
    reached: list[str],
) -> None:
    spoil(steps)
    outcome = _bring_up(fleet, store, steps).run()

    bad = store.node(BAD)
    assert bad is not None
    assert (bad.state, bad.failed_in, bad.last_error) == (S.failed, failed_in, error)
    assert store.history(BAD)[-1].error == error
    assert steps.steps_of(BAD) == reached
    assert store.burnin_results(BAD) == []
    good = [node for node in NODES if node != BAD]
    assert {n: s for n, s in _states(outcome).items() if n in good} == dict.fromkeys(good, S.ready)
    assert not outcome.ok and outcome.count(S.failed) == 1
    run = store.run(outcome.run_id)
    assert run is not None and run.status == "failed"


def test_a_quarantine_verdict_keeps_the_node_out_with_its_failing_checks(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    steps.documents[BAD] = "xid_79"  # GPU 5 fell off the bus
    outcome = _bring_up(fleet, store, steps).run()

    bad = store.node(BAD)
    assert bad is not None and bad.state is S.quarantined and bad.failed_in is None
    failing = judged(fleet, BAD, "xid_79").verdict.failing
    assert {check.id for check in failing} == {"inventory.gpu_count", "xid"}
    assert bad.last_error is not None
    for check in failing:
        assert f"{check.name}: {check.reason}" in bad.last_error
    assert [t.to_state for t in store.history(BAD)][-2:] == [S.burning_in, S.quarantined]
    results = store.burnin_results(BAD)
    assert [(r.run_id, r.verdict) for r in results] == [(outcome.run_id, "quarantined")]
    assert {c["id"] for c in results[0].checks if c["verdict"] == "fail"} == {
        "inventory.gpu_count",
        "xid",
    }
    assert outcome.count(S.ready) == 3 and outcome.count(S.quarantined) == 1


# --------------------------------------------------------------------------- resuming


def test_a_rerun_carries_each_node_on_from_its_recorded_step_without_booting_it_again(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    """The nodes were left mid-way by a run that died: booted (pxe_booting), called back
    (installing), installed (configuring), configured (burning_in)."""
    left = dict(zip(NODES, (S.pxe_booting, S.installing, S.configuring, S.burning_in), strict=True))
    for node, state in left.items():
        _put(store, fleet, node, state)
    steps.booted_at |= dict.fromkeys(NODES, time.time())  # what the dead run's boots did
    steps.called_back_at |= dict.fromkeys(NODES, time.time())

    outcome = _bring_up(fleet, store, steps).run()

    assert _states(outcome) == dict.fromkeys(NODES, S.ready)
    assert steps.called("check_bmc") == [] and steps.called("network_boot") == []
    assert sorted(steps.called("configure")) == ["gpu-lab-01", "gpu-lab-02", "gpu-lab-03"]
    assert sorted(steps.called("burn_in")) == list(NODES)
    for node, state in left.items():
        path = BRING_UP[BRING_UP.index(state) :]
        assert _new_rows(store, node, outcome.run_id) == list(itertools.pairwise(path)), node


def test_a_burnin_result_saved_before_a_crash_moves_its_node_without_burning_in_again(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    """01 and 02 were burned in and their results saved, then the run died before moving
    them; 03's saved result is older than its current burning_in (it failed there and is
    retried), so it does not count."""
    passed, failed = judged(fleet, "gpu-lab-01"), judged(fleet, "gpu-lab-02", "row_remap_pending")
    for node, outcome_ in (("gpu-lab-01", passed), ("gpu-lab-02", failed)):
        _save(store, node, _put(store, fleet, node, S.burning_in), outcome_)
    old = _put(store, fleet, BAD, S.burning_in)
    _save(store, BAD, old, judged(fleet, BAD, "row_remap_pending"))
    store.move(BAD, S.failed, run_id=old, error="the move after saving failed")

    outcome = _bring_up(fleet, store, steps).run()

    states = _states(outcome)
    assert (states["gpu-lab-01"], states["gpu-lab-02"], states[BAD]) == (
        S.ready,
        S.quarantined,
        S.ready,
    )
    assert "gpu-lab-01" not in steps.called("burn_in") + steps.called("fetched")
    assert "gpu-lab-02" not in steps.called("burn_in") + steps.called("fetched")
    assert len(store.burnin_results("gpu-lab-01")) == 1
    assert len(store.burnin_results("gpu-lab-02")) == 1
    quarantined = store.node("gpu-lab-02")
    assert quarantined is not None and quarantined.last_error is not None
    assert "memory.row_remap[gpu 1]: row remap pending" in quarantined.last_error
    assert steps.called("burn_in").count(BAD) == 1
    assert [r.run_id for r in store.burnin_results(BAD)] == [old, outcome.run_id]


def test_a_fetched_document_not_yet_saved_is_saved_once_and_not_burned_in_again(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    _put(store, fleet, "gpu-lab-01", S.burning_in)
    entered = store.history("gpu-lab-01")[-1].at.timestamp()
    steps.unsaved["gpu-lab-01"] = judged(fleet, "gpu-lab-01", "slow_gpu")

    outcome = _bring_up(fleet, store, steps).run()

    node = store.node("gpu-lab-01")
    assert node is not None and node.state is S.quarantined
    assert "gpu-lab-01" not in steps.called("burn_in")
    (asked,) = [c for c in steps.calls if c.step == "fetched" and c.nodes == ("gpu-lab-01",)]
    assert asked.since == entered
    results = store.burnin_results("gpu-lab-01")
    assert [(r.run_id, r.verdict) for r in results] == [(outcome.run_id, "quarantined")]
    assert results[0].document == steps.unsaved["gpu-lab-01"].document


@pytest.mark.parametrize(
    ("failed_in", "retried_at"),
    [
        (S.powering_on, S.enrolled),
        (S.pxe_booting, S.enrolled),
        (S.installing, S.enrolled),
        (S.configuring, S.configuring),
        (S.burning_in, S.burning_in),
    ],
)
def test_a_failed_node_is_retried_where_it_failed_or_from_the_start_before_install(
    fleet: Fleet, store: Store, steps: FakeSteps, failed_in: State, retried_at: State
) -> None:
    _put(store, fleet, BAD, failed_in, error="it broke last time")

    outcome = _bring_up(fleet, store, steps).run()

    node = store.node(BAD)
    assert node is not None
    assert (node.state, node.retries, node.failed_in, node.last_error) == (S.ready, 1, None, None)
    (first, *_) = [t for t in store.history(BAD) if t.run_id == outcome.run_id]
    assert (first.from_state, first.to_state) == (S.failed, retried_at)
    assert first.detail == "retry after: it broke last time"
    start = BRING_UP.index(retried_at)
    assert steps.steps_of(BAD) == [s for s in ALL_STEPS if _step_state(s) >= start]
    assert steps.called("network_boot").count(BAD) == (1 if retried_at is S.enrolled else 0)


@pytest.mark.parametrize(
    ("failed_in", "silent"), [(S.pxe_booting, "no_boot"), (S.installing, "no_callback")]
)
def test_a_boot_or_install_callback_from_before_this_power_on_does_not_count(
    fleet: Fleet, store: Store, steps: FakeSteps, failed_in: State, silent: str
) -> None:
    """The node booted and called back during an earlier attempt, then failed; powered on
    again now, it stays silent, so the rerun must not take the old events for new ones."""
    then = time.time()
    steps.booted_at[BAD] = steps.called_back_at[BAD] = then
    _put(store, fleet, BAD, failed_in, error="it broke last time")
    getattr(steps, silent).add(BAD)

    _bring_up(fleet, store, steps).run()

    node = store.node(BAD)
    assert node is not None and (node.state, node.failed_in) == (S.failed, failed_in)
    assert sorted(steps.called("network_boot")) == list(NODES)


def _step_state(step: str) -> int:
    """Where on the bring-up path a FakeSteps step is done."""
    done_in = {
        "check_bmc": S.powering_on,
        "network_boot": S.powering_on,
        "configure": S.configuring,
        "fetched": S.burning_in,
        "burn_in": S.burning_in,
    }
    return BRING_UP.index(done_in[step])


def test_a_site_yml_run_that_raises_fails_its_batch_and_the_next_run_configures_it_again(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    steps.configure_raises = error = "ansible-runner could not start"
    first = _bring_up(fleet, store, steps).run()
    assert _states(first) == dict.fromkeys(NODES, S.failed)
    assert {(node.failed_in, node.last_error) for node in first.nodes} == {(S.configuring, error)}

    steps.configure_raises = None
    steps.calls.clear()
    second = _bring_up(fleet, store, steps).run()
    assert second.ok
    assert steps.called("network_boot") == []
    assert sorted(steps.called("configure")) == list(NODES)


def test_nodes_settled_in_service_or_retired_are_left_alone(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    run = _put(store, fleet, "gpu-lab-01", S.ready)
    _put(store, fleet, "gpu-lab-02", S.burning_in)
    store.move("gpu-lab-02", S.quarantined, run_id=run, error="xid: 79")
    store.move("gpu-lab-03", S.retired, run_id=run)
    _put(store, fleet, "gpu-lab-04", S.ready)
    store.move("gpu-lab-04", S.draining, run_id=run)
    before = {node: store.history(node) for node in NODES}
    moves: list[Move] = []

    outcome = _bring_up(fleet, store, steps, moves=moves).run()

    assert _states(outcome) == {
        "gpu-lab-01": S.ready,
        "gpu-lab-02": S.quarantined,
        "gpu-lab-03": S.retired,
        "gpu-lab-04": S.draining,
    }
    assert {node: store.history(node) for node in NODES} == before
    assert [c.step for c in steps.calls] == ["recover"]
    assert sorted((m.node, m.source, m.target, m.detail) for m in moves) == [
        (node, state, state, "nothing to do") for node, state in _states(outcome).items()
    ]


def test_a_node_that_failed_while_draining_or_upgrading_is_left_to_the_upgrade(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    run = _put(store, fleet, "gpu-lab-01", S.ready)
    store.move("gpu-lab-01", S.draining, run_id=run)
    store.move("gpu-lab-01", S.failed, run_id=run, error="drain: jobs still running")
    _put(store, fleet, "gpu-lab-02", S.ready)
    store.move("gpu-lab-02", S.draining, run_id=run)
    store.move("gpu-lab-02", S.upgrading, run_id=run)
    store.move("gpu-lab-02", S.failed, run_id=run, error="driver: dkms build failed")
    before = {node: store.history(node) for node in ("gpu-lab-01", "gpu-lab-02")}

    outcome = _bring_up(fleet, store, steps).run()

    states = _states(outcome)
    assert states["gpu-lab-01"] is S.failed and states["gpu-lab-02"] is S.failed
    assert {node: store.history(node) for node in before} == before
    assert states["gpu-lab-03"] is S.ready and states["gpu-lab-04"] is S.ready
    touched = steps.called("check_bmc") + steps.called("configure")
    assert "gpu-lab-01" not in touched and "gpu-lab-02" not in touched


def test_a_step_that_fails_without_a_message_still_leaves_an_error(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    steps.bmc_errors[BAD] = ""

    outcome = _bring_up(fleet, store, steps).run()

    record = store.node(BAD)
    assert record is not None and record.state is S.failed
    assert record.failed_in is S.powering_on and record.last_error == "powering_on failed"
    assert outcome.count(S.ready) == 3 and not outcome.ok


def test_a_watcher_that_raises_never_fails_a_node(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    seen: list[Move] = []

    def broken(move: Move) -> None:
        seen.append(move)
        raise RuntimeError("the terminal went away")

    work = BringUp(fleet, fleet.nodes, store, steps, caps=CAPS, timeouts=TIMEOUTS, on_move=broken)
    outcome = work.run()

    assert outcome.ok and outcome.errors == {}
    assert len(seen) == len(NODES) * (len(BRING_UP) - 1)


def test_a_bring_up_of_no_nodes_is_an_error(fleet: Fleet, store: Store, steps: FakeSteps) -> None:
    with pytest.raises(ValueError, match="at least one node"):
        BringUp(fleet, [], store, steps, caps=CAPS, timeouts=TIMEOUTS).run()
    assert steps.calls == []


# --------------------------------------------------------------------------- caps


def test_nodes_that_reach_configuring_within_the_settle_time_share_one_playbook_run(
    fleet: Fleet, store: Store, steps: FakeSteps
) -> None:
    """The four nodes' SSH starts answering 0, 20, 40 and 60 ms apart; a batch gathers for
    0.3 s, so one site.yml run configures them all."""
    for node in NODES:
        _put(store, fleet, node, S.configuring)
    steps.gate = threading.Barrier(len(NODES))
    steps.ssh_after = {node: 0.02 * k for k, node in enumerate(NODES)}

    outcome = _bring_up(fleet, store, steps, caps=Caps(runs=1, batch=64, settle=0.3)).run()

    assert outcome.ok
    assert [sorted(batch) for batch in steps.batches("configure")] == [list(NODES)]


@pytest.mark.parametrize(
    ("runs", "batch", "sizes"), [(1, 2, [2, 2]), (2, 1, [1, 1, 1, 1])], ids=["1x2", "2x1"]
)
def test_playbook_runs_are_capped_in_hosts_each_and_in_runs_at_once(
    fleet: Fleet, store: Store, steps: FakeSteps, runs: int, batch: int, sizes: list[int]
) -> None:
    for node in NODES:
        _put(store, fleet, node, S.configuring)
    steps.gate = threading.Barrier(len(NODES))  # all four ask for SSH at once
    steps.playbook_seconds = 0.05

    outcome = _bring_up(fleet, store, steps, caps=Caps(runs=runs, batch=batch, settle=0.05)).run()

    assert outcome.ok
    assert [len(hosts) for hosts in steps.batches("configure")] == sizes
    assert sorted(steps.called("configure")) == list(NODES)
    assert all(len(hosts) <= batch for hosts in steps.batches("burn_in"))
    assert sorted(steps.called("burn_in")) == list(NODES)
    assert steps.most_at_once["configure"] == runs  # the four asked at once: runs in parallel
    assert steps.most_at_once["burn_in"] <= runs


def test_power_on_is_staggered_per_rack_as_the_spec_says(tmp_path: Path, store: Store) -> None:
    """count 2, interval 0.2 s: the rack's first two nodes power on at once, the next two
    one interval later."""
    fleet = lab_fleet(tmp_path / "spec", count=2, interval=0.2)
    steps = FakeSteps(fleet)
    steps.gate = threading.Barrier(len(NODES))  # all four reach the stagger together

    outcome = _bring_up(fleet, store, steps).run()

    assert outcome.ok
    first, second, third, fourth = sorted(c.at for c in steps.calls if c.step == "network_boot")
    assert second - first < 0.15
    assert third - first >= 0.19 and fourth - first >= 0.19
    assert fourth - first < 0.38  # one interval, not two


def test_the_stagger_paces_a_burst_after_a_quiet_spell_too() -> None:
    """count 2 per 0.2 s: two power-ons go at once and the third waits an interval; after a
    quiet spell, a burst of three late nodes (a slow BMC, a retry) is paced the same way,
    and another rack has a window of its own."""
    stagger = Stagger(2, 0.2)
    went: list[float] = []
    for _ in range(2):
        started = time.monotonic()
        for _ in range(3):
            stagger.wait("lab1")
            went.append(time.monotonic() - started)
        time.sleep(0.5)  # quiet: the window is empty again
    first, second, third, late1, late2, late3 = went
    assert first < 0.1 and second < 0.1 and 0.19 <= third < 0.35
    assert late1 < 0.1 and late2 < 0.1 and late3 >= 0.19
    stagger.wait("lab1")
    stagger.wait("lab1")  # lab1's window is full again ...
    started = time.monotonic()
    stagger.wait("lab2")  # ... which does not hold lab2
    assert time.monotonic() - started < 0.1


# --------------------------------------------------------------------------- locks


def test_a_second_bring_up_of_the_same_nodes_is_refused_naming_the_first(
    fleet: Fleet, tmp_path: Path
) -> None:
    second_is_refused_while_the_first_runs(fleet, _url(tmp_path))


def second_is_refused_while_the_first_runs(fleet: Fleet, url: str) -> None:
    """Two bring-ups of the same nodes, each with a store (a database session) of its own as
    two processes would have, on the state database at ``url``: the second is refused with
    :class:`LockHeld` naming the first, touches nothing and is recorded as refused; once the
    first has finished, a new run goes ahead. (Also run on PostgreSQL by
    tests/integration/test_bring_up_postgres.py.)"""
    held = FakeSteps(fleet)
    held.hold = threading.Event()
    with (
        open_store(url, None) as mine,
        open_store(url, None) as other,
        ThreadPoolExecutor(1) as pool,
    ):
        first = _bring_up(fleet, mine, held)
        running = pool.submit(first.run)
        try:
            assert held.holding.wait(WAIT), "the first bring-up never reached its BMC check"
            refused = FakeSteps(fleet)
            second = _bring_up(fleet, other, refused)
            with pytest.raises(LockHeld) as error:
                second.run()
        finally:
            held.hold.set()
        done = running.result(WAIT)

        message = str(error.value)
        for part in (f"run {first.run_id}", f"pid {os.getpid()}", socket.gethostname()):
            assert part in message, message
        assert error.value.holder is not None and error.value.holder.run_id == first.run_id
        assert refused.calls == []  # not even recover(): it runs only under the locks
        assert all(t.run_id != second.run_id for node in NODES for t in other.history(node))
        refused_run = other.run(second.run_id)
        assert refused_run is not None and refused_run.status == "refused"
        assert done.ok and {node.state for node in done.nodes} == {S.ready}
        later = FakeSteps(fleet)
        assert _bring_up(fleet, other, later).run().ok  # the locks were given back
        assert [c.step for c in later.calls] == ["recover"]  # everything was done


# --------------------------------------------------------------------------- crash injection


def test_kill_point_does_nothing_when_no_kill_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)
    for point in ("power-on", "burnin-fetched", "burnin-saved"):
        kill_point(point, "gpu-lab-01")
        kill_point(point, "*")


_KILLER = """
import sys
from provisioner.workflows.bring_up import kill_point
for call in sys.argv[1:]:
    point, node = call.split(":")
    print(call, flush=True)
    kill_point(point, node)
print("survived", flush=True)
"""


@pytest.mark.parametrize(
    ("wanted", "passed"),
    [
        ("power-on:gpu-lab-03", ["burnin-saved:gpu-lab-03", "power-on:gpu-lab-01"]),
        ("burnin-fetched:*", ["burnin-saved:gpu-lab-03", "power-on:gpu-lab-03"]),
    ],
)
def test_kill_point_sigkills_its_process_exactly_at_the_named_point(
    wanted: str, passed: list[str]
) -> None:
    """Points (or nodes) other than the named one pass; the named one never returns."""
    fatal = wanted.replace("*", "gpu-lab-03")
    done = subprocess.run(
        [sys.executable, "-c", _KILLER, *passed, fatal, "power-on:gpu-lab-04"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, KILL_ENV: wanted},
        timeout=60,
        check=False,
    )
    assert done.returncode == -9, done.stderr
    assert done.stdout.split() == [*passed, fatal]
