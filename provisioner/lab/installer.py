"""A lab node's network boot: its PXE firmware (iPXE) and its OS installer, as one script.

This stands in for what a lab node cannot have: a NIC option ROM and the Ubuntu live installer
(or Anaconda). It runs INSIDE the node's machine container, in the node's network namespace,
with the node's disk mounted at ``/target``; it imports nothing of provisioner's (stdlib and
the node image's PyYAML), because it is copied into the node like a firmware image.

Firmware: from the DHCP boot file URL (what the rendered dnsmasq hands an iPXE client) it
fetches and interprets iPXE scripts over HTTP: ``chain``, ``kernel``, ``initrd``, ``boot``,
``echo``, ``sleep``, ``goto``, labels, ``exit``, ``cmd || alternative`` and ``${...}``
variables such as ``${netX/mac:hexhyp}``. ``boot`` "starts the kernel": the installer below
gets the kernel command line.

Installer: ``autoinstall ds=nocloud-net;s=URL`` (cloud-init NoCloud, Ubuntu autoinstall) or
``inst.ks=URL`` (kickstart). It fetches the answers, writes the identity they describe to the
disk (host name, SSH host keys, authorised keys), runs the late commands / ``%post`` (which
call the boot server back) and marks the disk installed. Packages are not installed: the lab
image already carries them. Exit status: 0 installed, reboot; 10 installed, power off;
1 nothing to boot (the firmware gives up, like iPXE's ``exit``); 2 the install failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REBOOT, POWER_OFF, NO_BOOT, FAILED = 0, 10, 1, 2
MARKER = "etc/provisioner-lab/installed.json"
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_FETCH_TIMEOUT = 30.0


class BootFailed(Exception):
    """A step of the boot failed; the message says which."""


def say(stage: str, message: str) -> None:
    print(f"lab-{stage}: {message}", flush=True)


def fetch(url: str, retries: int = 3) -> bytes:
    """GET ``url``; a connection error is retried (the boot server may be starting)."""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT) as reply:  # noqa: S310
                data: bytes = reply.read()
                return data
        except urllib.error.HTTPError as exc:
            raise BootFailed(f"{url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            if attempt == retries:
                raise BootFailed(f"{url}: {exc}") from None
            time.sleep(0.5 * 2**attempt)
    raise BootFailed(url)  # unreachable


# ---------------------------------------------------------------------------------- iPXE


class Ipxe:
    """Interprets iPXE scripts the way the lab's firmware needs: see the module docstring."""

    def __init__(self, mac: str, ip: str) -> None:
        hexhyp = mac.lower().replace(":", "-")
        self.variables = {
            "mac": mac.lower(),
            "mac:hexhyp": hexhyp,
            "ip": ip,
            "manufacturer": "Provisioner Lab",
            "platform": "pcbios",
            "buildarch": "x86_64",
        }
        self.kernel: str | None = None
        self.cmdline = ""
        self.initrds: list[str] = []

    def expand(self, text: str) -> str:
        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            for prefix in ("netX/", "net0/", "net0.dhcp/", "netX.dhcp/"):
                name = name.removeprefix(prefix)
            return self.variables.get(name, "")

        return _VARIABLE.sub(value, text)

    def run(self, url: str, depth: int = 0) -> str | int:
        """Run the script at ``url``: ``"boot"`` when a kernel is started, or an exit code."""
        if depth > 8:
            raise BootFailed("too many chained scripts")
        say("firmware", f"http {url}")
        text = fetch(url).decode("utf-8", "replace")
        if not text.startswith("#!ipxe"):
            raise BootFailed(f"{url} is not an iPXE script")
        lines = [line.strip() for line in text.splitlines()]
        labels = {line[1:]: n for n, line in enumerate(lines) if line.startswith(":")}
        pc = 0
        while pc < len(lines):
            line = lines[pc]
            pc += 1
            if not line or line.startswith(("#", ":")):
                continue
            outcome: str | int | None = None
            for alternative in line.split(" || "):
                try:
                    outcome = self._command(self.expand(alternative).split(), url, depth, labels)
                except BootFailed as exc:
                    say("firmware", f"{alternative.split()[0]} failed: {exc}")
                    continue
                break
            else:
                raise BootFailed(f"{url}: {line!r} failed")
            if isinstance(outcome, tuple):
                pc = outcome[1]
            elif outcome is not None:
                return outcome
        return NO_BOOT

    def _command(self, words: list[str], url: str, depth: int, labels: dict[str, int]) -> Any:
        name, args = words[0], _positional(words[1:])
        if name == "goto":
            if args[0] not in labels:
                raise BootFailed(f"no label {args[0]!r}")
            return ("goto", labels[args[0]] + 1)
        if name == "echo":
            say("firmware", " ".join(words[1:]))
        elif name == "sleep":
            time.sleep(float(args[0]) if args else 1.0)
        elif name == "exit":
            return NO_BOOT
        elif name == "chain":
            return self.run(urllib.parse.urljoin(url, args[0]), depth + 1)
        elif name == "kernel":
            self.kernel = args[0]
            fetch(self.kernel)
            self.cmdline = " ".join(args[1:])
        elif name == "initrd":
            fetch(args[0])
            self.initrds.append(args[0])
        elif name == "boot":
            if self.kernel is None:
                raise BootFailed("boot: no kernel loaded")
            return "boot"
        elif name == "set" and args:
            self.variables[args[0]] = " ".join(args[1:])
        elif name not in ("imgfree", "dhcp", "ifopen", "ifconf", "prompt"):
            raise BootFailed(f"the lab firmware does not know the iPXE command {name!r}")
        return None


_VALUED = ("--name", "-n", "--timeout", "-t")


def _positional(words: list[str]) -> list[str]:
    """A command's arguments without its options (``--name X``, ``--autofree``, ...)."""
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in _VALUED:
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


# ----------------------------------------------------------------------------- installers


def cmdline_value(cmdline: str, key: str) -> str | None:
    for word in cmdline.split():
        if word.startswith(key + "="):
            return word[len(key) + 1 :]
    return None


def install_autoinstall(cmdline: str, target: Path) -> int:
    import yaml  # the node image's python3-yaml

    source = cmdline_value(cmdline, "ds")
    if source is None or "s=" not in source:
        raise BootFailed("autoinstall without ds=nocloud-net;s=URL on the kernel command line")
    base = source.split("s=", 1)[1]
    meta = yaml.safe_load(fetch(base + "meta-data")) or {}
    user = yaml.safe_load(fetch(base + "user-data")) or {}
    say("installer", f"autoinstall answers from {base}")
    auto = user.get("autoinstall") or {}
    cloud = auto.get("user-data") or {}
    hostname = cloud.get("hostname") or meta.get("local-hostname")
    if not hostname:
        raise BootFailed("the answers name no host name")
    keys = (auto.get("ssh") or {}).get("authorized-keys") or []
    write_identity(target, hostname, cloud.get("fqdn"), keys, "root")
    run_commands(auto.get("late-commands") or [], target, chroot=False)
    mark_installed(target, "autoinstall", base)
    return POWER_OFF if auto.get("shutdown") == "poweroff" else REBOOT


def install_kickstart(cmdline: str, target: Path) -> int:
    url = cmdline_value(cmdline, "inst.ks")
    assert url is not None
    text = fetch(url).decode()
    say("installer", f"kickstart from {url}")
    hostname, fqdn, user = None, None, "root"
    keys: list[str] = []
    posts: list[str] = []
    section: list[str] | None = None  # lines of the %-section being read
    keep = False  # whether that section is a %post to run
    for line in text.splitlines():
        if section is not None:
            if line.strip() == "%end":
                if keep:
                    posts.append("\n".join(section))
                section = None
            else:
                section.append(line)
            continue
        words = shlex.split(line, comments=True) if line.strip() else []
        if not words:
            continue
        if words[0].startswith("%"):
            section, keep = [], words[0] == "%post" and "--nochroot" not in words
        elif words[0] == "network":
            for word in words:
                if word.startswith("--hostname="):
                    fqdn = word.split("=", 1)[1]
                    hostname = fqdn.split(".")[0]
        elif words[0] == "sshkey":
            user = next((w.split("=", 1)[1] for w in words if w.startswith("--username=")), user)
            keys.append(words[-1])
    if not hostname:
        raise BootFailed("the kickstart names no host name (network --hostname=)")
    write_identity(target, hostname, fqdn, keys, user)
    run_commands(posts, target, chroot=True)
    mark_installed(target, "kickstart", url)
    return REBOOT


def write_identity(
    target: Path, hostname: str, fqdn: str | None, keys: list[str], user: str
) -> None:
    (target / "etc/hostname").write_text(hostname + "\n")
    names = f"{fqdn} {hostname}" if fqdn and fqdn != hostname else hostname
    (target / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {names}\n")
    subprocess.run(["ssh-keygen", "-A", "-f", str(target)], check=True, capture_output=True)
    say("installer", f"host name {hostname}, SSH host keys made")
    if keys:
        home = target / ("root" if user == "root" else f"home/{user}")
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (ssh / "authorized_keys").open("a") as handle:
            handle.writelines(key + "\n" for key in keys)
        (ssh / "authorized_keys").chmod(0o600)


def run_commands(commands: list[Any], target: Path, *, chroot: bool) -> None:
    for command in commands:
        argv = command if isinstance(command, list) else ["sh", "-c", str(command)]
        if chroot:
            argv = ["chroot", str(target), *argv]
        say("installer", f"run: {_redact(' '.join(map(str, argv[-1:])))}")
        done = subprocess.run([str(a) for a in argv], check=False)
        if done.returncode != 0:
            raise BootFailed(f"command failed with status {done.returncode}")


def _redact(text: str) -> str:
    return re.sub(r"(X-Provisioner-Token: )[0-9a-f]+", r"\1***", text)[:300]


def mark_installed(target: Path, how: str, source: str) -> None:
    marker = target / MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"by": how, "from": source, "time": time.time()}) + "\n")
    os.sync()


def boot(dhcp_boot: str, mac: str, ip: str, target: Path) -> int:
    firmware = Ipxe(mac, ip)
    outcome = firmware.run(dhcp_boot)
    if outcome != "boot":
        say("firmware", "no boot: the script exited; trying the next boot device")
        return NO_BOOT
    say("firmware", f"booting {firmware.kernel} {firmware.cmdline}")
    try:
        if "autoinstall" in firmware.cmdline.split():
            return install_autoinstall(firmware.cmdline, target)
        if cmdline_value(firmware.cmdline, "inst.ks"):
            return install_kickstart(firmware.cmdline, target)
    except BootFailed as exc:
        say("installer", f"install failed: {exc}")
        return FAILED
    except Exception as exc:  # a bug or bad answers: the install fails, the node lives on
        say("installer", f"install failed: {type(exc).__name__}: {exc}")
        return FAILED
    say("installer", "the kernel command line names no installer answers")
    return FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dhcp-boot", required=True, help="boot file URL DHCP hands iPXE")
    parser.add_argument("--mac", required=True)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--target", type=Path, default=Path("/target"))
    args = parser.parse_args(argv)
    try:
        status = boot(args.dhcp_boot, args.mac, args.ip, args.target)
    except (BootFailed, ValueError, OSError) as exc:
        say("firmware", f"network boot failed: {exc}")
        return NO_BOOT
    say("installer" if status in (REBOOT, POWER_OFF) else "firmware", f"exit {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
