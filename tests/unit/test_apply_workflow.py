"""``apply`` (:class:`provisioner.workflows.apply.Apply`) at its public interface: real specs
edited as pull requests would, a real SQLite store, and :class:`FakeParts` in place of the
BMCs, Terraform and the bring-up and upgrade runs (each tested on its own against the lab,
real BMC peers and the real terraform binary). The fake walks nodes through the store's own
moves, so what the plan asked for is checked in recorded state."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from provisioner.errors import PlanStale, TerraformFailed
from provisioner.plan import ActionKind
from provisioner.spec import Fleet, Node, load_fleet
from provisioner.state.lifecycle import BRING_UP, State
from provisioner.state.store import Store, open_store
from provisioner.workflows.apply import Apply, current_plan
from provisioner.workflows.bring_up import Outcome
from provisioner.workflows.upgrade import UpgradeOutcome
from tests.conftest import LAB_SPEC
from tests.unit.test_plan import edited
from tests.unit.test_upgrade_workflow import bring_up
from tests.unit.upgrade_fakes import FakeScheduler

A = ActionKind
S = State


class FakeParts:
    """Stands in for BMCs, Terraform and the bring-up/upgrade runs; records every call."""

    def __init__(self, store: Store, site: str = "lab") -> None:
        self.store = store
        self.site = site
        self.scheduler = FakeScheduler()
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.bmc_errors: dict[str, str] = {}
        self.outputs: Mapping[str, Any] | None = None
        self.terraform_error: Exception | None = None

    def terraform(self) -> Mapping[str, Any] | None:
        self.calls.append(("terraform", ()))
        if self.terraform_error is not None:
            raise self.terraform_error
        return self.outputs

    def check_bmc(self, nodes: Sequence[Node]) -> Mapping[str, str | None]:
        self.calls.append(("check_bmc", tuple(n.name for n in nodes)))
        return {n.name: self.bmc_errors.get(n.name) for n in nodes}

    def power_off(self, nodes: Mapping[str, Mapping[str, Any]]) -> Mapping[str, str | None]:
        self.calls.append(("power_off", tuple(nodes)))
        return dict.fromkeys(nodes)

    def bring_up(self, nodes: Sequence[Node]) -> Outcome:
        """Each node from where it is to ready, through the store's moves."""
        self.calls.append(("bring_up", tuple(n.name for n in nodes)))
        run = self.store.start_run("bring-up", self.site)
        self.store.enroll(nodes, site=self.site, run_id=run)
        for node in nodes:
            state = self.store.node(node.name).state  # type: ignore[union-attr]
            for target in BRING_UP[BRING_UP.index(state) + 1 :]:
                self.store.move(node.name, target, run_id=run)
        self.store.finish_run(run, "succeeded")
        records = tuple(self.store.node(n.name) for n in nodes)
        return Outcome(run, records, 0.0)  # type: ignore[arg-type]

    def upgrade(self, nodes: Sequence[Node]) -> UpgradeOutcome:
        self.calls.append(("upgrade", tuple(n.name for n in nodes)))
        return UpgradeOutcome("upgrade-fake", (), 0.0, upgraded=tuple(n.name for n in nodes))

    def called(self, what: str) -> list[tuple[str, ...]]:
        return [nodes for call, nodes in self.calls if call == what]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'state.db'}", None) as opened:
        yield opened


@pytest.fixture
def lab() -> Fleet:
    return load_fleet(LAB_SPEC)


def run(fleet: Fleet, store: Store, parts: FakeParts, retire: bool = False) -> Any:
    plan = current_plan(fleet, store, retire=retire)
    return Apply(fleet, plan, store, parts, poll=0.01).run()


def test_a_new_rack_is_enrolled_and_brought_up_in_one_run(lab: Fleet, store: Store) -> None:
    parts = FakeParts(store)
    outcome = run(lab, store, parts)
    assert outcome.ok and parts.called("bring_up") == [tuple(n.name for n in lab.nodes)]
    assert [call for call, _ in parts.calls] == ["bring_up"]  # no terraform section: none
    assert {r.state for r in store.nodes()} == {S.ready}


def test_a_stale_plan_is_refused_and_nothing_is_touched(lab: Fleet, store: Store) -> None:
    bring_up(store, lab)
    fleet = edited(store_path(store), LAB_SPEC, ("version: 570.133.20", "version: 570.172.08"))
    plan = current_plan(fleet, store)
    run_id = store.start_run("configure", "lab")
    store.move("gpu-lab-02", S.burning_in, run_id=run_id)  # another run moved a node meanwhile
    parts = FakeParts(store)
    before = [store.history(n.name) for n in lab.nodes]
    with pytest.raises(PlanStale, match="the recorded state changed"):
        Apply(fleet, plan, store, parts).run()
    assert parts.calls == [] and [store.history(n.name) for n in lab.nodes] == before
    assert all(run.kind != "apply" for run in runs(store))


def store_path(store: Store) -> Path:
    return Path(str(store.engine.url.database)).parent


def runs(store: Store) -> list[Any]:
    from sqlalchemy import select

    from provisioner.state import schema

    with store.engine.connect() as conn:
        return list(conn.execute(select(schema.runs)))


def test_each_kind_of_action_is_carried_out_in_order(tmp_path: Path, store: Store) -> None:
    lab = load_fleet(LAB_SPEC)
    bring_up(store, lab)
    site = store.start_run("bring-up", "lab")
    store.enroll([_Gone()], site="lab", run_id=site)  # a node since taken out of the spec
    gone_bmc = {"endpoint": "ipmi://127.0.0.1:9009", "username": "admin", "credential": "env:X"}
    store.set_facts("bmc", {"gpu-lab-09": gone_bmc}, site)
    fleet = edited(
        tmp_path,
        LAB_SPEC,
        ("ipmi://127.0.0.1:9001", "ipmi://127.0.0.1:9101"),  # gpu-lab-01's BMC moved
        ("version: 570.133.20", "version: 570.172.08"),  # every node's stack
        ("      level: quick", "      level: standard"),  # every node's burn-in
    )
    parts = FakeParts(store)
    plan = current_plan(fleet, store, retire=True)
    assert plan.counts() == {A.update_bmc: 1, A.retire: 1, A.upgrade: 4}
    outcome = Apply(fleet, plan, store, parts, poll=0.01).run()
    assert outcome.ok, outcome.errors
    assert [call for call, _ in parts.calls] == ["check_bmc", "power_off", "upgrade"]
    assert parts.called("power_off") == [("gpu-lab-09",)]
    assert store.node("gpu-lab-09").state is S.retired  # type: ignore[union-attr]
    assert "gpu-lab-09" in parts.scheduler.drained
    assert store.facts("bmc")["gpu-lab-01"]["endpoint"] == "ipmi://127.0.0.1:9101"


def test_a_re_burn_in_drains_burns_in_and_resumes(tmp_path: Path, store: Store) -> None:
    lab = load_fleet(LAB_SPEC)
    bring_up(store, lab)
    fleet = edited(tmp_path, LAB_SPEC, ("      level: quick", "      level: standard"))
    parts = FakeParts(store)
    outcome = run(fleet, store, parts)
    assert outcome.ok and parts.called("bring_up") == [tuple(n.name for n in lab.nodes)]
    for node in lab.nodes:
        path = [(r.from_state, r.to_state) for r in store.history(node.name)][-3:]
        assert path == [(S.ready, S.draining), (S.draining, S.burning_in), (S.burning_in, S.ready)]
    calls = [call for call, node, _ in parts.scheduler.log if call in ("drain", "resume")]
    assert calls.count("drain") == 4 and calls.count("resume") == 4
    assert not parts.scheduler.drained


def test_a_reimage_drains_and_starts_the_bring_up_over(tmp_path: Path, store: Store) -> None:
    lab = load_fleet(LAB_SPEC)
    bring_up(store, lab)
    fleet = edited(
        tmp_path, LAB_SPEC, ("packages: [python3, linux-headers-generic]", "packages: [python3]")
    )
    outcome = run(fleet, store, FakeParts(store))
    assert outcome.ok
    for node in lab.nodes:
        states = [r.to_state for r in store.history(node.name)]
        assert states[-8:] == [S.draining, S.enrolled, *BRING_UP[1:]]


def test_a_failed_bmc_check_keeps_the_old_bmc_and_says_why(tmp_path: Path, store: Store) -> None:
    lab = load_fleet(LAB_SPEC)
    bring_up(store, lab)
    fleet = edited(tmp_path, LAB_SPEC, ("ipmi://127.0.0.1:9001", "ipmi://127.0.0.1:9101"))
    parts = FakeParts(store)
    parts.bmc_errors["gpu-lab-01"] = "ipmi://127.0.0.1:9101: unreachable: no answer"
    outcome = run(fleet, store, parts)
    assert not outcome.ok and "unreachable" in outcome.errors["gpu-lab-01"]
    assert store.facts("bmc")["gpu-lab-01"]["endpoint"] == "ipmi://127.0.0.1:9001"


def test_terraform_runs_first_and_a_failing_module_touches_no_node(
    tmp_path: Path, store: Store
) -> None:
    text = LAB_SPEC.read_text() + "\nterraform:\n  module: terraform\n"
    spec = tmp_path / "fleet.yaml"
    spec.write_text(text)
    fleet = load_fleet(spec)
    parts = FakeParts(store)
    parts.terraform_error = TerraformFailed("plan", "terraform plan failed in terraform (exit 1)")
    with pytest.raises(TerraformFailed):
        run(fleet, store, parts)
    assert [call for call, _ in parts.calls] == ["terraform"] and store.nodes() == []
    parts = FakeParts(store)
    parts.outputs = {"nodes": {"gpu-lab-01": {"dns_name": "gpu-lab-01.lab"}}, "total": 32}
    outcome = run(fleet, store, parts)
    assert outcome.ok and outcome.terraform == parts.outputs
    assert [call for call, _ in parts.calls] == ["terraform", "bring_up"]
    assert store.facts("terraform") == {"gpu-lab-01": {"dns_name": "gpu-lab-01.lab"}}


class _Gone:
    name = "gpu-lab-09"
    rack = "lab1"
    serial = None
