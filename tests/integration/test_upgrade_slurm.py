"""A rolling upgrade drained through a real Slurm (slurmctld and slurmd on loopback,
tests.peers.slurm): the workflow and the Slurm adapter are the real ones, over a real SQLite
store; the playbook runs are the fakes of tests/unit/upgrade_fakes.py (the real ones run on
the lab in tests/integration/test_bring_up.py). At the moment the fake "runs" the upgrade of a
node it asks Slurm itself what runs there and what the node's drain reason is."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from provisioner.scheduler.slurm import Slurm, parse_node
from provisioner.spec import Fleet, load_fleet
from provisioner.state.lifecycle import State
from provisioner.state.store import Store, open_store
from provisioner.workflows.bring_up import Caps
from provisioner.workflows.upgrade import Limits, Upgrade
from tests.conftest import LAB_SPEC
from tests.peers.slurm import SlurmCluster
from tests.unit.test_plan import edited
from tests.unit.test_upgrade_workflow import BUMP, bring_up
from tests.unit.upgrade_fakes import FakeUpgradeSteps

pytestmark = pytest.mark.integration
BUSY = "gpu-lab-02"


class WatchedSteps(FakeUpgradeSteps):
    """Fake playbook runs that look at Slurm when a node's upgrade starts."""

    def __init__(self, fleet: Fleet, slurm: SlurmCluster) -> None:
        super().__init__(fleet)
        self.slurm = slurm
        self.jobs_at_upgrade: dict[str, str] = {}
        self.node_at_upgrade: dict[str, str] = {}

    def upgrade(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        for node in nodes:
            jobs = self.slurm.run("squeue", "--noheader", f"--nodelist={node}", "--format=%i %T")
            self.jobs_at_upgrade[node] = jobs.stdout.strip()
            shown = self.slurm.run("scontrol", "show", "node", node, "--oneliner")
            self.node_at_upgrade[node] = shown.stdout
        return super().upgrade(nodes)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'state.db'}", None) as opened:
        yield opened


def test_a_node_running_a_job_is_upgraded_only_after_it_ends_then_resumed(
    tmp_path: Path, store: Store, slurm: SlurmCluster
) -> None:
    bring_up(store, load_fleet(LAB_SPEC))
    fleet = edited(tmp_path, LAB_SPEC, BUMP)
    job = slurm.submit(BUSY, 8)
    slurm.wait_job(job, ("RUNNING",), timeout=30)
    steps = WatchedSteps(fleet, slurm)
    limits = Limits(canary=1, unavailable=3, per_rack=None, max_failures=0,
                    drain_timeout=120, poll=0.2)  # fmt: skip
    scheduler = Slurm(conf=str(slurm.conf), timeout=20)
    work = Upgrade(fleet, fleet.nodes, store, steps, scheduler=scheduler, limits=limits,
                   caps=Caps(settle=0.05))  # fmt: skip
    started = time.monotonic()
    outcome = work.run()
    assert outcome.ok, outcome
    assert time.monotonic() - started >= 4  # it waited for the job
    assert steps.jobs_at_upgrade[BUSY] == ""  # nothing ran there when its upgrade began
    assert slurm.job_state(job) in ("COMPLETED", "")
    drained = parse_node(steps.node_at_upgrade[BUSY])
    assert drained.drained and drained.reason == f"provisioner upgrade {outcome.run_id}: " + (
        "to stack h100-570"
    )
    for node in fleet.nodes:  # every node back in service, on the new stack
        status = scheduler.status(node.name)
        assert not status.drained, status
        assert store.node(node.name).state is State.ready  # type: ignore[union-attr]
    # The busy node waited in draining while its job ran: the store says so too.
    rows = [(r.from_state, r.to_state) for r in store.history(BUSY)][-4:]
    assert rows[0] == (State.ready, State.draining) and rows[1] == (
        State.draining,
        State.upgrading,
    )
