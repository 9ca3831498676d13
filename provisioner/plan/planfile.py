"""Saved plans: a JSON file holding the spec's hash, the state's fingerprint and the actions.

``provisioner apply FILE`` loads one and, before touching anything, refuses it with
:class:`~provisioner.errors.PlanStale` when the spec or the recorded state changed since it
was made (:func:`check_fresh` says which).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from provisioner.errors import PlanStale, ProvisionerError
from provisioner.plan.model import Action, Note, Plan

FORMAT = "provisioner-plan/1"


class PlanFileError(ProvisionerError):
    """A plan file that cannot be read."""


def as_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "site": plan.site,
        "spec": plan.spec,
        "spec_hash": plan.spec_hash,
        "state_fingerprint": plan.state_fingerprint,
        "retire": plan.retire,
        "summary": {str(kind): n for kind, n in plan.counts().items()},
        "actions": [a.as_dict() for a in plan.actions],
        "notes": [n.as_dict() for n in plan.notes],
    }


def from_dict(data: Any, where: str = "plan") -> Plan:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PlanFileError(f"{where}: not a provisioner plan (format {FORMAT})")
    try:
        return Plan(
            site=str(data["site"]),
            spec=str(data["spec"]),
            spec_hash=str(data["spec_hash"]),
            state_fingerprint=str(data["state_fingerprint"]),
            actions=tuple(Action.from_dict(a) for a in data["actions"]),
            notes=tuple(Note(str(n["node"]), str(n["message"])) for n in data.get("notes", [])),
            retire=bool(data.get("retire", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanFileError(f"{where}: a damaged plan ({type(exc).__name__}: {exc})") from None


def save(plan: Plan, path: Path) -> None:
    """Write the plan (atomically: a reader never sees half a plan)."""
    text = json.dumps(as_dict(plan), indent=2, sort_keys=False) + "\n"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def load(path: Path) -> Plan:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanFileError(f"cannot read the plan {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanFileError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
    return from_dict(data, str(path))


def check_fresh(plan: Plan, spec_hash: str, state_fingerprint: str, site: str) -> None:
    """Refuse a plan made from another spec or another recorded state than now's."""
    stale = []
    if plan.site != site:
        stale.append(f"it is for site {plan.site}, not {site}")
    if plan.spec_hash != spec_hash:
        stale.append(f"the spec changed since it was made ({plan.spec})")
    if plan.state_fingerprint != state_fingerprint:
        stale.append("the recorded state changed since it was made (another run moved nodes)")
    if stale:
        raise PlanStale(
            "refusing a stale plan: " + "; ".join(stale) + ". Nothing was touched: plan again"
        )
