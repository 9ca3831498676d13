"""The per-run inventory: a subset of the rendered inventory holding only the targeted hosts,
cut line by line from the rendered layout, and the same for any YAML inventory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.runner.inventory import InventoryError, run_inventory, subset
from tests.conftest import DATA

RENDERED = DATA / "render" / "rocky-redfish" / "expected" / "ansible"


def _groups(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """group -> {host: vars} of a parsed inventory."""
    children = document["all"]["children"] or {}
    return {name: dict(group["hosts"]) for name, group in children.items()}


def test_rendered_subset_keeps_the_wanted_hosts_with_their_vars_and_drops_empty_groups() -> None:
    text = (RENDERED / "inventory.yml").read_text()
    cut = subset(text, {"a100-b01-canary"})
    assert cut is not None
    kept, found = cut
    assert found == {"a100-b01-canary"}
    full = _groups(yaml.safe_load(text))
    expected = {
        group: {h: v for h, v in hosts.items() if h == "a100-b01-canary"}
        for group, hosts in full.items()
        if "a100-b01-canary" in hosts
    }
    assert _groups(yaml.safe_load(kept)) == expected
    assert "stack_a100_550" not in kept  # only the other stack's hosts were in it
    assert kept.startswith("# Ansible inventory of site golden-b")


def test_anything_but_the_rendered_layout_is_not_cut_by_lines() -> None:
    assert subset("all:\n  hosts:\n    a:\n", {"a"}) is None
    assert subset("all:\n  children:\n    g:\n      vars: {}\n", {"a"}) is None
    assert subset("all:\n  children:\n    g:\n      hosts:\n        - a\n", {"a"}) is None


def test_hand_written_inventory_is_cut_as_yaml(tmp_path: Path) -> None:
    folder = tmp_path / "inv"
    folder.mkdir()
    document = {
        "all": {
            "vars": {"x": 1},
            "children": {
                "gpu": {"hosts": {"a": {"ansible_host": "10.0.0.1"}, "b": None}},
                "cpu": {"hosts": {"c": None}, "vars": {"y": 2}},
            },
        }
    }
    (folder / "inventory.yml").write_text(yaml.safe_dump(document))
    (folder / "group_vars").mkdir()
    path = run_inventory(folder, ["a"], tmp_path / "run")
    assert yaml.safe_load(path.read_text()) == {
        "all": {
            "children": {"gpu": {"hosts": {"a": {"ansible_host": "10.0.0.1"}}}},
            "vars": {"x": 1},
        }
    }
    assert (tmp_path / "run" / "group_vars").resolve() == (folder / "group_vars").resolve()


def test_every_host_or_none_runs(tmp_path: Path) -> None:
    assert run_inventory(RENDERED, None, tmp_path / "all") == RENDERED / "inventory.yml"
    with pytest.raises(InventoryError, match="no host a100-b01-999"):
        run_inventory(RENDERED, ["a100-b01-007", "a100-b01-999"], tmp_path / "bad")
    with pytest.raises(InventoryError, match="render the spec first"):
        run_inventory(tmp_path, ["x"], tmp_path / "none")
