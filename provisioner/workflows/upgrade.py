"""Rolling stack upgrade: canary first, then a sliding window bounded by ``max_unavailable``.

Which nodes: those of the selection whose recorded stack is not the spec's (a ready node), and
those a previous upgrade left half way (draining, upgrading, or burning in after an upgrade,
or failed there). Per node, in a thread of its own::

    ready -> draining      the scheduler drains it, with a reason that names the run; the
                           workflow waits until no job runs there (``drain_timeout``; past
                           it the node is resumed and left for a later run, not failed)
          -> upgrading     playbooks/driver-upgrade.yml installs the spec's pins, rebooting
                           the node so that its kernel runs the new driver; the roles check
                           that it does (nvidia-smi answers with the pinned version)
          -> burning_in    a quick burn-in (the stack fact is recorded with this move)
          -> ready         resumed in the scheduler

A node that fails its upgrade or its burn-in goes back to the stack it had (its recorded
stack, pins and all, even one the spec no longer names), stays drained with a reason that
says so, and is quarantined; when even the way back fails, it is failed, with both errors.

The rollout: the ``canary`` first nodes go alone (one per rack first), and the rest waits
until every canary passed: a failed canary halts the rollout. Then a sliding window: a node
starts as soon as fewer than ``max_unavailable`` nodes are out of service (drained and not yet
resumed) in the whole rollout, and fewer than ``max_unavailable_per_rack`` in its rack. A
percentage is of the fleet (of the rack, per rack), at least one node. When more than
``max_failures`` nodes failed, no further node starts; those under way finish.

A crash (kill -9 included) leaves each node in its step; the next run takes the nodes under
way first (they count against the window) and carries on, so no node is upgraded twice: its
``draining -> upgrading`` move happens once, and a node that already has the spec's stack is
not selected again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from provisioner.burnin.verdict import READY
from provisioner.plan.desired import Desired
from provisioner.scheduler.base import NoScheduler, Scheduler, SchedulerError
from provisioner.spec import Fleet, Node
from provisioner.spec.models import Rollout
from provisioner.state.lifecycle import State
from provisioner.state.locks import LockHeld, node_locks
from provisioner.state.records import NodeRecord
from provisioner.state.store import Store
from provisioner.workflows.bring_up import (
    Batcher,
    BurninOutcome,
    Caps,
    Move,
    StepFailed,
    failing,
    kill_point,
)

log = logging.getLogger("provisioner.upgrade")
S = State
#: Where a node is when this rollout has it out of service.
OUT = frozenset({S.draining, S.upgrading, S.burning_in})
#: Playbook runs at once at most by default (each is an ansible-playbook process).
MAX_RUNS = 32
#: The fact kept with a node's drain: the stack it had before the upgrade it starts.
BEFORE = "stack-before"


class UpgradeSteps(Protocol):
    """What happens to nodes during an upgrade (the scheduler aside)."""

    def upgrade(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        """Install the spec's stack on ``nodes`` and reboot them into it; each node's error,
        or None."""

    def roll_back(
        self, nodes: Sequence[str], stacks: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, str | None]:
        """Put each node back on its recorded stack (``stacks[node]``: the stack fact)."""

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        """A quick burn-in of ``nodes``: each node's judged outcome, or why it has none."""

    def recover(self) -> None:
        """Clean up after a run that died (called holding the nodes' locks)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The rollout policy, resolved to counts for one fleet."""

    canary: int
    unavailable: int
    per_rack: Mapping[str, int] | None  # rack -> nodes out at once; None: no rack limit
    max_failures: int
    drain_timeout: float
    poll: float = 5.0

    @classmethod
    def of(cls, fleet: Fleet, rollout: Rollout | None = None, poll: float = 5.0) -> Limits:
        policy = rollout or fleet.document.rollout
        sizes: dict[str, int] = {}
        for node in fleet.nodes:
            sizes[node.rack] = sizes.get(node.rack, 0) + 1
        per_rack = None
        if policy.max_unavailable_per_rack is not None:
            cap = policy.max_unavailable_per_rack
            per_rack = {rack: max(1, cap.of(size)) for rack, size in sizes.items()}
        return cls(
            canary=policy.canary,
            unavailable=max(1, policy.max_unavailable.of(len(fleet.nodes))),
            per_rack=per_rack,
            max_failures=policy.max_failures,
            drain_timeout=policy.drain_timeout,
            poll=poll,
        )

    def rack_cap(self, rack: str) -> int:
        if self.per_rack is None:
            return self.unavailable
        return self.per_rack.get(rack, self.unavailable)


@dataclass(frozen=True, slots=True)
class Schedule:
    """Who goes when: the canaries, then the rest in the order they are admitted."""

    resumed: tuple[str, ...]  # under way in an earlier run: taken first
    canaries: tuple[str, ...]
    rest: tuple[str, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.resumed + self.canaries + self.rest

    def waves(self, limits: Limits, racks: Mapping[str, str]) -> list[list[str]]:
        """The nodes after the canaries in waves, as they would go if every node took as
        long (``--dry-run``): each wave fills the window, rack limits kept."""
        waves: list[list[str]] = []
        pending = list(self.rest)
        while pending:
            wave: list[str] = []
            per: dict[str, int] = {}
            for name in pending:
                rack = racks[name]
                if len(wave) < limits.unavailable and per.get(rack, 0) < limits.rack_cap(rack):
                    wave.append(name)
                    per[rack] = per.get(rack, 0) + 1
            chosen = set(wave)
            pending = [name for name in pending if name not in chosen]
            waves.append(wave)
        return waves


@dataclass(frozen=True, slots=True)
class UpgradeOutcome:
    run_id: str
    nodes: tuple[NodeRecord, ...]
    seconds: float
    upgraded: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()  # quarantined (rolled back) or failed (could not roll back)
    called_off: tuple[str, ...] = ()  # still busy at drain_timeout: resumed, left for later
    not_started: tuple[str, ...] = ()  # the rollout halted before them
    halted: str | None = None  # why the rollout stopped early
    errors: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.failed or self.called_off or self.not_started or self.halted) and not (
            self.errors
        )


class Upgrade:
    """One rolling upgrade of ``nodes`` (spec nodes) of ``fleet`` to their spec stacks."""

    def __init__(
        self,
        fleet: Fleet,
        nodes: Sequence[Node],
        store: Store,
        steps: UpgradeSteps,
        *,
        scheduler: Scheduler | None = None,
        limits: Limits | None = None,
        caps: Caps | None = None,
        on_move: Callable[[Move], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.nodes = list(nodes)
        self.store = store
        self.steps = steps
        self.scheduler = scheduler or NoScheduler()
        self.limits = limits or Limits.of(fleet)
        self.on_move = on_move
        self.site = fleet.document.metadata.site
        self.desired = Desired(fleet)
        # A playbook run per node by default: an upgrade run lasts its slowest host (a
        # reboot, a DKMS build), so batching nodes keeps the quick ones out of service while
        # the slow one finishes (the rollout benchmark: 1.14x the ideal with batches, 1.10x
        # without); as many runs at once as the window holds, up to MAX_RUNS.
        caps = caps or Caps(runs=min(self.limits.unavailable, MAX_RUNS), batch=1)
        self._upgrade: Batcher[str | None] = Batcher(steps.upgrade, caps)
        self._burn: Batcher[BurninOutcome | str] = Batcher(self._burn_batch, caps)
        self._racks = {node.name: node.rack for node in fleet.nodes}
        self._cond = threading.Condition()
        self._out: dict[str, str] = {}  # node -> rack, out of service now
        self._results: dict[str, str] = {}  # node -> upgraded | failed | called-off
        self._errors: dict[str, str] = {}
        self._halted: str | None = None
        self.run_id = ""

    # ------------------------------------------------------------------ what to do

    def schedule(self) -> Schedule:
        """The nodes to upgrade, in order (reads the store, changes nothing)."""
        records = {record.name: record for record in self.store.nodes(self.site)}
        stacks = self.store.facts("stack")
        resumed, fresh = [], []
        for node in self.nodes:
            record = records.get(node.name)
            if record is None:
                continue
            if self._under_way(record):
                resumed.append(node.name)
            elif record.state is S.ready:
                recorded = stacks.get(node.name)
                if recorded is None or recorded.get("hash") != self.desired.stack(node)["hash"]:
                    fresh.append(node.name)
        # Round-robin over racks: the canaries come from as many racks as they can, and a
        # per-rack limit never leaves the window idle while one rack's nodes wait.
        fresh = _interleaved(fresh, self._racks)
        canaries = fresh[: max(0, self.limits.canary)]
        return Schedule(tuple(resumed), tuple(canaries), tuple(fresh[len(canaries) :]))

    def _under_way(self, record: NodeRecord) -> bool:
        if record.state in (S.draining, S.upgrading):
            return True
        if record.state is S.failed and record.failed_in in (S.draining, S.upgrading):
            return True
        burning = record.state is S.burning_in or (
            record.state is S.failed and record.failed_in is S.burning_in
        )
        return burning and self._burning_after_upgrade(record.name)

    def _burning_after_upgrade(self, name: str) -> bool:
        for row in reversed(self.store.history(name)):
            if row.to_state is S.burning_in:
                return row.from_state is S.upgrading
        return False

    # ------------------------------------------------------------------ the run

    def run(self) -> UpgradeOutcome:
        started = time.monotonic()
        names = [node.name for node in self.nodes]
        if not names:
            raise ValueError("an upgrade needs at least one node")
        self.run_id = self.store.start_run("upgrade", self.site)
        status = "failed"
        plan = Schedule((), (), ())
        try:
            with node_locks(self.store, names, self.run_id):
                self.steps.recover()
                plan = self.schedule()
                self.store.event(
                    self.run_id,
                    "upgrade.schedule",
                    resumed=list(plan.resumed),
                    canaries=list(plan.canaries),
                    rest=len(plan.rest),
                    unavailable=self.limits.unavailable,
                    max_failures=self.limits.max_failures,
                )
                self._roll(plan)
            outcome = self._outcome(plan, started)
            status = "succeeded" if outcome.ok else "failed"
            return outcome
        except LockHeld:
            status = "refused"
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            self._upgrade.close()
            self._burn.close()
            self.store.finish_run(self.run_id, status)

    def _roll(self, plan: Schedule) -> None:
        threads: list[threading.Thread] = []
        threads += self._admit(plan.resumed + plan.canaries)
        self._join(threads)
        canaries_failed = [n for n in plan.canaries if self._results.get(n) == "failed"]
        if canaries_failed and self._halted is None:
            self._halted = f"canary {', '.join(canaries_failed)} failed"
        threads += self._admit(plan.rest)
        self._join(threads)

    def _admit(self, names: Sequence[str]) -> list[threading.Thread]:
        """Start each node as the window allows; returns once all are started (or halted)."""
        pending = list(names)
        threads = []
        with self._cond:
            while pending and self._halted is None:
                chosen = next((n for n in pending if self._fits(n)), None)
                if chosen is None:
                    self._cond.wait(1.0)
                    continue
                pending.remove(chosen)
                self._out[chosen] = self._racks[chosen]
                thread = threading.Thread(
                    target=self._guarded, args=(chosen,), name=chosen, daemon=True
                )
                thread.start()
                threads.append(thread)
        return threads

    def _fits(self, name: str) -> bool:
        rack = self._racks[name]
        in_rack = sum(1 for r in self._out.values() if r == rack)
        return len(self._out) < self.limits.unavailable and in_rack < self.limits.rack_cap(rack)

    def _join(self, threads: Sequence[threading.Thread]) -> None:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)

    def _guarded(self, name: str) -> None:
        try:
            result = self._node(name)
        except Exception as error:  # the store gone, or a bug: say which node, go on
            log.error("%s: upgrade stopped: %s", name, error, exc_info=error)
            self._errors[name] = f"{type(error).__name__}: {error}"
            result = "failed"
        with self._cond:
            self._out.pop(name, None)
            self._results[name] = result
            failures = sum(1 for r in self._results.values() if r == "failed")
            if failures > self.limits.max_failures and self._halted is None:
                nodes = "1 node" if failures == 1 else f"{failures} nodes"
                self._halted = (
                    f"{nodes} failed, more than max_failures ({self.limits.max_failures})"
                )
            self._cond.notify_all()

    # ------------------------------------------------------------------ one node

    def _node(self, name: str) -> str:
        node = self.fleet.by_name[name]
        record = self._record(name)
        state = record.state
        wanted = self.desired.stack(node)
        previous = self._previous(name, wanted)
        if state is S.failed:
            assert record.failed_in is not None
            state = self._move(name, state, record.failed_in, f"retry after: {record.last_error}")
        reason = f"provisioner upgrade {self.run_id}: to stack {node.stack}"
        try:
            if state is S.ready:
                # What it had before is kept with the move: a resumed run still knows it.
                before = {"for": wanted["hash"], "stack": previous}
                detail = f"drain for stack {node.stack}"
                state = self._move(name, state, S.draining, detail, facts={BEFORE: before})
            if state is S.draining:
                self.scheduler.drain(name, reason)
                if not self._wait_idle(name):
                    self.scheduler.resume(name)
                    why = f"jobs still ran after {self.limits.drain_timeout:g} s: resumed"
                    self._move(name, state, S.ready, why)
                    return "called-off"
                kill_point("drained", name)
                state = self._move(name, state, S.upgrading, "no job runs on the node")
            if state is S.upgrading:
                error = self._upgrade.submit(name).result()
                if error is not None:
                    raise StepFailed(error)
                kill_point("upgraded", name)
                detail = f"on stack {node.stack}: quick burn-in"
                state = self._move(name, state, S.burning_in, detail, facts={"stack": wanted})
            got = self._burn.submit(name).result()
            if isinstance(got, str):
                raise StepFailed(f"burn-in: {got}")
            verdict = got.verdict
            checks = [check.as_dict() for check in verdict.checks]
            self.store.save_burnin(
                name, self.run_id, verdict.verdict, verdict.level, got.document, checks
            )
            if verdict.verdict != READY:
                raise StepFailed(f"burn-in failed: {failing(c.as_dict() for c in verdict.failing)}")
        except (StepFailed, SchedulerError) as failure:
            self._fail(name, state, str(failure), previous)
            return "failed"
        self._move(name, state, S.ready, "upgraded and burnt in")
        self.scheduler.resume(name)
        return "upgraded"

    def _wait_idle(self, name: str) -> bool:
        deadline = time.monotonic() + self.limits.drain_timeout
        while not self.scheduler.is_idle(name):
            if time.monotonic() > deadline:
                return False
            time.sleep(self.limits.poll)
        return True

    def _previous(self, name: str, wanted: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The stack the node had before this upgrade: the one kept with its drain when an
        earlier run started this same upgrade, else its recorded stack now."""
        kept = self.store.fact(name, BEFORE)
        if kept is not None and kept.get("for") == wanted["hash"] and kept.get("stack"):
            return dict(kept["stack"])
        return self.store.fact(name, "stack")

    def _fail(
        self, name: str, state: State, error: str, previous: Mapping[str, Any] | None
    ) -> None:
        if state is S.draining:  # the scheduler failed us before anything changed
            self._move(name, state, S.failed, error=error)
            return
        back = "no recorded stack to go back to"
        if previous is not None:
            back = self._roll_back(name, previous) or ""
        if back:
            self._move(name, state, S.failed, error=f"{error}; rolling back failed: {back}")
        else:
            stack = previous or {}
            why = f"{error}; rolled back to stack {stack.get('name')}"
            to = S.quarantined if state in (S.upgrading, S.burning_in) else S.failed
            self._move(name, state, to, f"upgrade failed: {why}", error=why, facts={"stack": stack})
        try:  # it stays drained: say why in the scheduler too
            self.scheduler.drain(name, f"provisioner upgrade {self.run_id}: failed, rolled back")
        except SchedulerError as exc:
            log.warning("%s: could not update the drain reason: %s", name, exc)

    def _roll_back(self, name: str, previous: Mapping[str, Any]) -> str | None:
        try:
            result = self.steps.roll_back([name], {name: previous})
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return result.get(name, "the roll-back gave no result for the node")

    def _burn_batch(self, nodes: Sequence[str]) -> Mapping[str, BurninOutcome | str]:
        return self.steps.burn_in(nodes, self.run_id)

    # ------------------------------------------------------------------ helpers

    def _outcome(self, plan: Schedule, started: float) -> UpgradeOutcome:
        names = [n.name for n in self.nodes]
        records = tuple(r for r in (self.store.node(n) for n in names) if r is not None)
        by = {kind: tuple(n for n, r in self._results.items() if r == kind) for kind in _KINDS}
        return UpgradeOutcome(
            run_id=self.run_id,
            nodes=records,
            seconds=time.monotonic() - started,
            upgraded=by["upgraded"],
            failed=by["failed"],
            called_off=by["called-off"],
            not_started=tuple(n for n in plan.nodes if n not in self._results),
            halted=self._halted,
            errors=dict(self._errors),
        )

    def _record(self, name: str) -> NodeRecord:
        record = self.store.node(name)
        if record is None:  # pragma: no cover - scheduled from the store
            raise StepFailed(f"{name} is not enrolled")
        return record

    def _move(
        self,
        name: str,
        before: State,
        to: State,
        detail: str | None = None,
        *,
        error: str | None = None,
        facts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> State:
        """Move the node from ``before`` (compare-and-set) to ``to``; returns ``to``."""
        self.store.move(
            name, to, run_id=self.run_id, detail=detail, error=error, expected=before, facts=facts
        )
        if self.on_move is not None:
            try:
                self.on_move(Move(name, before, to, detail, error))
            except Exception:
                log.exception("%s: the upgrade's watcher failed on %s", name, to)
        return to


_KINDS = ("upgraded", "failed", "called-off")


def _interleaved(names: Sequence[str], racks: Mapping[str, str]) -> list[str]:
    """Round-robin over racks: the first node of each rack, then the second ..."""
    by_rack: dict[str, list[str]] = {}
    for name in names:
        by_rack.setdefault(racks[name], []).append(name)
    out: list[str] = []
    queues = [iter(nodes) for _, nodes in sorted(by_rack.items())]
    while queues:
        alive = []
        for queue in queues:
            item = next(queue, None)
            if item is not None:
                out.append(item)
                alive.append(queue)
        queues = alive
    return out


def dry_run_lines(upgrade: Upgrade) -> Iterator[str]:
    """What ``--dry-run`` prints: the schedule, wave by wave, as if every node took as long."""
    plan = upgrade.schedule()
    limits = upgrade.limits
    yield (
        f"upgrade of {len(plan.nodes)} nodes: canary {len(plan.canaries)}, at most"
        f" {limits.unavailable} out at once"
        + ("" if limits.per_rack is None else " (and per rack: " + _caps(limits.per_rack) + ")")
        + f", halt after more than {limits.max_failures} failures"
    )
    if plan.resumed:
        yield f"  resumed first (under way in an earlier run): {', '.join(plan.resumed)}"
    if plan.canaries:
        yield f"  canary: {', '.join(plan.canaries)} (the rest waits until it passes)"
    racks = {node.name: node.rack for node in upgrade.fleet.nodes}
    for number, wave in enumerate(plan.waves(limits, racks), start=1):
        yield f"  wave {number}: {', '.join(wave)}"
    if not plan.nodes:
        yield "  nothing to upgrade: every selected node has its spec stack"


def _caps(per_rack: Mapping[str, int]) -> str:
    values = sorted(set(per_rack.values()))
    return ", ".join(str(v) for v in values)
