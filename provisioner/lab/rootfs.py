"""The lab nodes' base root filesystem: Debian 12 (debootstrap minbase) with systemd, sshd and
python3, built once into the cache and shared read-only by every node through overlayfs.

It also holds a lab stand-in for ``mokutil`` (``/usr/bin/mokutil``, where Debian's and RHEL's
packages put it): ``mokutil --sb-state`` answers from the Secure Boot state the rack gives the
node (``/run/provisioner-lab/secureboot``), as the real one answers from the firmware.

The build is keyed by what goes into it (suite, packages, the set-up below), made in a
temporary folder and renamed into place only when complete, under a lock, so an interrupted
or concurrent build never leaves a half-made base that a later ``lab up`` would trust.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from provisioner.lab.host import LabError, cache_root, have, run

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "python3-yaml",
    "curl",
    "ca-certificates",
    "gnupg",
    "iproute2",
    "procps",
    "kmod",
)
# Units that make no sense in a machine container, or that would race the playbooks for
# the dpkg lock (apt's daily timers).
MASKED = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "getty@tty1.service",
    "console-getty.service",
    "systemd-udevd.service",
    "systemd-modules-load.service",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
)
_SETUP_VERSION = "2"  # bump when _configure changes what it writes
SECURE_BOOT_FILE = "/run/provisioner-lab/secureboot"
MOKUTIL = f"""#!/bin/sh
# LAB STAND-IN for mokutil (provisioner lab), not the real tool: --sb-state reports the
# simulated Secure Boot state in {SECURE_BOOT_FILE}; nothing else is simulated.
if [ "$#" -eq 1 ] && [ "$1" = --sb-state ]; then
  case "$(cat {SECURE_BOOT_FILE} 2>/dev/null)" in
    enabled) echo "SecureBoot enabled"; exit 0 ;;
    disabled) echo "SecureBoot disabled"; exit 0 ;;
  esac
  echo "EFI variables are not supported on this system" >&2  # as on a legacy BIOS boot
  exit 1
fi
echo "mokutil: lab stand-in (provisioner lab): only --sb-state is simulated" >&2
exit 1
"""


def base_key() -> str:
    text = "\n".join([SUITE, MIRROR, *PACKAGES, *MASKED, _SETUP_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def base_path() -> Path:
    return cache_root() / f"base-{SUITE}-{base_key()}"


def ensure_base(say: Callable[[str], None] = print) -> Path:
    """The cached base root filesystem, built first if missing (about a minute)."""
    final = base_path()
    if (final / ".provisioner-base").is_file():
        return final
    if not have("debootstrap"):
        raise LabError("debootstrap is not installed (run scripts/bootstrap)")
    final.parent.mkdir(parents=True, exist_ok=True)
    with (final.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".provisioner-base").is_file():  # built while we waited
            return final
        work = final.with_name(final.name + f".tmp-{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        say(f"building the lab base image ({SUITE}, debootstrap minbase) into {final}")
        started = time.monotonic()
        try:
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(work),
                    MIRROR,
                ],
                timeout=1200,
            )
            _configure(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
        say(f"lab base image built in {time.monotonic() - started:.0f} s")
    return final


def _configure(root: Path) -> None:
    """Make the debootstrapped tree a machine-container image with no identity of its own:
    each node's installer gives it a host name and SSH host keys."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")  # systemd makes one per boot
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/apt/sources.list").write_text(
        "# lab node: no Internet; playbooks add the lab repositories\n"
    )
    for unit in MASKED:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    (root / "etc/provisioner-lab").mkdir(exist_ok=True)
    (root / "etc/provisioner-lab/README").write_text(
        "This is a provisioner lab node: a machine container with simulated GPUs.\n"
    )
    mokutil = root / "usr/bin/mokutil"
    mokutil.write_text(MOKUTIL)
    mokutil.chmod(0o755)
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)
    (root / ".provisioner-base").write_text(f"{SUITE} {base_key()}\n")
