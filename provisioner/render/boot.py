"""Network-boot files: dnsmasq (DHCP + TFTP), iPXE scripts, autoinstall and kickstart.

The chain a node follows: its firmware asks DHCP (dnsmasq), gets an iPXE binary over TFTP,
iPXE asks again and is pointed at ``boot.ipxe`` over HTTP, which chains to the node's own
script named by its MAC; that loads the installer kernel with the node's autoinstall (Ubuntu)
or kickstart (RHEL family) URL, and the installer calls back with the node's token when done.
"""

from __future__ import annotations

import hashlib
import hmac
from ipaddress import IPv4Network
from typing import Any

import jinja2

from provisioner.spec.fleet import Fleet, Node
from provisioner.spec.types import ipv4_int

CALLBACK_PATH = "callback/"


def callback_token(key: bytes, node: str) -> str:
    """The per-node install-callback token: HMAC-SHA256 of the node name under the site key.
    The boot server recomputes it to check a callback; no token is stored anywhere."""
    digest = hmac.new(key, b"provisioner-install-callback\0" + node.encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def mac_file(mac: str) -> str:
    """iPXE's ``${netX/mac:hexhyp}`` spelling: ``aa-bb-cc-dd-ee-ff``."""
    return mac.replace(":", "-")


class BootRenderer:
    def __init__(self, fleet: Fleet, env: jinja2.Environment, key: bytes, header: str) -> None:
        self.fleet = fleet
        self.env = env
        self.key = key
        self.header = header
        self.boot_url = str(fleet.document.boot.url)
        if not self.boot_url.endswith("/"):
            self.boot_url += "/"
        doc = fleet.document
        self.common: dict[str, Any] = {
            "header": header,
            "site": doc.metadata.site,
            "boot_url": self.boot_url,
            "ssh_user": doc.ssh.user,
            "ssh_keys": list(doc.ssh.authorized_keys),
            "domain": doc.networks.provisioning.domain,
        }
        self._ipxe = {
            "autoinstall": env.get_template("pxe/autoinstall.ipxe.j2"),
            "kickstart": env.get_template("pxe/kickstart.ipxe.j2"),
        }
        self._user_data = env.get_template("autoinstall/user-data.j2")
        self._meta_data = env.get_template("autoinstall/meta-data.j2")
        self._kickstart = env.get_template("kickstart/node.ks.j2")

    def dnsmasq(self) -> str:
        doc = self.fleet.document
        net = doc.networks.provisioning
        bmc = doc.networks.bmc
        bmc_hosts = []
        if bmc is not None and bmc.dhcp:
            bmc_hosts = [
                {"mac": node.bmc_mac, "ip": node.bmc.host, "name": f"{node.name}-bmc"}
                for node in self.fleet.nodes
                if node.bmc_mac and _inside(node.bmc.host, bmc.cidr)
            ]
        return self.env.get_template("dnsmasq/dnsmasq.conf.j2").render(
            self.common,
            net=net,
            netmask=str(net.cidr.netmask),
            network=str(net.cidr.network_address),
            tftp_root=doc.boot.tftp_root,
            nodes=[(node.mac, str(node.ip), node.name) for node in self.fleet.nodes],
            bmc=bmc,
            bmc_netmask=str(bmc.cidr.netmask) if bmc is not None else None,
            bmc_network=str(bmc.cidr.network_address) if bmc is not None else None,
            bmc_hosts=bmc_hosts,
        )

    def chain_script(self) -> str:
        return self.env.get_template("pxe/boot.ipxe.j2").render(self.common)

    def node_files(self, node: Node) -> dict[str, str]:
        """The iPXE script and installer data of one node, by path under ``boot/``."""
        image = self.fleet.image(node)
        token = callback_token(self.key, node.name)
        fqdn = f"{node.name}.{self.common['domain']}" if self.common["domain"] else node.name
        context = {
            **self.common,
            "node": node,
            "image": image,
            "fqdn": fqdn,
            "mac_file": mac_file(node.mac),
            "callback_url": f"{self.boot_url}{CALLBACK_PATH}{node.name}",
            "token": token,
        }
        files = {f"ipxe/{mac_file(node.mac)}.ipxe": self._ipxe[image.installer].render(context)}
        if image.installer == "autoinstall":
            files[f"autoinstall/{node.name}/user-data"] = self._user_data.render(context)
            files[f"autoinstall/{node.name}/meta-data"] = self._meta_data.render(context)
        else:
            files[f"kickstart/{node.name}.ks"] = self._kickstart.render(context)
        return files


def _inside(host: str, network: IPv4Network) -> bool:
    address = ipv4_int(host)
    return address is not None and (
        int(network.network_address) <= address <= int(network.broadcast_address)
    )
