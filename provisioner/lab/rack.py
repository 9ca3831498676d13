"""The lab rack: every part of the simulated site, wired together and run by one process.

For the nodes of a fleet spec it makes the provisioning switch (a bridge holding the gateway
address) and each node's network namespace; renders the spec; serves the boot server and the
lab apt repository on the gateway address; writes each node's simulated GPUs and its Secure
Boot state (``secureboot``: ``enabled`` or ``disabled``, what the nodes' ``mokutil`` reads);
and answers each node's BMC on loopback (IPMI: :mod:`ipmi_bmc`; Redfish: :mod:`redfish_bmc`),
whose power and boot override drive the node's :class:`Machine`.
The rack's live state is kept in ``status.json`` in the site folder, rewritten on each change.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from provisioner import boot
from provisioner.lab import aptrepo, gpus, host
from provisioner.lab.bmc_state import MachineState, PowerAction
from provisioner.lab.host import LabError
from provisioner.lab.ipmi_bmc import BmcFarm
from provisioner.lab.machine import Machine, Wiring
from provisioner.lab.redfish_bmc import RedfishFarm, RedfishSystem
from provisioner.render import render_fleet, write_tree
from provisioner.render.writer import site_key
from provisioner.spec import Fleet, Node

log = logging.getLogger("provisioner.lab")
INSTALLER = Path(__file__).with_name("installer.py")
_LOOPBACK = ("127.", "localhost")


class LabRack:
    """All of a lab site; ``start()`` brings it up with every node off, ``stop()`` ends it."""

    def __init__(self, fleet: Fleet, site_dir: Path, base: Path) -> None:
        self.fleet = fleet
        self.site = fleet.document.metadata.site
        self.dir = site_dir
        self.base = base
        network = fleet.document.networks.provisioning
        if network.interface is None:
            raise LabError("networks.provisioning.interface must name the lab bridge")
        self.bridge = network.interface
        self.gateway = str(network.gateway)
        self.prefix = int(str(network.cidr).split("/")[1])
        self.render_dir = site_dir / "render"
        self.machines: dict[str, Machine] = {}
        self.bmc_states: dict[str, MachineState] = {}
        self.redfish_systems: dict[str, RedfishSystem] = {}
        self._farm: BmcFarm | None = None
        self._redfish = RedfishFarm(site_dir / "redfish", on_change=self.write_status)
        self._boot: boot.BootServer | None = None
        self._repo: aptrepo.RepoServer | None = None
        self._status_lock = threading.Lock()
        for node in fleet.nodes:
            if not node.bmc.host.startswith(_LOOPBACK):
                raise LabError(f"{node.name}: lab BMCs listen on loopback, not {node.bmc.host}")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        host.ensure_bridge(self.bridge, f"{self.gateway}/{self.prefix}")
        self._render()
        self._images()
        self._boot = boot.for_fleet(
            self.fleet,
            self.render_dir,
            host=self.gateway,
            images=self.dir / "images",
            events=self.dir / "boot-events.jsonl",
        ).start()
        self._repo = self._serve_repo()
        password = self.fleet.bmc_credentials(self.fleet.nodes[0])[1].resolve(self.fleet.base_dir)
        self._farm = BmcFarm(username=self.fleet.document.bmc.username, password=password)
        for node in self.fleet.nodes:
            self._add_node(node)
        self._farm.start()
        self._redfish.start()
        self.write_status()

    def stop(self) -> None:
        threads = [
            threading.Thread(target=machine.power_off, daemon=True)
            for machine in self.machines.values()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        if self._farm is not None:
            self._farm.stop()
        self._redfish.stop()
        if self._boot is not None:
            self._boot.stop()
        if self._repo is not None:
            self._repo.stop()
        self.write_status(stopped=True)

    # ------------------------------------------------------------------ parts

    def _render(self) -> None:
        write_tree(render_fleet(self.fleet, site_key(self.fleet, self.render_dir)), self.render_dir)

    def _serve_repo(self) -> aptrepo.RepoServer | None:
        """Build (incrementally, in the cache) and serve the lab apt repository, when the
        stacks' repository URLs point at the lab gateway; None when none do."""
        stacks = self.fleet.document.stacks.values()
        urls = [u for s in stacks for u in (s.repos.cuda, s.repos.container_toolkit) if u]
        hosts = {urlsplit(u).netloc for u in urls if urlsplit(u).hostname == self.gateway}
        if not hosts:
            return None
        if len(hosts) > 1:
            raise LabError(f"the stacks name several lab repository addresses: {sorted(hosts)}")
        (address,) = hosts
        # A web root per site (labs up at once serve their own stacks); one cache of .debs
        # and one signing key for all.
        shared = host.cache_root() / "apt"
        dest = shared / "sites" / self.site
        aptrepo.build_repo(self.fleet, dest, address, cache=shared / aptrepo.CACHE)
        port = urlsplit(f"http://{address}").port or 80
        return aptrepo.serve(dest, self.gateway, port)

    def _images(self) -> None:
        """Stand-in kernels and initrds where the spec's images point at the boot server: the
        lab firmware fetches them as a PXE ROM would, but boots no kernel."""
        served = urlsplit(str(self.fleet.document.boot.url))
        for image in self.fleet.document.images.values():
            for url in (image.kernel_url, image.initrd_url):
                parts = urlsplit(str(url))
                if parts.netloc != served.netloc or not parts.path.startswith("/images/"):
                    continue
                path = self.dir / "images" / parts.path.removeprefix("/images/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"provisioner lab stand-in for {url}: not a kernel\n")

    def _add_node(self, node: Node) -> None:
        assert self._farm is not None
        netns = host.netns_name(self.site, node.name)
        host.plug_node(
            netns,
            host.veth_name(self.site, node.name),
            self.bridge,
            node.mac,
            f"{node.ip}/{self.prefix}",
            self.gateway,
        )
        home = self.dir / "nodes" / node.name
        home.mkdir(parents=True, exist_ok=True)
        document = gpus.gpu_document(self.fleet, node)
        state = MachineState(
            product_name=f"Lab {self.fleet.profile(node).gpu} node",
            product_serial=node.serial or f"LAB-{node.name}",
            board_serial=f"LABMB-{node.name}",
            chassis_serial=f"LABCH-{node.name}",
        )

        redfish = node.bmc.protocol == "redfish"

        def boot_device() -> str:  # a reboot keeps only a persistent override
            if redfish:
                return self._redfish.boot_device(self.redfish_systems[node.name])
            return state.boot_device if state.boot_persistent else "default"

        machine = Machine(
            node.name,
            Wiring(netns, node.mac, str(node.ip), f"{self.fleet.document.boot.url}ipxe/boot.ipxe"),
            self.base,
            home,
            INSTALLER,
            boot_device=boot_device,
            on_change=self._machine_changed,
        )
        _write_json(home / "hardware/gpus.json", document)
        (home / "hardware/kmsg").write_text("".join(f"{line}\n" for line in document["kernel_log"]))
        secure_boot = "enabled" if document["platform"]["secure_boot"] else "disabled"
        (home / "hardware/secureboot").write_text(f"{secure_boot}\n")
        self.machines[node.name] = machine
        if redfish:
            username, secret = self.fleet.bmc_credentials(node)
            self.redfish_systems[node.name] = self._redfish.add(
                node.name,
                node.bmc,
                (username, secret.resolve(self.fleet.base_dir)),
                node.mac,
                on_power=lambda action, device: _run_power(machine, action, device),
                powered=lambda: machine.powered,
            )
            return

        def power(state: MachineState, action: PowerAction) -> None:
            self._power(machine, state, action)

        state.on_power = power
        self.bmc_states[node.name] = state
        self._farm.add(node.bmc.port, state)

    # ------------------------------------------------------------------ events

    def _power(self, machine: Machine, state: MachineState, action: PowerAction) -> None:
        """The IPMI BMC's power changes, on the BMC loop thread: hand them to a worker."""
        device = state.last_boot_device or "default"
        threading.Thread(
            target=_run_power,
            args=(machine, action, device),
            name=f"power-{machine.name}",
            daemon=True,
        ).start()

    def _machine_changed(self, machine: Machine) -> None:
        state = self.bmc_states.get(machine.name)
        if state is not None and machine.phase == "off":
            with state.lock:
                state.power = "off"  # the node powered itself off: the BMC sees it
        system = self.redfish_systems.get(machine.name)
        if system is not None and machine.phase == "off":
            self._redfish.machine_stopped(system)  # the Redfish BMC sees it too
        self.write_status()

    def status(self, stopped: bool = False) -> dict[str, Any]:
        nodes = {}
        for node in self.fleet.nodes:
            machine = self.machines.get(node.name)
            state = self.bmc_states.get(node.name) or self.redfish_systems.get(node.name)
            nodes[node.name] = {
                "ip": str(node.ip),
                "mac": node.mac,
                "bmc": node.bmc.url,
                "netns": host.netns_name(self.site, node.name),
                "power": state.power if state else "off",
                "phase": machine.phase if machine else "off",
                "installed": machine.installed if machine else False,
                "boots": machine.boots if machine else 0,
                "installs": machine.installs if machine else 0,
                "console": str(machine.console) if machine else None,
            }
        return {
            "site": self.site,
            "spec": str(self.fleet.spec_path),
            "pid": os.getpid(),
            "running": not stopped,
            "bridge": self.bridge,
            "gateway": self.gateway,
            "boot_url": str(self.fleet.document.boot.url),
            "repo_url": self._repo.url if self._repo else None,
            "time": time.time(),
            "nodes": nodes,
        }

    def write_status(self, stopped: bool = False) -> None:
        with self._status_lock:
            _write_json(self.dir / "status.json", self.status(stopped))


def _run_power(machine: Machine, action: PowerAction, device: str) -> None:
    """Carry out a BMC's power action on a machine (``device``: what an on or reset boots)."""
    if action == "on":
        machine.power_on(device)
    elif action == "off":
        machine.power_off()
    elif action == "soft":
        machine.soft_off()
    elif action in ("cycle", "reset"):
        machine.reset(device)


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)
