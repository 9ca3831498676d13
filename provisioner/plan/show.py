"""A plan for people: text for a terminal, markdown for a pull-request comment, JSON for tools.

Nodes that share an action, a rack, a before/after and a reason are one line, their names
folded the way Slurm writes host lists (``gpu-r01-[01-16,18-32]``), so a 128-node change
reads as a few lines per rack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from itertools import groupby

from provisioner.plan.model import ORDER, Action, ActionKind, Plan
from provisioner.plan.planfile import as_dict

_NUMBERED = re.compile(r"(.*?)(\d+)")

VERBS = {
    ActionKind.update_bmc: "to update BMC",
    ActionKind.retire: "to retire",
    ActionKind.enroll: "to enroll",
    ActionKind.bring_up: "to bring up",
    ActionKind.reimage: "to reimage",
    ActionKind.upgrade: "to upgrade",
    ActionKind.reburn: "to burn in again",
}


def fold(names: Iterable[str]) -> str:
    """``gpu-01, gpu-02, gpu-03, gpu-07`` -> ``gpu-[01-03,07]``; other names as they are."""
    plain: list[str] = []
    numbered: dict[tuple[str, int], list[int]] = {}
    for name in names:
        match = _NUMBERED.fullmatch(name)
        if match is None:
            plain.append(name)
        else:
            prefix, digits = match.groups()
            numbered.setdefault((prefix, len(digits)), []).append(int(digits))
    out = list(plain)
    for (prefix, width), numbers in numbered.items():
        numbers.sort()
        spans = []
        for _, run in groupby(enumerate(numbers), key=lambda item: item[1] - item[0]):
            values = [n for _, n in run]
            first, last = f"{values[0]:0{width}d}", f"{values[-1]:0{width}d}"
            spans.append(first if first == last else f"{first}-{last}")
        out.append(prefix + spans[0] if len(numbers) == 1 else f"{prefix}[{','.join(spans)}]")
    return ", ".join(out)


def _groups(actions: Sequence[Action]) -> list[tuple[Action, list[str]]]:
    """Runs of actions alike but for the node, each with its nodes."""
    out: list[tuple[Action, list[str]]] = []

    def key(a: Action) -> tuple[str, ...]:
        return (a.kind, a.rack, a.before or "", a.after or "", a.reason)

    for _, run in groupby(sorted(actions, key=lambda a: (*key(a), a.node)), key=key):
        items = list(run)
        out.append((items[0], [a.node for a in items]))
    order = {kind: i for i, kind in enumerate(ORDER)}
    out.sort(key=lambda group: (order[group[0].kind], group[0].rack, group[1][0]))
    return out


def _change(action: Action) -> str:
    if action.before is None and action.after is None:
        return ""
    if action.before == action.after:
        return str(action.after)
    return f"{action.before or '(none recorded)'} → {action.after or '-'}"


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def summary(plan: Plan) -> str:
    if not plan.changes:
        return "No changes: the recorded fleet matches the spec."
    counts = ", ".join(f"{n} {VERBS[kind]}" for kind, n in plan.counts().items())
    return f"Plan: {_nodes(len(plan.nodes()))} to change ({counts})."


def text(plan: Plan) -> str:
    lines = [f"Plan for site {plan.site} (spec {plan.spec})", ""]
    for kind in ORDER:
        groups = list(_groups(plan.of_kind(kind)))
        if not groups:
            continue
        lines.append(f"  {kind} ({_nodes(sum(len(nodes) for _, nodes in groups))})")
        for action, nodes in groups:
            change = _change(action)
            lines.append(
                f"    rack {action.rack}: {fold(nodes)}"
                + (f"  {change}" if change else "")
                + f"  ({action.reason})"
            )
        lines.append("")
    if plan.notes:
        lines.append("  Left alone:")
        lines.extend(f"    {note.node}: {note.message}" for note in plan.notes)
        lines.append("")
    lines.append(summary(plan))
    return "\n".join(lines) + "\n"


def markdown(plan: Plan) -> str:
    lines = [f"### provisioner plan: site `{plan.site}`", "", f"**{summary(plan)}**", ""]
    if plan.changes:
        lines += ["| action | nodes | racks |", "|---|---:|---|"]
        for kind, count in plan.counts().items():
            racks: dict[str, int] = {}
            for action in plan.of_kind(kind):
                racks[action.rack] = racks.get(action.rack, 0) + 1
            shown = ", ".join(f"{rack} ({n})" for rack, n in sorted(racks.items()))
            lines.append(f"| {kind} | {count} | {shown} |")
        lines.append("")
    for kind in ORDER:
        groups = _groups(plan.of_kind(kind))
        if not groups:
            continue
        total = sum(len(nodes) for _, nodes in groups)
        lines += [
            f"<details><summary><b>{kind}</b>: {_nodes(total)}</summary>",
            "",
            "| rack | nodes | change | why |",
            "|---|---|---|---|",
        ]
        for action, nodes in groups:
            change = _change(action)
            lines.append(f"| {action.rack} | `{fold(nodes)}` | {change} | {action.reason} |")
        lines += ["", "</details>", ""]
    if plan.notes:
        lines += ["**Left alone:**", ""]
        lines += [f"- `{note.node}`: {note.message}" for note in plan.notes]
        lines.append("")
    lines.append(
        f"<sub>spec `{plan.spec}` · spec hash `{plan.spec_hash[:12]}` · "
        f"state `{plan.state_fingerprint[:12]}`</sub>"
    )
    return "\n".join(lines) + "\n"


def as_json(plan: Plan) -> str:
    return json.dumps(as_dict(plan), indent=2) + "\n"


def render(plan: Plan, fmt: str) -> str:
    if fmt == "text":
        return text(plan)
    if fmt == "markdown":
        return markdown(plan)
    if fmt == "json":
        return as_json(plan)
    raise ValueError(f"unknown plan format {fmt!r} (text, markdown, json)")
