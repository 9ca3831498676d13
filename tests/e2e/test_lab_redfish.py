"""The lab's Redfish BMC end to end: gpu-lab-04 of the lab rack, driven through the real CLI
and the real Redfish client (pyghmi) against the lab's sushy-tools emulator: power off and on,
one-time network boot, the node's own reboot and power off, and ``lab down``.

Runs as root only. The spec is the embedded lab's with its own site name, bridge, subnet and
ports (also its own Redfish port), so it never touches a lab a developer has up. The lab
comes up ``--blank`` and only the Redfish node is installed, through its BMC.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LAB_SPEC, REPO

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap missing"),
]

SITE = "labrf"
NODE = "gpu-lab-04"
IP = "10.202.0.14"
REDFISH_PORT = 19543


@dataclass
class Lab:
    spec: Path
    state: Path
    key: Path
    env: dict[str, str]

    @property
    def site(self) -> Path:
        return self.state / SITE

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REPO / ".venv/bin/provisioner"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
            cwd=REPO,
        )

    def bmc(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``provisioner bmc ARGS SPEC --nodes gpu-lab-04``, which must succeed."""
        result = self.cli("bmc", *args, str(self.spec), "--nodes", NODE)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def bmc_power(self) -> str:
        reply = self.bmc("power", "status", "-o", "json")
        return str(json.loads(reply.stdout.splitlines()[0])["value"])

    def node(self) -> dict[str, object]:
        result = self.cli("lab", "status", "-o", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["nodes"][NODE]  # type: ignore[no-any-return]

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        options = ["BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"]
        options += ["ConnectTimeout=5", "LogLevel=ERROR"]
        return subprocess.run(
            ["ssh", "-i", str(self.key), *(f"-o{o}" for o in options), f"root@{IP}", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def callbacks_since(self, since: float) -> list[dict[str, object]]:
        lines = (self.site / "boot-events.jsonl").read_text().splitlines()
        events = [json.loads(line) for line in lines]
        return [
            e
            for e in events
            if e["kind"] == "callback" and e["node"] == NODE and float(str(e["time"])) >= since
        ]


def _spec_text() -> str:
    text = LAB_SPEC.read_text()
    for old, new in (
        ("site: lab\n", f"site: {SITE}\n"),
        ("10.200.0.", "10.202.0."),
        ("prov-lab0", "prov-labr0"),
        ("127.0.0.1:900", "127.0.0.1:1920"),
        ("127.0.0.1:9443/", f"127.0.0.1:{REDFISH_PORT}/"),
        (":8080/", ":18280/"),
        (":8081/", ":18281/"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    assert f'bmc: "redfish+https://127.0.0.1:{REDFISH_PORT}/redfish/v1/Systems/' in text
    return text


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _ran(lab: Lab, command: str) -> bool:
    """Whether ``command`` ran on the node (exit 0)."""
    return lab.ssh(command, timeout=15).returncode == 0


def _ssh_refused() -> bool:
    try:
        socket.create_connection((IP, 22), timeout=3).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("labrf")
    spec = root / "fleet.yaml"
    spec.write_text(_spec_text())
    (root / "ssh").mkdir()
    key = root / "ssh" / "lab_ed25519"
    shutil.copy(REPO / "inventories/lab/ssh/lab_ed25519", key)
    key.chmod(0o600)
    env = {
        **os.environ,
        "PROVISIONER_LAB_DIR": str(root / "state"),
        "PROVISIONER_LAB_BMC_PASSWORD": "lab-redfish-test-pw",
    }
    lab = Lab(spec, root / "state", key, env)
    try:
        yield lab
    finally:
        lab.cli("lab", "down", SITE, timeout=120)


def test_a_blank_lab_has_its_redfish_system_off(lab: Lab) -> None:
    started = time.monotonic()
    result = lab.cli("lab", "up", "--blank", str(lab.spec), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"lab up --blank took {time.monotonic() - started:.1f} s")
    assert lab.bmc_power() == "off"
    node = lab.node()
    assert (node["power"], node["phase"], node["installed"]) == ("off", "off", False)


def test_pxe_and_power_on_over_redfish_install_the_node(lab: Lab) -> None:
    before = time.time()
    lab.bmc("pxe")
    lab.bmc("power", "on")
    _wait(lambda: lab.callbacks_since(before), 120, f"{NODE}'s install callback")
    _wait(lambda: lab.ssh("true", timeout=10).returncode == 0, 120, f"SSH on {NODE}")
    print(f"install over Redfish took {time.time() - before:.1f} s")
    assert [e["accepted"] for e in lab.callbacks_since(before)] == [True]
    reply = lab.ssh("hostname; cat /etc/provisioner-lab/installed.json")
    assert reply.stdout.splitlines()[0] == NODE
    assert json.loads(reply.stdout.splitlines()[1])["by"] == "autoinstall"
    assert lab.bmc_power() == "on"
    node = lab.node()
    assert (node["power"], node["phase"], node["installs"]) == ("on", "running", 1)


def test_redfish_power_off_stops_the_container(lab: Lab) -> None:
    started = time.monotonic()
    lab.bmc("power", "off", "--wait", "30")
    _wait(lambda: lab.node()["phase"] == "off", 30, f"{NODE} off")
    print(f"power off took {time.monotonic() - started:.1f} s")
    netns = f"plab-{SITE}-{NODE}"
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    assert pids.returncode == 0 and pids.stdout.split() == []  # nothing of the node runs
    assert _ssh_refused()
    assert lab.bmc_power() == "off"
    assert lab.node()["power"] == "off"


def test_redfish_network_boot_reinstalls_and_calls_back(lab: Lab) -> None:
    before = time.time()
    lab.bmc("pxe")
    lab.bmc("power", "on", "--wait", "30")
    _wait(lambda: lab.callbacks_since(before), 120, f"{NODE}'s install callback")
    _wait(lambda: lab.ssh("true", timeout=10).returncode == 0, 120, f"SSH on {NODE}")
    print(f"reinstall over Redfish took {time.time() - before:.1f} s")
    assert [e["accepted"] for e in lab.callbacks_since(before)] == [True]
    node = lab.node()
    assert (node["power"], node["installs"]) == ("on", 2)


def test_a_reboot_inside_boots_from_disk_as_the_override_was_one_time(lab: Lab) -> None:
    before = time.time()
    boots = lab.node()["boots"]
    assert isinstance(boots, int)
    # A loaded host may miss an SSH connect timeout now and then: each command is tried
    # again until it got through (the reboot: until the node booted again).
    _wait(lambda: _ran(lab, "touch /root/survives-reboot"), 60, f"{NODE} to mark its disk")
    _wait(lambda: _ran(lab, "systemctl --no-block reboot"), 60, "the reboot to get through")
    _wait(lambda: lab.node()["boots"] == boots + 1, 60, f"{NODE} to reboot")
    _wait(lambda: lab.ssh("true", timeout=10).returncode == 0, 120, f"SSH on {NODE}")
    assert lab.ssh("test -f /root/survives-reboot").returncode == 0  # the same disk
    assert lab.node()["installs"] == 2
    assert lab.callbacks_since(before) == []


def test_poweroff_inside_is_seen_by_the_redfish_bmc(lab: Lab) -> None:
    _wait(lambda: _ran(lab, "systemctl --no-block poweroff"), 60, "the poweroff to get through")
    _wait(lambda: lab.node()["phase"] == "off", 60, f"{NODE} off")
    _wait(lambda: lab.bmc_power() == "off", 30, "the BMC to report off")
    assert lab.node()["power"] == "off"
    lab.bmc("power", "on", "--wait", "30")  # no override now: from disk
    _wait(lambda: lab.ssh("true", timeout=10).returncode == 0, 120, f"SSH on {NODE}")
    assert lab.ssh("test -f /root/survives-reboot").returncode == 0
    assert lab.node()["installs"] == 2


def test_redfish_reset_restarts_the_node_from_disk(lab: Lab) -> None:
    _wait(lambda: lab.node()["phase"] == "running", 60, f"{NODE} running")
    boots = lab.node()["boots"]
    assert isinstance(boots, int)
    lab.bmc("power", "reset", "--wait", "30")
    _wait(lambda: lab.node()["boots"] == boots + 1, 30, f"{NODE} to boot again")
    _wait(lambda: lab.ssh("true", timeout=10).returncode == 0, 120, f"SSH on {NODE}")
    assert lab.ssh("test -f /root/survives-reboot").returncode == 0
    node = lab.node()
    assert (node["power"], node["installs"]) == ("on", 2)


def test_soft_off_shuts_the_os_down(lab: Lab) -> None:
    unit = (
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
        "ExecStop=/bin/touch /root/clean-shutdown\n"
    )
    reply = lab.ssh(
        f"printf '{unit}' > /etc/systemd/system/lab-mark.service && "
        "systemctl daemon-reload && systemctl start lab-mark"
    )
    assert reply.returncode == 0, reply.stderr
    started = time.monotonic()
    lab.bmc("power", "soft-off", "--wait", "60")
    _wait(lambda: lab.node()["phase"] == "off", 60, f"{NODE} off")
    print(f"soft off took {time.monotonic() - started:.1f} s")
    disk = lab.site / "nodes" / NODE / "disk" / "upper"
    assert (disk / "root/clean-shutdown").is_file()  # systemd stopped its services
    assert lab.bmc_power() == "off"


def test_lab_down_stops_the_redfish_emulator(lab: Lab) -> None:
    pgrep = ["pgrep", "-f", "--", f"sushy_tools.emulator.main --config {lab.site}/redfish/"]
    assert subprocess.run(pgrep, check=False, capture_output=True).returncode == 0  # it runs
    result = lab.cli("lab", "down", SITE)
    assert result.returncode == 0, result.stderr
    assert subprocess.run(pgrep, check=False, capture_output=True).returncode == 1  # it is gone
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", REDFISH_PORT), timeout=3).close()
    assert not lab.site.exists()
