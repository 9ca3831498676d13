"""The roles' RHEL-family tasks run for real and in check mode: playbooks/site.yml against a
Rocky Linux 9 look-alike, with fake NVIDIA packages from local dnf repositories.

No RHEL host exists here. The node is :class:`tests.peers.rhelroot.RhelRoot`: this host's root
under an overlay with Rocky 9's identity and its own RPM database, entered through a private
mount namespace and a chroot, so that ``gather_facts`` says Rocky 9 and every role includes its
``tasks/redhat.yml``; Debian's dnf and rpm do the package work. The repositories
(:mod:`tests.peers.rpmrepo`) hold FAKE packages named, versioned and signed like NVIDIA's
(the CUDA repository: driver with epoch 3, fabric manager, CUDA toolkit, DCGM with epoch 1;
the container-toolkit repository, whose metadata is signed) and a stand-in for the site's
BaseOS/AppStream/Docker mirror (kernel-devel of the node's kernel, kernel-headers, dnf's
versionlock plugin, docker-ce, containerd.io), served on loopback.

The tests run in order on one node:

1. a real run brings it to stack a100-550 (R550, proprietary modules, CUDA 12.4, container
   toolkit 1.16.2 with docker, DCGM 4.1.1): keys imported, .repo files written, exactly the
   stack's packages installed and locked;
2. a second real run changes nothing;
3. a check run for stack a100-570 (R570 open, CUDA 12.8, toolkit 1.17.5 with containerd, DCGM
   4.2.3) fails nowhere and reports what it would change: new locks, the driver, fabric
   manager, CUDA, container-toolkit and DCGM installs (dnf resolves each pin in check mode),
   the removal of the R550 flavour, branch and CUDA 12.4 packages, the containerd install;
   the repositories and kernel headers are already right. The node's files and RPM database
   stay exactly as they were;
4. a check run for a driver version that the repository lacks fails, again writing nothing.

What this cannot show: services are enabled but never started (systemctl in a chroot starts
nothing), so the fabric manager, nvidia-smi and ``dcgmi discovery`` checks are off; the
driver's dnf module stream is not exercised (the fake repository has no module metadata, so
``nvidia_driver_rpm_module_stream`` is ""); versionlock.list is written, but Debian's dnf has no
versionlock plugin to obey it; the node's kernel is a variable (``ansible_kernel``), not the
running one; a check run on a node that has never been configured is not tried, since dnf
cannot see packages of repositories that check mode only said it would add.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from provisioner.lab.aptrepo import RepoServer
from tests.conftest import REPO
from tests.peers.rhelroot import RhelRoot
from tests.peers.rpmrepo import FakeRpm, RpmFile, SigningKey, build_rpms, unit, write_repo

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the Rocky root needs root (mounts, chroot)"),
    pytest.mark.skipif(
        any(shutil.which(t) is None for t in ("dnf", "rpmbuild", "createrepo_c", "unshare")),
        reason="needs Debian's dnf, rpm and createrepo-c (scripts/bootstrap --dev)",
    ),
]

NODE = "rocky-node-01"
KERNEL = "5.14.0-503.14.1.el9_5.x86_64"  # the node's kernel, as Rocky 9.5 names it
KEY_FILE = "fake-repo-key.asc"
MISSING_DRIVER = "570.133.99"  # a version the CUDA repository does not have
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
PLAY_TIMEOUT = 600
_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")
_TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(.+?)\] \*+$")
_STATUS = re.compile(r"^(ok|changed|skipping|fatal|failed): \[")

SPEC = """\
version: 1
metadata: {site: rhel-check}
networks:
  provisioning:
    cidr: 10.8.0.0/22
    gateway: 10.8.0.1
    dns: [10.8.0.2]
    dhcp_range: {start: 10.8.3.1, end: 10.8.3.100}
  bmc: {cidr: 10.9.0.0/16, gateway: 10.9.0.1, dhcp: true}
ssh:
  user: root
  authorized_keys:
    - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6GFuN4SG+YD2Cpod/OiC9w02Ut6b3UUarAS03nJ2dT t@test
boot: {url: "http://10.8.0.5:8080/", tftp_root: /srv/tftp}
bmc: {username: root, password: "file:/etc/provisioner/bmc.pass"}
images:
  rocky-9:
    os: rocky
    version: "9.5"
    kernel_url: http://10.8.0.5:8080/rocky/vmlinuz
    initrd_url: http://10.8.0.5:8080/rocky/initrd.img
    repo_url: http://10.8.0.5:8080/rocky/9.5/BaseOS/x86_64/os/
    packages: [python3, kernel-devel]
stacks:
  a100-550:
    driver: {version: 550.163.01, kernel_modules: proprietary}
    cuda: "12.4"
    container_toolkit: 1.16.2
    container_runtime: docker
    dcgm: 4.1.1
    fabric_manager: true
    repos: &repos
      cuda: @URL@cuda/{distro}/{arch}/
      container_toolkit: @URL@libnvidia-container/{pkg}/{pkg_arch}/
      key_file: @KEY_FILE@
  a100-570:
    driver: {version: @DRIVER_570@, kernel_modules: open}
    cuda: "12.8"
    container_toolkit: 1.17.5
    container_runtime: containerd
    dcgm: 4.2.3
    fabric_manager: true
    repos: *repos
profiles:
  hgx-a100:
    gpu: A100-SXM4-80GB
    gpus: 8
racks:
  - name: r01
    profile: hgx-a100
    stack: @STACK@
    image: rocky-9
    nodes:
      - name: @NODE@
        ip: 10.8.1.7
        mac: "02:00:00:00:00:07"
        bmc: redfish+https://10.9.1.7/redfish/v1/Systems/1
"""

# What the play is told beyond the render: how to reach the node, its kernel, and the checks
# that need a GPU or a running systemd (see the module docstring).
EXTRA_VARS = {
    "ansible_connection": "local",
    "ansible_become": False,  # already root; the host has no sudo
    "ansible_kernel": KERNEL,
    "nvidia_driver_rpm_module_stream": "",
    "nvidia_driver_verify": False,
    "fabric_manager_verify": False,
    "dcgm_verify": False,
}


# --------------------------------------------------------------------------- fake packages


def _script(body: str) -> str:
    return f"#!/bin/sh\n# FAKE tool from a provisioner test package: not NVIDIA software.\n{body}"


def _driver(version: str, modules: str) -> list[FakeRpm]:
    """NVIDIA's RHEL driver packages (yum-packaging-nvidia-driver and friends): epoch 3."""
    kmod = "kmod-nvidia-open-dkms" if modules == "open" else "kmod-nvidia-latest-dkms"
    names = ["nvidia-driver", "nvidia-driver-cuda", "nvidia-driver-libs",
             "nvidia-driver-cuda-libs", "nvidia-kmod-common", kmod, "nvidia-modprobe"]  # fmt: skip
    packages = [FakeRpm(name, version, "1.el9", epoch=3) for name in names]
    persistenced = RpmFile(
        "/usr/lib/systemd/system/nvidia-persistenced.service",
        unit("NVIDIA Persistence Daemon", "/usr/bin/nvidia-persistenced --verbose"),
    )
    packages.append(FakeRpm("nvidia-persistenced", version, "1.el9", epoch=3,
                            files=(persistenced,)))  # fmt: skip
    return packages


def _fabric_manager(version: str) -> list[FakeRpm]:
    """NVIDIA's RHEL fabric manager: one ``nvidia-fabric-manager`` for every branch (since
    R460) that provides ``nvidia-fabricmanager-<branch>``, and the branch's NSCQ library."""
    branch = version.split(".")[0]
    service = unit("NVIDIA fabric manager service", "/usr/bin/nv-fabricmanager")
    tool = _script(f'echo "Fabric Manager version is : {version}"\n')
    return [
        FakeRpm("nvidia-fabric-manager", version,
                provides=(f"nvidia-fabricmanager = {version}",
                          f"nvidia-fabricmanager-{branch} = {version}"),
                files=(RpmFile("/usr/lib/systemd/system/nvidia-fabricmanager.service", service),
                       RpmFile("/usr/bin/nv-fabricmanager", tool, 0o755))),
        FakeRpm(f"libnvidia-nscq-{branch}", version,
                provides=(f"libnvidia-nscq = {version}",)),
    ]  # fmt: skip


def _cuda_toolkit(release: str) -> list[FakeRpm]:
    nvcc = _script(
        'echo "nvcc: NVIDIA (R) Cuda compiler driver"\n'
        f'echo "Cuda compilation tools, release {release}, V{release}.41"\n'
    )
    return [
        FakeRpm(f"cuda-toolkit-{release.replace('.', '-')}", f"{release}.0",
                files=(RpmFile(f"/usr/local/cuda-{release}/bin/nvcc", nvcc, 0o755),)),
    ]  # fmt: skip


def _container_toolkit(version: str) -> list[FakeRpm]:
    ctk = _script(
        f"""case "$1" in
--version) printf 'NVIDIA Container Toolkit CLI version {version}\\ncommit: fake\\n'; exit 0 ;;
runtime) ;;
*) echo "fake nvidia-ctk: $*: not supported" >&2; exit 2 ;;
esac
runtime=; config=
for arg in "$@"; do
  case "$arg" in
    --runtime=*) runtime=${{arg#--runtime=}} ;;
    --config=*) config=${{arg#--config=}} ;;
  esac
done
mkdir -p "$(dirname "$config")"
if [ "$runtime" = docker ]; then
  runtime='"nvidia": {{"args": [], "path": "nvidia-container-runtime"}}'
  printf '{{"runtimes": {{%s}}}}\\n' "$runtime" > "$config"
else
  printf '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]\\n' >> "$config"
fi
"""
    )
    return [
        FakeRpm("nvidia-container-toolkit", version),
        FakeRpm("nvidia-container-toolkit-base", version,
                files=(RpmFile("/usr/bin/nvidia-ctk", ctk, 0o755),)),
        FakeRpm("libnvidia-container-tools", version),
        FakeRpm("libnvidia-container1", version),
    ]  # fmt: skip


def _dcgm(version: str) -> list[FakeRpm]:
    """DCGM 4 as NVIDIA's CUDA repository has it: epoch 1, a core and a CUDA-12 flavour."""
    dcgmi = _script(f'echo "dcgmi  version: {version}"\n')
    service = unit("NVIDIA DCGM service", "/usr/bin/nv-hostengine -n")
    return [
        FakeRpm("datacenter-gpu-manager-4-core", version, epoch=1,
                files=(RpmFile("/usr/bin/dcgmi", dcgmi, 0o755),
                       RpmFile("/usr/lib/systemd/system/nvidia-dcgm.service", service))),
        FakeRpm("datacenter-gpu-manager-4-cuda12", version, epoch=1),
    ]  # fmt: skip


def _site() -> list[FakeRpm]:
    """Stand-ins for what Rocky's BaseOS/AppStream and Docker's repository give a node."""
    kernel_version, kernel_release = KERNEL.rsplit(".", 1)[0].split("-", 1)
    headers = f"/usr/src/kernels/{KERNEL}"
    return [
        # Installed from the start: dnf reads the release version from its provides.
        FakeRpm("rocky-release", "9.5", "1.2.el9", arch="noarch",
                provides=("system-release = 9.5", "system-release(releasever) = 9")),
        FakeRpm("kernel-devel", kernel_version, kernel_release,
                files=(RpmFile(f"{headers}/Makefile", "# FAKE kernel headers\n"),
                       RpmFile(f"/lib/modules/{KERNEL}/build", link=headers))),
        FakeRpm("kernel-headers", kernel_version, kernel_release),
        FakeRpm("python3-dnf-plugin-versionlock", "4.3.0", "16.el9", arch="noarch"),
        FakeRpm("docker-ce", "27.3.1", "1.el9", epoch=3,
                files=(RpmFile("/usr/lib/systemd/system/docker.service",
                               unit("Docker Application Container Engine", "/usr/bin/dockerd")),)),
        FakeRpm("containerd.io", "1.7.22", "3.1.el9",
                files=(RpmFile("/usr/lib/systemd/system/containerd.service",
                               unit("containerd container runtime", "/usr/bin/containerd")),)),
    ]  # fmt: skip


@dataclass(frozen=True)
class Repos:
    url: str
    cuda: list[FakeRpm]
    container_toolkit: list[FakeRpm]
    site: list[FakeRpm]
    release: Path  # rocky-release, installed on the node from the start


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repos]:
    """The CUDA, container-toolkit and site repositories, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("rpm-repos")
    cuda = [
        *_driver("550.163.01", "proprietary"), *_fabric_manager("550.163.01"),
        *_driver("570.133.20", "open"), *_fabric_manager("570.133.20"),
        *_cuda_toolkit("12.4"), *_cuda_toolkit("12.8"), *_dcgm("4.1.1"), *_dcgm("4.2.3"),
    ]  # fmt: skip
    toolkit = [*_container_toolkit("1.16.2"), *_container_toolkit("1.17.5")]
    site = _site()
    web = root / "web"
    with SigningKey() as key:
        cuda_rpms = build_rpms(cuda, root / "rpms" / "cuda")
        key.sign_rpms(cuda_rpms)  # the role turns gpgcheck on for the CUDA repository
        write_repo(web / "cuda/rhel9/x86_64", cuda_rpms, key=key, key_file=KEY_FILE)
        # NVIDIA signs this repository's metadata, not its packages (repo_gpgcheck).
        write_repo(web / "libnvidia-container/rpm/x86_64", build_rpms(toolkit, root / "rpms/ct"),
                   key=key, key_file=KEY_FILE, sign_metadata=True)  # fmt: skip
        site_rpms = build_rpms(site, root / "rpms" / "site")
        write_repo(web / "site", site_rpms)
    with RepoServer(web, "127.0.0.1", 0) as server:
        yield Repos(server.url, cuda, toolkit, site, site_rpms[0])


# --------------------------------------------------------------------------- renders, node


def _render(repos: Repos, folder: Path, stack: str, driver_570: str = "570.133.20") -> Path:
    text = SPEC
    for name, value in (("@URL@", repos.url), ("@KEY_FILE@", KEY_FILE), ("@STACK@", stack),
                        ("@DRIVER_570@", driver_570), ("@NODE@", NODE)):  # fmt: skip
        text = text.replace(name, value)
    folder.mkdir(parents=True)
    (folder / "fleet.yaml").write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "provisioner", "render", str(folder / "fleet.yaml"),
         "--out", str(folder / "render")],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return folder / "render"


@dataclass
class Play:
    rc: int
    output: str
    seconds: float

    def recap(self) -> dict[str, int]:
        """The node's PLAY RECAP counts: ok, changed, unreachable, failed."""
        for line in self.output.split("PLAY RECAP", 1)[-1].splitlines():
            match = _RECAP.match(line)
            if match and match.group(1) == NODE:
                ok, changed, unreachable, failed = map(int, match.groups()[1:])
                return {"ok": ok, "changed": changed, "unreachable": unreachable,
                        "failed": failed}  # fmt: skip
        raise AssertionError(f"no recap for {NODE}:\n{self.output}")

    def tasks(self, status: str) -> set[str]:
        """``role : task`` names that reported ``status`` (for a loop: any item did)."""
        found, task = set(), ""
        for line in self.output.splitlines():
            header = _TASK.match(line)
            if header:
                task = header.group(1)
                continue
            result = _STATUS.match(line)
            if result and result.group(1) == status:
                found.add(task)
        return found


@dataclass
class Node:
    root: RhelRoot
    renders: dict[str, Path]

    def play(self, render: str, *args: str) -> Play:
        inventory = self.renders[render] / "ansible" / "inventory.yml"
        started = time.monotonic()
        done = self.root.run(
            [str(ANSIBLE_PLAYBOOK), "-i", str(inventory), "-e", json.dumps(EXTRA_VARS),
             *args, str(REPO / "playbooks" / "site.yml")],
            env={"ANSIBLE_LOCAL_TEMP": "/run/ansible-home/tmp",
                 "ANSIBLE_REMOTE_TEMP": "/run/ansible-home/tmp",
                 "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0"},
            timeout=PLAY_TIMEOUT,
        )  # fmt: skip
        play = Play(done.returncode, done.stdout + done.stderr, time.monotonic() - started)
        print(f"site.yml {' '.join(args)} [{render}]: rc {play.rc}, {play.seconds:.0f} s")
        return play


@pytest.fixture(scope="module")
def node(repos: Repos, tmp_path_factory: pytest.TempPathFactory) -> Node:
    folder = tmp_path_factory.mktemp("rhel-check")
    renders = {
        "a100-550": _render(repos, folder / "a100-550", "a100-550"),
        "a100-570": _render(repos, folder / "a100-570", "a100-570"),
        "missing": _render(repos, folder / "missing", "a100-570", MISSING_DRIVER),
    }
    root = RhelRoot(folder / "node")
    site_repo = (
        "[site]\nname=Rocky 9 BaseOS, AppStream and Docker CE (FAKE test mirror)\n"
        f"baseurl={repos.url}site/\ngpgcheck=0\nenabled=1\n"
    )
    root.create({"site.repo": site_repo}, [repos.release])
    return Node(root, renders)


def _pins(packages: list[FakeRpm], *versions: str) -> dict[str, str]:
    return {p.name: p.evr for p in packages if p.version.split("-")[0] in versions}


def _stack_550(repos: Repos) -> dict[str, str]:
    return {
        **_pins(repos.cuda, "550.163.01", "12.4.0", "4.1.1"),
        **_pins(repos.container_toolkit, "1.16.2"),
    }


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def converged(node: Node) -> Play:
    play = node.play("a100-550")
    print(play.output)
    return play


def test_a_real_run_brings_the_rocky_node_to_its_stack(
    node: Node, repos: Repos, converged: Play
) -> None:
    assert converged.rc == 0, converged.output
    assert converged.recap()["failed"] == 0, converged.output
    pins = _stack_550(repos)
    assert len(pins) == 17, pins
    assert node.root.rpm_query(*pins) == pins
    installed = node.root.rpm_query()
    assert "kernel-devel" in installed and "docker-ce" in installed
    nvidia = {n for n in installed if not n.startswith(("kernel", "gpg-pubkey", "rocky"))}
    assert nvidia == set(pins) | {"python3-dnf-plugin-versionlock", "docker-ce"}
    assert len([n for n in installed if n.startswith("gpg-pubkey")]) == 1  # one key, both repos
    files = node.root.run(
        ["/bin/sh", "-c", "cat /etc/yum.repos.d/nvidia-*.repo /etc/dnf/plugins/versionlock.list"
         " /etc/docker/daemon.json"]
    )  # fmt: skip
    assert files.returncode == 0, files.stderr
    for expected in (f"baseurl = {repos.url}cuda/rhel9/x86_64/",
                     f"gpgkey = {repos.url}libnvidia-container/rpm/x86_64/{KEY_FILE}",
                     "repo_gpgcheck = 1",
                     "nvidia-driver-3:550.163.01-*.*",
                     "datacenter-gpu-manager-4-core-1:4.1.1-1.*",
                     '"nvidia": {"args": []'):  # fmt: skip
        assert expected in files.stdout, files.stdout
    written = node.root.snapshot()  # what the check runs below must leave as it is
    assert "etc/dnf/plugins/versionlock.list" in written and "var/lib/rpm/rpmdb.sqlite" in written


def test_a_second_real_run_changes_nothing(node: Node, converged: Play) -> None:
    again = node.play("a100-550")
    assert again.rc == 0, again.output
    assert again.recap()["changed"] == 0, sorted(again.tasks("changed"))


def test_a_check_run_for_another_stack_reports_its_changes_and_writes_nothing(
    node: Node, repos: Repos, converged: Play
) -> None:
    before, packages = node.root.snapshot(), node.root.rpm_query()
    check = node.play("a100-570", "--check")
    print(check.output)
    assert check.rc == 0, check.output
    recap = check.recap()
    assert recap["failed"] == 0 and recap["unreachable"] == 0, check.output
    changed = check.tasks("changed")
    for task in (
        "nvidia_driver : Lock the packages to their versions",
        "nvidia_driver : Remove the driver packages of the other flavour",
        "nvidia_driver : Install the locked packages",
        "fabric_manager : Remove the fabric manager packages of other branches",
        "fabric_manager : Install the locked packages",
        "cuda_toolkit : Remove the toolkits of other CUDA releases",
        "cuda_toolkit : Install the locked packages",
        "nvidia_container_toolkit : Install the locked packages",
        "nvidia_container_toolkit : Install the container runtime",
        "dcgm : Install the locked packages",
    ):
        assert task in changed, f"{task} not reported as changed: {sorted(changed)}"
    unchanged = check.tasks("ok")
    for task in (
        "nvidia_repo : Import the signing keys",
        "nvidia_repo : Write the repository files",
        f"preflight : Install kernel-headers and kernel-devel-{KERNEL}",
    ):
        assert task in unchanged and task not in changed, task
    assert node.root.rpm_query() == packages
    assert node.root.snapshot() == before


def test_a_check_run_for_a_driver_the_repository_lacks_fails(node: Node, converged: Play) -> None:
    before, packages = node.root.snapshot(), node.root.rpm_query()
    check = node.play("missing", "--check")
    assert check.rc != 0, check.output
    assert check.recap()["failed"] == 1, check.output
    assert "nvidia_driver : Install the locked packages" in check.tasks("fatal"), check.output
    assert MISSING_DRIVER in check.output.split("fatal:", 1)[1], check.output
    assert node.root.rpm_query() == packages
    assert node.root.snapshot() == before
