"""The lab's container-runtime pieces the nvidia_container_toolkit role relies on: the
stand-in ``nvidia-ctk runtime configure`` adds the nvidia runtime to the runtime's
configuration file as the real tool does (once), and the lab's containerd stand-in is served
beside the container toolkit. Tests move the tool's state, so no host file is touched.
"""

from __future__ import annotations

import json
from pathlib import Path

from provisioner.lab.aptrepo import plan_repos
from provisioner.lab.debcontents import CONTAINERD, package_files
from provisioner.lab.labbin import nvidia_ctk
from provisioner.spec import load_fleet
from tests.conftest import LAB_SPEC

TABLE = '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]'


def _configure(state: Path, *args: str) -> list[str]:
    return nvidia_ctk.run(["runtime", "configure", *args], str(state))


def test_configure_writes_a_containerd_config_once_under_the_moved_state(tmp_path: Path) -> None:
    lines = _configure(tmp_path, "--runtime=containerd")
    config = tmp_path / "root" / "etc" / "containerd" / "config.toml"
    assert f"Wrote updated config to {config}" in lines[1]
    text = config.read_text()
    assert text.startswith("version = 2\n") and text.count(TABLE) == 1
    assert 'BinaryName = "/usr/bin/nvidia-container-runtime"' in text
    _configure(tmp_path, "--runtime=containerd")
    assert config.read_text() == text  # a second configure adds nothing


def test_configure_keeps_an_existing_containerd_config_and_follows_its_version(
    tmp_path: Path,
) -> None:
    config = tmp_path / "root" / "srv" / "containerd.toml"  # --config=/srv/containerd.toml
    config.parent.mkdir(parents=True)
    config.write_text('version = 3\n\n[plugins."io.containerd.cri.v1.images"]\n  x = 1\n')
    _configure(tmp_path, "--runtime", "containerd", "--config", "/srv/containerd.toml")
    text = config.read_text()
    assert text.startswith('version = 3\n\n[plugins."io.containerd.cri.v1.images"]\n  x = 1\n')
    assert '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.nvidia]' in text


def test_configure_adds_the_nvidia_runtime_to_docker_and_keeps_the_rest(tmp_path: Path) -> None:
    daemon = tmp_path / "root" / "etc" / "docker" / "daemon.json"
    daemon.parent.mkdir(parents=True)
    daemon.write_text('{"log-driver": "journald", "runtimes": {"crun": {"path": "crun"}}}')
    _configure(tmp_path, "--runtime=docker")
    document = json.loads(daemon.read_text())
    assert document["log-driver"] == "journald" and "crun" in document["runtimes"]
    assert document["runtimes"]["nvidia"] == {
        "args": [], "path": "/usr/bin/nvidia-container-runtime"
    }  # fmt: skip


def test_a_dry_run_writes_nothing(tmp_path: Path) -> None:
    _configure(tmp_path, "--runtime=containerd", "--dry-run")
    assert list(tmp_path.iterdir()) == []


def test_the_containerd_stand_in_idles_as_a_service_and_ships_no_config() -> None:
    files = {f.path: f for f in package_files(CONTAINERD)}
    assert sorted(files) == ["/lib/systemd/system/containerd.service", "/usr/bin/containerd",
                             "/usr/share/doc/containerd/LAB-BUILD"]  # fmt: skip
    unit = files["/lib/systemd/system/containerd.service"].data
    assert b"ExecStart=/usr/bin/containerd\n" in unit and b"WantedBy=multi-user.target" in unit
    assert b"exec sleep infinity" in files["/usr/bin/containerd"].data
    assert files["/usr/bin/containerd"].mode == 0o755


def test_containerd_is_served_beside_the_container_toolkit_only() -> None:
    plans = plan_repos(load_fleet(LAB_SPEC), "10.200.0.1:8081")
    serving = {plan.path for plan in plans if CONTAINERD in plan.packages}
    assert serving == {"libnvidia-container/deb/amd64"}
