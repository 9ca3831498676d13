"""The preflight role, run for real by ansible-playbook against a lab rack of two nodes.

``lab up`` brings up site ``lp1`` (its own bridge, subnet and ports, so it never touches a lab
a developer has up): gpu-lab-01 is healthy, gpu-lab-02 carries the ``secure_boot`` fault (its
firmware has Secure Boot on; the nodes' lab ``mokutil`` reports it). The test playbook
(``tests/data/playbooks/preflight.yml``) sets up the lab's CUDA repository, which serves the
lab build of the running kernel's headers, then runs the role against the inventory the lab
rendered. The lab needs root (the ``lab_host`` fixture skips otherwise); the role's syntax
and lint checks are in test_playbooks_static.py, its RHEL tasks' check-mode run in
test_roles_redhat_check.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import DATA
from tests.integration.labrig import PLAYBOOK_ENV, Lab, Play, lab_spec, running_lab

pytestmark = pytest.mark.integration

N = 1  # lab lp1
HEALTHY, SECURE_BOOT = "gpu-lab-01", "gpu-lab-02"
PLAYBOOK = DATA / "playbooks" / "preflight.yml"
REMEDY = "mokutil --import /var/lib/dkms/mok.pub"


def _play(lab: Lab, *args: str) -> Play:
    """The test playbook against the inventory ``lab up`` rendered."""
    inventory = lab.render / "ansible" / "inventory.yml"
    return lab.play(PLAYBOOK, "-i", str(inventory), *args, timeout=300)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, lab_host: None) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lp1")
    faults = f"    {SECURE_BOOT}:\n      - {{kind: secure_boot}}\n"
    with running_lab(root, N, lab_spec(N, nodes=2, faults=faults), PLAYBOOK_ENV) as lab:
        yield lab


@pytest.fixture(scope="module")
def first_run(lab: Lab) -> Play:
    play = _play(lab)
    print(play.output)  # shown with pytest -s
    return play


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
    second = _play(lab, "--limit", HEALTHY)
    assert second.rc == 0, second.output
    assert second.recap()[HEALTHY]["changed"] == 0, second.output


def test_without_mokutil_a_node_with_no_efi_is_taken_as_legacy_bios(
    lab: Lab, first_run: Play
) -> None:
    done = _play(lab, "--limit", SECURE_BOOT, "-e", "preflight_mokutil_path=/usr/bin/no-mokutil")
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
    toolkit_repo = "http://10.211.0.1:18212/libnvidia-container/deb/amd64/"
    done = _play(
        lab,
        "--limit", SECURE_BOOT, "-e", "preflight_signed_modules=true",
        "-e", f"nvidia_repo_cuda_url={toolkit_repo}",
    )  # fmt: skip
    assert done.rc != 0
    assert done.recap()[SECURE_BOOT]["failed"] == 1, done.output
    assert re.search(r"linux-headers-\S+ cannot be installed on gpu-lab-02", done.output)
    assert "DKMS build needs the headers of the running kernel" in done.output
    lab.ssh(SECURE_BOOT, "rm -f /etc/apt/sources.list.d/provisioner-lab-cuda.list")


def test_signed_modules_let_the_secure_boot_node_through(lab: Lab, first_run: Play) -> None:
    done = _play(lab, "--limit", SECURE_BOOT, "-e", "preflight_signed_modules=true")
    assert done.rc == 0, done.output
    assert "Secure Boot enabled (mokutil --sb-state says SecureBoot enabled)" in done.output


def test_too_little_free_disk_stops_the_node_with_a_clear_message(
    lab: Lab, first_run: Play
) -> None:
    done = _play(lab, "--limit", HEALTHY, "-e", "preflight_min_free_gib=1000000")
    assert done.rc != 0
    assert done.recap()[HEALTHY]["failed"] == 1, done.output
    assert re.search(r"/ on gpu-lab-01 has [\d.]+ GiB free, and preflight needs 1000000 GiB",
                     done.output), done.output  # fmt: skip
