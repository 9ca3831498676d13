"""The rolling upgrade (:class:`provisioner.workflows.upgrade.Upgrade`) at its public
interface: a real SQLite store, real specs (the lab rack; the 128-node example pod) edited
the way a pull request bumps a driver, and the fakes of tests/unit/upgrade_fakes.py for
Ansible, the burn-in agent and the scheduler. Claims about the window are checked from the
recorded transitions, not from what the fakes saw."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from provisioner.plan.desired import Desired
from provisioner.spec import Fleet, load_fleet
from provisioner.state.lifecycle import BRING_UP, State
from provisioner.state.store import Store, open_store
from provisioner.workflows.bring_up import KILL_ENV, Caps
from provisioner.workflows.upgrade import OUT, Limits, Upgrade, dry_run_lines
from tests.conftest import LAB_SPEC, POD_SPEC, REPO
from tests.unit.test_plan import edited
from tests.unit.upgrade_fakes import FakeScheduler, FakeUpgradeSteps

S = State
CAPS = Caps(settle=0.01)
BUMP = ("version: 570.133.20", "version: 570.172.08")  # the lab's h100-570 driver


def limits(**changes: object) -> Limits:
    values: dict[str, object] = {
        "canary": 1,
        "unavailable": 1,
        "per_rack": None,
        "max_failures": 0,
        "drain_timeout": 5.0,
        "poll": 0.01,
    }
    values.update(changes)
    return Limits(**values)  # type: ignore[arg-type]


def bring_up(store: Store, fleet: Fleet, names: Sequence[str] | None = None) -> None:
    """Record the nodes as brought up on ``fleet``'s stacks (the facts a bring-up records)."""
    desired = Desired(fleet)
    chosen = [n for n in fleet.nodes if names is None or n.name in names]
    run = store.start_run("bring-up", fleet.document.metadata.site)
    store.enroll(chosen, site=fleet.document.metadata.site, run_id=run)
    kinds = {S.pxe_booting: "bmc", S.configuring: "image", S.burning_in: "stack", S.ready: "floors"}
    for node in chosen:
        for state in BRING_UP[1:]:
            kind = kinds.get(state)
            facts = {kind: desired.fact(kind, node)} if kind else None
            store.move(node.name, state, run_id=run, facts=facts)
    store.finish_run(run, "succeeded")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with open_store(f"sqlite:///{tmp_path / 'state.db'}", None) as opened:
        yield opened


@pytest.fixture
def lab(tmp_path: Path, store: Store) -> Fleet:
    """The lab rack brought up on h100-570; the spec then bumps that stack's driver."""
    bring_up(store, load_fleet(LAB_SPEC))
    return edited(tmp_path, LAB_SPEC, BUMP)


def moves(store: Store, names: Sequence[str]) -> list[tuple[int, str, State | None, State]]:
    """Every recorded transition of ``names``, in the order they were written."""
    rows = [(r.id, r.node, r.from_state, r.to_state) for n in names for r in store.history(n)]
    return sorted(rows)


def most_out_at_once(store: Store, names: Sequence[str], racks: dict[str, str] | None = None):
    """The most nodes (of one rack, when ``racks`` is given) out of service at once, replayed
    from the transitions."""
    out: dict[str, State] = {}
    most: dict[str, int] = {}
    for _, node, _, to in moves(store, names):
        if to in OUT:
            out[node] = to
        else:
            out.pop(node, None)
        key = "all"
        count = len(out)
        if racks is not None:
            key = racks[node]
            count = sum(1 for n in out if racks[n] == key)
        most[key] = max(most.get(key, 0), count)
    return most


def test_every_node_is_drained_upgraded_burnt_in_and_resumed(store: Store, lab: Fleet) -> None:
    steps, scheduler = FakeUpgradeSteps(lab), FakeScheduler()
    work = Upgrade(lab, lab.nodes, store, steps, scheduler=scheduler, limits=limits(), caps=CAPS)
    outcome = work.run()
    assert outcome.ok and sorted(outcome.upgraded) == [n.name for n in lab.nodes]
    wanted = Desired(lab)
    stacks = store.facts("stack")
    for node in lab.nodes:
        path = [(r.from_state, r.to_state) for r in store.history(node.name)][-4:]
        assert path == [
            (S.ready, S.draining),
            (S.draining, S.upgrading),
            (S.upgrading, S.burning_in),
            (S.burning_in, S.ready),
        ]
        assert stacks[node.name]["hash"] == wanted.stack(node)["hash"]
        calls = [(c, t) for c, n, t in scheduler.log if n == node.name and c != "idle"]
        assert [c for c, _ in calls] == ["drain", "resume"]
    assert not scheduler.drained  # every node back in service
    assert store.run(outcome.run_id).status == "succeeded"  # type: ignore[union-attr]
    # A second run finds nothing to do.
    again = Upgrade(lab, lab.nodes, store, steps, scheduler=scheduler, limits=limits(), caps=CAPS)
    assert again.schedule().nodes == ()


def test_the_canary_passes_before_any_other_node_is_drained(store: Store, lab: Fleet) -> None:
    steps = FakeUpgradeSteps(lab)
    work = Upgrade(lab, lab.nodes, store, steps, limits=limits(unavailable=3), caps=CAPS)
    canary = work.schedule().canaries
    assert len(canary) == 1
    work.run()
    rows = moves(store, [n.name for n in lab.nodes])
    canary_ready = max(i for i, n, f, t in rows if n == canary[0] and t is S.ready)
    others_drained = [i for i, n, f, t in rows if n != canary[0] and t is S.draining]
    assert others_drained and min(others_drained) > canary_ready


def test_the_window_never_holds_more_than_max_unavailable_nor_per_rack(
    tmp_path: Path, store: Store
) -> None:
    bring_up(store, load_fleet(POD_SPEC))
    pod = edited(
        tmp_path, POD_SPEC, ("driver: {version: 570.133.20,", "driver: {version: 570.172.08,")
    )
    chosen = [n for n in pod.nodes if n.stack == "prod-570"]  # racks r01-r03: 96 nodes
    racks = {n.name: n.rack for n in pod.nodes}
    steps = FakeUpgradeSteps(pod, seconds=0.02)
    per_rack = dict.fromkeys(set(racks.values()), 2)
    policy = limits(canary=2, unavailable=5, per_rack=per_rack)
    outcome = Upgrade(pod, chosen, store, steps, limits=policy, caps=CAPS).run()
    assert outcome.ok and len(outcome.upgraded) == 96
    names = [n.name for n in chosen]
    assert most_out_at_once(store, names)["all"] == 5  # the window is used, and never more
    assert max(most_out_at_once(store, names, racks).values()) == 2


def test_a_failed_canary_halts_the_rollout_and_goes_back_to_its_stack(
    store: Store, lab: Fleet
) -> None:
    steps, scheduler = FakeUpgradeSteps(lab), FakeScheduler()
    work = Upgrade(
        lab, lab.nodes, store, steps, scheduler=scheduler, limits=limits(max_failures=3), caps=CAPS
    )
    canary = work.schedule().canaries[0]
    steps.upgrade_errors[canary] = "driver-upgrade.yml: dkms build failed"
    outcome = work.run()
    assert outcome.halted == f"canary {canary} failed" and outcome.failed == (canary,)
    assert len(outcome.not_started) == 3 and not outcome.ok
    record = store.node(canary)
    assert record is not None and record.state is S.quarantined
    assert "dkms build failed" in (record.last_error or "")
    before = Desired(load_fleet(LAB_SPEC)).stack(lab.by_name[canary])
    assert steps.rolled_back[canary]["hash"] == before["hash"]  # back to the old pins
    assert store.facts("stack")[canary]["hash"] == before["hash"]
    assert canary in scheduler.drained and "rolled back" in scheduler.drained[canary]
    for name in outcome.not_started:
        assert store.node(name).state is S.ready  # type: ignore[union-attr]


def test_failures_past_the_budget_halt_the_remaining_batches(tmp_path: Path, store: Store) -> None:
    bring_up(store, load_fleet(POD_SPEC))
    pod = edited(
        tmp_path, POD_SPEC, ("driver: {version: 580.65.06,", "driver: {version: 580.82.07,")
    )
    chosen = [n for n in pod.nodes if n.stack == "prod-580"]  # rack r04: 32 nodes
    steps = FakeUpgradeSteps(pod)
    work = Upgrade(
        pod, chosen, store, steps, limits=limits(canary=1, unavailable=2, max_failures=1), caps=CAPS
    )
    plan = work.schedule()
    bad = plan.rest[2:4]  # two failures after the canary: one more than the budget
    for name in bad:
        steps.burn_documents[name] = "ecc_uncorrectable"
    outcome = work.run()
    assert set(bad) <= set(outcome.failed) and outcome.halted is not None
    assert "more than max_failures (1)" in outcome.halted
    assert len(outcome.not_started) > 0 and len(outcome.upgraded) < 30
    for name in bad:
        record = store.node(name)
        assert record is not None and record.state is S.quarantined
        assert "burn-in failed" in (record.last_error or "")
    untouched = list(outcome.not_started)
    assert all(store.node(n).state is S.ready for n in untouched)  # type: ignore[union-attr]
    assert not set(untouched) & set(steps.nodes_of("upgrade"))


def test_a_busy_node_is_upgraded_only_after_its_jobs_end(store: Store, lab: Fleet) -> None:
    import time

    steps, scheduler = FakeUpgradeSteps(lab), FakeScheduler()
    busy = "gpu-lab-02"
    scheduler.busy_until[busy] = time.monotonic() + 0.5
    work = Upgrade(
        lab, lab.nodes, store, steps, scheduler=scheduler, limits=limits(unavailable=4), caps=CAPS
    )
    assert work.run().ok
    upgraded_at = next(t for step, nodes, t in steps.calls if step == "upgrade" and busy in nodes)
    assert upgraded_at >= scheduler.busy_until[busy]
    assert ("busy", busy) in [(c, n) for c, n, _ in scheduler.log]


def test_a_node_still_busy_at_the_drain_timeout_is_resumed_and_left_ready(
    store: Store, lab: Fleet
) -> None:
    import time

    steps, scheduler = FakeUpgradeSteps(lab), FakeScheduler()
    scheduler.busy_until["gpu-lab-03"] = time.monotonic() + 60
    policy = limits(unavailable=4, drain_timeout=0.2)
    outcome = Upgrade(
        lab, lab.nodes, store, steps, scheduler=scheduler, limits=policy, caps=CAPS
    ).run()
    assert outcome.called_off == ("gpu-lab-03",) and not outcome.ok
    assert store.node("gpu-lab-03").state is S.ready  # type: ignore[union-attr]
    assert "gpu-lab-03" not in scheduler.drained and "gpu-lab-03" not in steps.nodes_of("upgrade")


def test_a_roll_back_that_fails_leaves_the_node_failed_with_both_errors(
    store: Store, lab: Fleet
) -> None:
    steps = FakeUpgradeSteps(lab)
    work = Upgrade(lab, lab.nodes, store, steps, limits=limits(max_failures=4), caps=CAPS)
    canary = work.schedule().canaries[0]
    steps.upgrade_errors[canary] = "apt: held broken packages"
    steps.roll_back_errors[canary] = "apt: 570.133.20 no longer in the mirror"
    work.run()
    record = store.node(canary)
    assert record is not None and record.state is S.failed and record.failed_in is S.upgrading
    assert "held broken packages" in (record.last_error or "")
    assert "no longer in the mirror" in (record.last_error or "")


def test_a_dry_run_prints_the_schedule_and_touches_nothing(store: Store, lab: Fleet) -> None:
    before = moves(store, [n.name for n in lab.nodes])
    work = Upgrade(lab, lab.nodes, store, FakeUpgradeSteps(lab), limits=limits(unavailable=2))
    lines = list(dry_run_lines(work))
    assert lines[0].startswith("upgrade of 4 nodes: canary 1, at most 2 out at once")
    assert any(line.startswith("  canary: gpu-lab-01") for line in lines)
    assert [line.split(":")[0] for line in lines[2:]] == ["  wave 1", "  wave 2"]
    assert moves(store, [n.name for n in lab.nodes]) == before


def test_a_rollout_killed_mid_way_finishes_without_upgrading_a_node_twice(
    tmp_path: Path, store: Store, lab: Fleet
) -> None:
    url = str(store.engine.url)
    env = {**os.environ, KILL_ENV: "upgraded:gpu-lab-03", "PYTHONPATH": str(REPO)}
    child = subprocess.run(
        [sys.executable, "-m", "tests.unit.upgrade_fakes", str(lab.spec_path), url],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr  # SIGKILL, mid-rollout
    assert store.node("gpu-lab-03").state is S.upgrading  # type: ignore[union-attr]
    new = Desired(lab)
    finished = [
        n.name
        for n in lab.nodes
        if store.node(n.name).state is S.ready  # type: ignore[union-attr]
        and store.facts("stack")[n.name]["hash"] == new.stack(n)["hash"]
    ]
    assert finished  # the canary at least was done before the kill
    steps = FakeUpgradeSteps(lab)
    outcome = Upgrade(lab, lab.nodes, store, steps, limits=limits(unavailable=2), caps=CAPS).run()
    assert outcome.ok
    resumed = work_first(outcome.run_id, store)  # taken up first: those under way
    assert "gpu-lab-03" in resumed and not set(resumed) & set(finished)
    for node in lab.nodes:
        rows = [(r.from_state, r.to_state) for r in store.history(node.name)]
        assert rows.count((S.draining, S.upgrading)) == 1, node.name
        assert store.node(node.name).state is S.ready  # type: ignore[union-attr]
    assert not set(finished) & set(steps.nodes_of("upgrade"))


def work_first(run_id: str, store: Store) -> list[str]:
    """The nodes a run took up first (resumed from an earlier run)."""
    event = next(e for e in store.events(run_id) if e.kind == "upgrade.schedule")
    return list(event.data["resumed"])


def test_an_upgrade_of_no_nodes_is_an_error(store: Store, lab: Fleet) -> None:
    with pytest.raises(ValueError, match="at least one node"):
        Upgrade(lab, [], store, FakeUpgradeSteps(lab)).run()


def test_limits_follow_the_spec_policy() -> None:
    pod = load_fleet(POD_SPEC)
    got = Limits.of(pod)
    policy = pod.document.rollout
    assert got.unavailable == max(1, policy.max_unavailable.of(128))
    assert got.canary == policy.canary and got.max_failures == policy.max_failures
