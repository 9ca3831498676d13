"""Plan and rollout benchmarks.

``plan N nodes``: a synthetic N-node fleet (fleetgen.py) recorded as brought up, then a spec
that bumps one stack's driver; the figure is :func:`provisioner.plan.make_plan` on that spec
and snapshot (what ``provisioner plan`` computes), with the markdown render; beside it, what
reading the snapshot out of a SQLite store and loading the spec cost.

``rollout N nodes``: the real :class:`~provisioner.workflows.upgrade.Upgrade` (threads, the
window, the canary gate, the batched playbook runs, a real SQLite store) over N nodes whose
stages take seeded random simulated times (:class:`SimulatedSteps`, :class:`BusyScheduler`).
The makespan is compared with the ideal for the policy: the slowest canary, then the rest's
own times packed perfectly into ``max_unavailable`` slots (their sum over the slots, and no
less than the slowest of them), i.e. what a scheduler with no overhead and perfect knowledge
could not beat.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.fleetgen import write_fleet
from provisioner.burnin.floors import expectation_for
from provisioner.burnin.judge import judge
from provisioner.plan import FACT_KINDS, Desired, NodeState, Snapshot, make_plan
from provisioner.plan.show import markdown
from provisioner.scheduler.base import NodeStatus
from provisioner.spec import Fleet, load_fleet
from provisioner.state.lifecycle import BRING_UP, State
from provisioner.state.store import Store, open_store
from provisioner.workflows.apply import snapshot
from provisioner.workflows.bring_up import BurninOutcome, Caps
from provisioner.workflows.upgrade import Limits, Upgrade

REPO = Path(__file__).resolve().parent.parent
HEALTHY = REPO / "tests" / "data" / "burnin" / "documents" / "healthy.json"


@dataclass(frozen=True)
class PlanFigure:
    nodes: int
    plan: list[float]
    snapshot_read: float
    load: float
    actions: int


def _bumped(spec: Path, every: bool = False) -> Path:
    """A copy of ``spec`` in which its first stack's driver version (``every``: each
    stack's) moved on."""
    text = spec.read_text(encoding="utf-8")
    fleet = load_fleet(spec)
    stacks = list(fleet.document.stacks.values())
    for stack in stacks if every else stacks[:1]:
        old = stack.driver.version
        major, minor, patch = old.split(".")
        text = text.replace(f"version: {old}", f"version: {major}.{int(minor) + 1}.{patch}", 1)
    bumped = spec.with_name("fleet-bumped.yaml")
    bumped.write_text(text, encoding="utf-8")
    return bumped


def record_ready(store: Store, fleet: Fleet) -> None:
    """Record every node of ``fleet`` as brought up (facts and all), in one run."""
    desired = Desired(fleet)
    site = fleet.document.metadata.site
    run = store.start_run("bring-up", site)
    store.enroll(fleet.nodes, site=site, run_id=run)
    kinds = {State.pxe_booting: "bmc", State.configuring: "image", State.burning_in: "stack"}
    kinds[State.ready] = "floors"
    for node in fleet.nodes:
        for state in BRING_UP[1:]:
            kind = kinds.get(state)
            facts = {kind: desired.fact(kind, node)} if kind else None
            store.move(node.name, state, run_id=run, facts=facts)
    store.finish_run(run, "succeeded")


def plan_figure(work: Path, nodes: int, repeat: int) -> PlanFigure:
    spec = write_fleet(work / f"plan-{nodes}", nodes)
    before = load_fleet(spec)
    desired = Desired(before)
    state = Snapshot(
        {n.name: NodeState(n.rack, "ready") for n in before.nodes},
        {kind: {n.name: desired.fact(kind, n) for n in before.nodes} for kind in FACT_KINDS},
    )
    bumped = _bumped(spec)
    started = time.perf_counter()
    fleet = load_fleet(bumped)
    load = time.perf_counter() - started
    samples, actions = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        plan = make_plan(fleet, state)
        markdown(plan)
        samples.append(time.perf_counter() - started)
        actions = len(plan.actions)
    # The same snapshot, read out of a store (a smaller fleet would hide its cost).
    with open_store(f"sqlite:///{work / f'plan-{nodes}.db'}", None) as store:
        _bulk_ready(store, before, state)
        started = time.perf_counter()
        snapshot(store, before.document.metadata.site)
        read = time.perf_counter() - started
    return PlanFigure(nodes, samples, read, load, actions)


def _bulk_ready(store: Store, fleet: Fleet, state: Snapshot) -> None:
    """Nodes and facts written straight into the store's tables (10,000 nodes walked through
    the lifecycle one move at a time would take minutes and measure something else)."""
    import json

    from provisioner.state import schema as t
    from provisioner.state.db import writing
    from provisioner.state.schema import now

    site = fleet.document.metadata.site
    run = store.start_run("bench", site)
    at = now()
    with writing(store.engine) as conn:
        conn.execute(
            t.nodes.insert(),
            [
                {"name": n.name, "site": site, "rack": n.rack, "serial": n.serial,
                 "state": "ready", "retries": 0, "last_run_id": run, "updated_at": at}
                for n in fleet.nodes
            ],
        )  # fmt: skip
        conn.execute(
            t.node_facts.insert(),
            [
                {"node": node, "kind": kind, "data": json.dumps(data), "run_id": run, "at": at}
                for kind, facts in state.facts.items()
                for node, data in facts.items()
            ],
        )
    store.finish_run(run, "succeeded")


# ---------------------------------------------------------------------------- rollout


@dataclass(frozen=True)
class Stages:
    """One node's simulated times, in benchmark seconds."""

    busy: float  # until its running jobs end, once drained
    upgrade: float  # its share of driver-upgrade.yml, reboot included
    burn_in: float  # the quick burn-in

    @property
    def total(self) -> float:
        return self.busy + self.upgrade + self.burn_in


class BusyScheduler:
    """A simulated scheduler: a node's jobs end ``busy`` seconds after it is drained."""

    name = "simulated"

    def __init__(self, stages: Mapping[str, Stages]) -> None:
        self.stages = stages
        self.drained_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def drain(self, node: str, reason: str) -> None:
        with self._lock:
            self.drained_at.setdefault(node, time.monotonic())

    def is_idle(self, node: str) -> bool:
        return time.monotonic() >= self.drained_at[node] + self.stages[node].busy

    def resume(self, node: str) -> None:
        with self._lock:
            self.drained_at.pop(node, None)

    def status(self, node: str) -> NodeStatus:
        return NodeStatus(node, node in self.drained_at, self.is_idle(node))


class SimulatedSteps:
    """Playbook runs that take as long as their slowest node; a healthy burn-in document
    judged for real."""

    def __init__(self, fleet: Fleet, stages: Mapping[str, Stages]) -> None:
        self.fleet = fleet
        self.stages = stages
        raw = HEALTHY.read_text(encoding="utf-8")
        self.raw = raw

    def upgrade(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        time.sleep(max(self.stages[n].upgrade for n in nodes))
        return dict.fromkeys(nodes)

    def roll_back(
        self, nodes: Sequence[str], stacks: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, str | None]:
        return dict.fromkeys(nodes)

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        import json

        time.sleep(max(self.stages[n].burn_in for n in nodes))
        out: dict[str, BurninOutcome | str] = {}
        for node in nodes:
            document = json.loads(self.raw)
            document["node"] = node
            stack = self.fleet.stack(self.fleet.by_name[node])
            document["host"]["driver_version"] = stack.driver.version  # as upgraded
            verdict = judge(document, expectation_for(self.fleet, self.fleet.by_name[node]))
            out[node] = BurninOutcome(verdict, document)
        return out

    def recover(self) -> None:
        return None


@dataclass(frozen=True)
class RolloutFigure:
    nodes: int
    seconds: float
    ideal: float
    limits: Limits
    upgraded: int
    most_out: int

    @property
    def ratio(self) -> float:
        return self.seconds / self.ideal


def rollout_figure(work: Path, nodes: int, seed: int = 11) -> RolloutFigure:
    spec = write_fleet(work / f"rollout-{nodes}", nodes)
    before = load_fleet(spec)
    fleet = load_fleet(_bumped(spec, every=True))
    chosen = list(fleet.nodes)
    rng = random.Random(seed)
    stages = {
        n.name: Stages(rng.uniform(0.0, 1.0), rng.uniform(2.0, 3.0), rng.uniform(1.0, 1.5))
        for n in chosen
    }
    limits = Limits(
        canary=2,
        unavailable=max(1, len(chosen) // 10),
        per_rack=None,
        max_failures=0,
        drain_timeout=60.0,
        poll=5.0 / 120,  # the scheduler asked every 5 s, scaled
    )
    with open_store(f"sqlite:///{work / f'rollout-{nodes}.db'}", None) as store:
        record_ready(store, before)
        work_ = Upgrade(
            fleet,
            chosen,
            store,
            SimulatedSteps(fleet, stages),
            scheduler=BusyScheduler(stages),
            limits=limits,
            # The upgrade's own default (a run per node), the window as the only limit, the
            # settle time scaled like the stages (2 s -> 1/120 of it).
            caps=Caps(runs=limits.unavailable, batch=1, settle=2.0 / 120),
        )
        plan = work_.schedule()
        outcome = work_.run()
        most = _most_out(store, [n.name for n in chosen])
    canary = max(stages[n].total for n in plan.canaries) if plan.canaries else 0.0
    rest = [stages[n].total for n in plan.rest]
    ideal = canary + max(sum(rest) / limits.unavailable, max(rest, default=0.0))
    return RolloutFigure(len(chosen), outcome.seconds, ideal, limits, len(outcome.upgraded), most)


def _most_out(store: Store, names: Sequence[str]) -> int:
    from provisioner.workflows.upgrade import OUT

    rows = sorted((r.id, r.node, r.to_state) for n in names for r in store.history(n))
    out: set[str] = set()
    most = 0
    for _, node, to in rows:
        if to in OUT:
            out.add(node)
        else:
            out.discard(node)
        most = max(most, len(out))
    return most
