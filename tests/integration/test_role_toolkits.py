"""The cuda_toolkit, nvidia_container_toolkit and dcgm roles, run for real by ansible-playbook
against a lab rack of two nodes, then upgraded to the lab's other stack.

``lab up`` brings up site ``lp3`` (its own bridge, subnet and ports, so it never touches a lab
a developer has up) with the rack on stack h100-570. The test playbook
(``tests/data/playbooks/toolkits.yml``) sets up the lab's two repositories, then runs the three
roles against the inventory the lab rendered: gpu-lab-01 gets containerd installed (the lab
serves a stand-in for Ubuntu's package) and restarted; gpu-lab-02 has no runtime, installs
none and gets a Docker configuration only. Then a copy of
the spec whose rack is on h100-580 is rendered. The same play in check mode against that
render must report changes and make none; run for real it must move CUDA 12.8 -> 13.0, the
container toolkit 1.17.5 -> 1.17.8 and DCGM 4.1.1 -> 4.2.3, keep them pinned and held, and
change nothing on a further run (a run on h100-570 changing nothing is the configure tests').

The lab needs root (the ``lab_host`` fixture skips otherwise); the syntax and lint checks of
the roles are in test_playbooks_static.py, their RHEL tasks' check-mode run in
test_roles_redhat_check.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA
from tests.integration.labrig import PLAYBOOK_ENV, Lab, Play, lab_spec, running_lab

pytestmark = pytest.mark.integration

N = 3  # lab lp3
CONTAINERD, DOCKER = "gpu-lab-01", "gpu-lab-02"  # by the runtime each gets
NODES = (CONTAINERD, DOCKER)
PLAYBOOK = DATA / "playbooks" / "toolkits.yml"
ROLE_NAMES = ("cuda_toolkit", "nvidia_container_toolkit", "dcgm")
PIN_VARS = ("cuda_toolkit_deb_packages", "nvidia_container_toolkit_deb_packages",
            "dcgm_deb_packages")  # fmt: skip
CONTAINERD_NVIDIA = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]'


def _play(lab: Lab, *args: str, render: Path | None = None) -> Play:
    """The test playbook against ``render``'s inventory (default: the one ``lab up`` made)."""
    inventory = (render or lab.render) / "ansible" / "inventory.yml"
    return lab.play(PLAYBOOK, "-i", str(inventory), *args)


def _pins(render: Path, stack: str) -> dict[str, str]:
    """name -> version of every package the three roles install for ``stack``, from the
    render's group variables."""
    path = render / "ansible" / "group_vars" / f"stack_{stack.replace('-', '_')}.yml"
    variables = yaml.safe_load(path.read_text())
    return dict(pin.split("=", 1) for var in PIN_VARS for pin in variables[var])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, lab_host: None) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lp3")
    with running_lab(root, N, lab_spec(N, nodes=2, faults=""), PLAYBOOK_ENV) as lab:
        yield lab


@pytest.fixture(scope="module")
def upgrade_render(lab: Lab) -> Path:
    """A render of the spec copy whose rack is on stack h100-580 (same nodes and addresses)."""
    return lab.render_copy("580", lab_spec(N, nodes=2, stack="h100-580", faults=""))


# --------------------------------------------------------------------------- in the lab


def _installed(lab: Lab, node: str, names: list[str]) -> dict[str, str]:
    """name -> version of those of ``names`` that dpkg has installed on ``node``."""
    reply = lab.ssh(node, "dpkg-query -W -f '${Package}=${Version}=${Status}\\n' "
                          + " ".join(names) + " 2>/dev/null; true")  # fmt: skip
    found = {}
    for line in reply.stdout.splitlines():
        name, version, status = line.split("=", 2)
        if status == "install ok installed" or status == "hold ok installed":
            found[name] = version
    return found


def _holds(lab: Lab, node: str) -> set[str]:
    reply = lab.ssh(node, "apt-mark showhold")
    assert reply.returncode == 0, reply.stderr
    return set(reply.stdout.split())


def _check_stack(lab: Lab, pins: dict[str, str], cuda: str, toolkit: str, dcgm: str) -> None:
    """Every node has exactly the stack's three components installed, pinned, held, on the
    PATH and the linker path, with the runtime configured and DCGM running."""
    suffix = cuda.replace(".", "-")
    for node in NODES:
        assert _installed(lab, node, sorted(pins)) == pins, node
        assert _holds(lab, node) == set(pins), node
        for name, version in pins.items():
            policy = lab.ssh(node, f"apt-cache policy {name}").stdout
            assert re.search(rf"^ \*\*\* {re.escape(version)} 1001$", policy, re.M), policy
        login = "bash -lc 'command -v nvcc; nvcc --version; readlink -f /usr/local/cuda'"
        shell = lab.ssh(node, login)
        assert shell.returncode == 0, shell.stderr
        lines = shell.stdout.splitlines()
        assert lines[0] == f"/usr/local/cuda-{cuda}/bin/nvcc", shell.stdout
        assert f"release {cuda}," in shell.stdout
        assert lines[-1] == f"/usr/local/cuda-{cuda}", shell.stdout
        confs = lab.ssh(node, "grep -l cuda_toolkit /etc/ld.so.conf.d/*.conf; "
                              f"cat /etc/ld.so.conf.d/cuda-{suffix}.conf").stdout  # fmt: skip
        assert confs.splitlines()[0] == f"/etc/ld.so.conf.d/cuda-{suffix}.conf", confs
        assert f"\n/usr/local/cuda-{cuda}/lib64\n" in confs, confs  # the only CUDA linker file
        tools = lab.ssh(
            node,
            "nvidia-ctk --version; dcgmi --version; dcgmi discovery -l;"
            " systemctl is-enabled nvidia-dcgm; systemctl is-active nvidia-dcgm",
        )
        assert tools.returncode == 0, tools.stdout + tools.stderr
        assert f"NVIDIA Container Toolkit CLI version {toolkit}" in tools.stdout
        assert f"dcgmi  version: {dcgm}" in tools.stdout
        assert "\n8 GPUs found.\n" in tools.stdout
        assert tools.stdout.endswith("enabled\nactive\n"), tools.stdout


def test_disabled_roles_do_nothing(lab: Lab) -> None:
    off = json.dumps({f"{role}_enabled": False for role in ROLE_NAMES})
    play = _play(lab, "-e", off)
    assert play.rc == 0, play.output
    for node in NODES:
        names = ["cuda-toolkit-12-8", "nvidia-container-toolkit", "containerd",
                 "datacenter-gpu-manager-4-core"]  # fmt: skip
        assert _installed(lab, node, names) == {}, node
        left = lab.ssh(node, "ls /etc/profile.d/cuda.sh /etc/apt/preferences.d/provisioner-*"
                             " /etc/containerd /etc/docker /usr/local/cuda 2>&1")  # fmt: skip
        assert left.stdout.count("No such file or directory") == 5, left.stdout


@pytest.fixture(scope="module")
def first_run(lab: Lab) -> Play:
    play = _play(lab)
    print(play.output)  # shown with pytest -s
    return play


def test_the_570_stack_is_installed_pinned_and_held(lab: Lab, first_run: Play) -> None:
    assert first_run.rc == 0, first_run.output
    pins = _pins(lab.render, "h100-570")
    assert len(pins) == 8 and pins["cuda-toolkit-12-8"] == "12.8.0-1"
    assert pins["nvidia-container-toolkit"] == "1.17.5-1"
    assert pins["datacenter-gpu-manager-4-core"] == "1:4.1.1-1"
    _check_stack(lab, pins, cuda="12.8", toolkit="1.17.5", dcgm="4.1.1")


def test_containerd_is_installed_configured_and_restarted(lab: Lab, first_run: Play) -> None:
    reply = lab.ssh(CONTAINERD, "systemctl is-enabled containerd; systemctl is-active containerd;"
                                " cat /etc/containerd/config.toml")  # fmt: skip
    assert reply.returncode == 0, reply.stdout + reply.stderr
    assert reply.stdout.startswith("enabled\nactive\n")
    assert CONTAINERD_NVIDIA in reply.stdout
    assert 'BinaryName = "/usr/bin/nvidia-container-runtime"' in reply.stdout
    # started by the role, then restarted by the handler once the nvidia runtime was added
    journal = lab.ssh(CONTAINERD, "journalctl -u containerd -o cat --no-pager").stdout
    assert journal.count("no containers run; idling") == 2, journal


def test_a_node_without_a_runtime_gets_its_configuration_only(lab: Lab, first_run: Play) -> None:
    reply = lab.ssh(DOCKER, "cat /etc/docker/daemon.json")
    assert reply.returncode == 0, reply.stderr
    runtime = json.loads(reply.stdout)["runtimes"]["nvidia"]
    assert runtime["path"].endswith("nvidia-container-runtime")
    assert _installed(lab, DOCKER, ["containerd", "docker.io"]) == {}
    units = lab.ssh(DOCKER, "systemctl list-unit-files docker.service containerd.service")
    assert "0 unit files listed." in units.stdout, units.stdout
    assert lab.ssh(DOCKER, "test -e /etc/containerd").returncode != 0


def test_a_check_mode_upgrade_reports_changes_and_changes_nothing(
    lab: Lab, first_run: Play, upgrade_render: Path
) -> None:
    check = _play(lab, "--check", render=upgrade_render)
    assert check.rc == 0, check.output
    recap = check.recap()
    assert set(recap) == set(NODES), check.output
    assert all(counts["changed"] > 0 for counts in recap.values()), check.output
    pins = _pins(lab.render, "h100-570")
    for node in NODES:
        assert _installed(lab, node, sorted(pins)) == pins, node
        assert _holds(lab, node) == set(pins), node


@pytest.fixture(scope="module")
def upgrade(lab: Lab, first_run: Play, upgrade_render: Path) -> Play:
    # gpu-lab-02's /usr/local/cuda is managed by update-alternatives, as NVIDIA's packages
    # leave it on a real node: the upgrade must choose the new release there, keeping the link.
    alternatives = lab.ssh(
        DOCKER,
        "rm /usr/local/cuda && update-alternatives --install /usr/local/cuda cuda"
        " /usr/local/cuda-12.8 128 >/dev/null && readlink /usr/local/cuda",
    )
    assert alternatives.stdout == "/etc/alternatives/cuda\n", alternatives.stderr
    play = _play(lab, render=upgrade_render)
    print(play.output)
    return play


def test_the_upgrade_moves_every_component_to_the_580_stack(
    lab: Lab, upgrade: Play, upgrade_render: Path
) -> None:
    assert upgrade.rc == 0, upgrade.output
    pins = _pins(upgrade_render, "h100-580")
    assert len(pins) == 8 and pins["cuda-toolkit-13-0"] == "13.0.0-1"
    assert pins["nvidia-container-toolkit"] == "1.17.8-1"
    assert pins["datacenter-gpu-manager-4-core"] == "1:4.2.3-1"
    _check_stack(lab, pins, cuda="13.0", toolkit="1.17.8", dcgm="4.2.3")
    for node in NODES:  # the 12.8 toolkit is gone, not just unheld
        assert _installed(lab, node, ["cuda-toolkit-12-8", "cuda-nvcc-12-8"]) == {}, node
    link = lab.ssh(DOCKER, "readlink /usr/local/cuda; update-alternatives --query cuda")
    assert link.stdout.startswith("/etc/alternatives/cuda\n"), link.stdout
    assert "\nValue: /usr/local/cuda-13.0\n" in link.stdout, link.stdout


def test_a_run_after_the_upgrade_changes_nothing(
    lab: Lab, upgrade: Play, upgrade_render: Path
) -> None:
    """Idempotence on the stack the nodes moved to; on the stack they were installed with, the
    configure tests' second run over every role shows it."""
    again = _play(lab, render=upgrade_render)
    again.assert_changed_nothing(NODES)
