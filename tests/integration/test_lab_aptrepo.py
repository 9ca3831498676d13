"""The lab's apt repositories, read by real apt in an isolated apt root.

The repositories of ``inventories/lab/fleet.yaml`` are built into a temporary folder and served
on 127.0.0.1 (a free port); apt gets its own root (sources, lists, cache, an empty dpkg status)
through ``APT_CONFIG``, with the repository URLs rewritten to that port and ``signed-by`` the
published lab key. apt verifies the signatures with gpgv; a tampered ``InRelease`` must fail.
Packages are downloaded and unpacked with ``dpkg-deb -x`` and their tools run with python3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from provisioner.lab.aptrepo import KEY_FILE, RepoBuild, RepoServer, build_repo, serve
from provisioner.spec import Fleet, load_fleet
from provisioner.spec.packages import stack_packages
from tests.conftest import DATA, LAB_SPEC

pytestmark = pytest.mark.integration
LAB_ADDRESS = "10.200.0.1:8081"
GPUS = DATA / "lab" / "gpus.json"
TIMEOUT = 120


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/bootstrap installs it)")
    return path


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return load_fleet(LAB_SPEC)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, fleet: Fleet) -> tuple[Path, RepoBuild]:
    for tool in ("dpkg-deb", "gpg", "gpgv", "apt-get"):
        _tool(tool)
    dest = tmp_path_factory.mktemp("aptrepo")
    return dest, build_repo(fleet, dest, LAB_ADDRESS)


@pytest.fixture(scope="module")
def server(built: tuple[Path, RepoBuild]) -> Iterator[RepoServer]:
    with serve(built[0], "127.0.0.1", 0) as running:
        yield running


class AptRoot:
    """A private apt root: its own sources, lists, archives and an empty dpkg status."""

    def __init__(self, base: Path, urls: list[str], key: Path) -> None:
        self.base = base
        for sub in ("etc/apt/apt.conf.d", "etc/apt/preferences.d", "etc/apt/sources.list.d",
                    "var/lib/apt/lists/partial", "var/cache/apt/archives/partial",
                    "var/lib/dpkg", "var/log/apt"):  # fmt: skip
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "var/lib/dpkg/status").write_text("")
        sources = "".join(f"deb [signed-by={key}] {url} /\n" for url in urls)
        (base / "etc/apt/sources.list").write_text(sources)
        self.config = base / "apt.conf"
        self.config.write_text(
            f'Dir "{base}/";\n'
            f'Dir::State::status "{base}/var/lib/dpkg/status";\n'
            'APT::Architecture "amd64";\nAPT::Architectures { "amd64"; };\n'
            'Debug::NoLocking "true";\nAPT::Sandbox::User "root";\n'
            'Acquire::Languages "none";\nAcquire::Retries "0";\n'
        )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "APT_CONFIG": str(self.config), "LC_ALL": "C.UTF-8"}
        return subprocess.run(
            args, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False
        )

    def archives(self) -> Path:
        return self.base / "var/cache/apt/archives"


def _apt_root(base: Path, build: RepoBuild, root: Path, port: int) -> AptRoot:
    urls = [plan.url.replace(LAB_ADDRESS, f"127.0.0.1:{port}") for plan in build.repos]
    return AptRoot(base, urls, root / KEY_FILE)


@pytest.fixture
def apt(tmp_path: Path, built: tuple[Path, RepoBuild], server: RepoServer) -> AptRoot:
    _, build = built
    return _apt_root(tmp_path / "aptroot", build, build.root, server.address[1])


@pytest.fixture
def updated(apt: AptRoot) -> AptRoot:
    done = apt.run("apt-get", "update")
    assert done.returncode == 0, done.stdout + done.stderr
    return apt


# --------------------------------------------------------------------------- the repositories


def test_builds_a_cuda_and_a_container_toolkit_repository(built: tuple[Path, RepoBuild]) -> None:
    _, build = built
    assert [(plan.url, plan.path) for plan in build.repos] == [
        ("http://10.200.0.1:8081/cuda/ubuntu2404/x86_64/", "cuda/ubuntu2404/x86_64"),
        (
            "http://10.200.0.1:8081/libnvidia-container/deb/amd64/",
            "libnvidia-container/deb/amd64",
        ),
    ]
    for plan in build.repos:
        folder = build.root / plan.path
        for name in ("Packages", "Packages.gz", "Release", "InRelease", "Release.gpg", KEY_FILE):
            assert (folder / name).is_file(), f"{plan.path}/{name}"
        release = (folder / "Release").read_text()
        assert "Origin: provisioner lab\n" in release
        assert "Label: LAB BUILDS - not NVIDIA software\n" in release
        assert "\nSHA256:\n" in release and "\nMD5Sum:\n" in release
        assert len(list(folder.glob("*.deb"))) == len(plan.packages)


def test_apt_update_verifies_the_signed_repositories(apt: AptRoot) -> None:
    done = apt.run("apt-get", "update")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "W:" not in done.stdout + done.stderr, done.stdout + done.stderr
    lists = [p.name for p in (apt.base / "var/lib/apt/lists").iterdir()]
    assert sum(name.endswith("_InRelease") for name in lists) == 2


def test_apt_update_fails_when_inrelease_is_tampered(
    tmp_path: Path, built: tuple[Path, RepoBuild]
) -> None:
    _, build = built
    copy = tmp_path / "web"
    shutil.copytree(build.root, copy)
    inrelease = copy / build.repos[0].path / "InRelease"
    text = inrelease.read_text()
    assert "Origin: provisioner lab" in text
    inrelease.write_text(text.replace("Origin: provisioner lab", "Origin: provisioner lad"))
    with RepoServer(copy, "127.0.0.1", 0) as tampered:
        apt = _apt_root(tmp_path / "aptroot", build, copy, tampered.address[1])
        done = apt.run("apt-get", "update")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "BADSIG" in output, output


def test_apt_cache_policy_shows_both_driver_branches(updated: AptRoot) -> None:
    done = updated.run("apt-cache", "policy", "nvidia-driver-570-open", "nvidia-driver-580-open")
    assert done.returncode == 0, done.stderr
    assert "Candidate: 570.133.20-0ubuntu1" in done.stdout
    assert "Candidate: 580.65.06-0ubuntu1" in done.stdout
    dcgm = updated.run("apt-cache", "policy", "datacenter-gpu-manager-4-core").stdout
    assert "1:4.1.1-1 500" in dcgm and "1:4.2.3-1 500" in dcgm
    origin = updated.run("apt-cache", "policy").stdout
    assert "o=provisioner lab,l=LAB BUILDS - not NVIDIA software" in origin


def test_the_570_stack_resolves_with_exact_pins(updated: AptRoot, fleet: Fleet) -> None:
    packages = stack_packages(fleet.document.stacks["h100-570"])
    done = updated.run("apt-get", "install", "-s", *[p.pin for p in packages])
    assert done.returncode == 0, done.stdout + done.stderr
    for package in packages:
        assert f"Inst {package.name} ({package.version} " in done.stdout, package.pin


def test_the_downloaded_570_stack_holds_working_lab_tools(
    updated: AptRoot, fleet: Fleet, tmp_path: Path
) -> None:
    packages = stack_packages(fleet.document.stacks["h100-570"])
    done = updated.run("apt-get", "install", "--download-only", "-y", *[p.pin for p in packages])
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path / "unpacked"
    for package in packages:
        # apt names the file it downloads with the epoch quoted (1%3a4.1.1-1)
        debs = list(updated.archives().glob(f"{package.name}_*.deb"))
        assert len(debs) == 1, package.pin
        deb = debs[0]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=TIMEOUT)
    env = {**os.environ, "PROVISIONER_LAB_GPUS": str(GPUS), "PROVISIONER_LAB_STATE": str(tmp_path)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False
        )

    smi = str(root / "usr/bin/nvidia-smi")
    listed = run("python3", smi, "-L")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == [
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-8c1f5a9e-3b1d-4c35-9d2e-0f6a1b2c3d40)",
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-8c1f5a9e-3b1d-4c35-9d2e-0f6a1b2c3d41)",
        "GPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-8c1f5a9e-3b1d-4c35-9d2e-0f6a1b2c3d43)",
    ]
    query = run("python3", smi, "--query-gpu=index,driver_version", "--format=csv,noheader")
    assert query.stdout.splitlines() == ["0, 570.133.20", "1, 570.133.20", "3, 570.133.20"]
    table = run("python3", smi)
    assert table.stdout.startswith("LAB BUILD")
    assert "CUDA Version: 12.8" in table.stdout
    no_driver = subprocess.run(
        ["python3", smi], capture_output=True, text=True, timeout=TIMEOUT, check=False,
        env={**env, "PROVISIONER_LAB_GPUS": str(tmp_path / "absent.json")},
    )  # fmt: skip
    assert no_driver.returncode == 9
    assert "couldn't communicate with the NVIDIA driver" in no_driver.stdout

    diag = json.loads(run("python3", str(root / "usr/bin/dcgmi"), "diag", "-r", "1", "-j").stdout)
    assert diag["metadata"]["DCGM version"] == "4.1.1"
    ctk = run(
        "python3", str(root / "usr/bin/nvidia-ctk"), "runtime", "configure", "--runtime=containerd"
    )
    assert ctk.returncode == 0, ctk.stderr
    assert (tmp_path / "nvidia-ctk" / "runtime-containerd.json").is_file()
    versions = {
        "usr/bin/nvidia-ctk": "NVIDIA Container Toolkit CLI version 1.17.5",
        "usr/bin/nvidia-container-cli": "cli-version: 1.17.5",
        "usr/bin/nv-fabricmanager": "Fabric Manager version is : 570.133.20",
        "usr/local/cuda-12.8/bin/nvcc": "release 12.8, V12.8.61",
        "usr/bin/nv-hostengine": "nv-hostengine version 4.1.1",
    }
    for tool, expected in versions.items():
        command = ["python3", str(root / tool)] if tool.endswith("ctk") else [str(root / tool)]
        assert expected in run(*command, "--version").stdout, tool
    assert (root / "lib/systemd/system/nvidia-fabricmanager.service").is_file()
    assert (root / "lib/systemd/system/nvidia-dcgm.service").is_file()
    version = json.loads((root / "usr/local/cuda-12.8/version.json").read_text())
    assert version["cuda"]["version"] == "12.8.0"


def test_the_web_root_serves_the_key_but_never_the_cache(
    server: RepoServer, built: tuple[Path, RepoBuild]
) -> None:
    dest, _ = built
    assert (dest / "cache" / "gnupg").is_dir()
    with urllib.request.urlopen(server.url + KEY_FILE, timeout=10) as reply:  # noqa: S310
        assert reply.read().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    for path in ("cache/gnupg/pubring.kbx", "../cache/gnupg/pubring.kbx"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(server.url + path, timeout=10)  # noqa: S310
        assert caught.value.code == 404


# --------------------------------------------------------------------------- rebuilding


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_two_builds_with_one_key_are_byte_identical(tmp_path: Path, fleet: Fleet) -> None:
    first = build_repo(fleet, tmp_path / "a", LAB_ADDRESS)
    (tmp_path / "b" / "cache").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "cache" / "gnupg", tmp_path / "b" / "cache" / "gnupg")
    second = build_repo(fleet, tmp_path / "b", LAB_ADDRESS)
    assert second.built == first.built == len(_tree(tmp_path / "b" / "cache" / "debs"))
    assert _tree(first.root) == _tree(second.root)


def test_builds_at_once_into_two_web_roots_share_one_cache_and_one_key(
    tmp_path: Path, fleet: Fleet
) -> None:
    """Two labs brought up at once: each its own web root, one cache of .debs and one key."""
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(
            lambda name: build_repo(fleet, tmp_path / name, LAB_ADDRESS, cache=cache), "ab"
        )
    assert first.fingerprint == second.fingerprint
    assert first.built + second.built == len(_tree(cache / "debs"))  # each .deb built once
    assert {first.built, second.built} == {0, first.built + second.built}
    assert _tree(first.root) == _tree(second.root)
    assert not (tmp_path / "a" / "cache").exists() and not (tmp_path / "b" / "cache").exists()


def test_a_second_build_reuses_everything(tmp_path: Path, fleet: Fleet) -> None:
    first = build_repo(fleet, tmp_path, LAB_ADDRESS)
    stamps = {p: p.stat().st_mtime_ns for p in first.root.rglob("*") if p.is_file()}
    second = build_repo(fleet, tmp_path, LAB_ADDRESS)
    assert (second.built, second.reused) == (0, first.built)
    assert second.seconds < 2.0
    assert {p: p.stat().st_mtime_ns for p in second.root.rglob("*") if p.is_file()} == stamps


def test_a_changed_stack_rebuilds_only_its_new_packages(tmp_path: Path, fleet: Fleet) -> None:
    first = build_repo(fleet, tmp_path, LAB_ADDRESS)
    cuda_repo = first.root / first.repos[0].path
    release = (cuda_repo / "InRelease").read_bytes()
    stacks = dict(fleet.document.stacks)
    stacks["h100-580"] = stacks["h100-580"].model_copy(update={"dcgm": "4.4.0"})
    changed = dataclasses.replace(
        fleet, document=fleet.document.model_copy(update={"stacks": stacks})
    )
    second = build_repo(changed, tmp_path, LAB_ADDRESS)
    assert second.built == 2
    names = {p.name for p in cuda_repo.glob("datacenter-gpu-manager-4-*.deb")}
    assert names == {
        "datacenter-gpu-manager-4-core_4.1.1-1_amd64.deb",
        "datacenter-gpu-manager-4-cuda12_4.1.1-1_amd64.deb",
        "datacenter-gpu-manager-4-core_4.4.0-1_amd64.deb",
        "datacenter-gpu-manager-4-cuda13_4.4.0-1_amd64.deb",
    }
    assert (cuda_repo / "InRelease").read_bytes() != release


def test_the_command_line_builds_and_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "provisioner.lab.aptrepo", str(LAB_SPEC), "--dest", str(tmp_path)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "http://10.200.0.1:8081/cuda/ubuntu2404/x86_64/ ->" in done.stdout
    assert (tmp_path / "repo" / "cuda/ubuntu2404/x86_64/InRelease").is_file()
