"""A lab node's machine: a container that powers on, network-boots, installs, runs and reboots
like a server.

Power on starts the container in the node's network namespace, in its own PID, mount, UTS and
IPC namespaces. What it boots is decided the way firmware decides:

* boot override ``network``, or a disk with no OS: the *firmware* runs (``installer.py``, on
  a throw-away live root, the node's new disk at ``/target``): it network-boots through the
  boot server and installs. A good install replaces the disk and reboots from it; a failed
  one leaves the old disk, and the firmware falls to the next boot device (the disk, if it
  has an OS; else the machine halts: on, doing nothing, as a server with no boot device);
* otherwise the *disk*: an overlay of the shared base image and the node's own upper layer,
  with systemd as PID 1 and the node's simulated GPUs bound at ``/run/provisioner-lab``.

A ``reboot`` inside the node ends its PID 1 with SIGHUP and the machine boots again (from the
disk unless a persistent override says otherwise); ``poweroff`` ends it with SIGINT and the
machine is off. Power off from the BMC kills the container outright (SIGKILL to the PID
namespace); soft off asks systemd to power off (SIGRTMIN+4) and forces it after a grace time.
The console (systemd's and the firmware's output) goes to ``console.log`` in the node folder.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from provisioner.lab.host import die_with_parent
from provisioner.lab.installer import MARKER, NO_BOOT, POWER_OFF, REBOOT

SOFT_OFF_GRACE = 60.0
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class Wiring:
    """Where a node sits on the lab network, and where its firmware finds the boot file."""

    netns: str
    mac: str
    ip: str
    dhcp_boot: str  # the boot file URL DHCP gives an iPXE client


class Machine:
    """One lab node. ``boot_device()`` reads the BMC's boot override at each boot;
    ``on_change(machine)`` hears of every phase change (``off``, ``firmware``, ``running``,
    ``halted``) and is how the BMC learns that the node powered itself off."""

    def __init__(
        self,
        name: str,
        wiring: Wiring,
        base: Path,
        home: Path,
        installer: Path,
        boot_device: Callable[[], str],
        on_change: Callable[[Machine], None],
    ) -> None:
        self.name, self.wiring, self.base, self.home = name, wiring, base, home
        self.installer = installer
        self._boot_device = boot_device
        self._on_change = on_change
        self.phase = "off"
        self.boots = 0
        self.installs = 0
        self._lock = threading.Lock()  # serialises power operations
        self._process: subprocess.Popen[bytes] | None = None
        self._session: threading.Thread | None = None
        self._stopping = threading.Event()
        for folder in ("disk/upper", "disk/work", "hardware", "root", "live", "live-rw"):
            (home / folder).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ state

    @property
    def console(self) -> Path:
        return self.home / "console.log"

    @property
    def installed(self) -> bool:
        return (self.home / "disk/upper" / MARKER).is_file()

    @property
    def powered(self) -> bool:
        return self.phase != "off"

    def init_pid(self) -> int | None:
        """The host PID of the container's PID 1, while it runs."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        try:
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
        except OSError:
            return None
        return int(children.split()[0]) if children.split() else None

    # ------------------------------------------------------------------ power

    def power_on(self, device: str) -> None:
        """Power on (nothing if on), booting from ``device`` (``network``, ``hd``, ...)."""
        with self._lock:
            if self._session is not None and self._session.is_alive():
                return
            self._stopping.clear()
            self._set_phase("firmware")
            self._session = threading.Thread(
                target=self._run, args=(device,), name=f"machine-{self.name}", daemon=True
            )
            self._session.start()

    def power_off(self, timeout: float = 10.0) -> None:
        """Cut the power: the container is killed at once."""
        with self._lock:
            self._stopping.set()
            process = self._process
            if process is not None and process.poll() is None:
                process.kill()  # unshare --kill-child takes the PID namespace with it
            session = self._session
        if session is not None:
            session.join(timeout)

    def soft_off(self, grace: float = SOFT_OFF_GRACE) -> None:
        """Ask the OS to shut down (ACPI power button); force it after ``grace`` seconds."""
        pid = self.init_pid()
        if pid is not None and self.phase == "running":
            os.kill(pid, signal.SIGRTMIN + 4)  # systemd: start poweroff.target
            session = self._session
            if session is not None:
                session.join(grace)
        self.power_off()

    def reset(self, device: str) -> None:
        self.power_off()
        self.power_on(device)

    # ------------------------------------------------------------------ the boot loop

    def _run(self, device: str) -> None:
        try:
            self._boot_loop(device)
        finally:
            self._process = None
            self._set_phase("off")

    def _boot_loop(self, device: str) -> None:
        while not self._stopping.is_set():
            self.boots += 1
            self._on_change(self)
            if device == "network" or not self.installed:
                status = self._start_and_wait("firmware", self._firmware_script())
                if self._stopping.is_set():
                    self._discard_new_disk()
                    return
                if status in (REBOOT, POWER_OFF):
                    self._replace_disk()
                    if status == POWER_OFF:
                        return
                    device = "disk"
                    continue
                self._discard_new_disk()
                if not self.installed:
                    self._say("no bootable device: halted (power off or reset to retry)")
                    self._set_phase("halted")
                    self._stopping.wait()
                    return
                self._say("network boot failed; booting from disk")
            status = self._start_and_wait("running", self._disk_script())
            if self._stopping.is_set() or status != -signal.SIGHUP:
                return
            override = self._boot_device()  # a persistent override survives a reboot
            device = "network" if override == "network" else "disk"

    def _start_and_wait(self, phase: str, script: str) -> int:
        with self.console.open("ab") as console:
            self._process = subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{self.wiring.netns}",
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--propagation=private",
                    "--kill-child",
                    "sh",
                    "-ec",
                    script,
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self._set_phase(phase)
        return self._process.wait()

    def _set_phase(self, phase: str) -> None:
        if phase == self.phase:
            return
        self.phase = phase
        self._on_change(self)

    def _say(self, message: str) -> None:
        with self.console.open("a") as console:
            console.write(f"lab-machine: {message}\n")

    # ------------------------------------------------------------------ disks

    def _new_disk(self) -> Path:
        new = self.home / "disk.new"
        shutil.rmtree(new, ignore_errors=True)
        (new / "upper").mkdir(parents=True)
        (new / "work").mkdir()
        return new

    def _replace_disk(self) -> None:
        old = self.home / "disk"
        shutil.rmtree(old, ignore_errors=True)
        (self.home / "disk.new").rename(old)
        self.installs += 1

    def _discard_new_disk(self) -> None:
        shutil.rmtree(self.home / "disk.new", ignore_errors=True)

    # ------------------------------------------------------------------ container scripts

    def _mounts(self, root: str) -> list[str]:
        """The kernel filesystems and a minimal /dev for a container rooted at ``root``."""
        devices = " ".join(("null", "zero", "full", "random", "urandom", "tty"))
        return [
            f"mount -t proc proc {root}/proc",
            f"mount -t sysfs -o ro sysfs {root}/sys",
            f"mount --rbind /sys/fs/cgroup {root}/sys/fs/cgroup",
            f"mount -t tmpfs -o mode=755,size=256m tmpfs {root}/run",
            f"mount -t tmpfs -o mode=1777 tmpfs {root}/tmp",  # noqa: S108 - inside it
            f"mount -t tmpfs -o mode=755,size=8m tmpfs {root}/dev",
            f"for d in {devices}; do touch {root}/dev/$d; mount --bind /dev/$d {root}/dev/$d; done",
            f"mkdir -p {root}/dev/pts {root}/dev/shm",  # noqa: S108 - inside the container
            f"mount -t devpts -o newinstance,ptmxmode=0666 devpts {root}/dev/pts",
            f"ln -s pts/ptmx {root}/dev/ptmx",
            f"mount -t tmpfs -o mode=1777 tmpfs {root}/dev/shm",  # noqa: S108 - ditto
            f"ln -s /proc/self/fd {root}/dev/fd",
            f"touch {root}/dev/console",
            f"mount --bind /proc/self/fd/1 {root}/dev/console",
        ]

    def _overlay(self, upper: Path, target: str) -> str:
        options = f"lowerdir={self.base},upperdir={upper}/upper,workdir={upper}/work"
        return f"mount -t overlay overlay -o {shlex.quote(options)} {target}"

    def _disk_script(self) -> str:
        root = shlex.quote(str(self.home / "root"))
        hardware = shlex.quote(str(self.home / "hardware"))
        boot_id = shlex.quote(str(self.home / "boot_id"))
        lines = [
            self._overlay(self.home / "disk", root),
            *self._mounts(root),
            # A boot id of this boot, as a kernel's changes at each boot: Ansible's reboot
            # module (and anyone else) tells a reboot by it; the host's never changes.
            f"cat /proc/sys/kernel/random/uuid > {boot_id}",
            f"mount --bind {boot_id} {root}/proc/sys/kernel/random/boot_id",
            f"mkdir -p {root}/run/provisioner-lab",
            f"mount --bind {hardware} {root}/run/provisioner-lab",
            f"mount -o remount,bind,ro {root}/run/provisioner-lab",
            f"exec chroot {root} /usr/bin/env -i container=other {PATH} /lib/systemd/systemd",
        ]
        return "\n".join(lines)

    def _firmware_script(self) -> str:
        new = self._new_disk()
        live = shlex.quote(str(self.home / "live"))
        scratch = shlex.quote(str(self.home / "live-rw"))
        installer = f"{live}/run/provisioner-lab/installer.py"
        wiring = self.wiring
        command = shlex.join(
            [
                "python3",
                "/run/provisioner-lab/installer.py",
                "--dhcp-boot",
                wiring.dhcp_boot,
                "--mac",
                wiring.mac,
                "--ip",
                wiring.ip,
                "--target",
                "/target",
            ]
        )
        lines = [
            f"mount -t tmpfs -o size=256m tmpfs {scratch}",
            f"mkdir -p {scratch}/upper {scratch}/work",
            self._overlay(self.home / "live-rw", live),
            *self._mounts(live),
            f"mkdir -p {live}/target {live}/run/provisioner-lab",
            self._overlay(new, f"{live}/target"),
            f"touch {installer}",
            f"mount --bind {shlex.quote(str(self.installer))} {installer}",
            f"exec chroot {live} /usr/bin/env -i {PATH} {command}",
        ]
        return "\n".join(lines)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


__all__ = ["NO_BOOT", "Machine", "Wiring", "wait_for"]
