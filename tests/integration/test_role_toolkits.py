"""The cuda_toolkit, nvidia_container_toolkit and dcgm roles, run for real by ansible-playbook
against a lab rack of two nodes, then upgraded to the lab's other stack.

``lab up`` brings up site ``lp3`` (its own bridge, subnet and ports, so it never touches a lab
a developer has up) with the rack on stack h100-570. The test playbook
(``tests/data/playbooks/toolkits.yml``) sets up the lab's two repositories, then runs the three
roles against the inventory the lab rendered: gpu-lab-01 gets containerd installed (the lab
serves a stand-in for Ubuntu's package) and restarted; gpu-lab-02 has no runtime, installs
none and gets a Docker configuration only. A second run must change nothing. Then a copy of
the spec whose rack is on h100-580 is rendered. The same play in check mode against that
render must report changes and make none; run for real it must move CUDA 12.8 -> 13.0, the
container toolkit 1.17.5 -> 1.17.8 and DCGM 4.1.1 -> 4.2.3, keep them pinned and held, and
again change nothing on a further run.

The lab tests need root; the syntax and lint checks run anywhere. No RHEL host exists here, so
the RHEL tasks are syntax-checked and linted only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, LAB_SPEC, REPO

pytestmark = pytest.mark.integration

SITE = "lp3"
PASSWORD = "lp3-test-bmc-pw"
CONTAINERD, DOCKER = "gpu-lab-01", "gpu-lab-02"  # by the runtime each gets
NODES = (CONTAINERD, DOCKER)
IPS = {CONTAINERD: "10.213.0.11", DOCKER: "10.213.0.12"}
PLAYBOOK = DATA / "playbooks" / "toolkits.yml"
ROLE_NAMES = ("cuda_toolkit", "nvidia_container_toolkit", "dcgm")
ROLES = REPO / "playbooks" / "roles"
ANSIBLE_PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"
PIN_VARS = ("cuda_toolkit_deb_packages", "nvidia_container_toolkit_deb_packages",
            "dcgm_deb_packages")  # fmt: skip
CONTAINERD_NVIDIA = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]'
_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


@dataclass
class Play:
    rc: int
    output: str
    seconds: float

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counts per host: ok, changed, unreachable, failed."""
        found = {}
        for line in self.output.split("PLAY RECAP", 1)[-1].splitlines():
            match = _RECAP.match(line)
            if match:
                ok, changed, unreachable, failed = map(int, match.groups()[1:])
                found[match.group(1)] = {
                    "ok": ok, "changed": changed, "unreachable": unreachable, "failed": failed
                }  # fmt: skip
        return found


@dataclass
class Lab:
    root: Path
    spec: Path
    key: Path
    env: dict[str, str]

    @property
    def inventory(self) -> Path:
        """The render ``lab up`` made (stack h100-570)."""
        return self.root / "state" / SITE / "render" / "ansible" / "inventory.yml"

    def ssh(self, node: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        options = ["BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
                   "ConnectTimeout=5", "LogLevel=ERROR"]  # fmt: skip
        return subprocess.run(
            ["ssh", "-i", str(self.key), *[f"-o{o}" for o in options], f"root@{IPS[node]}",
             command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def play(self, *args: str, inventory: Path | None = None, timeout: float = 900) -> Play:
        started = time.monotonic()
        done = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(inventory or self.inventory),
             "--private-key", str(self.key), *args, str(PLAYBOOK)],
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
            cwd=self.root,
        )  # fmt: skip
        play = Play(done.returncode, done.stdout + done.stderr, time.monotonic() - started)
        print(f"ansible-playbook {' '.join(args)}: rc {play.rc} in {play.seconds:.1f} s")
        return play


def _spec_text(stack: str = "h100-570") -> str:
    """The embedded lab's spec with this test's site, addresses and ports, its first two
    nodes only (both IPMI), no injected faults, and the rack on ``stack``."""
    text = LAB_SPEC.read_text()
    for old, new in (
        ("site: lab\n", f"site: {SITE}\n"),
        ("10.200.0.", "10.213.0."),
        ("prov-lab0", "prov-lp3"),
        ("127.0.0.1:9001", "127.0.0.1:19231"),
        ("127.0.0.1:9002", "127.0.0.1:19232"),
        ("127.0.0.1:9003", "127.0.0.1:19233"),
        ("127.0.0.1:9443", "127.0.0.1:19235"),
        (":8080/", ":18231/"),
        (":8081/", ":18232/"),
        ("    stack: h100-570\n", f"    stack: {stack}\n"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    head, tail = text.split("      - {name: gpu-lab-03,", 1)
    text = head + "\n" + tail.split("\n\n", 1)[1]
    return text.split("\nlab:\n", 1)[0] + "\n"


def _pins(render: Path, stack: str) -> dict[str, str]:
    """name -> version of every package the three roles install for ``stack``, from the
    render's group variables."""
    path = render / "ansible" / "group_vars" / f"stack_{stack.replace('-', '_')}.yml"
    variables = yaml.safe_load(path.read_text())
    return dict(pin.split("=", 1) for var in PIN_VARS for pin in variables[var])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the lab needs root and debootstrap")
    root = tmp_path_factory.mktemp("lp3")
    spec = root / "fleet.yaml"
    spec.write_text(_spec_text())
    key = root / "lab_ed25519"
    shutil.copy(REPO / "inventories/lab/ssh/lab_ed25519", key)
    key.chmod(0o600)
    env = {
        **os.environ,
        "PROVISIONER_LAB_DIR": str(root / "state"),
        "PROVISIONER_LAB_BMC_PASSWORD": PASSWORD,
        "ANSIBLE_ROLES_PATH": str(ROLES),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_SSH_COMMON_ARGS": "-o UserKnownHostsFile=/dev/null",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(root / "cp"),
        "ANSIBLE_LOCAL_TEMP": str(root / "tmp"),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
    }
    lab = Lab(root, spec, key, env)
    try:
        up = _cli(lab, "lab", "up", str(spec), timeout=1200)
        assert up.returncode == 0, up.stdout + up.stderr
        yield lab
    finally:
        down = _cli(lab, "lab", "down", SITE, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def _cli(lab: Lab, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / ".venv/bin/provisioner"), *args],
        capture_output=True, text=True, env=lab.env, timeout=timeout, check=False, cwd=REPO,
    )  # fmt: skip


@pytest.fixture(scope="module")
def upgrade_render(lab: Lab) -> Path:
    """A render of the spec copy whose rack is on stack h100-580 (same nodes and addresses)."""
    spec = lab.root / "fleet-580.yaml"
    spec.write_text(_spec_text("h100-580"))
    out = lab.root / "render-580"
    done = _cli(lab, "render", str(spec), "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


# --------------------------------------------------------------------------- syntax and lint


def _syntax_check(playbook: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "--syntax-check", "-i", "localhost,", str(playbook)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


def test_the_test_playbook_passes_the_syntax_check() -> None:
    done = _syntax_check(PLAYBOOK)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("family", ["debian", "redhat"])
@pytest.mark.parametrize("role", ROLE_NAMES)
def test_each_os_familys_tasks_pass_the_syntax_check(
    role: str, family: str, tmp_path: Path
) -> None:
    playbook = tmp_path / f"{family}.yml"
    playbook.write_text(
        f"- name: Syntax of the {role} role's tasks for one OS family\n"
        "  hosts: all\n  gather_facts: false\n  tasks:\n"
        f"    - name: Import the {family} tasks\n"
        "      ansible.builtin.import_role:\n"
        f"        name: {role}\n        tasks_from: {family}\n"
    )
    done = _syntax_check(playbook)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_roles_pass_ansible_lint_production_and_ignore_no_error() -> None:
    for role in ROLE_NAMES:
        for path in (ROLES / role).rglob("*.yml"):
            assert "ignore_errors" not in path.read_text(), path
    lint = REPO / ".venv" / "bin" / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed in .venv")
    env = {**os.environ, "PATH": f"{lint.parent}:{os.environ['PATH']}", "NO_COLOR": "1"}
    done = subprocess.run(
        [str(lint), "--profile", "production", "--offline",
         *[f"playbooks/roles/{role}" for role in ROLE_NAMES]],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr


def test_every_role_variable_is_documented_in_its_argument_specs() -> None:
    for role in ROLE_NAMES:
        defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
        specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
        options = specs["argument_specs"]["main"]["options"]
        assert set(defaults) == set(options), role
        assert all(name.startswith(f"{role}_") for name in options), role


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
    play = lab.play("-e", off)
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
    play = lab.play()
    print(play.output)  # shown with pytest -s
    return play


def test_the_570_stack_is_installed_pinned_and_held(lab: Lab, first_run: Play) -> None:
    assert first_run.rc == 0, first_run.output
    pins = _pins(lab.root / "state" / SITE / "render", "h100-570")
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


def test_a_second_run_changes_nothing(lab: Lab, first_run: Play) -> None:
    second = lab.play()
    assert second.rc == 0, second.output
    recap = second.recap()
    assert set(recap) == set(NODES), second.output
    assert all(counts["changed"] == 0 for counts in recap.values()), second.output


def test_a_check_mode_upgrade_reports_changes_and_changes_nothing(
    lab: Lab, first_run: Play, upgrade_render: Path
) -> None:
    check = lab.play("--check", inventory=upgrade_render / "ansible" / "inventory.yml")
    assert check.rc == 0, check.output
    recap = check.recap()
    assert set(recap) == set(NODES), check.output
    assert all(counts["changed"] > 0 for counts in recap.values()), check.output
    pins = _pins(lab.root / "state" / SITE / "render", "h100-570")
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
    play = lab.play(inventory=upgrade_render / "ansible" / "inventory.yml")
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
    again = lab.play(inventory=upgrade_render / "ansible" / "inventory.yml")
    assert again.rc == 0, again.output
    recap = again.recap()
    assert set(recap) == set(NODES), again.output
    assert all(counts["changed"] == 0 for counts in recap.values()), again.output
