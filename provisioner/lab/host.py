"""The lab's footprint on the host: where its files live, what its namespaces and links are
called, and the commands that make and remove them. Everything the lab creates is named
here, so ``lab down`` can find it all again even when the lab daemon is gone.

* state: ``/var/lib/provisioner-lab/<site>/`` (``PROVISIONER_LAB_DIR`` overrides the parent);
* cache: ``/var/cache/provisioner/lab/`` (``PROVISIONER_LAB_CACHE``): the base root
  filesystem and package builds, kept by ``lab down`` so the next ``lab up`` is warm;
* network namespaces ``plab-<site>-<node>``, host-side veth links ``plv<hash>``, and the
  bridge named by the spec's ``networks.provisioning.interface``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from provisioner.errors import ProvisionerError

_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork, used in the child
_PR_SET_PDEATHSIG = 1

NETNS_PREFIX = "plab-"
VETH_PREFIX = "plv"


class LabError(ProvisionerError):
    """The lab could not be brought up, or a host command it needs failed."""


def state_root() -> Path:
    return Path(os.environ.get("PROVISIONER_LAB_DIR", "/var/lib/provisioner-lab"))


def cache_root() -> Path:
    return Path(os.environ.get("PROVISIONER_LAB_CACHE", "/var/cache/provisioner/lab"))


def site_dir(site: str) -> Path:
    return state_root() / site


def netns_name(site: str, node: str) -> str:
    return f"{NETNS_PREFIX}{site}-{node}"


def veth_name(site: str, node: str) -> str:
    """At most 15 characters (IFNAMSIZ), stable, distinct per site and node."""
    return VETH_PREFIX + hashlib.sha256(f"{site}/{node}".encode()).hexdigest()[:10]


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, bridges): run it with sudo")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60) -> str:
    """Run a host command; a failure is a LabError naming the command and its message."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} is not installed (run scripts/bootstrap)") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} took over {timeout:g} s") from exc
    if check and done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {message[-1] if message else done.returncode}")
    return done.stdout


def die_with_parent() -> None:
    """``preexec_fn`` for the lab daemon's children (containers, emulators): the kernel kills
    the child when the daemon dies, so nothing the lab started outlives it."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def have(program: str) -> bool:
    return shutil.which(program) is not None


# ------------------------------------------------------------------------------ network


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def ensure_bridge(name: str, address: str) -> None:
    """The lab's provisioning switch: a bridge holding the gateway address (CIDR form)."""
    if not link_exists(name):
        run(["ip", "link", "add", name, "type", "bridge"])
    if address.split("/")[0] not in run(["ip", "-o", "-4", "addr", "show", "dev", name]):
        run(["ip", "addr", "add", address, "dev", name])
    run(["ip", "link", "set", name, "up"])


def netns_list() -> list[str]:
    listing = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def plug_node(netns: str, veth: str, bridge: str, mac: str, address: str, gateway: str) -> None:
    """A node's network: its namespace, an ``eth0`` with the node's MAC and address, wired
    to the bridge, default route through the gateway. Made afresh each time."""
    unplug_node(netns, veth)
    run(["ip", "netns", "add", netns])
    peer = veth[:-1] + "p"
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
    run(["ip", "link", "set", peer, "netns", netns])
    inside = ["ip", "-n", netns]
    run([*inside, "link", "set", peer, "name", "eth0"])
    run([*inside, "link", "set", "eth0", "address", mac])
    run([*inside, "addr", "add", address, "dev", "eth0"])
    run([*inside, "link", "set", "eth0", "up"])
    run([*inside, "link", "set", "lo", "up"])
    run([*inside, "route", "add", "default", "via", gateway])
    run(["ip", "link", "set", veth, "master", bridge, "up"])


def unplug_node(netns: str, veth: str) -> None:
    if netns in netns_list():
        kill_netns_processes(netns)
        run(["ip", "netns", "delete", netns], check=False)
    if link_exists(veth):
        run(["ip", "link", "delete", veth], check=False)


def kill_netns_processes(netns: str) -> None:
    for pid in run(["ip", "netns", "pids", netns], check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_link(name: str) -> None:
    if link_exists(name):
        run(["ip", "link", "delete", name], check=False)


# ------------------------------------------------------------------------------- mounts


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace, deepest first."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_under(root: Path) -> None:
    for point in mounts_under(root):
        run(["umount", "-l", point], check=False)
