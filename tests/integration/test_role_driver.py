"""The nvidia_repo, nvidia_driver and fabric_manager roles, run for real by ansible-playbook
against a lab rack of two nodes; then one node moves to the lab's other stack and back.

``lab up`` brings up site ``lp2`` (its own bridge, subnet and ports, so it never touches a lab
a developer has up) with the rack on stack h100-570, and renders its inventory. The test
playbook (``tests/data/playbooks/driver.yml``) runs the three roles against that render: they
must add the lab's signed repositories, install exactly the stack's driver and fabric manager
pins, pin them (apt preferences, priority 1001) and hold them, start nvidia-persistenced and
nvidia-fabricmanager, and see nvidia-smi report the version.
Then gpu-lab-02 alone moves to h100-580 (a spec copy whose rack is on that stack, rendered
with ``provisioner render``): driver and fabric manager must move together, the R570 packages
must be gone and the new ones held, while gpu-lab-01 stays on R570. Moving it back is a
downgrade, made with nvidia_driver_reboot on, so the node reboots once; a last run over both
nodes (the second for gpu-lab-01) changes nothing.

The lab needs root (the ``lab_host`` fixture skips otherwise); the syntax, lint and
documentation checks of the roles are in test_playbooks_static.py, their RHEL tasks'
check-mode run in test_roles_redhat_check.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA
from tests.integration.labrig import PLAYBOOK_ENV, Lab, Play, lab_spec, running_lab

pytestmark = pytest.mark.integration

N = 2  # lab lp2
STAYS, MOVES = "gpu-lab-01", "gpu-lab-02"
NODES = (STAYS, MOVES)
PLAYBOOK = DATA / "playbooks" / "driver.yml"
# The lab's nodes are machine containers sharing this host's kernel: its boot_id never
# changes, the start time of their own PID 1 does.
REBOOT_VARS = {
    "nvidia_driver_reboot": True,
    "nvidia_driver_reboot_timeout": 300,
    "nvidia_driver_reboot_boot_time_command": "awk '{print $22}' /proc/1/stat",
}


def _play(
    lab: Lab, *args: str, render: Path | None = None, extra: dict[str, object] | None = None
) -> Play:
    """The test playbook against ``render``'s inventory (default: the one ``lab up`` made)."""
    inventory = (render or lab.render) / "ansible" / "inventory.yml"
    variables = ["-e", json.dumps(extra)] if extra else []
    return lab.play(PLAYBOOK, "-i", str(inventory), *variables, *args)


@dataclass(frozen=True)
class Stack:
    """What the render says a node of a stack runs: the driver version and both pin sets."""

    version: str
    driver: dict[str, str]  # name -> version
    fabric_manager: dict[str, str]

    @property
    def pins(self) -> dict[str, str]:
        return {**self.driver, **self.fabric_manager}


def _stack(render: Path, name: str) -> Stack:
    path = render / "ansible" / "group_vars" / f"stack_{name.replace('-', '_')}.yml"
    variables = yaml.safe_load(path.read_text())
    assert variables["fabric_manager_version"] == variables["nvidia_driver_version"]

    def pins(var: str) -> dict[str, str]:
        return dict(pin.split("=", 1) for pin in variables[var])

    return Stack(
        variables["nvidia_driver_version"],
        pins("nvidia_driver_deb_packages"),
        pins("fabric_manager_deb_packages"),
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, lab_host: None) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lp2")
    with running_lab(root, N, lab_spec(N, nodes=2, faults=""), PLAYBOOK_ENV) as lab:
        yield lab


@pytest.fixture(scope="module")
def other_render(lab: Lab) -> Path:
    """A render of the spec copy whose rack is on stack h100-580 (same nodes and addresses)."""
    return lab.render_copy("580", lab_spec(N, nodes=2, stack="h100-580", faults=""))


# --------------------------------------------------------------------------- in the lab


def _installed(lab: Lab, node: str) -> dict[str, str]:
    """name -> version of every NVIDIA driver or fabric manager package dpkg has installed."""
    reply = lab.ssh(node, "dpkg-query -W -f '${Package}=${Version}=${db:Status-Abbrev}\\n'")
    assert reply.returncode == 0, reply.stderr
    found = {}
    for line in reply.stdout.splitlines():
        name, version, status = line.split("=", 2)
        wanted = re.match(r"^(nvidia-|libnvidia-nscq|cuda-drivers)", name)
        if wanted and status[:2] in ("ii", "hi"):
            found[name] = version
    return found


def _holds(lab: Lab, node: str) -> set[str]:
    reply = lab.ssh(node, "apt-mark showhold")
    assert reply.returncode == 0, reply.stderr
    return set(reply.stdout.split())


def _boots(lab: Lab, node: str) -> int:
    done = lab.cli("lab", "status", "-o", "json", timeout=60)
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["nodes"][node]["boots"])


def _check_node(lab: Lab, node: str, stack: Stack) -> None:
    """The node runs exactly the stack's driver and fabric manager, pinned, held, in
    service, and the tools report the version."""
    assert _installed(lab, node) == stack.pins, node
    assert _holds(lab, node) == set(stack.pins), node
    for name, version in stack.pins.items():
        policy = lab.ssh(node, f"apt-cache policy {name}").stdout
        assert re.search(rf"^ \*\*\* {re.escape(version)} 1001$", policy, re.M), policy
    preferences = lab.ssh(node, "cat /etc/apt/preferences.d/provisioner-*").stdout
    for name, version in stack.pins.items():
        assert f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n" in preferences
    tools = lab.ssh(
        node,
        "nvidia-smi --query-gpu=driver_version --format=csv,noheader | sort | uniq -c;"
        " nv-fabricmanager --version;"
        " systemctl is-enabled nvidia-fabricmanager nvidia-persistenced;"
        " systemctl is-active nvidia-fabricmanager nvidia-persistenced",
    )
    assert tools.returncode == 0, tools.stdout + tools.stderr
    lines = tools.stdout.splitlines()
    assert lines[0].split() == ["8", stack.version], tools.stdout  # 8 GPUs, all at the version
    assert lines[1] == f"Fabric Manager version is : {stack.version}", tools.stdout
    assert lines[2:] == ["enabled", "enabled", "active", "active"], tools.stdout
    read = lab.ssh(node, "python3 -c 'import json, sys; print(json.dumps([json.load(open(p))"
                         " for p in sys.argv[1:]]))' /etc/ansible/facts.d/nvidia_driver.fact"
                         " /etc/ansible/facts.d/fabric_manager.fact")  # fmt: skip
    assert read.returncode == 0, read.stderr
    facts = json.loads(read.stdout)
    assert facts[0]["version"] == facts[1]["version"] == stack.version
    assert dict(pin.split("=", 1) for pin in facts[0]["packages"]) == stack.driver
    assert dict(pin.split("=", 1) for pin in facts[1]["packages"]) == stack.fabric_manager
    # the running services are the installed builds, not the ones of the stack before (each
    # lab daemon notes the version it started as)
    started = lab.ssh(node, "cat /run/provisioner-lab-daemons/nv-fabricmanager"
                            " /run/provisioner-lab-daemons/nvidia-persistenced").stdout  # fmt: skip
    assert started.split() == [stack.version, stack.version], started


@pytest.fixture(scope="module")
def first_run(lab: Lab) -> Play:
    play = _play(lab)
    print(play.output)  # shown with pytest -s
    return play


def test_the_570_stack_is_installed_pinned_held_and_running(lab: Lab, first_run: Play) -> None:
    assert first_run.rc == 0, first_run.output
    stack = _stack(lab.render, "h100-570")
    assert stack.driver == {
        "nvidia-open-570": "570.133.20-0ubuntu1",
        "nvidia-driver-570-open": "570.133.20-0ubuntu1",
        "nvidia-utils-570": "570.133.20-0ubuntu1",
    }
    assert stack.fabric_manager == {
        "nvidia-fabricmanager-570": "570.133.20-1",
        "libnvidia-nscq-570": "570.133.20-1",
    }
    for node in NODES:
        _check_node(lab, node, stack)
    assert "nvidia-smi: driver 570.133.20 on 8 GPUs" in first_run.output
    assert "fabric manager 570.133.20 running" in first_run.output


def test_the_repositories_are_signed_sources_of_their_own_keys(lab: Lab, first_run: Play) -> None:
    reply = lab.ssh(STAYS, "cat /etc/apt/sources.list.d/nvidia-cuda.sources;"
                           " head -1 /etc/apt/keyrings/nvidia-cuda.asc; echo =====;"
                           " ls /etc/apt/sources.list.d; ls /etc/apt/keyrings")  # fmt: skip
    assert reply.returncode == 0, reply.stderr
    source, listing = reply.stdout.split("=====\n")
    assert "URIs: http://10.212.0.1:18222/cuda/ubuntu2404/x86_64/\nSuites: /\n" in source
    assert "Signed-By: /etc/apt/keyrings/nvidia-cuda.asc\n" in source
    assert source.endswith("-----BEGIN PGP PUBLIC KEY BLOCK-----\n"), source
    assert listing.split() == [
        "nvidia-container-toolkit.sources", "nvidia-cuda.sources",
        "nvidia-container-toolkit.asc", "nvidia-cuda.asc",
    ]  # fmt: skip


def test_apt_cannot_move_the_held_driver(lab: Lab, first_run: Play) -> None:
    # R580's utils replace R570's (one owns nvidia-smi): apt would have to remove held packages
    moved = lab.ssh(STAYS, "apt-get -s -y install nvidia-utils-580")
    assert moved.returncode != 0, moved.stdout
    assert "held packages" in moved.stdout + moved.stderr, moved.stdout + moved.stderr
    upgrade = lab.ssh(STAYS, "apt-get -s -y dist-upgrade")
    assert "0 upgraded, 0 newly installed, 0 to remove" in upgrade.stdout, upgrade.stdout


@pytest.fixture(scope="module")
def moved(lab: Lab, first_run: Play, other_render: Path) -> Play:
    play = _play(lab, "--limit", MOVES, render=other_render)
    print(play.output)
    return play


def test_a_node_moved_to_the_580_stack_moves_driver_and_fabric_manager_together(
    lab: Lab, moved: Play, other_render: Path
) -> None:
    assert moved.rc == 0, moved.output
    assert set(moved.recap()) == {MOVES}, moved.output
    new = _stack(other_render, "h100-580")
    assert new.version == "580.65.06"
    assert set(new.fabric_manager) == {"nvidia-fabricmanager", "libnvidia-nscq"}  # R580 names
    _check_node(lab, MOVES, new)  # and nothing of R570 is left installed or held
    _check_node(lab, STAYS, _stack(lab.render, "h100-570"))  # the other node is untouched


@pytest.fixture(scope="module")
def moved_back(lab: Lab, moved: Play) -> tuple[Play, int, int]:
    before = _boots(lab, MOVES)
    play = _play(lab, "--limit", MOVES, extra=REBOOT_VARS)
    print(play.output)
    return play, before, _boots(lab, MOVES)


def test_moving_it_back_downgrades_both_and_reboots_once_when_allowed(
    lab: Lab, moved_back: tuple[Play, int, int]
) -> None:
    play, boots_before, boots_after = moved_back
    assert play.rc == 0, play.output
    assert "RUNNING HANDLER [nvidia_driver : Reboot for the NVIDIA driver]" in play.output
    assert boots_after == boots_before + 1
    _check_node(lab, MOVES, _stack(lab.render, "h100-570"))


def test_a_last_run_over_both_nodes_changes_nothing_and_reboots_nothing(
    lab: Lab, moved_back: tuple[Play, int, int]
) -> None:
    """The node never moved gets its second run here, the other its run after a move and a
    move back: one run shows both idempotent (a run straight after the first install, as
    the configure tests do over all roles, would cost a minute more for nothing new)."""
    boots = _boots(lab, MOVES)
    _play(lab, extra=REBOOT_VARS).assert_changed_nothing(NODES)
    assert _boots(lab, MOVES) == boots


def test_the_switches_drop_the_toolkit_repository_and_the_fabric_manager(
    lab: Lab, moved_back: tuple[Play, int, int]
) -> None:
    """A stack without a container toolkit keeps no such repository; a node that wants no
    fabric manager keeps none (stopped, unheld, removed); the one-line source format replaces
    the deb822 one. The driver stays as it is."""
    switches = {
        "nvidia_repo_container_toolkit_enabled": False,
        "nvidia_repo_apt_format": "one_line",
        "fabric_manager_enabled": False,
    }
    play = _play(lab, extra=switches)
    assert play.rc == 0, play.output
    stack = _stack(lab.render, "h100-570")
    for node in NODES:
        assert _installed(lab, node) == stack.driver, node
        assert _holds(lab, node) == set(stack.driver), node
        files = lab.ssh(node, "ls /etc/apt/sources.list.d /etc/apt/keyrings /etc/apt/preferences.d"
                              " /etc/ansible/facts.d; systemctl is-active nvidia-fabricmanager;"
                              " cat /etc/apt/sources.list.d/nvidia-cuda.list")  # fmt: skip
        assert files.stdout.split("\n\n")[0].split() == [
            "/etc/ansible/facts.d:", "nvidia_driver.fact"
        ], files.stdout  # fmt: skip
        listed = files.stdout.split()
        assert "nvidia-cuda.list" in listed and "nvidia-cuda.asc" in listed, files.stdout
        assert not [name for name in listed if "container-toolkit" in name], files.stdout
        assert "nvidia-cuda.sources" not in listed, files.stdout
        assert "provisioner-fabric-manager" not in listed, files.stdout
        assert "\ninactive\n" in files.stdout, files.stdout
        assert (
            "deb [signed-by=/etc/apt/keyrings/nvidia-cuda.asc]"
            " http://10.212.0.1:18222/cuda/ubuntu2404/x86_64/ /\n"
        ) in files.stdout
    _play(lab, extra=switches).assert_changed_nothing(NODES)
