"""``lab up``, ``lab status`` and ``lab down``: start a site's lab daemon and install its nodes,
report on it, and remove every trace of it from the host.

``up`` installs the nodes the way a bring-up would, through the front door: over each node's
BMC (real IPMI) it sets a one-time network boot and powers the node on; the node's firmware
PXE-boots from the boot server, installs, calls back and reboots into its OS. ``up`` returns
when every node answers SSH at its own address. ``--blank`` leaves the nodes off with empty
disks instead: the state a rack arrives in.

``down`` needs nothing but the host: it reads what ``up`` recorded in ``lab.json`` (written
before anything else is made) and sweeps the site's namespaces by their ``plab-<site>-`` names,
so it works after a crash of the daemon and is safe to repeat. Other sites are not touched.
The base image cache is kept (``--purge`` removes it too).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioner.bmc import operations as ops
from provisioner.bmc.base import BootDevice, PowerAction
from provisioner.bmc.fanout import FanOut, Policy, failed
from provisioner.lab import host, rootfs
from provisioner.lab.host import LabError
from provisioner.spec import Fleet, load_fleet

Say = Callable[[str], None]
READY_TIMEOUT = 120.0


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").read_bytes().find(b"provisioner.lab.daemon") >= 0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sites() -> list[Path]:
    root = host.state_root()
    return sorted(p for p in root.iterdir() if (p / "lab.json").is_file()) if root.is_dir() else []


# ---------------------------------------------------------------------------------- up


def up(
    spec: Path, *, blank: bool = False, timeout: float = 300.0, say: Say = print
) -> dict[str, Any]:
    """Bring the lab of ``spec`` up; see the module docstring. Returns ``status()``."""
    host.require_root()
    fleet = load_fleet(spec)
    site = fleet.document.metadata.site
    site_dir = host.site_dir(site)
    record = _read_json(site_dir / "lab.json")
    if record is not None and _pid_alive(record.get("pid")):
        if Path(record["spec"]) != spec.resolve():
            raise LabError(f"lab {site} is already up from {record['spec']}: lab down first")
        say(f"lab {site} is already up")
        return status(site_dir)
    started = time.monotonic()
    base = rootfs.ensure_base(say)
    site_dir.mkdir(parents=True, exist_ok=True)
    daemon = _start_daemon(fleet, spec.resolve(), site_dir, base)
    say(
        f"lab {site}: daemon {daemon.pid} up, {len(fleet.nodes)} nodes wired "
        f"({time.monotonic() - started:.1f} s)"
    )
    if not blank:
        install(fleet, site_dir, timeout=timeout, say=say)
    say(f"lab {site} is up in {time.monotonic() - started:.1f} s")
    return status(site_dir)


def _start_daemon(fleet: Fleet, spec: Path, site_dir: Path, base: Path) -> subprocess.Popen[bytes]:
    network = fleet.document.networks.provisioning
    record = {
        "site": fleet.document.metadata.site,
        "spec": str(spec),
        "pid": None,
        "bridge": network.interface,
    }
    (site_dir / "lab.json").write_text(json.dumps(record) + "\n")  # before anything is made
    log = (site_dir / "daemon.log").open("ab")
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "provisioner.lab.daemon",
            str(spec),
            "--dir",
            str(site_dir),
            "--base",
            str(base),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        start_new_session=True,
    )
    (site_dir / "lab.json").write_text(json.dumps({**record, "pid": daemon.pid}) + "\n")
    assert daemon.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(daemon.stdout, selectors.EVENT_READ)
        ready = selector.select(READY_TIMEOUT)
    line = daemon.stdout.readline().decode().strip() if ready else ""
    if line != "ready":
        daemon.kill()
        daemon.wait()
        tail = (site_dir / "daemon.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise LabError("the lab daemon did not start: " + (" / ".join(tail) or "no output"))
    daemon.stdout.close()
    return daemon


def install(fleet: Fleet, site_dir: Path, *, timeout: float, say: Say) -> None:
    """Network-boot and install every node through its BMC; wait until each answers SSH."""
    targets = ops.targets_for(fleet, fleet.nodes)
    with FanOut(Policy.from_spec(fleet.document.bmc)) as fan:
        for step, operation in (
            ("network boot", ops.boot(BootDevice.NETWORK)),
            ("power on", ops.power(PowerAction.ON)),
        ):
            bad = failed(fan.run(targets, operation))
            if bad:
                raise LabError(
                    f"{step} failed on {', '.join(r.node for r in bad)}: "
                    f"{bad[0].reason}: {bad[0].message}"
                )
    say(f"installing {len(targets)} nodes over PXE")
    deadline = time.monotonic() + timeout
    waiting = {node.name: str(node.ip) for node in fleet.nodes}
    while waiting:
        phases = (_read_json(site_dir / "status.json") or {}).get("nodes", {})
        for name, address in list(waiting.items()):
            if ssh_open(address):
                say(f"{name}: installed, SSH up at {address}")
                del waiting[name]
            elif phases.get(name, {}).get("phase") == "halted":
                console = site_dir / "nodes" / name / "console.log"
                tail = console.read_text(errors="replace").strip().splitlines()[-2:]
                raise LabError(f"{name} could not network-boot: {' / '.join(tail)}")
        if waiting and time.monotonic() > deadline:
            raise LabError(
                f"not up after {timeout:g} s: {', '.join(sorted(waiting))} "
                "(see lab status and the nodes' console.log)"
            )
        time.sleep(0.2)


def ssh_open(address: str, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=timeout) as connection:
            return connection.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def boot_events(spec: Path, site: str) -> Path | None:
    """The boot server's events file of the lab that runs ``spec``; None when none does."""
    site_dir = host.site_dir(site)
    record = _read_json(site_dir / "lab.json")
    if record is None or not _pid_alive(record.get("pid")):
        return None
    if Path(str(record.get("spec"))) != spec.resolve():
        return None
    return site_dir / "boot-events.jsonl"


# ------------------------------------------------------------------------------ status


def status(site_dir: Path) -> dict[str, Any]:
    record = _read_json(site_dir / "lab.json") or {}
    current = _read_json(site_dir / "status.json") or {"nodes": {}}
    alive = _pid_alive(record.get("pid"))
    current["daemon"] = {"pid": record.get("pid"), "alive": alive}
    for node in current.get("nodes", {}).values():
        node["ssh"] = alive and node.get("phase") == "running" and ssh_open(node["ip"])
    current.setdefault("site", record.get("site", site_dir.name))
    return current


# -------------------------------------------------------------------------------- down


def down(site_dir: Path | None = None, *, purge: bool = False, say: Say = print) -> list[str]:
    """Remove a lab site (every one when ``site_dir`` is None). Returns what it removed."""
    host.require_root()
    removed: list[str] = []
    for folder in [site_dir] if site_dir is not None else sites():
        removed += _down_site(folder, say)
    if purge and host.cache_root().exists():
        shutil.rmtree(host.cache_root())
        removed.append(f"cache {host.cache_root()}")
    return removed


def _down_site(folder: Path, say: Say) -> list[str]:
    removed: list[str] = []
    record = _read_json(folder / "lab.json") or {}
    site = record.get("site", folder.name)
    pid = record.get("pid")
    if isinstance(pid, int) and _pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 20):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
        removed.append(f"daemon {pid}")
    for netns in host.netns_list():
        if netns.startswith(f"{host.NETNS_PREFIX}{site}-"):
            host.kill_netns_processes(netns)
            host.run(["ip", "netns", "delete", netns], check=False)
            removed.append(f"namespace {netns}")
    bridge = record.get("bridge")
    if bridge and host.link_exists(bridge):
        host.delete_link(bridge)
        removed.append(f"bridge {bridge}")
    host.unmount_under(folder)
    if folder.exists():
        shutil.rmtree(folder)
        removed.append(f"folder {folder}")
    say(f"lab {site} is down" + (f": removed {', '.join(removed)}" if removed else ""))
    return removed


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
