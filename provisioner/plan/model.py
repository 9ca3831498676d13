"""The plan's data: actions per node, notes for people, and the state a plan was made from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class ActionKind(StrEnum):
    """What a node needs, in the order ``apply`` carries kinds out."""

    update_bmc = "update-bmc"  # the BMC's address or credential reference changed
    retire = "retire"  # gone from the spec: drained and powered off (never wiped)
    enroll = "enroll"  # new in the spec
    bring_up = "bring-up"  # not ready yet: start, resume or retry its bring-up
    reimage = "reimage"  # its OS image changed: drain, network boot, install again
    upgrade = "upgrade-stack"  # its software stack changed: rolling upgrade
    reburn = "re-burn-in"  # its burn-in floors or level changed: drain and burn in again


#: ``apply``'s order of kinds (a node's actions are applied in this order too).
ORDER: tuple[ActionKind, ...] = tuple(ActionKind)


@dataclass(frozen=True, slots=True)
class Action:
    node: str
    rack: str
    kind: ActionKind
    reason: str
    before: str | None = None  # what is recorded (a stack name, an image, a BMC URL)
    after: str | None = None  # what the spec asks for

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "rack": self.rack,
            "action": str(self.kind),
            "reason": self.reason,
            "before": self.before,
            "after": self.after,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Action:
        return cls(
            node=str(data["node"]),
            rack=str(data["rack"]),
            kind=ActionKind(data["action"]),
            reason=str(data["reason"]),
            before=data.get("before"),
            after=data.get("after"),
        )


@dataclass(frozen=True, slots=True)
class Note:
    """A node the plan leaves alone on purpose, and what a person should do about it."""

    node: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"node": self.node, "message": self.message}


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the store records of one node, as the plan needs it."""

    rack: str
    state: str
    failed_in: str | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The recorded state a plan is made from: nodes, and their facts by kind
    (``facts["stack"]["gpu-01"]`` is the stack recorded as applied to gpu-01)."""

    nodes: Mapping[str, NodeState]
    facts: Mapping[str, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)

    def fact(self, kind: str, node: str) -> Mapping[str, Any] | None:
        return self.facts.get(kind, {}).get(node)


@dataclass(frozen=True, slots=True)
class Plan:
    site: str
    spec: str  # the spec file, as given
    spec_hash: str
    state_fingerprint: str
    actions: tuple[Action, ...]
    notes: tuple[Note, ...] = ()
    retire: bool = False  # made with --retire: retire actions are in, not held back

    @property
    def changes(self) -> bool:
        return bool(self.actions)

    def of_kind(self, kind: ActionKind) -> list[Action]:
        return [a for a in self.actions if a.kind is kind]

    def counts(self) -> dict[ActionKind, int]:
        out = dict.fromkeys(ORDER, 0)
        for action in self.actions:
            out[action.kind] += 1
        return {kind: n for kind, n in out.items() if n}

    def nodes(self, *kinds: ActionKind) -> list[str]:
        wanted = set(kinds) or set(ORDER)
        seen: dict[str, None] = {}
        for action in self.actions:
            if action.kind in wanted:
                seen.setdefault(action.node)
        return list(seen)
