"""``provisioner apply``: carry out a reviewed plan, or refuse it before touching anything.

:func:`snapshot` reads what a plan is made from; :func:`current_plan` makes one from the
spec and the store. :class:`Apply` takes a saved plan, checks that neither the spec nor the
recorded state changed since it was made (:class:`~provisioner.errors.PlanStale` otherwise,
with nothing touched), then goes through the plan's kinds in order:

1. the Terraform stage, when the spec has one: ``terraform.tfvars.json`` from the node facts,
   init / plan / apply in the module; its outputs are kept (the run's event, and per node the
   ``terraform`` fact when the module has a ``nodes`` output). A failing module stops the
   apply here, before any node is touched;
2. **update-bmc**: the BMC must answer at its new address with its new credential reference
   (its FRU is read); then the ``bmc`` fact is recorded;
3. **retire**: drained through the scheduler, powered off through the BMC recorded for it
   (the node is gone from the spec), moved to ``retired``. Never wiped;
4. **reimage**: drained, waited on until idle, moved ``draining -> enrolled``; then with
5. **enroll** and **bring-up**: one bring-up run (:class:`~provisioner.workflows.bring_up.
   BringUp`), which network-boots the reimaged nodes anew;
6. **upgrade-stack**: the rolling upgrade (:class:`~provisioner.workflows.upgrade.Upgrade`);
7. **re-burn-in**: drained, idle, moved ``draining -> burning_in``; burnt in by a bring-up
   run at the profile's level; resumed in the scheduler when ready.

What does the work is a :class:`Parts`: the real one (:func:`site_parts`, in the CLI) drives
BMCs, Ansible, Terraform and the scheduler; tests hand in their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from provisioner.plan import ActionKind, NodeState, Plan, Snapshot, make_plan
from provisioner.plan.compute import spec_hash, state_fingerprint
from provisioner.plan.desired import FACT_KINDS, Desired
from provisioner.plan.planfile import check_fresh
from provisioner.scheduler.base import NoScheduler, Scheduler, SchedulerError
from provisioner.spec import Fleet, Node
from provisioner.state.lifecycle import State
from provisioner.state.store import Store
from provisioner.workflows.bring_up import Outcome
from provisioner.workflows.upgrade import UpgradeOutcome

log = logging.getLogger("provisioner.apply")
A = ActionKind
S = State


def snapshot(store: Store, site: str) -> Snapshot:
    """The recorded state of ``site`` as a plan reads it."""
    nodes = {
        record.name: NodeState(
            record.rack,
            str(record.state),
            None if record.failed_in is None else str(record.failed_in),
            record.last_error,
        )
        for record in store.nodes(site)
    }
    facts = {kind: store.facts(kind) for kind in FACT_KINDS}
    return Snapshot(nodes, facts)


def current_plan(fleet: Fleet, store: Store, *, retire: bool = False) -> Plan:
    return make_plan(fleet, snapshot(store, fleet.document.metadata.site), retire=retire)


def refuse_stale(fleet: Fleet, plan: Plan, store: Store) -> None:
    """:class:`~provisioner.errors.PlanStale` when the spec or the recorded state is no
    longer what ``plan`` was made from; reads only."""
    site = fleet.document.metadata.site
    check_fresh(plan, spec_hash(fleet), state_fingerprint(snapshot(store, site)), site)


class Parts(Protocol):
    """What carries the plan out."""

    scheduler: Scheduler

    def terraform(self) -> Mapping[str, Any] | None:
        """Run the spec's Terraform module; its outputs (None: the spec has no module)."""

    def check_bmc(self, nodes: Sequence[Node]) -> Mapping[str, str | None]:
        """Whether each node's BMC answers with the spec's endpoint and credentials."""

    def power_off(self, nodes: Mapping[str, Mapping[str, Any]]) -> Mapping[str, str | None]:
        """Power off nodes gone from the spec, through their recorded BMC facts."""

    def bring_up(self, nodes: Sequence[Node]) -> Outcome:
        """A bring-up run over ``nodes``."""

    def upgrade(self, nodes: Sequence[Node]) -> UpgradeOutcome:
        """A rolling upgrade of ``nodes``."""


@dataclass
class ApplyOutcome:
    run_id: str
    seconds: float = 0.0
    terraform: Mapping[str, Any] | None = None
    bring_up: Outcome | None = None
    upgrade: UpgradeOutcome | None = None
    reburn: Outcome | None = None
    #: Nodes an action failed on, and why (bring-up and upgrade outcomes say their own).
    errors: dict[str, str] = field(default_factory=dict)
    done: dict[str, list[str]] = field(default_factory=dict)  # action kind -> nodes

    @property
    def ok(self) -> bool:
        runs = [self.bring_up, self.upgrade, self.reburn]
        return not self.errors and all(run is None or run.ok for run in runs)


class Apply:
    """Carry out ``plan`` for ``fleet`` (see the module docstring)."""

    def __init__(
        self,
        fleet: Fleet,
        plan: Plan,
        store: Store,
        parts: Parts,
        *,
        drain_timeout: float | None = None,
        poll: float = 5.0,
        on_stage: Callable[[str], None] | None = None,
    ) -> None:
        self.fleet = fleet
        self.plan = plan
        self.store = store
        self.parts = parts
        self.scheduler = parts.scheduler or NoScheduler()
        self.drain_timeout = drain_timeout or fleet.document.rollout.drain_timeout
        self.poll = poll
        self.on_stage = on_stage or (lambda _: None)
        self.site = fleet.document.metadata.site
        self.run_id = ""

    def run(self) -> ApplyOutcome:
        refuse_stale(self.fleet, self.plan, self.store)
        started = time.monotonic()
        self.run_id = self.store.start_run("apply", self.site, self.plan.spec_hash)
        outcome = ApplyOutcome(self.run_id)
        status = "failed"
        try:
            self._stages(outcome)
            status = "succeeded" if outcome.ok else "failed"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            outcome.seconds = time.monotonic() - started
            self.store.finish_run(self.run_id, status)
        return outcome

    def _stages(self, outcome: ApplyOutcome) -> None:
        plan, by_name = self.plan, self.fleet.by_name
        outputs = None
        if self.fleet.document.terraform is not None:
            self.on_stage("terraform")
            outputs = self.parts.terraform()  # TerraformFailed: nothing touched yet
            outcome.terraform = outputs
            self.store.event(self.run_id, "terraform.outputs", outputs=dict(outputs or {}))
        self._update_bmc([by_name[n] for n in plan.nodes(A.update_bmc)], outcome)
        self._retire(plan.nodes(A.retire), outcome)
        reimage = [n for n in plan.nodes(A.reimage) if self._drained(n, S.enrolled, outcome)]
        coming = plan.nodes(A.enroll, A.bring_up) + reimage
        if coming:
            self.on_stage(f"bring-up of {len(coming)} nodes")
            outcome.bring_up = self.parts.bring_up([by_name[n] for n in dict.fromkeys(coming)])
        if outputs is not None:
            self._terraform_facts(outputs)
        upgrading = plan.nodes(A.upgrade)
        if upgrading:
            self.on_stage(f"rolling upgrade of {len(upgrading)} nodes")
            outcome.upgrade = self.parts.upgrade([by_name[n] for n in upgrading])
        reburn = [n for n in plan.nodes(A.reburn) if self._drained(n, S.burning_in, outcome)]
        if reburn:
            self.on_stage(f"burn-in of {len(reburn)} nodes")
            outcome.reburn = self.parts.bring_up([by_name[n] for n in reburn])
            for record in outcome.reburn.nodes:
                if record.state is S.ready:
                    self._resume(record.name, outcome)
        for kind in (A.reimage, A.reburn):
            outcome.done[str(kind)] = [n for n in plan.nodes(kind) if n not in outcome.errors]

    # ------------------------------------------------------------------ stages

    def _update_bmc(self, nodes: Sequence[Node], outcome: ApplyOutcome) -> None:
        if not nodes:
            return
        self.on_stage(f"check {len(nodes)} moved BMCs")
        desired = Desired(self.fleet)
        answers = self.parts.check_bmc(nodes)
        good = {}
        for node in nodes:
            error = answers.get(node.name, "no answer")
            if error is None:
                good[node.name] = desired.bmc(node)
            else:
                outcome.errors[node.name] = f"update-bmc: {error}"
        if good:
            self.store.set_facts("bmc", good, self.run_id)
        outcome.done[str(A.update_bmc)] = list(good)

    def _retire(self, names: Sequence[str], outcome: ApplyOutcome) -> None:
        if not names:
            return
        self.on_stage(f"retire {len(names)} nodes")
        reason = f"provisioner apply {self.run_id}: retired (gone from the spec)"
        for name in names:
            try:
                self.scheduler.drain(name, reason)
            except SchedulerError as exc:
                log.warning("%s: not drained in the scheduler: %s", name, exc)
        recorded = self.store.facts("bmc")
        known = {n: recorded[n] for n in names if n in recorded}
        answers = self.parts.power_off(known) if known else {}
        done = []
        for name in names:
            error = answers.get(name) if name in known else None
            if error is not None:
                outcome.errors[name] = f"retire: power off failed: {error}"
                continue
            detail = "gone from the spec; drained" + (
                ", powered off" if name in known else "; no BMC recorded: not powered off"
            )
            self.store.move(name, S.retired, run_id=self.run_id, detail=detail)
            done.append(name)
        outcome.done[str(A.retire)] = done

    def _drained(self, name: str, to: State, outcome: ApplyOutcome) -> bool:
        """Drain a ready node and wait until idle, then move it on to ``to`` through
        draining; False (and the node resumed) when it does not go idle in time."""
        record = self.store.node(name)
        if record is None or record.state not in (S.ready, S.draining):
            outcome.errors[name] = f"expected ready, found {record.state if record else 'nothing'}"
            return False
        what = "reimage" if to is S.enrolled else "re-burn-in"
        if record.state is S.ready:
            self.store.move(name, S.draining, run_id=self.run_id, detail=f"drain for {what}")
        try:
            self.scheduler.drain(name, f"provisioner apply {self.run_id}: {what}")
            deadline = time.monotonic() + self.drain_timeout
            while not self.scheduler.is_idle(name):
                if time.monotonic() > deadline:
                    self.scheduler.resume(name)
                    why = f"jobs still ran after {self.drain_timeout:g} s: resumed"
                    self.store.move(name, S.ready, run_id=self.run_id, detail=why)
                    outcome.errors[name] = f"{what}: {why}"
                    return False
                time.sleep(self.poll)
        except SchedulerError as exc:
            self.store.move(name, S.failed, run_id=self.run_id, error=f"{what}: {exc}")
            outcome.errors[name] = f"{what}: {exc}"
            return False
        self.store.move(name, to, run_id=self.run_id, detail=f"drained and idle: {what}")
        return True

    def _resume(self, name: str, outcome: ApplyOutcome) -> None:
        try:
            self.scheduler.resume(name)
        except SchedulerError as exc:
            outcome.errors[name] = f"resume: {exc}"

    def _terraform_facts(self, outputs: Mapping[str, Any]) -> None:
        per_node = outputs.get("nodes")
        if not isinstance(per_node, Mapping):
            return
        known = {record.name for record in self.store.nodes(self.site)}
        facts = {
            name: dict(value)
            for name, value in per_node.items()
            if name in known and isinstance(value, Mapping)
        }
        if facts:
            self.store.set_facts("terraform", facts, self.run_id)
