"""Drift (:mod:`provisioner.workflows.drift`): drift.yml's documents parsed and compared with
a recorded stack fact. The documents are built the way drift.yml writes them (dpkg-query's
``${db:Status-Abbrev}|${Package}|${Version}`` lines, apt-mark's held names, nvidia-smi's
CSV line, systemctl's word) from the lab spec's h100-570 stack; each test changes one thing
a person could have done to a node by hand."""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.plan.desired import Desired
from provisioner.spec import load_fleet
from provisioner.spec.packages import stack_packages
from provisioner.workflows.drift import differences, parse
from tests.conftest import LAB_SPEC

FLEET = load_fleet(LAB_SPEC)
NODE = FLEET.by_name["gpu-lab-01"]
FACT = Desired(FLEET).stack(NODE)
PACKAGES = stack_packages(FLEET.stack(NODE))


def document(**changes: Any) -> dict[str, Any]:
    """What drift.yml writes for gpu-lab-01 running exactly its recorded stack."""
    doc: dict[str, Any] = {
        "node": "gpu-lab-01",
        "os_family": "Debian",
        "dpkg": [f"ii |{p.name}|{p.version}" for p in PACKAGES]
        + ["un |nvidia-driver-560-open|", "ii |libnvidia-compute-570|570.133.20-0ubuntu1"],
        "holds": [p.name for p in PACKAGES],
        "rpm": [],
        "nvidia_smi": {"rc": "0", "lines": ["570.133.20"] * 8},
        "fabric_manager": "active",
    }
    doc.update(changes)
    return doc


def test_a_node_on_its_recorded_stack_has_no_drift() -> None:
    # dpkg marks held packages "hi" (wanted: hold; installed); apt-mark lists them too.
    held = [f"hi |{p.name}|{p.version}" for p in PACKAGES]
    assert differences(FACT, parse(document(dpkg=held))) == []
    gathered = parse(document())
    assert gathered.driver == "570.133.20" and gathered.fabric_manager == "active"
    assert "nvidia-driver-560-open" not in gathered.packages  # known to dpkg, not installed
    assert differences(FACT, gathered) == []


def test_a_package_upgraded_by_hand_is_named_with_both_versions() -> None:
    first = PACKAGES[0]
    lines = [f"ii |{p.name}|{'9' + p.version if p is first else p.version}" for p in PACKAGES]
    found = differences(FACT, parse(document(dpkg=lines)))
    assert found == [f"{first.name}: 9{first.version} installed, recorded {first.version}"]


def test_a_lifted_hold_and_a_removed_package_are_drift() -> None:
    gone, unheld = PACKAGES[-1], PACKAGES[1]
    lines = [f"ii |{p.name}|{p.version}" for p in PACKAGES if p is not gone]
    holds = [p.name for p in PACKAGES if p is not unheld]
    found = differences(FACT, parse(document(dpkg=lines, holds=holds)))
    assert f"{gone.name}: not installed (recorded {gone.version})" in found
    assert f"{unheld.name}: not held (an apt upgrade would move it)" in found
    assert len(found) == 2


@pytest.mark.parametrize(
    ("smi", "said"),
    [
        ({"rc": "9", "lines": ["NVIDIA-SMI has failed"]}, "nvidia-smi: no driver answers"),
        ({"rc": "0", "lines": ["570.124.06"] * 8}, "loaded driver 570.124.06, recorded"),
        ({"rc": "0", "lines": ["570.133.20", "570.124.06"]}, "nvidia-smi: no driver answers"),
    ],
)
def test_the_loaded_driver_must_be_the_recorded_one(smi: dict[str, Any], said: str) -> None:
    found = differences(FACT, parse(document(nvidia_smi=smi)))
    assert len(found) == 1 and found[0].startswith(said)


def test_a_stopped_fabric_manager_is_drift_on_an_nvswitch_stack() -> None:
    found = differences(FACT, parse(document(fabric_manager="failed")))
    assert found == ["nvidia-fabricmanager: failed, recorded on"]


def test_a_rhel_node_is_checked_by_its_driver_package_and_loaded_driver() -> None:
    rpm = ["nvidia-driver|3:575.51.03-1.el9", "kernel|5.14.0-503.el9"]
    gathered = parse(document(os_family="RedHat", dpkg=[], holds=[], rpm=rpm))
    assert gathered.packages["nvidia-driver"] == "3:575.51.03-1.el9"
    found = differences(FACT, gathered)
    assert found == ["nvidia-driver: 3:575.51.03-1.el9 installed, recorded 570.133.20"]


def test_a_node_never_configured_by_provisioner_says_so() -> None:
    assert differences(None, parse(document())) == [
        "no stack recorded for the node (never configured by provisioner)"
    ]


def test_a_rhel_node_on_its_recorded_driver_has_no_drift() -> None:
    rpm = ["nvidia-driver|3:570.133.20-1.el9"]
    gathered = parse(document(os_family="RedHat", dpkg=[], holds=[], rpm=rpm))
    assert differences(FACT, gathered) == []
