"""The per-run inventory: only the hosts a run targets, with the rendered group variables.

DESIGN: Ansible is handed only the hosts a run targets, never the whole fleet (reading a
10,000-host YAML inventory alone takes Ansible ~17 s). The rendered ``inventory.yml`` has a
fixed layout (templates/ansible/inventory.yml.j2), so the subset is cut line by line; an
inventory in any other layout (edited by hand) is read as YAML instead. ``group_vars/`` and
``host_vars/`` are linked, not copied: Ansible reads them beside the inventory file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from provisioner.errors import ProvisionerError

INVENTORY = "inventory.yml"
_GROUP = re.compile(r"    ([A-Za-z0-9_]+):")
_HOSTS = "      hosts:"
_HOST = re.compile(r"        ([^\s:#{}]+):(?: \{.*\})?")


class InventoryError(ProvisionerError):
    """The rendered inventory is missing or lacks a host a run targets."""


def run_inventory(inventory_dir: Path, hosts: Sequence[str] | None, folder: Path) -> Path:
    """The inventory file to hand Ansible: the rendered one, or (when ``hosts`` is given) a
    subset of it written into ``folder`` beside links to the rendered variable folders."""
    source = inventory_dir / INVENTORY
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError(
            f"{inventory_dir} holds no {INVENTORY}: render the spec first (provisioner render)"
        ) from None
    if hosts is None:
        return source
    wanted = set(hosts)
    cut = subset(text, wanted)
    if cut is None:
        cut = _subset_yaml(text, wanted, source)
    subset_text, found = cut
    missing = [host for host in hosts if host not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InventoryError(
            f"{source} has no host {shown}: render the spec again (provisioner render)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / INVENTORY
    target.write_text(subset_text, encoding="utf-8")
    for name in ("group_vars", "host_vars"):
        variables = inventory_dir / name
        if variables.is_dir():
            (folder / name).symlink_to(variables.resolve(), target_is_directory=True)
    return target


def subset(text: str, wanted: set[str]) -> tuple[str, set[str]] | None:
    """Cut the rendered layout down to ``wanted`` hosts, dropping groups left empty; None when
    ``text`` is not in the rendered layout. Returns the text and the hosts it kept."""
    head: list[str] = []
    groups: list[tuple[str, list[str]]] = []
    found: set[str] = set()
    lines = text.splitlines()
    position = 0
    while position < len(lines) and lines[position].startswith("#"):
        head.append(lines[position])
        position += 1
    if lines[position : position + 2] != ["all:", "  children:"]:
        return None
    head += ["all:", "  children:"]
    position += 2
    while position < len(lines):
        line = lines[position]
        group = _GROUP.fullmatch(line)
        if group is None or position + 1 >= len(lines) or lines[position + 1] != _HOSTS:
            return None
        kept: list[str] = []
        position += 2
        while position < len(lines) and lines[position].startswith("        "):
            host = _HOST.fullmatch(lines[position])
            if host is None:
                return None
            if host.group(1) in wanted:
                kept.append(lines[position])
                found.add(host.group(1))
            position += 1
        if kept:
            groups.append((line, kept))
    if not groups:
        return "\n".join(head) + "\n", found  # all: children: with nothing under it
    out = list(head)
    for line, kept in groups:
        out += [line, _HOSTS, *kept]
    return "\n".join(out) + "\n", found


def _subset_yaml(text: str, wanted: set[str], source: Path) -> tuple[str, set[str]]:
    """The same cut for any YAML inventory: groups keep their vars and children."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{source}: not YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise InventoryError(f"{source}: not an Ansible YAML inventory")
    found: set[str] = set()
    kept = {
        name: pruned
        for name, group in document.items()
        if (pruned := _prune(group, wanted, found)) is not None
    }
    return yaml.safe_dump(kept or {"all": {}}, sort_keys=False), found


def _prune(group: Any, wanted: set[str], found: set[str]) -> dict[str, Any] | None:
    if not isinstance(group, dict):
        return None
    out: dict[str, Any] = {}
    hosts = group.get("hosts")
    if isinstance(hosts, dict):
        chosen = {name: value for name, value in hosts.items() if name in wanted}
        found.update(chosen)
        if chosen:
            out["hosts"] = chosen
    children = group.get("children")
    if isinstance(children, dict):
        pruned = _children(children.items(), wanted, found)
        if pruned:
            out["children"] = pruned
    if not out:
        return None
    if "vars" in group:
        out["vars"] = group["vars"]
    return out


def _children(
    items: Iterable[tuple[str, Any]], wanted: set[str], found: set[str]
) -> dict[str, Any]:
    return {
        name: pruned
        for name, child in items
        if (pruned := _prune(child or {}, wanted, found)) is not None
    }
