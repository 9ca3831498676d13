"""The rendered files, read by the real tools that consume them.

ansible-inventory (ansible-core) reads the inventory and the dynamic-inventory protocol,
dnsmasq --test checks its configuration, pykickstart's ksvalidator the kickstarts; the
autoinstall data is parsed as YAML and checked for what Ubuntu's installer needs.
Each tool is first shown to reject a broken file, so a pass means something.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.render import render_fleet, write_tree
from provisioner.render.boot import callback_token
from provisioner.spec import Fleet, load_fleet
from tests.conftest import DATA, LAB_SPEC, POD_SPEC

pytestmark = pytest.mark.integration
KEY = b"integration-test-callback-key-000"
GOLDEN_B = DATA / "render" / "rocky-redfish" / "input" / "fleet.yaml"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=f"/usr/sbin:{Path(sys.executable).parent}")
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/bootstrap installs it)")
    return path


def _render(spec: Path, out: Path) -> Fleet:
    fleet = load_fleet(spec)
    write_tree(render_fleet(fleet, KEY), out)
    return fleet


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": "/tmp/.ansible-tests"}
    return subprocess.run(
        args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> tuple[Fleet, Path]:
    out = tmp_path_factory.mktemp("pod")
    return _render(POD_SPEC, out), out


def _expected_vars(fleet: Fleet, name: str) -> dict[str, Any]:
    node = fleet.by_name[name]
    stack = fleet.stack(node)
    profile = fleet.profile(node)
    image = fleet.image(node)
    return {
        "ansible_host": str(node.ip),
        "provisioner_mac": node.mac,
        "provisioner_bmc": node.bmc.url,
        "provisioner_rack": node.rack,
        "provisioner_stack": node.stack,
        "provisioner_profile": node.profile,
        "provisioner_gpu_sku": profile.gpu,
        "provisioner_gpu_count": profile.gpus,
        "provisioner_distro": image.distro,
        "nvidia_driver_version": stack.driver.version,
        "nvidia_driver_kernel_modules": stack.driver.kernel_modules,
        "fabric_manager_enabled": stack.fabric_manager,
        "fabric_manager_version": stack.driver.version,
        "cuda_toolkit_version": stack.cuda,
        "nvidia_container_toolkit_version": stack.container_toolkit,
        "dcgm_version": stack.dcgm,
        "ansible_user": fleet.document.ssh.user,
    }


def _inventory_list(source: Path, cwd: Path) -> dict[str, Any]:
    result = _run(_tool("ansible-inventory"), "-i", str(source), "--list", cwd=cwd)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_ansible_inventory_reads_every_node_with_its_vars(pod: tuple[Fleet, Path]) -> None:
    fleet, out = pod
    listed = _inventory_list(out / "ansible" / "inventory.yml", out)
    hostvars = listed["_meta"]["hostvars"]
    assert set(hostvars) == {node.name for node in fleet.nodes}
    for node in fleet.nodes:
        for key, value in _expected_vars(fleet, node.name).items():
            assert hostvars[node.name].get(key) == value, (node.name, key)
    for rack in fleet.document.racks:
        group = f"rack_{rack.name}"
        assert set(listed[group]["hosts"]) == {n.name for n in fleet.nodes if n.rack == rack.name}
    assert set(listed["stack_prod_580"]["hosts"]) == {
        n.name for n in fleet.nodes if n.stack == "prod-580"
    }


def test_dynamic_inventory_agrees_with_rendered_inventory(
    pod: tuple[Fleet, Path], tmp_path: Path
) -> None:
    fleet, out = pod
    wrapper = tmp_path / "provisioner-inventory"
    wrapper.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m provisioner inventory "{POD_SPEC}" "$@"\n'
    )
    wrapper.chmod(0o755)
    dynamic = _inventory_list(wrapper, tmp_path)
    static = _inventory_list(out / "ansible" / "inventory.yml", out)
    assert dynamic["_meta"]["hostvars"] == static["_meta"]["hostvars"]
    groups = {k: sorted(v.get("hosts", [])) for k, v in static.items() if k != "_meta"}
    assert {k: sorted(v.get("hosts", [])) for k, v in dynamic.items() if k != "_meta"} == groups
    host = fleet.nodes[5].name
    result = _run(str(wrapper), "--host", host)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ansible_host"] == str(fleet.nodes[5].ip)


@pytest.mark.parametrize("spec", [LAB_SPEC, POD_SPEC, GOLDEN_B], ids=lambda p: p.parent.name)
def test_dnsmasq_accepts_rendered_config(spec: Path, tmp_path: Path) -> None:
    dnsmasq = _tool("dnsmasq")
    fleet = _render(spec, tmp_path)
    conf = tmp_path / "dnsmasq" / "dnsmasq.conf"
    result = _run(dnsmasq, "--test", f"--conf-file={conf}")
    assert result.returncode == 0, result.stderr
    text = conf.read_text()
    for node in fleet.nodes:
        assert f"dhcp-host={node.mac},{node.ip},{node.name},infinite\n" in text


def test_dnsmasq_test_rejects_a_broken_config(tmp_path: Path) -> None:
    _render(LAB_SPEC, tmp_path)
    conf = tmp_path / "dnsmasq" / "dnsmasq.conf"
    conf.write_text(conf.read_text().replace("dhcp-host=", "dhcp-hots=", 1))
    assert _run(_tool("dnsmasq"), "--test", f"--conf-file={conf}").returncode != 0


@pytest.mark.parametrize("spec", [POD_SPEC, GOLDEN_B], ids=lambda p: p.parent.name)
def test_kickstarts_pass_ksvalidator(spec: Path, tmp_path: Path) -> None:
    fleet = _render(spec, tmp_path)
    kickstarts = sorted((tmp_path / "boot" / "kickstart").glob("*.ks"))
    rhel = [n for n in fleet.nodes if fleet.image(n).installer == "kickstart"]
    assert len(kickstarts) == len(rhel) > 0
    result = _run(_tool("ksvalidator"), "-v", "RHEL9", *map(str, kickstarts))
    assert result.returncode == 0, result.stdout + result.stderr
    # And the values a node depends on parse back as written.
    from pykickstart.parser import KickstartParser
    from pykickstart.version import RHEL9, makeVersion

    for path in kickstarts:
        handler = makeVersion(RHEL9)
        KickstartParser(handler).readKickstart(str(path))
        node = fleet.by_name[path.stem]
        assert handler.network.network[0].device == node.mac
        assert handler.network.network[0].hostname.split(".")[0] == node.name


def test_ksvalidator_rejects_a_broken_kickstart(tmp_path: Path) -> None:
    _render(GOLDEN_B, tmp_path)
    ks = next((tmp_path / "boot" / "kickstart").glob("*.ks"))
    ks.write_text(ks.read_text().replace("autopart --type=plain", "autopart --type=wobbly"))
    assert _run(_tool("ksvalidator"), "-v", "RHEL9", str(ks)).returncode != 0


@pytest.mark.parametrize(
    ("spec", "version"), [(LAB_SPEC, "24.04"), (POD_SPEC, "22.04")], ids=["24.04", "22.04"]
)
def test_autoinstall_has_what_the_ubuntu_installer_needs(
    spec: Path, version: str, tmp_path: Path
) -> None:
    fleet = _render(spec, tmp_path)
    nodes = [node for node in fleet.nodes if fleet.image(node).installer == "autoinstall"]
    assert nodes and {fleet.image(node).version for node in nodes} == {version}
    keys = list(fleet.document.ssh.authorized_keys)
    for node in nodes:
        folder = tmp_path / "boot" / "autoinstall" / node.name
        raw = (folder / "user-data").read_text()
        assert raw.startswith("#cloud-config\n")
        data = yaml.safe_load(raw)["autoinstall"]
        assert data["version"] == 1
        assert "identity" in data or "user-data" in data
        assert data["user-data"]["hostname"] == node.name
        assert data["ssh"]["install-server"] is True and data["ssh"]["allow-pw"] is False
        ethernets = data["network"]["ethernets"]
        assert [e["match"]["macaddress"] for e in ethernets.values()] == [node.mac]
        commands = "\n".join(data["late-commands"])
        if fleet.document.ssh.user == "root":
            for key in keys:
                assert key in commands
        else:
            (user,) = data["user-data"]["users"]
            assert user["ssh_authorized_keys"] == keys
        token = callback_token(KEY, node.name)
        assert f"X-Provisioner-Token: {token}" in commands
        assert f"{fleet.document.boot.url}callback/{node.name}" in commands
        meta = yaml.safe_load((folder / "meta-data").read_text())
        assert meta == {"instance-id": f"provisioner-{node.name}", "local-hostname": node.name}


def test_autoinstall_for_a_non_root_user_creates_a_sudo_user(tmp_path: Path) -> None:
    fleet = _render(POD_SPEC, tmp_path)
    node = next(n for n in fleet.nodes if fleet.image(n).installer == "autoinstall")
    data = yaml.safe_load(
        (tmp_path / "boot" / "autoinstall" / node.name / "user-data").read_text()
    )["autoinstall"]
    (user,) = data["user-data"]["users"]
    assert user["name"] == "ops" and user["lock_passwd"] is True
    assert user["ssh_authorized_keys"] == list(fleet.document.ssh.authorized_keys)
    assert data["apt"]["primary"][0]["uri"].startswith("http://mirror.pod-a")


def test_ipxe_scripts_chain_to_each_node_installer(tmp_path: Path) -> None:
    fleet = _render(POD_SPEC, tmp_path)
    boot = str(fleet.document.boot.url)
    chain = (tmp_path / "boot" / "ipxe" / "boot.ipxe").read_text()
    assert chain.startswith("#!ipxe\n") and "${netX/mac:hexhyp}.ipxe" in chain
    for node in fleet.nodes:
        script = (tmp_path / "boot" / "ipxe" / f"{node.mac.replace(':', '-')}.ipxe").read_text()
        assert script.startswith("#!ipxe\n")
        image = fleet.image(node)
        kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
        assert kernel.startswith(f"kernel {image.kernel_url} ")
        if image.installer == "autoinstall":
            assert f"ds=nocloud-net;s={boot}autoinstall/{node.name}/" in kernel
        else:
            assert f"inst.ks={boot}kickstart/{node.name}.ks" in kernel
        for arg in image.kernel_args:
            assert f" {arg}" in kernel


def test_terraform_vars_hold_node_facts(pod: tuple[Fleet, Path]) -> None:
    fleet, out = pod
    data = json.loads((out / "terraform" / "terraform.tfvars.json").read_text())
    assert data["site"] == "pod-a"
    assert set(data["nodes"]) == {n.name for n in fleet.nodes}
    node = fleet.nodes[40]
    facts = data["nodes"][node.name]
    assert (facts["ip"], facts["mac"], facts["serial"], facts["bmc_host"]) == (
        str(node.ip),
        node.mac,
        node.serial,
        node.bmc.host,
    )
