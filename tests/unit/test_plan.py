"""Plans (:mod:`provisioner.plan`) at their public interface: real specs (the lab rack, the
128-node example pod, and copies of them edited the way a pull request would), recorded
state given as a :class:`Snapshot` whose facts are the ones the spec wanted when the nodes
were last brought up, and the plan file's round trip and staleness checks.

The markdown of a 128-node driver bump is compared with a golden file
(tests/data/plan/pod-driver-bump.md; ``UPDATE_GOLDEN=1`` rewrites it after an intended
change of the output)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from provisioner.errors import PlanStale
from provisioner.plan import (
    FACT_KINDS,
    ActionKind,
    Desired,
    NodeState,
    Snapshot,
    make_plan,
    planfile,
    spec_hash,
    state_fingerprint,
)
from provisioner.plan.show import fold, render
from provisioner.spec import Fleet, load_fleet
from tests.conftest import DATA, LAB_SPEC, POD_SPEC

A = ActionKind
GOLDEN = DATA / "plan" / "pod-driver-bump.md"


def edited(tmp_path: Path, source: Path, *changes: tuple[str, str]) -> Fleet:
    """A copy of the spec at ``source`` (with its vendor manifests) with text replaced, as
    a pull request would change it; each replaced text must be there."""
    folder = tmp_path / source.parent.name
    if not folder.exists():
        shutil.copytree(source.parent, folder, ignore=shutil.ignore_patterns("terraform"))
    text = source.read_text(encoding="utf-8")
    for old, new in changes:
        assert old in text, old
        text = text.replace(old, new)
    path = folder / source.name
    path.write_text(text, encoding="utf-8")
    return load_fleet(path)


def settled(fleet: Fleet, state: str = "ready") -> Snapshot:
    """Every node of ``fleet`` in ``state``, with the facts ``fleet`` wants recorded."""
    desired = Desired(fleet)
    nodes = {node.name: NodeState(node.rack, state) for node in fleet.nodes}
    facts = {kind: {n.name: desired.fact(kind, n) for n in fleet.nodes} for kind in FACT_KINDS}
    return Snapshot(nodes, facts)


def with_node(snapshot: Snapshot, name: str, node: NodeState) -> Snapshot:
    return Snapshot({**snapshot.nodes, name: node}, snapshot.facts)


@pytest.fixture(scope="module")
def lab() -> Fleet:
    return load_fleet(LAB_SPEC)


def test_an_empty_store_enrolls_and_brings_up_every_node(lab: Fleet) -> None:
    plan = make_plan(lab, Snapshot({}))
    assert plan.counts() == {A.enroll: 4, A.bring_up: 4}
    assert plan.nodes(A.enroll) == [n.name for n in lab.nodes]
    # Kinds come in apply's order: every enroll before any bring-up.
    kinds = [a.kind for a in plan.actions]
    assert kinds == sorted(kinds, key=list(A).index)


def test_a_fleet_that_matches_its_spec_has_no_changes(lab: Fleet) -> None:
    plan = make_plan(lab, settled(lab))
    assert not plan.changes and plan.actions == () and plan.notes == ()
    assert "No changes" in render(plan, "text")


def test_a_changed_stack_upgrades_only_the_nodes_on_it(tmp_path: Path, lab: Fleet) -> None:
    before = settled(lab)
    fleet = edited(tmp_path, LAB_SPEC, ("version: 570.133.20", "version: 570.172.08"))
    plan = make_plan(fleet, before)
    assert plan.counts() == {A.upgrade: 4}
    assert {(a.before, a.after) for a in plan.actions} == {("h100-570", "h100-570")}
    assert {a.reason for a in plan.actions} == {"driver 570.133.20 → 570.172.08"}
    # Moving one rack to another stack says so.
    fleet = edited(tmp_path, LAB_SPEC, ("    stack: h100-570", "    stack: h100-580"))
    plan = make_plan(fleet, before)
    assert {(a.kind, a.before, a.after) for a in plan.actions} == {
        (A.upgrade, "h100-570", "h100-580")
    }


def test_a_changed_image_reimages_instead_of_upgrading(tmp_path: Path, lab: Fleet) -> None:
    fleet = edited(
        tmp_path,
        LAB_SPEC,
        ("packages: [python3, linux-headers-generic]", "packages: [python3]"),
        ("    stack: h100-570", "    stack: h100-580"),
    )
    plan = make_plan(fleet, settled(lab))
    assert plan.counts() == {A.reimage: 4}


def test_changed_floors_burn_the_nodes_in_again(tmp_path: Path, lab: Fleet) -> None:
    fleet = edited(tmp_path, LAB_SPEC, ("      level: quick", "      level: standard"))
    plan = make_plan(fleet, settled(lab))
    assert plan.counts() == {A.reburn: 4}


def test_a_moved_bmc_is_updated_whatever_else_the_node_needs(tmp_path: Path, lab: Fleet) -> None:
    fleet = edited(tmp_path, LAB_SPEC, ("ipmi://127.0.0.1:9002", "ipmi://127.0.0.1:9102"))
    snapshot = with_node(settled(lab), "gpu-lab-02", NodeState("lab1", "failed", "configuring"))
    plan = make_plan(fleet, snapshot)
    assert [(a.node, a.kind) for a in plan.actions] == [
        ("gpu-lab-02", A.update_bmc),
        ("gpu-lab-02", A.bring_up),
    ]
    bmc = plan.actions[0]
    assert (bmc.before, bmc.after) == ("ipmi://127.0.0.1:9002", "ipmi://127.0.0.1:9102")
    # A changed credential reference is a change too; the secret itself is never read.
    fleet = edited(tmp_path, LAB_SPEC, ("env:PROVISIONER_LAB_BMC_PASSWORD", "env:LAB_BMC_ROTATED"))
    plan = make_plan(fleet, settled(lab))
    assert plan.counts() == {A.update_bmc: 4}
    assert {a.reason for a in plan.actions} == {"its BMC credentials changed"}


def test_each_recorded_state_gets_its_own_action(lab: Fleet) -> None:
    base = settled(lab)
    cases = {
        "gpu-lab-01": (NodeState("lab1", "installing"), A.bring_up, "resume its bring-up"),
        "gpu-lab-02": (
            NodeState("lab1", "failed", "burning_in", "gemm: 10 TFLOPS"),
            A.bring_up,
            "retry its bring-up at burning_in: gemm: 10 TFLOPS",
        ),
        "gpu-lab-03": (NodeState("lab1", "failed", "upgrading"), A.upgrade, "retry its upgrade"),
        "gpu-lab-04": (NodeState("lab1", "draining"), A.upgrade, "resume its upgrade"),
    }
    snapshot = Snapshot({name: case[0] for name, case in cases.items()}, base.facts)
    plan = make_plan(lab, snapshot)
    got = {a.node: (a.kind, a.reason) for a in plan.actions}
    for name, (_, kind, reason) in cases.items():
        assert got[name][0] is kind and got[name][1].startswith(reason), name


def test_quarantined_and_retired_nodes_are_left_to_a_person(lab: Fleet) -> None:
    snapshot = with_node(
        settled(lab), "gpu-lab-04", NodeState("lab1", "quarantined", last_error="xid 79")
    )
    snapshot = with_node(snapshot, "gpu-lab-03", NodeState("lab1", "retired"))
    plan = make_plan(lab, snapshot)
    assert not plan.changes
    notes = {note.node: note.message for note in plan.notes}
    assert "xid 79" in notes["gpu-lab-04"] and "retired" in notes["gpu-lab-03"]


def test_a_node_gone_from_the_spec_is_retired_only_when_asked(lab: Fleet) -> None:
    snapshot = with_node(settled(lab), "gpu-lab-09", NodeState("lab1", "ready"))
    held = make_plan(lab, snapshot)
    assert not held.changes and "--retire" in held.notes[0].message
    retiring = make_plan(lab, snapshot, retire=True)
    assert [(a.node, a.kind) for a in retiring.actions] == [("gpu-lab-09", A.retire)]
    # An already retired node is not retired again.
    gone = with_node(settled(lab), "gpu-lab-09", NodeState("lab1", "retired"))
    assert not make_plan(lab, gone, retire=True).changes


def test_a_saved_plan_reads_back_the_same(tmp_path: Path, lab: Fleet) -> None:
    plan = make_plan(lab, Snapshot({}), retire=True)
    path = tmp_path / "plan.json"
    planfile.save(plan, path)
    assert planfile.load(path) == plan
    with pytest.raises(planfile.PlanFileError, match="not a provisioner plan"):
        path.write_text('{"format": "other"}', encoding="utf-8")
        planfile.load(path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(planfile.PlanFileError, match=r"plan.json:1: not JSON"):
        planfile.load(path)


def test_a_stale_plan_is_refused_saying_what_changed(tmp_path: Path, lab: Fleet) -> None:
    snapshot = settled(lab)
    plan = make_plan(lab, snapshot)
    planfile.check_fresh(plan, spec_hash(lab), state_fingerprint(snapshot), "lab")
    moved = with_node(snapshot, "gpu-lab-01", NodeState("lab1", "draining"))
    with pytest.raises(PlanStale, match="recorded state changed") as stale:
        planfile.check_fresh(plan, spec_hash(lab), state_fingerprint(moved), "lab")
    assert "spec changed" not in str(stale.value)
    changed = edited(tmp_path, LAB_SPEC, ("max_failures: 1", "max_failures: 2"))
    assert spec_hash(changed) != spec_hash(lab)
    with pytest.raises(PlanStale, match="the spec changed"):
        planfile.check_fresh(plan, spec_hash(changed), state_fingerprint(snapshot), "lab")


def test_the_spec_hash_follows_the_vendor_manifest(tmp_path: Path) -> None:
    pod = load_fleet(POD_SPEC)
    copy = edited(tmp_path, POD_SPEC)
    assert spec_hash(copy) == spec_hash(pod)
    manifest = tmp_path / POD_SPEC.parent.name / "vendor" / "rack-r02.csv"
    rows = manifest.read_text(encoding="utf-8").splitlines()
    header, first, second, *rest = rows
    manifest.write_text("\n".join([header, second, first, *rest]) + "\n", encoding="utf-8")
    swapped = load_fleet(copy.spec_path)
    assert spec_hash(swapped) != spec_hash(pod)


@pytest.mark.parametrize(
    ("names", "folded"),
    [
        (["gpu-01", "gpu-02", "gpu-03", "gpu-07"], "gpu-[01-03,07]"),
        (["gpu-07"], "gpu-07"),
        (["r1-n9", "r1-n10"], "r1-n9, r1-n10"),  # widths differ: two lists
        (["head", "gpu-2", "gpu-1"], "head, gpu-[1-2]"),
    ],
)
def test_node_names_fold_like_slurm_host_lists(names: list[str], folded: str) -> None:
    assert fold(names) == folded


def test_a_128_node_driver_bump_is_a_readable_pull_request_comment(tmp_path: Path) -> None:
    pod = load_fleet(POD_SPEC)
    before = settled(pod)
    before = with_node(before, "h100-r02-n07", NodeState("r02", "quarantined", None, "Xid 79"))
    before = with_node(before, "h100-r05-n01", NodeState("r05", "ready"))
    fleet = edited(
        tmp_path,
        POD_SPEC,
        ("driver: {version: 570.133.20,", "driver: {version: 570.172.08,"),
        ("driver: {version: 580.65.06,", "driver: {version: 580.82.07,"),
    )
    plan = make_plan(fleet, before, retire=True)
    assert plan.counts() == {A.retire: 1, A.upgrade: 127}
    text = render(plan, "markdown").replace(str(tmp_path), "<tmp>")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 40  # one line per rack and change, not per node
