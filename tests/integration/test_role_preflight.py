"""The preflight role, run for real by ansible-playbook against a lab rack of two nodes.

``lab up`` brings up site ``lp1`` (its own bridge, subnet and ports, so it never touches a lab
a developer has up): gpu-lab-01 is healthy, gpu-lab-02 carries the ``secure_boot`` fault (its
firmware has Secure Boot on; the nodes' lab ``mokutil`` reports it). The test playbook
(``tests/data/playbooks/preflight.yml``) sets up the lab's CUDA repository, which serves the
lab build of the running kernel's headers, then runs the role against the inventory the lab
rendered. The lab tests need root; the syntax checks run anywhere. No RHEL host exists here, so
the RHEL tasks are syntax-checked only (imported statically, so that their text is parsed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DATA, LAB_SPEC, REPO

pytestmark = pytest.mark.integration

SITE = "lp1"
PASSWORD = "lp1-test-bmc-pw"
HEALTHY, SECURE_BOOT = "gpu-lab-01", "gpu-lab-02"
IPS = {HEALTHY: "10.211.0.11", SECURE_BOOT: "10.211.0.12"}
PLAYBOOK = DATA / "playbooks" / "preflight.yml"
ROLES = REPO / "playbooks" / "roles"
ANSIBLE_PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"
REMEDY = "mokutil --import /var/lib/dkms/mok.pub"
_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


@dataclass
class Lab:
    root: Path
    spec: Path
    key: Path
    env: dict[str, str]

    @property
    def inventory(self) -> Path:
        return self.root / "state" / SITE / "render" / "ansible" / "inventory.yml"

    def ssh(self, node: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        options = ["BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
                   "ConnectTimeout=5", "LogLevel=ERROR"]  # fmt: skip
        options = [f"-o{option}" for option in options]
        return subprocess.run(
            ["ssh", "-i", str(self.key), *options, f"root@{IPS[node]}", command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def play(self, *args: str, timeout: float = 300) -> Play:
        done = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), "--private-key", str(self.key),
             *args, str(PLAYBOOK)],
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
            cwd=self.root,
        )  # fmt: skip
        return Play(done.returncode, done.stdout + done.stderr)


@dataclass
class Play:
    rc: int
    output: str

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


def _spec_text() -> str:
    """The embedded lab's spec with this test's site, addresses and ports; its first two
    nodes only, the second with Secure Boot on."""
    text = LAB_SPEC.read_text()
    for old, new in (
        ("site: lab\n", f"site: {SITE}\n"),
        ("10.200.0.", "10.211.0."),
        ("prov-lab0", "prov-lp1"),
        ("127.0.0.1:900", "127.0.0.1:1921"),
        ("127.0.0.1:9443", "127.0.0.1:19215"),
        (":8080/", ":18211/"),
        (":8081/", ":18212/"),
        ("    gpu-lab-04:\n      - {kind: xid_79, gpu: 5}\n",
         f"    {SECURE_BOOT}:\n      - {{kind: secure_boot}}\n"),
    ):  # fmt: skip
        assert old in text, old
        text = text.replace(old, new)
    head, tail = text.split("      - {name: gpu-lab-03,", 1)
    return head + "\n" + tail.split("\n\n", 1)[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the lab needs root and debootstrap")
    root = tmp_path_factory.mktemp("lp1")
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
def first_run(lab: Lab) -> Play:
    play = lab.play()
    print(play.output)  # shown with pytest -s
    return play


# --------------------------------------------------------------------------- syntax


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
def test_each_os_familys_tasks_pass_the_syntax_check(family: str, tmp_path: Path) -> None:
    playbook = tmp_path / f"{family}.yml"
    playbook.write_text(
        "- name: Syntax of the preflight role's tasks for one OS family\n"
        "  hosts: all\n  gather_facts: false\n  tasks:\n"
        f"    - name: Import the {family} tasks\n"
        "      ansible.builtin.import_role:\n"
        f"        name: preflight\n        tasks_from: {family}\n"
    )
    done = _syntax_check(playbook)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_role_passes_ansible_lint_production_and_ignores_no_error() -> None:
    for path in (ROLES / "preflight").rglob("*.yml"):
        assert "ignore_errors" not in path.read_text(), path
    lint = REPO / ".venv" / "bin" / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed in .venv")
    env = {**os.environ, "PATH": f"{lint.parent}:{os.environ['PATH']}", "NO_COLOR": "1"}
    done = subprocess.run(
        [str(lint), "playbooks/roles/preflight"],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr


# --------------------------------------------------------------------------- in the lab


def test_the_lab_gives_the_faulty_node_secure_boot(lab: Lab) -> None:
    for node, state in ((HEALTHY, "disabled"), (SECURE_BOOT, "enabled")):
        reply = lab.ssh(node, "cat /run/provisioner-lab/secureboot; mokutil --sb-state")
        assert reply.returncode == 0, reply.stderr
        assert reply.stdout.splitlines() == [state, f"SecureBoot {state}"]
    gpus = lab.ssh(SECURE_BOOT, "cat /run/provisioner-lab/gpus.json").stdout
    assert '"secure_boot": true' in gpus and '"kind": "secure_boot"' not in gpus
    other = lab.ssh(HEALTHY, "mokutil --import x.der")
    assert other.returncode == 1 and "lab stand-in" in other.stderr


def test_secure_boot_stops_only_its_node_with_the_remedy(first_run: Play) -> None:
    recap = first_run.recap()
    assert first_run.rc != 0, first_run.output
    assert recap[SECURE_BOOT]["failed"] == 1, first_run.output
    assert recap[HEALTHY]["failed"] == 0 and recap[HEALTHY]["unreachable"] == 0, first_run.output
    assert "Secure Boot is enabled on gpu-lab-02" in first_run.output
    assert REMEDY in first_run.output and "turn Secure Boot off" in first_run.output
    assert "preflight_signed_modules" in first_run.output


def test_the_healthy_node_gets_the_running_kernels_headers(lab: Lab, first_run: Play) -> None:
    reply = lab.ssh(
        HEALTHY,
        "dpkg-query -W -f '${Status}\\n' linux-headers-$(uname -r);"
        " cat /lib/modules/$(uname -r)/build/LAB-BUILD",
    )
    assert reply.returncode == 0, reply.stderr + first_run.output
    assert reply.stdout.startswith("install ok installed\nLAB BUILD - not a kernel package.")
    untouched = lab.ssh(SECURE_BOOT, "dpkg-query -W linux-headers-$(uname -r)")
    assert untouched.returncode != 0  # the Secure Boot check came before any change


def test_the_healthy_node_blacklists_nouveau(lab: Lab, first_run: Play) -> None:
    reply = lab.ssh(HEALTHY, "cat /etc/modprobe.d/blacklist-nouveau.conf")
    assert reply.returncode == 0, reply.stderr
    lines = reply.stdout.splitlines()
    assert "blacklist nouveau" in lines and "options nouveau modeset=0" in lines
    # the lab's nodes are containers with no initramfs: the handler says so
    assert "/usr/sbin/update-initramfs is not installed on gpu-lab-01" in first_run.output


def test_the_healthy_node_keeps_nvidia_packages_from_unattended_upgrades(
    lab: Lab, first_run: Play
) -> None:
    reply = lab.ssh(HEALTHY, "apt-config dump Unattended-Upgrade::Package-Blacklist")
    assert reply.returncode == 0, reply.stderr
    patterns = re.findall(r'^Unattended-Upgrade::Package-Blacklist:: "(.*)";$', reply.stdout, re.M)
    names = ["nvidia-driver-570-open", "libnvidia-nscq-570", "cuda-toolkit-12-8",
             "datacenter-gpu-manager-4-core", "nvidia-fabricmanager-570"]  # fmt: skip
    for name in names:  # unattended-upgrades matches with re.match
        assert any(re.match(p, name) for p in patterns), (name, patterns)
    assert not any(re.match(p, "linux-headers-6.1.0-1-amd64") for p in patterns)


def test_a_second_run_changes_nothing(lab: Lab, first_run: Play) -> None:
    second = lab.play("--limit", HEALTHY)
    assert second.rc == 0, second.output
    assert second.recap()[HEALTHY]["changed"] == 0, second.output


def test_without_mokutil_a_node_with_no_efi_is_taken_as_legacy_bios(
    lab: Lab, first_run: Play
) -> None:
    done = lab.play("--limit", SECURE_BOOT, "-e", "preflight_mokutil_path=/usr/bin/no-mokutil")
    assert done.rc == 0, done.output  # the lab's nodes have no /sys/firmware/efi
    assert "Secure Boot disabled (no /sys/firmware/efi, a legacy BIOS boot)" in done.output


def test_headers_missing_from_the_repositories_stop_the_node_clearly(
    lab: Lab, first_run: Play
) -> None:
    """A node whose apt sources carry no headers for its kernel (here: only the lab's
    container-toolkit repository)."""
    reset = lab.ssh(
        SECURE_BOOT,
        "apt-get remove -y -q linux-headers-$(uname -r) >/dev/null;"
        " rm -f /etc/apt/sources.list.d/provisioner-lab-cuda.list",
        timeout=120,
    )
    assert reset.returncode == 0, reset.stderr
    toolkit_repo = "http://10.211.0.1:18212/libnvidia-container/deb/x86_64/"
    done = lab.play(
        "--limit", SECURE_BOOT, "-e", "preflight_signed_modules=true",
        "-e", f"nvidia_repo_cuda_url={toolkit_repo}",
    )  # fmt: skip
    assert done.rc != 0
    assert done.recap()[SECURE_BOOT]["failed"] == 1, done.output
    assert re.search(r"linux-headers-\S+ cannot be installed on gpu-lab-02", done.output)
    assert "DKMS build needs the headers of the running kernel" in done.output
    lab.ssh(SECURE_BOOT, "rm -f /etc/apt/sources.list.d/provisioner-lab-cuda.list")


def test_signed_modules_let_the_secure_boot_node_through(lab: Lab, first_run: Play) -> None:
    done = lab.play("--limit", SECURE_BOOT, "-e", "preflight_signed_modules=true")
    assert done.rc == 0, done.output
    assert "Secure Boot enabled (mokutil --sb-state says SecureBoot enabled)" in done.output


def test_too_little_free_disk_stops_the_node_with_a_clear_message(
    lab: Lab, first_run: Play
) -> None:
    done = lab.play("--limit", HEALTHY, "-e", "preflight_min_free_gib=1000000")
    assert done.rc != 0
    assert done.recap()[HEALTHY]["failed"] == 1, done.output
    assert re.search(r"/ on gpu-lab-01 has [\d.]+ GiB free, and preflight needs 1000000 GiB",
                     done.output), done.output  # fmt: skip
