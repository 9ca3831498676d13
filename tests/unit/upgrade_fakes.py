"""Fakes for the rolling-upgrade tests: upgrade steps and a scheduler in memory.

:class:`FakeUpgradeSteps` stands in for Ansible and the burn-in agent (the real ones,
``SiteUpgradeSteps``, run on the lab in tests/e2e); :class:`FakeScheduler` stands in for a
workload scheduler where a test needs jobs that end on cue (the real Slurm adapter is tested
against a real slurmctld in tests/integration/test_scheduler_slurm.py). Run as a module,
this file is the child process of the crash test: it runs one upgrade with these fakes and
the kill point the environment names.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from provisioner.burnin.floors import expectation_for
from provisioner.burnin.judge import judge
from provisioner.scheduler.base import NodeStatus, SchedulerError
from provisioner.spec import Fleet, load_fleet
from provisioner.state.store import open_store
from provisioner.workflows.bring_up import BurninOutcome, Caps
from provisioner.workflows.upgrade import Limits, Upgrade

DOCUMENTS = Path(__file__).resolve().parent.parent / "data" / "burnin" / "documents"


def judged(fleet: Fleet, node: str, document: str = "healthy") -> BurninOutcome:
    raw = json.loads((DOCUMENTS / f"{document}.json").read_text(encoding="utf-8"))
    raw["node"] = node
    raw["host"]["driver_version"] = fleet.stack(fleet.by_name[node]).driver.version  # upgraded
    return BurninOutcome(judge(raw, expectation_for(fleet, fleet.by_name[node])), raw)


class FakeUpgradeSteps:
    """Every node upgrades and burns in healthy unless the test says otherwise; every call
    is recorded with its nodes and time."""

    def __init__(self, fleet: Fleet, seconds: float = 0.0) -> None:
        self.fleet = fleet
        self.seconds = seconds  # how long an upgrade run takes
        self.upgrade_errors: dict[str, str] = {}
        self.burn_documents: dict[str, str] = {}  # node -> agent document name
        self.roll_back_errors: dict[str, str] = {}
        self.calls: list[tuple[str, tuple[str, ...], float]] = []
        self.rolled_back: dict[str, Mapping[str, Any]] = {}
        self._lock = threading.Lock()

    def _record(self, step: str, nodes: Sequence[str]) -> None:
        with self._lock:
            self.calls.append((step, tuple(nodes), time.monotonic()))

    def nodes_of(self, step: str) -> list[str]:
        return [n for s, nodes, _ in self.calls if s == step for n in nodes]

    def upgrade(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        self._record("upgrade", nodes)
        time.sleep(self.seconds)
        return {n: self.upgrade_errors.get(n) for n in nodes}

    def roll_back(
        self, nodes: Sequence[str], stacks: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, str | None]:
        self._record("roll_back", nodes)
        self.rolled_back.update(stacks)
        return {n: self.roll_back_errors.get(n) for n in nodes}

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        self._record("burn_in", nodes)
        return {n: judged(self.fleet, n, self.burn_documents.get(n, "healthy")) for n in nodes}

    def recover(self) -> None:
        self._record("recover", ())


class FakeScheduler:
    """A scheduler whose nodes run jobs until the test ends them (``busy_until``: node ->
    monotonic time), remembering every drain and resume."""

    name = "fake"

    def __init__(self) -> None:
        self.busy_until: dict[str, float] = {}
        self.drained: dict[str, str] = {}  # node -> reason, while drained
        self.log: list[tuple[str, str, float]] = []  # (call, node, time)
        self.fail_drain: set[str] = set()
        self._lock = threading.Lock()

    def drain(self, node: str, reason: str) -> None:
        if node in self.fail_drain:
            raise SchedulerError(f"slurm: {node}: Invalid node name specified")
        with self._lock:
            self.drained[node] = reason
            self.log.append(("drain", node, time.monotonic()))

    def is_idle(self, node: str) -> bool:
        idle = time.monotonic() >= self.busy_until.get(node, 0.0)
        with self._lock:
            self.log.append(("idle" if idle else "busy", node, time.monotonic()))
        return idle

    def resume(self, node: str) -> None:
        with self._lock:
            self.drained.pop(node, None)
            self.log.append(("resume", node, time.monotonic()))

    def status(self, node: str) -> NodeStatus:
        return NodeStatus(node, node in self.drained, self.is_idle(node), self.drained.get(node))


def main(argv: Sequence[str]) -> int:
    """``python -m tests.unit.upgrade_fakes SPEC STATE_URL``: one upgrade of every node."""
    spec, url = argv
    fleet = load_fleet(Path(spec))
    with open_store(url, None) as store:
        steps = FakeUpgradeSteps(fleet, seconds=0.05)
        limits = Limits(canary=1, unavailable=2, per_rack=None, max_failures=0,
                        drain_timeout=5, poll=0.01)  # fmt: skip
        work = Upgrade(fleet, fleet.nodes, store, steps, limits=limits, caps=Caps(settle=0.01))
        outcome = work.run()
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
