"""Everything ``provisioner render`` produces, as a mapping of relative path -> text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from provisioner.gcpause import paused
from provisioner.render.boot import BootRenderer
from provisioner.render.environment import make_environment
from provisioner.render.inventory import build_inventory
from provisioner.render.parallel import NodeFiles
from provisioner.spec.fleet import Fleet
from provisioner.spec.types import group_name


@dataclass
class RenderedTree:
    files: dict[str, str] = field(default_factory=dict)

    def add(self, path: str, text: str) -> None:
        if path in self.files:
            raise ValueError(f"two rendered files at {path}")  # a renderer bug, not user input
        self.files[path] = text


def render_fleet(fleet: Fleet, callback_key: bytes, workers: int = 1) -> RenderedTree:
    """All rendered files of a fleet. ``callback_key`` derives the per-node callback tokens.

    With ``workers`` > 1, a large fleet's per-node files are rendered in forked processes
    while this one renders the rest; the result is the same, byte for byte."""
    overlay = fleet.document.render.templates
    env = make_environment(fleet.base_dir / overlay if overlay else None)
    header = (
        f"Rendered by provisioner from {fleet.spec_path.name}: do not edit; "
        "change the spec and render again."
    )
    boot = BootRenderer(fleet, env, callback_key, header)
    with paused(), NodeFiles(boot, fleet.nodes, workers) as node_files:  # children fork now
        tree = RenderedTree()
        _ansible(tree, fleet, env, header)
        tree.add("dnsmasq/dnsmasq.conf", boot.dnsmasq())
        tree.add("boot/ipxe/boot.ipxe", boot.chain_script())
        tree.add(
            "terraform/terraform.tfvars.json",
            env.get_template("terraform/terraform.tfvars.json.j2").render(tfvars(fleet)),
        )
        for path, text in node_files.result():
            tree.add(f"boot/{path}", text)
    return tree


def _ansible(tree: RenderedTree, fleet: Fleet, env: Any, header: str) -> None:
    inventory = build_inventory(fleet)
    site = fleet.document.metadata.site
    rack_groups = {group_name("rack", rack.name) for rack in fleet.document.racks}
    tree.add(
        "ansible/inventory.yml",
        env.get_template("ansible/inventory.yml.j2").render(
            site=site,
            header=header,
            groups=inventory.groups,
            host_vars=inventory.host_vars,
            rack_groups=rack_groups,
        ),
    )
    template = env.get_template("ansible/group_vars.yml.j2")
    for group, variables in inventory.group_vars.items():
        tree.add(
            f"ansible/group_vars/{group}.yml",
            template.render(site=site, header=header, group=group, vars=variables),
        )


def tfvars(fleet: Fleet) -> dict[str, Any]:
    """Node facts for Terraform (``terraform.tfvars.json``): no credentials, only facts."""
    doc = fleet.document
    nodes: dict[str, Any] = {}
    for node in fleet.nodes:
        profile = fleet.profile(node)
        nodes[node.name] = {
            "rack": node.rack,
            "ip": str(node.ip),
            "mac": node.mac,
            "bmc_protocol": node.bmc.protocol,
            "bmc_host": node.bmc.host,
            "bmc_port": node.bmc.port,
            "serial": node.serial,
            "profile": node.profile,
            "stack": node.stack,
            "image": node.image,
            "gpu_sku": profile.gpu,
            "gpu_count": profile.gpus,
        }
    net = doc.networks.provisioning
    return {
        "site": doc.metadata.site,
        "provisioning_network": {
            "cidr": str(net.cidr),
            "gateway": str(net.gateway),
            "domain": net.domain,
        },
        "nodes": nodes,
    }
