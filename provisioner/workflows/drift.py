"""``provisioner drift``: what nodes really run, against the stack recorded for them.

playbooks/drift.yml reads each node (installed NVIDIA packages and versions, held packages,
the driver nvidia-smi reports, whether the fabric manager runs) into a JSON document; the
pure :func:`parse` and :func:`differences` here compare it with the node's recorded stack fact
(what the last configure or upgrade installed), so a node someone upgraded by hand, a hold
someone lifted, or a driver that did not load after a reboot shows up by name.

On Debian-family nodes every package of the stack is checked by name, version and hold (the
names of :mod:`provisioner.spec.packages`, which the roles install); on RHEL-family nodes the
driver version (from nvidia-smi, else the ``nvidia-driver`` package) and the fabric manager.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.burnin.results import reasons_from
from provisioner.runner.ansible import run_playbook
from provisioner.spec.models import Stack
from provisioner.spec.packages import stack_packages

PLAYBOOK = "drift.yml"


@dataclass(frozen=True, slots=True)
class Gathered:
    """What one node runs, as drift.yml read it."""

    node: str
    os_family: str
    packages: Mapping[str, str]  # installed name -> version
    held: frozenset[str]
    driver: str | None  # nvidia-smi's (the loaded module's); None when it could not say
    fabric_manager: str  # systemd's word: active, inactive, failed, unknown ...


def parse(document: Mapping[str, Any]) -> Gathered:
    """drift.yml's document -> :class:`Gathered` (pure)."""
    packages: dict[str, str] = {}
    held = {str(h).strip() for h in document.get("holds") or [] if str(h).strip()}
    for line in document.get("dpkg") or []:
        # dpkg's abbreviated status: the wanted state (i install, h hold ...), then the
        # package's (i installed, n not installed, c config files only ...).
        parts = str(line).split("|")
        if len(parts) == 3 and parts[0][1:2] == "i":
            packages[parts[1]] = parts[2]
            if parts[0][:1] == "h":
                held.add(parts[1])
    for line in document.get("rpm") or []:
        parts = str(line).split("|")
        if len(parts) == 2:
            version = parts[1][2:] if parts[1].startswith("0:") else parts[1]
            packages[parts[0]] = version
    smi = document.get("nvidia_smi") or {}
    versions = {str(v).strip() for v in smi.get("lines") or [] if str(v).strip()}
    driver = versions.pop() if str(smi.get("rc")) == "0" and len(versions) == 1 else None
    return Gathered(
        node=str(document.get("node", "")),
        os_family=str(document.get("os_family", "")),
        packages=packages,
        held=frozenset(held),
        driver=driver,
        fabric_manager=str(document.get("fabric_manager") or "unknown"),
    )


def differences(stack_fact: Mapping[str, Any] | None, node: Gathered) -> list[str]:
    """How ``node`` differs from its recorded stack, one line each; empty: no drift."""
    if stack_fact is None or "stack" not in stack_fact:
        return ["no stack recorded for the node (never configured by provisioner)"]
    stack = Stack.model_validate(stack_fact["stack"])
    out: list[str] = []
    if node.os_family == "Debian":
        for package in stack_packages(stack):
            have = node.packages.get(package.name)
            if have is None:
                out.append(f"{package.name}: not installed (recorded {package.version})")
            elif have != package.version:
                out.append(f"{package.name}: {have} installed, recorded {package.version}")
            elif package.name not in node.held:
                out.append(f"{package.name}: not held (an apt upgrade would move it)")
    elif "nvidia-driver" in node.packages:
        have = node.packages["nvidia-driver"]
        if not have.split(":", 1)[-1].startswith(f"{stack.driver.version}-"):  # epoch aside
            out.append(f"nvidia-driver: {have} installed, recorded {stack.driver.version}")
    if node.driver is None:
        out.append("nvidia-smi: no driver answers (not loaded, or no GPU)")
    elif node.driver != stack.driver.version:
        out.append(f"loaded driver {node.driver}, recorded {stack.driver.version}")
    if stack.fabric_manager and node.fabric_manager != "active":
        out.append(f"nvidia-fabricmanager: {node.fabric_manager}, recorded on")
    return out


@dataclass(frozen=True, slots=True)
class DriftReport:
    nodes: Mapping[str, list[str]]  # node -> differences (empty: none)
    unreadable: Mapping[str, str] = field(default_factory=dict)  # node -> why

    @property
    def drifted(self) -> list[str]:
        return [node for node, found in self.nodes.items() if found]


def gather(
    render_dir: Path, nodes: Sequence[str], results_dir: Path, *, key: Path | None = None
) -> tuple[dict[str, Gathered], dict[str, str]]:
    """Run drift.yml on ``nodes``; what each one runs, and why some could not be read."""
    results_dir.mkdir(parents=True, exist_ok=True)
    played = run_playbook(
        PLAYBOOK,
        render_dir / "ansible",
        limit=nodes,
        private_key=key,
        extravars={"drift_results_dir": str(results_dir)},
    )
    reasons = reasons_from(played, nodes)
    found: dict[str, Gathered] = {}
    missing: dict[str, str] = {}
    for node in nodes:
        path = results_dir / f"{node}.json"
        if node in reasons or not path.is_file():
            missing[node] = reasons.get(node, "drift.yml wrote no document")
            continue
        try:
            found[node] = parse(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            missing[node] = f"{path}: {exc}"
    return found, missing


def report(
    recorded: Mapping[str, Mapping[str, Any]],
    found: Mapping[str, Gathered],
    missing: Mapping[str, str],
) -> DriftReport:
    return DriftReport(
        {node: differences(recorded.get(node), gathered) for node, gathered in found.items()},
        dict(missing),
    )
