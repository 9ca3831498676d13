"""Rack bring-up: from racked and cabled to ``ready`` or ``quarantined``, with no hands.

Each node goes its own way through the lifecycle (:mod:`provisioner.state.lifecycle`), in a
thread of its own, so a slow node never holds the others::

    enrolled
      -> powering_on   the BMC answers; its FRU serial is the spec's; a one-time network boot
                       is set and the node powered on (or reset, when it is on), staggered
      -> pxe_booting   the boot server serves the node its own iPXE script or installer files
      -> installing    the installer calls back (the boot server believed its token)
      -> configuring   SSH answers; playbooks/site.yml configures the NVIDIA stack, rebooting
                       the node when the kernel must load the new driver
      -> burning_in    playbooks/burnin.yml runs the agent; the controller judges its document
      -> ready | quarantined

Steps that have many nodes doing the same thing have caps: BMC work (``Caps.bmc`` nodes at a
time, plus the spec's power-on stagger per rack), and the two playbooks, which run in batches
(``Caps.batch`` hosts at most, ``Caps.runs`` playbook runs at once): a node that reaches
configuring while a run is going joins the next batch, gathered for ``Caps.settle`` seconds.

Every move is a transition row, and the store is asked, not trusted memory: a re-run carries
on from each node's recorded step. A node that has passed ``installing`` is never powered or
network-booted again (the lifecycle has no move back), so a re-run cannot reinstall it. A
burn-in result is saved before the node moves on, and a re-run that finds one saved (or a
fetched document not yet saved) for the node's current burning_in uses it instead of burning
in again. A failed node keeps its error; the next run retries it where it failed (from the
start, when it failed before its OS was installed). What happens to a node is done by a
:class:`Steps`: :class:`SiteSteps` for real racks and the lab; the benchmark's simulated ones.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from provisioner.bmc import operations as ops
from provisioner.bmc.base import BootDevice, PowerAction, PowerState
from provisioner.bmc.fanout import FanOut, Policy, Stagger, Target
from provisioner.boot.events import EventLog
from provisioner.burnin.document import BurninDocumentError, Level, load_document
from provisioner.burnin.results import agent_path, collect, judge_all, reasons_from
from provisioner.burnin.verdict import READY, Check, NodeVerdict, Verdict
from provisioner.errors import ProvisionerError
from provisioner.plan.desired import Desired
from provisioner.runner.ansible import end_orphaned_runs, run_playbook
from provisioner.spec import Fleet, Node
from provisioner.state.lifecycle import BEFORE_INSTALL, State
from provisioner.state.locks import LockHeld, node_locks
from provisioner.state.records import NodeRecord
from provisioner.state.store import Store

log = logging.getLogger("provisioner.bring_up")
S = State
R = TypeVar("R")

#: Where a bring-up leaves a node for good (this run).
SETTLED = frozenset({S.ready, S.quarantined, S.failed})
#: States a bring-up does not touch: the node is in service, being upgraded, or gone.
NOT_OURS = frozenset({S.draining, S.upgrading, S.retired})
KILL_ENV = "PROVISIONER_KILL_AT"


class StepFailed(ProvisionerError):
    """A node's step failed; the message is kept as the node's last error."""


@dataclass(frozen=True, slots=True)
class Caps:
    bmc: int = 16  # nodes talking to their BMC at once
    runs: int = 8  # playbook runs (site.yml or burnin.yml) going at once, each
    batch: int = 64  # hosts in one playbook run at most
    settle: float = 2.0  # seconds a batch waits for more nodes to join


@dataclass(frozen=True, slots=True)
class Timeouts:
    boot: float = 600.0  # power on -> the boot server serves the node
    install: float = 3600.0  # -> the installer calls back
    ssh: float = 900.0  # -> SSH answers
    poll: float = 0.5


@dataclass(frozen=True, slots=True)
class BurninOutcome:
    """A node's judged burn-in: the verdict and the agent document it was judged from."""

    verdict: NodeVerdict
    document: dict[str, Any]


class Steps(Protocol):
    """What happens to a node at each step (see the module docstring for the order)."""

    def check_bmc(self, node: str) -> str:
        """The BMC answers: return what to record (the FRU serial); StepFailed if not."""

    def network_boot(self, node: str) -> str:
        """Set a one-time network boot and power the node on (reset it when it is on)."""

    def booted(self, node: str, since: float) -> bool:
        """Whether the node fetched its boot files at or after ``since`` (Unix time)."""

    def installed(self, node: str, since: float) -> bool:
        """Whether the node's installer called back at or after ``since``."""

    def reachable(self, node: str) -> bool:
        """Whether the node answers SSH."""

    def configure(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        """Configure the NVIDIA stack on ``nodes``: each node's error, or None."""

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        """Burn ``nodes`` in: each node's judged outcome, or why it has none."""

    def recover(self) -> None:
        """Clean up after a run that died (called holding the nodes' locks)."""

    def fetched(self, node: str, since: float) -> BurninOutcome | None:
        """A burn-in document fetched for ``node`` at or after ``since`` and not yet saved
        (a run that died between fetching and saving), judged; None when there is none."""


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True, slots=True)
class Move:
    """A node's move, as the bring-up reports it to its watcher."""

    node: str
    source: State | None
    target: State
    detail: str | None = None
    error: str | None = None
    at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "from": None if self.source is None else str(self.source),
            "to": str(self.target),
            "detail": self.detail,
            "error": self.error,
            "at": round(self.at, 3),
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    run_id: str
    nodes: tuple[NodeRecord, ...]
    seconds: float
    interrupted: bool = False
    #: Nodes whose thread stopped on an unexpected error (the store gone, a bug), and why.
    errors: Mapping[str, str] = field(default_factory=dict)

    def count(self, state: State) -> int:
        return sum(1 for node in self.nodes if node.state == state)

    @property
    def ok(self) -> bool:
        return (
            not self.interrupted
            and not self.errors
            and all(node.state == S.ready for node in self.nodes)
        )


class BringUp:
    """One bring-up run over ``nodes`` (spec nodes) of ``fleet``; :meth:`run` it once."""

    def __init__(
        self,
        fleet: Fleet,
        nodes: Sequence[Node],
        store: Store,
        steps: Steps,
        *,
        caps: Caps = Caps(),
        timeouts: Timeouts = Timeouts(),
        on_move: Callable[[Move], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.nodes = list(nodes)
        self.store = store
        self.steps = steps
        self.caps = caps
        self.timeouts = timeouts
        self.on_move = on_move
        self.site = fleet.document.metadata.site
        self._bmc = threading.Semaphore(max(1, caps.bmc))
        bmc = fleet.document.bmc.power_on_stagger
        self._stagger = Stagger(bmc.count, bmc.interval)
        self._configure: Batcher[str | None] = Batcher(steps.configure, caps)
        self._burn: Batcher[BurninOutcome | str] = Batcher(self._burn_batch, caps)
        self.run_id = ""
        self._errors: dict[str, str] = {}
        self._desired = Desired(fleet)

    def run(self) -> Outcome:
        """Bring the nodes up; returns where each ended. Raises
        :class:`~provisioner.state.locks.LockHeld` (naming the holder) when another run holds
        one of the nodes."""
        started = time.monotonic()
        names = [node.name for node in self.nodes]
        if not names:
            raise ValueError("a bring-up needs at least one node")
        self.run_id = self.store.start_run("bring-up", self.site)
        status = "failed"
        try:
            with node_locks(self.store, names, self.run_id):
                self.store.enroll(self.nodes, site=self.site, run_id=self.run_id)
                self.steps.recover()
                self._all(names)
            records = tuple(r for r in (self.store.node(n) for n in names) if r is not None)
            outcome = Outcome(
                self.run_id, records, time.monotonic() - started, errors=dict(self._errors)
            )
            status = "succeeded" if outcome.ok else "failed"
            return outcome
        except LockHeld:
            status = "refused"  # another run holds some of the nodes; this one did nothing
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self._configure.close()
            self._burn.close()
            self.store.finish_run(self.run_id, status)

    def _all(self, names: Sequence[str]) -> None:
        """A daemon thread per node (so that Ctrl-C ends the run at once, leaving each node
        in its step), joined in turn."""
        threads = [
            threading.Thread(target=self._guarded, args=(name,), name=name, daemon=True)
            for name in names
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)

    def _guarded(self, name: str) -> None:
        try:
            self._node(name)
        except Exception as error:  # the store gone, or a bug: say which node, go on
            log.error("%s: bring-up stopped: %s", name, error, exc_info=error)
            self._errors[name] = f"{type(error).__name__}: {error}"

    # ------------------------------------------------------------------ one node

    def _node(self, name: str) -> None:
        record = self._record(name)
        # A node that failed while draining or upgrading is the upgrade's to retry, not ours.
        theirs = record.state is S.failed and record.failed_in in NOT_OURS
        if record.state in NOT_OURS or record.state in (S.ready, S.quarantined) or theirs:
            self._say(Move(name, record.state, record.state, detail="nothing to do"))
            return
        if record.state is S.failed:
            assert record.failed_in is not None
            retry = S.enrolled if record.failed_in in BEFORE_INSTALL else record.failed_in
            self._move(name, retry, f"retry after: {record.last_error}")
        state = self._record(name).state
        while state not in SETTLED:
            try:
                self._step(name, state)
            except StepFailed as failure:
                self._move(name, S.failed, error=str(failure) or f"{state} failed")
            except Exception as error:
                log.exception("%s: %s failed", name, state)
                self._move(name, S.failed, error=f"{type(error).__name__}: {error}")
            state = self._record(name).state

    def _step(self, name: str, state: State) -> None:
        if state is S.enrolled:
            self._move(name, S.powering_on, "check the BMC, network boot, power on")
        elif state is S.powering_on:
            self._power_on(name)
        elif state is S.pxe_booting:
            since = self._entered(name, S.powering_on)
            self._wait(name, "no network boot", self.timeouts.boot, self.steps.booted, since)
            self._move(name, S.installing, "the boot server served the node's boot files")
        elif state is S.installing:
            since = self._entered(name, S.powering_on)
            wait = self.timeouts.install
            self._wait(name, "no install callback", wait, self.steps.installed, since)
            self._move(name, S.configuring, "the installer called back", facts=("image",))
        elif state is S.configuring:
            self._configure_node(name)
        elif state is S.burning_in:
            self._burn_in(name)
        else:  # pragma: no cover - SETTLED and NOT_OURS are handled by the caller
            raise StepFailed(f"bring-up does not move a node in {state}")

    def _power_on(self, name: str) -> None:
        with self._bmc:
            serial = self.steps.check_bmc(name)
            self.store.event(self.run_id, "fru", name, serial=serial)
        kill_point("power-on", name)
        self._stagger.wait(self._rack(name))
        with self._bmc:
            done = self.steps.network_boot(name)
        self._move(name, S.pxe_booting, f"FRU serial {serial}; {done}", facts=("bmc",))

    def _configure_node(self, name: str) -> None:
        self._wait(name, "SSH does not answer", self.timeouts.ssh, self._reachable, 0.0)
        error = self._configure.submit(name).result()
        if error is not None:
            raise StepFailed(error)
        self._move(name, S.burning_in, "site.yml configured the NVIDIA stack", facts=("stack",))

    def _burn_in(self, name: str) -> None:
        since = self._entered(name, S.burning_in)
        saved = [r for r in self.store.burnin_results(name) if r.at.timestamp() >= since]
        if saved:  # the run that saved it died before moving the node
            result = saved[-1]
            detail = f"burn-in {result.verdict} (saved by run {result.run_id})"
            if result.verdict == READY:
                self._move(name, S.ready, detail, facts=("floors",))
            else:
                why = failing(c for c in result.checks if c.get("verdict") == str(Verdict.FAIL))
                self._move(name, S.quarantined, detail, error=why or "burn-in failed")
            return
        outcome = self.steps.fetched(name, since)
        if outcome is None:
            got = self._burn.submit(name).result()
            if isinstance(got, str):
                raise StepFailed(f"burn-in: {got}")
            outcome = got
        verdict = outcome.verdict
        checks = [check.as_dict() for check in verdict.checks]
        self.store.save_burnin(
            name, self.run_id, verdict.verdict, verdict.level, outcome.document, checks
        )
        kill_point("burnin-saved", name)
        if verdict.ready:
            self._move(name, S.ready, "burn-in passed", facts=("floors",))
            return
        why = failing(check.as_dict() for check in verdict.failing)
        self._move(name, S.quarantined, f"burn-in failed: {why}", error=why)

    def _burn_batch(self, nodes: Sequence[str]) -> Mapping[str, BurninOutcome | str]:
        return self.steps.burn_in(nodes, self.run_id)

    # ------------------------------------------------------------------ helpers

    def _reachable(self, name: str, since: float) -> bool:
        return self.steps.reachable(name)

    def _wait(
        self,
        name: str,
        what: str,
        timeout: float,
        ready: Callable[[str, float], bool],
        since: float,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not ready(name, since):
            if time.monotonic() > deadline:
                raise StepFailed(f"{what} within {timeout:g} s")
            time.sleep(self.timeouts.poll)

    def _record(self, name: str) -> NodeRecord:
        record = self.store.node(name)
        if record is None:  # pragma: no cover - enrolled at the start of the run
            raise StepFailed(f"{name} is not enrolled")
        return record

    def _entered(self, name: str, state: State) -> float:
        """When ``name`` last entered ``state`` (Unix time)."""
        for row in reversed(self.store.history(name)):
            if row.to_state == state:
                return row.at.timestamp()
        return 0.0

    def _rack(self, name: str) -> str:
        return self.fleet.by_name[name].rack

    def _move(
        self,
        name: str,
        to: State,
        detail: str | None = None,
        *,
        error: str | None = None,
        facts: Sequence[str] = (),
    ) -> None:
        """Move the node, recording with the move the spec's ``facts`` (kinds) that the step
        just established (the image installed, the stack configured ...)."""
        before = self._record(name).state
        node = self.fleet.by_name[name]
        recorded = {kind: self._desired.fact(kind, node) for kind in facts}
        self.store.move(
            name,
            to,
            run_id=self.run_id,
            detail=detail,
            error=error,
            expected=before,
            facts=recorded,
        )
        self._say(Move(name, before, to, detail, error))

    def _say(self, move: Move) -> None:
        """Tell the watcher; a watcher that fails (a display bug) never fails the node."""
        if self.on_move is None:
            return
        try:
            self.on_move(move)
        except Exception:
            log.exception("%s: the bring-up's watcher failed on %s", move.node, move.target)


# ---------------------------------------------------------------------------- pacing


class Batcher(Generic[R]):
    """Group commit for playbook runs: nodes submitted while runs are going (or within
    ``settle`` seconds of each other) go into one run; at most ``runs`` runs at once. Its
    threads are daemons: an interrupted bring-up exits without waiting for a run to end (the
    nodes stay in their step, and the next run carries on)."""

    def __init__(self, work: Callable[[Sequence[str]], Mapping[str, R]], caps: Caps) -> None:
        self._work = work
        self._size = max(1, caps.batch)
        self._settle = caps.settle
        self._runs = max(1, caps.runs)
        self._queue: list[tuple[str, Future[R]]] = []
        self._ready = threading.Condition()
        self._workers = 0
        self._idle = 0
        self._closed = False

    def submit(self, node: str) -> Future[R]:
        future: Future[R] = Future()
        with self._ready:
            self._queue.append((node, future))
            if self._idle == 0 and self._workers < self._runs:
                self._workers += 1
                threading.Thread(target=self._worker, name="run", daemon=True).start()
            self._ready.notify()
        return future

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def _worker(self) -> None:
        while True:
            with self._ready:
                self._idle += 1
                while not self._queue and not self._closed:
                    self._ready.wait()
                self._idle -= 1
                if self._closed:
                    return
            if self._size > 1:  # one host a run: nothing to wait for
                time.sleep(self._settle)
            with self._ready:
                batch, self._queue = self._queue[: self._size], self._queue[self._size :]
            if batch:
                self._run(batch)

    def _run(self, batch: list[tuple[str, Future[R]]]) -> None:
        try:
            results = self._work([node for node, _ in batch])
        except Exception as error:
            for _, future in batch:
                future.set_exception(error)
            return
        for node, future in batch:
            if node in results:
                future.set_result(results[node])
            else:
                future.set_exception(StepFailed("the playbook run gave no result for the node"))


def kill_point(point: str, node: str) -> None:
    """Crash injection for the reliability tests: when ``PROVISIONER_KILL_AT`` names
    ``point:node`` (or ``point:*``), this process SIGKILLs itself here, exactly as a
    ``kill -9`` would, at a moment no outside observer could time. Unset, it does nothing."""
    wanted = os.environ.get(KILL_ENV)
    if wanted and wanted in (f"{point}:{node}", f"{point}:*"):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- real steps


class SiteSteps:
    """The steps on real hardware and on the lab: BMCs over IPMI/Redfish, the boot server's
    events file, SSH, and the playbooks through ansible-runner (over the rendered inventory
    in ``render_dir``)."""

    def __init__(
        self,
        fleet: Fleet,
        render_dir: Path,
        boot_events: Path,
        *,
        key: Path | None = None,
        fan: FanOut | None = None,
        extravars: Mapping[str, Any] | None = None,
        burnin_level: Level | None = None,
    ) -> None:
        self.fleet = fleet
        self.burnin_level = burnin_level  # None: each profile's
        self.render_dir = render_dir.absolute()
        self.events = EventLog(boot_events)
        self.key = key
        self.fan = fan or FanOut(Policy.from_spec(fleet.document.bmc, fleet.base_dir))
        self.extravars = {"nvidia_driver_reboot": True, **(extravars or {})}
        self._targets = {t.node: t for t in ops.targets_for(fleet, fleet.nodes)}

    def _bmc(self, node: str, operation: Callable[[Any, Target], R], what: str) -> R:
        result = self.fan.run([self._targets[node]], operation)[0]
        if not result.ok:
            raise StepFailed(
                f"BMC {result.endpoint}: {what}: {result.reason}: {result.message} "
                f"({result.attempts} attempts)"
            )
        assert result.value is not None
        return result.value

    def check_bmc(self, node: str) -> str:
        fru = self._bmc(node, ops.inventory, "FRU")
        serial = str(fru.get("serial") or "")
        expected = self._targets[node].expected_serial
        if not serial:  # some BMCs (and the lab's Redfish emulator) do not say
            return "not reported by the BMC"
        if expected is not None and serial != expected:
            raise StepFailed(
                f"the BMC's FRU serial is {serial}, the spec's is {expected}: is this BMC "
                "cabled to another node?"
            )
        return serial

    def network_boot(self, node: str) -> str:
        self._bmc(node, ops.boot(BootDevice.NETWORK), "set network boot")
        on = self._bmc(node, ops.power_status, "power status") == str(PowerState.ON)
        action = PowerAction.RESET if on else PowerAction.ON
        self._bmc(node, ops.power(action), f"power {action}")
        return f"network boot once, power {action}"

    def booted(self, node: str, since: float) -> bool:
        return self.events.booted(node, since) or self.events.installed(node, since)

    def installed(self, node: str, since: float) -> bool:
        if self.events.installed(node, since):
            return True
        refused = self.events.refusals(node, since)
        if refused:
            raise StepFailed(f"the boot server refused the install callback: {refused[-1]}")
        return False

    def reachable(self, node: str) -> bool:
        return ssh_answers(str(self.fleet.by_name[node].ip))

    def configure(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        result = run_playbook(
            "site.yml",
            self.render_dir / "ansible",
            limit=nodes,
            private_key=self.key,
            extravars=self.extravars,
        )
        reasons = reasons_from(result, nodes)
        return {node: (f"site.yml: {reasons[node]}" if node in reasons else None) for node in nodes}

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        results_dir = self.render_dir / "burnin" / run_id
        results_dir.mkdir(parents=True, exist_ok=True)
        played = run_playbook(
            "burnin.yml",
            self.render_dir / "ansible",
            limit=nodes,
            private_key=self.key,
            extravars={
                "burnin_agent_path": str(agent_path()),
                "burnin_results_dir": str(results_dir),
                **({"burnin_level": self.burnin_level} if self.burnin_level else {}),
            },
        )
        documents, missing = collect(results_dir, nodes, reasons_from(played, nodes))
        kill_point("burnin-fetched", "*")
        for node in nodes:
            kill_point("burnin-fetched", node)
        out: dict[str, BurninOutcome | str] = {m.node: m.reason for m in missing}
        verdicts, strangers = judge_all(self.fleet, documents, self.burnin_level)
        out |= {m.node: m.reason for m in strangers}
        paths = {document.node: path for path, document in documents}
        for verdict in verdicts:
            out[verdict.node] = BurninOutcome(verdict, _raw(paths[verdict.node]))
        return out

    def fetched(self, node: str, since: float) -> BurninOutcome | None:
        found = [
            path
            for path in (self.render_dir / "burnin").glob(f"*/{node}.json")
            if path.stat().st_mtime >= since
        ]
        for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                document = load_document(path)
            except BurninDocumentError:
                continue
            verdicts, _ = judge_all(self.fleet, [(path, document)], self.burnin_level)
            if verdicts:
                return BurninOutcome(verdicts[0], _raw(path))
        return None

    def recover(self) -> None:
        for session in end_orphaned_runs(self.render_dir / "ansible"):
            log.warning("ended playbook run session %d left by a run that died", session)

    def close(self) -> None:
        self.fan.close()


def failing(checks: Iterable[Mapping[str, Any]]) -> str:
    """The failing checks, as a node's last error says them."""
    return "; ".join(
        f"{Check.from_dict(dict(check)).name}: {check.get('reason')}" for check in checks
    )


def _raw(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def ssh_answers(address: str, port: int = 22, timeout: float = 1.0) -> bool:
    """Whether an SSH server answers at ``address`` (its banner, not just an open port)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            return connection.recv(4).startswith(b"SSH-")
    except OSError:
        return False


@contextmanager
def site_steps(
    fleet: Fleet,
    render_dir: Path,
    boot_events: Path,
    *,
    key: Path | None = None,
    extravars: Mapping[str, Any] | None = None,
    burnin_level: Level | None = None,
) -> Iterator[SiteSteps]:
    steps = SiteSteps(
        fleet, render_dir, boot_events, key=key, extravars=extravars, burnin_level=burnin_level
    )
    try:
        yield steps
    finally:
        steps.close()
