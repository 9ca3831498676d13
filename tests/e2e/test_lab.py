"""The lab end to end: ``lab up`` of the four-node lab rack, then power, PXE, reboot and
``lab down`` through the real CLI, real IPMI, real SSH and real machine containers. ``lab up``
installs gpu-lab-04 over its Redfish BMC; test_lab_redfish.py drives that BMC further.

Runs as root only (namespaces, mounts, bridges). The spec is the embedded lab's with its own
site name, bridge, subnet and ports, so it never touches a lab a developer has up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import LAB_SPEC, REPO

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("debootstrap") is None, reason="debootstrap missing"),
]

SITE = "labtest"
PASSWORD = "lab-test-bmc-pw"
NODES = ["gpu-lab-01", "gpu-lab-02", "gpu-lab-03", "gpu-lab-04"]


@dataclass
class Lab:
    spec: Path
    state: Path
    key: Path
    env: dict[str, str]

    def ip(self, node: str) -> str:
        return f"10.201.0.{10 + NODES.index(node) + 1}"

    def ssh(self, node: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "ssh",
                "-i",
                str(self.key),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                f"root@{self.ip(node)}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _spec_text() -> str:
    text = LAB_SPEC.read_text()
    for old, new in (
        ("site: lab\n", f"site: {SITE}\n"),
        ("10.200.0.", "10.201.0."),
        ("prov-lab0", "prov-labt0"),
        ("127.0.0.1:900", "127.0.0.1:1910"),
        ("127.0.0.1:9443", "127.0.0.1:19443"),
        (":8080/", ":18180/"),
        (":8081/", ":18181/"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab")
    spec = root / "fleet.yaml"
    spec.write_text(_spec_text())
    (root / "ssh").mkdir()
    key = root / "ssh" / "lab_ed25519"
    shutil.copy(REPO / "inventories/lab/ssh/lab_ed25519", key)
    key.chmod(0o600)
    env = {
        **os.environ,
        "PROVISIONER_LAB_DIR": str(root / "state"),
        "PROVISIONER_LAB_BMC_PASSWORD": PASSWORD,
    }
    lab = Lab(spec, root / "state", key, env)
    try:
        yield lab
    finally:
        _cli(lab, "lab", "down", SITE, timeout=120)


def _cli(lab: Lab, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / ".venv/bin/provisioner"), *args],
        capture_output=True,
        text=True,
        env=lab.env,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def _status(lab: Lab) -> dict[str, dict[str, object]]:
    result = _cli(lab, "lab", "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return report["nodes"]  # type: ignore[no-any-return]


def _ran(lab: Lab, node: str, command: str) -> bool:
    """Whether ``command`` ran on ``node`` (exit 0)."""
    return lab.ssh(node, command, timeout=15).returncode == 0


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _events(lab: Lab) -> list[dict[str, object]]:
    path = lab.state / SITE / "boot-events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lab_up_installs_every_node_over_pxe(lab: Lab) -> None:
    started = time.monotonic()
    result = _cli(lab, "lab", "up", str(lab.spec), timeout=1200)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"lab up took {elapsed:.1f} s")
    for node in NODES:
        reply = lab.ssh(node, "hostname; cat /etc/provisioner-lab/installed.json")
        assert reply.returncode == 0, reply.stderr
        assert reply.stdout.splitlines()[0] == node
        assert json.loads(reply.stdout.splitlines()[1])["by"] == "autoinstall"
    callbacks = [e for e in _events(lab) if e["kind"] == "callback" and e["accepted"]]
    assert sorted(str(e["node"]) for e in callbacks) == NODES
    assert {str(e["node"]): e["client"] for e in callbacks}[NODES[2]] == lab.ip(NODES[2])
    nodes = _status(lab)
    assert all(n["phase"] == "running" and n["installed"] and n["ssh"] for n in nodes.values())


def test_each_node_sees_its_own_simulated_gpus(lab: Lab) -> None:
    healthy = json.loads(lab.ssh(NODES[0], "cat /run/provisioner-lab/gpus.json").stdout)
    faulty = json.loads(lab.ssh(NODES[3], "cat /run/provisioner-lab/gpus.json").stdout)
    assert healthy["node"] == NODES[0] and faulty["node"] == NODES[3]
    assert len(healthy["gpus"]) == 8 and all(g["present"] for g in healthy["gpus"])
    assert [g["index"] for g in faulty["gpus"] if not g["present"]] == [5]
    assert "Xid" in lab.ssh(NODES[3], "cat /run/provisioner-lab/kmsg").stdout
    assert lab.ssh(NODES[0], "touch /run/provisioner-lab/x").returncode != 0  # read-only


def test_bmc_power_off_stops_the_node_and_pxe_power_on_reinstalls_it(lab: Lab) -> None:
    node = NODES[1]
    spec = str(lab.spec)
    off = _cli(lab, "bmc", "power", "off", spec, "--nodes", node, "--wait", "30")
    assert off.returncode == 0, off.stdout + off.stderr
    _wait(lambda: _status(lab)[node]["phase"] == "off", 30, f"{node} off")
    netns = f"plab-{SITE}-{node}"
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    assert pids.stdout.split() == []  # nothing of the node runs any more
    assert lab.ssh(node, "true", timeout=15).returncode != 0
    status = _cli(lab, "bmc", "power", "status", spec, "--nodes", node, "-o", "json")
    assert json.loads(status.stdout.splitlines()[0])["value"] == "off"

    before = time.time()
    assert _cli(lab, "bmc", "pxe", spec, "--nodes", node).returncode == 0
    on = _cli(lab, "bmc", "power", "on", spec, "--nodes", node)
    assert on.returncode == 0, on.stdout + on.stderr
    _wait(
        lambda: any(
            e["kind"] == "callback" and e["node"] == node and float(str(e["time"])) >= before
            for e in _events(lab)
        ),
        120,
        f"{node}'s install callback",
    )
    _wait(lambda: lab.ssh(node, "true", timeout=10).returncode == 0, 120, f"SSH on {node}")
    assert _status(lab)[node]["installs"] == 2  # lab up installed it once, this is twice


def test_reboot_inside_the_node_boots_it_again_from_disk(lab: Lab) -> None:
    node = NODES[2]
    boots = _status(lab)[node]["boots"]
    assert isinstance(boots, int)
    # A loaded host may miss an SSH connect timeout now and then: try until it got through.
    _wait(lambda: _ran(lab, node, "touch /root/survives-reboot"), 60, f"{node} to mark its disk")
    _wait(lambda: _ran(lab, node, "systemctl --no-block reboot"), 60, "the reboot to get through")
    _wait(lambda: _status(lab)[node]["boots"] == boots + 1, 60, f"{node} to reboot")
    _wait(lambda: lab.ssh(node, "true", timeout=10).returncode == 0, 120, f"SSH on {node}")
    assert lab.ssh(node, "test -f /root/survives-reboot").returncode == 0  # same disk


def test_poweroff_inside_the_node_is_seen_by_its_bmc(lab: Lab) -> None:
    node = NODES[0]
    _wait(lambda: _ran(lab, node, "systemctl --no-block poweroff"), 60, "the poweroff to go")
    _wait(lambda: _status(lab)[node]["phase"] == "off", 60, f"{node} off")
    status = _cli(lab, "bmc", "power", "status", str(lab.spec), "--nodes", node, "-o", "json")
    assert json.loads(status.stdout.splitlines()[0])["value"] == "off"


def test_lab_down_leaves_nothing_behind_and_is_safe_twice(lab: Lab) -> None:
    first = _cli(lab, "lab", "down", SITE)
    assert first.returncode == 0, first.stderr
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"plab-{SITE}-" not in namespaces
    assert not Path("/sys/class/net/prov-labt0").exists()
    assert not (lab.state / SITE).exists()
    assert str(lab.state) not in Path("/proc/self/mountinfo").read_text()
    daemons = subprocess.run(["pgrep", "-f", f"provisioner.lab.daemon {lab.spec}"], check=False)
    assert daemons.returncode == 1  # no such process
    second = _cli(lab, "lab", "down", SITE)
    assert second.returncode == 0, second.stderr
