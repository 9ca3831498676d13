"""The Ansible inventory of a fleet: groups per rack, profile, stack and image, with vars.

One data model serves both the rendered YAML (``ansible/inventory.yml`` + ``group_vars/``)
and the dynamic-inventory protocol (``provisioner inventory --list / --host``), so the two can
never disagree. Stack variables carry the role prefixes of ``playbooks/roles/``.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any

from provisioner.spec.fleet import Fleet, Node
from provisioner.spec.models import Image, Profile, Rollout, Stack
from provisioner.spec.packages import component_packages
from provisioner.spec.types import group_name

GROUP_KINDS = ("rack", "profile", "stack", "image")

# Placeholders in the spec's repository URLs -> the Ansible variables that fill them per host.
_REPO_PLACEHOLDERS = {
    "distro": "{{ provisioner_distro }}",
    "arch": "{{ provisioner_arch }}",
    "pkg": "{{ provisioner_pkg_format }}",
    "pkg_arch": "{{ provisioner_pkg_arch }}",
}


@dataclass
class Inventory:
    """Groups (in a stable order) with their hosts and vars, and per-host vars."""

    groups: dict[str, list[str]] = field(default_factory=dict)
    group_vars: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_vars: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_groups: dict[str, list[str]] = field(default_factory=dict)

    def dynamic_list(self) -> dict[str, Any]:
        """Ansible's dynamic-inventory ``--list`` document."""
        out: dict[str, Any] = {
            "_meta": {"hostvars": self.host_vars},
            "all": {"children": ["ungrouped", *self.groups], "vars": self.group_vars["all"]},
            "ungrouped": {"hosts": []},
        }
        for name, hosts in self.groups.items():
            out[name] = {"hosts": hosts, "vars": self.group_vars.get(name, {})}
        return out

    def merged_vars(self, host: str) -> dict[str, Any]:
        """Every variable a host sees: all, then its groups, then its own (``--host``)."""
        merged = dict(self.group_vars["all"])
        for group in self.host_groups[host]:
            merged.update(self.group_vars.get(group, {}))
        merged.update(self.host_vars[host])
        return merged


def build_inventory(fleet: Fleet) -> Inventory:
    doc = fleet.document
    inventory = Inventory()
    inventory.group_vars["all"] = all_vars(fleet)
    kinds: dict[str, dict[str, list[str]]] = {kind: {} for kind in GROUP_KINDS}
    for node in fleet.nodes:
        names = (
            group_name("rack", node.rack),
            group_name("profile", node.profile),
            group_name("stack", node.stack),
            group_name("image", node.image),
        )
        for kind, group in zip(GROUP_KINDS, names, strict=True):
            kinds[kind].setdefault(group, []).append(node.name)
        inventory.host_groups[node.name] = list(names)
        inventory.host_vars[node.name] = host_vars(node)
    for kind in GROUP_KINDS:
        inventory.groups.update(kinds[kind])
    for name, profile in doc.profiles.items():
        group = group_name("profile", name)
        if group in inventory.groups:
            inventory.group_vars[group] = profile_vars(fleet, name, profile)
    for name, stack in doc.stacks.items():
        group = group_name("stack", name)
        if group in inventory.groups:
            inventory.group_vars[group] = stack_vars(name, stack)
    for name, image in doc.images.items():
        group = group_name("image", name)
        if group in inventory.groups:
            inventory.group_vars[group] = image_vars(name, image)
    return inventory


def all_vars(fleet: Fleet) -> dict[str, Any]:
    doc = fleet.document
    out: dict[str, Any] = {
        "ansible_user": doc.ssh.user,
        "ansible_python_interpreter": "/usr/bin/python3",
        "provisioner_site": doc.metadata.site,
        "provisioner_boot_url": str(doc.boot.url),
        "provisioner_arch": "x86_64",
    }
    if doc.networks.provisioning.domain:
        out["provisioner_domain"] = doc.networks.provisioning.domain
    out.update(rollout_vars(doc.rollout, len(fleet.nodes)))
    return out


def rollout_vars(rollout: Rollout, nodes: int) -> dict[str, Any]:
    """The rollout policy as the play keywords of rolling playbooks (driver-upgrade.yml).

    * ``provisioner_rollout_serial``: Ansible's ``serial`` batches, ``[canary,
      max_unavailable]`` (no canary batch when ``canary`` is 0). A percentage stays one
      (Ansible takes it of the hosts the run targets, at least 1, as the spec does); a
      fractional one becomes the count it is of the whole fleet.
    * ``provisioner_rollout_max_fail_percentage``: Ansible stops the rollout when more than
      this percentage of a batch fails, so it is ``max_failures`` as a percentage of a full
      batch (of the whole fleet when ``max_unavailable`` is a percentage: a run on fewer
      nodes has smaller batches, so it stops sooner, never later). A batch in which every
      host fails always stops it (Ansible), so a failed canary stops the rollout. Ansible
      counts failures per batch; the upgrade workflow holds ``max_failures`` over the whole
      rollout.
    """
    steady = rollout.max_unavailable
    batch: int | str
    if not steady.percent:
        batch = int(steady.value)
    elif steady.value.is_integer():
        batch = f"{int(steady.value)}%"
    else:
        batch = steady.of(nodes)
    serial: list[int | str] = [rollout.canary, batch] if rollout.canary else [batch]
    size = max(1, steady.of(nodes))
    # Rounded up to 1/100 %: exactly max_failures failures in a full batch do not stop it.
    percentage = min(100.0, math.ceil(10000 * rollout.max_failures / size) / 100)
    return {
        "provisioner_rollout_serial": serial,
        "provisioner_rollout_max_fail_percentage": int(percentage)
        if percentage.is_integer()
        else percentage,
    }


def host_vars(node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ansible_host": str(node.ip),
        "provisioner_rack": node.rack,
        "provisioner_mac": node.mac,
        "provisioner_bmc": node.bmc.url,
    }
    if node.serial:
        out["provisioner_serial"] = node.serial
    if node.bmc_mac:
        out["provisioner_bmc_mac"] = node.bmc_mac
    return out


def profile_vars(fleet: Fleet, name: str, profile: Profile) -> dict[str, Any]:
    sku = fleet.sku(profile)
    floors = profile.burnin.floors.model_dump(exclude_none=True)
    return {
        "provisioner_profile": name,
        "provisioner_gpu_sku": profile.gpu,
        "provisioner_gpu_count": profile.gpus,
        "provisioner_gpu_architecture": sku.architecture,
        "provisioner_nvswitch": fleet.nvswitch(profile),
        "provisioner_boot_mode": profile.boot_mode,
        "burnin_level": profile.burnin.level,
        "burnin_floor_overrides": floors,
    }


_ROLE_PREFIX = {
    "driver": "nvidia_driver",
    "fabric_manager": "fabric_manager",
    "cuda": "cuda_toolkit",
    "container_toolkit": "nvidia_container_toolkit",
    "dcgm": "dcgm",
}


def stack_vars(name: str, stack: Stack) -> dict[str, Any]:
    driver = stack.driver
    out: dict[str, Any] = {
        "provisioner_stack": name,
        "nvidia_repo_cuda_url": repo_url(stack.repos.cuda),
        "nvidia_repo_container_toolkit_url": repo_url(stack.repos.container_toolkit),
        "nvidia_driver_version": driver.version,
        "nvidia_driver_branch": driver.effective_branch,
        "nvidia_driver_kernel_modules": driver.kernel_modules,
        "fabric_manager_enabled": stack.fabric_manager,
        "fabric_manager_version": driver.version,
        "cuda_toolkit_enabled": stack.cuda is not None,
        "nvidia_container_toolkit_enabled": stack.container_toolkit is not None,
        "nvidia_container_toolkit_runtime": stack.container_runtime,
        "dcgm_enabled": stack.dcgm is not None,
    }
    if stack.repos.keyring:
        out["nvidia_repo_keyring_url"] = repo_url(stack.repos.keyring)
    if stack.repos.key_file:
        out["nvidia_repo_key_file"] = stack.repos.key_file
    if stack.cuda is not None:
        out["cuda_toolkit_version"] = stack.cuda
    if stack.container_toolkit is not None:
        out["nvidia_container_toolkit_version"] = stack.container_toolkit
    if stack.dcgm is not None:
        out["dcgm_version"] = stack.dcgm
    # Exact apt pins (name=version) per role, from the one table of NVIDIA's package names.
    for component, packages in component_packages(stack).items():
        out[f"{_ROLE_PREFIX[component]}_deb_packages"] = [p.pin for p in packages]
    return out


def image_vars(name: str, image: Image) -> dict[str, Any]:
    return {
        "provisioner_image": name,
        "provisioner_os": image.os,
        "provisioner_os_version": image.version,
        "provisioner_distro": image.distro,
        "provisioner_pkg_format": "deb" if image.os == "ubuntu" else "rpm",
        # The package manager's name for the architecture: dpkg says amd64, rpm x86_64.
        "provisioner_pkg_arch": "amd64" if image.os == "ubuntu" else "x86_64",
    }


def repo_url(template: str) -> str:
    """``.../repos/{distro}/{arch}/`` -> ``.../repos/{{ provisioner_distro }}/...``."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(_REPO_PLACEHOLDERS[name])
    return "".join(out)
