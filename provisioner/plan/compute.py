"""(spec, recorded state) -> :class:`~provisioner.plan.model.Plan`. Pure: no I/O.

Per node in the spec:

* not recorded: **enroll** and **bring-up**;
* on its way up (enrolled .. burning_in), or failed there: **bring-up** (resume or retry);
* draining or upgrading, or failed there: **upgrade-stack** (resume or retry);
* ready: **reimage** when its image changed, else **upgrade-stack** when its stack changed,
  else **re-burn-in** when its burn-in level or floors changed;
* quarantined or retired: nothing; a note says what a person should do;
* and whatever its state (retired aside), **update-bmc** when its BMC's address or
  credential reference changed since the BMC last answered.

Per node recorded but gone from the spec (not retired yet): **retire**, only when the plan is
made with ``retire=True``; otherwise a note holds it back. A fact never recorded for a ready
node (a database older than facts) counts as changed: the action then makes it recorded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

from provisioner.plan.desired import FACT_KINDS, Desired, digest
from provisioner.plan.model import ORDER, Action, ActionKind, Note, Plan, Snapshot
from provisioner.spec import Fleet, Node

A = ActionKind
_BRING_UP = {"enrolled", "powering_on", "pxe_booting", "installing", "configuring", "burning_in"}
_UPGRADE = {"draining", "upgrading"}


def spec_hash(fleet: Fleet) -> str:
    """A hash of everything the spec says, its expanded nodes (CSV manifests included)."""
    h = hashlib.sha256(fleet.document.model_dump_json().encode())
    for n in fleet.nodes:
        h.update(
            f"\n{n.name}|{n.rack}|{n.ip}|{n.mac}|{n.bmc.url}|{n.profile}|{n.stack}|{n.image}"
            f"|{n.serial}|{n.bmc_mac}".encode()
        )
    return h.hexdigest()


def state_fingerprint(snapshot: Snapshot) -> str:
    """A hash of the recorded state a plan depends on: each node's state and fact hashes."""
    h = hashlib.sha256()
    for name in sorted(snapshot.nodes):
        node = snapshot.nodes[name]
        hashes = [(snapshot.fact(kind, name) or {}).get("hash", "") for kind in FACT_KINDS]
        h.update(f"{name}|{node.rack}|{node.state}|{node.failed_in}|{'|'.join(hashes)}\n".encode())
    return h.hexdigest()


def make_plan(fleet: Fleet, snapshot: Snapshot, *, retire: bool = False) -> Plan:
    """The actions that bring ``snapshot`` to what ``fleet`` says, ordered by kind, then
    rack, then node."""
    desired = Desired(fleet)
    actions: list[Action] = []
    notes: list[Note] = []
    for node in fleet.nodes:
        for item in _node(desired, node, snapshot):
            if isinstance(item, Action):
                actions.append(item)
            else:
                notes.append(item)
    in_spec = fleet.by_name
    for name, recorded in sorted(snapshot.nodes.items()):
        if name in in_spec or recorded.state == "retired":
            continue
        if retire:
            actions.append(
                Action(name, recorded.rack, A.retire, "gone from the spec", recorded.state)
            )
        else:
            notes.append(Note(name, "gone from the spec: plan with --retire to retire it"))
    rank = {kind: i for i, kind in enumerate(ORDER)}
    actions.sort(key=lambda a: (rank[a.kind], a.rack, a.node))
    return Plan(
        site=fleet.document.metadata.site,
        spec=str(fleet.spec_path),
        spec_hash=spec_hash(fleet),
        state_fingerprint=state_fingerprint(snapshot),
        actions=tuple(actions),
        notes=tuple(notes),
        retire=retire,
    )


def _node(desired: Desired, node: Node, snapshot: Snapshot) -> Iterator[Action | Note]:
    recorded = snapshot.nodes.get(node.name)
    if recorded is None:
        yield Action(node.name, node.rack, A.enroll, "new in the spec")
        yield Action(node.name, node.rack, A.bring_up, "new: power on, install, configure")
        return
    state = recorded.state
    if state == "retired":
        yield Note(node.name, "retired: a retired node is not brought back; give it a new name")
        return
    yield from _bmc(desired, node, snapshot)
    failed_in = recorded.failed_in if state == "failed" else None
    where = failed_in or state
    if where in _BRING_UP:
        why = "start its bring-up" if state == "enrolled" else f"resume its bring-up at {state}"
        if failed_in:
            why = f"retry its bring-up at {failed_in}: {_short(recorded.last_error)}"
        yield Action(node.name, node.rack, A.bring_up, why)
    elif where in _UPGRADE:
        why = f"retry its upgrade at {failed_in}" if failed_in else f"resume its upgrade at {state}"
        yield Action(node.name, node.rack, A.upgrade, why, after=node.stack)
    elif state == "quarantined":
        yield Note(
            node.name,
            f"quarantined ({_short(recorded.last_error)}): repair it, then burn it in again",
        )
    elif state == "ready":
        yield from _ready(desired, node, snapshot)


def _ready(desired: Desired, node: Node, snapshot: Snapshot) -> Iterator[Action]:
    image = snapshot.fact("image", node.name)
    if _differs(image, desired.image(node)):
        yield Action(node.name, node.rack, A.reimage, "its image changed", _name(image), node.image)
        return
    stack = snapshot.fact("stack", node.name)
    wanted = desired.stack(node)
    if _differs(stack, wanted):
        why = _versions(stack, wanted) or "its stack changed"
        yield Action(node.name, node.rack, A.upgrade, why, _name(stack), node.stack)
        return
    floors = snapshot.fact("floors", node.name)
    if _differs(floors, desired.floors(node)):
        yield Action(node.name, node.rack, A.reburn, "its burn-in level or floors changed")


_COMPONENTS = {
    "driver": "driver",
    "kernel_modules": "modules",
    "cuda": "CUDA",
    "container_toolkit": "toolkit",
    "dcgm": "DCGM",
    "fabric_manager": "fabric manager",
}


def _versions(recorded: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> str:
    """What changes, component by component: ``driver 570.133.20 → 570.172.08``."""
    if recorded is None or not isinstance(recorded.get("versions"), Mapping):
        return "no stack recorded" if recorded is None else ""
    old, new = recorded["versions"], wanted["versions"]
    return ", ".join(
        f"{label} {_shown(old.get(key))} → {_shown(new.get(key))}"
        for key, label in _COMPONENTS.items()
        if old.get(key) != new.get(key)
    )


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _bmc(desired: Desired, node: Node, snapshot: Snapshot) -> Iterator[Action]:
    recorded = snapshot.fact("bmc", node.name)
    wanted = desired.bmc(node)
    if recorded is not None and recorded.get("hash") != wanted["hash"]:
        before, after = recorded.get("endpoint"), wanted["endpoint"]
        why = "its BMC moved" if before != after else "its BMC credentials changed"
        yield Action(node.name, node.rack, A.update_bmc, why, before, after)


def _differs(recorded: Mapping[str, object] | None, wanted: Mapping[str, object]) -> bool:
    if recorded is None:
        return True  # never recorded
    return recorded.get("hash") != wanted["hash"]


def _name(fact: Mapping[str, object] | None) -> str | None:
    name = None if fact is None else fact.get("name")
    return None if name is None else str(name)


def _short(error: str | None, limit: int = 80) -> str:
    text = error.strip().splitlines()[0] if error and error.strip() else "no error recorded"
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["digest", "make_plan", "spec_hash", "state_fingerprint"]
