"""A fleet's BMC targets: credentials by reference (rack override first), UEFI from the
profile, the manifest's serial to compare FRU data with."""

from __future__ import annotations

from pathlib import Path

from provisioner.bmc.operations import targets_for
from provisioner.spec import load_fleet
from provisioner.spec.types import SecretRef
from tests.conftest import LAB_SPEC


def test_targets_carry_references_overrides_and_boot_mode(tmp_path: Path) -> None:
    text = LAB_SPEC.read_text()
    text = text.replace(
        "    image: ubuntu-2404\n    nodes:",
        "    image: ubuntu-2404\n"
        "    bmc: {username: rackadmin, password: 'file:rack.pass'}\n"
        "    nodes:",
    )
    text = text.replace("    nvswitch: true\n", "    nvswitch: true\n    boot_mode: legacy\n")
    spec = tmp_path / "fleet.yaml"
    spec.write_text(text)
    fleet = load_fleet(spec)
    targets = targets_for(fleet, fleet.nodes)
    assert {(t.username, t.password) for t in targets} == {
        ("rackadmin", SecretRef("file", "rack.pass"))
    }
    assert [t.uefi for t in targets] == [False] * 4
    assert [t.expected_serial for t in targets] == ["LAB0001", "LAB0002", "LAB0003", "LAB0004"]

    plain = targets_for(load_fleet(LAB_SPEC), load_fleet(LAB_SPEC).nodes)
    assert {(t.username, str(t.password), t.uefi) for t in plain} == {
        ("admin", "env:PROVISIONER_LAB_BMC_PASSWORD", True)
    }
