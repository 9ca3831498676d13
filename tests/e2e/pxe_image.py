"""A small PXE payload for the qemu end-to-end test: Debian's kernel and a busybox initramfs.

**A test fake.** It stands in for the Ubuntu 24.04 live installer (casper's kernel and initrd
that the lab spec's image points at), which cannot run here: it needs a 2.6 GB ISO, a disk
and many minutes of emulated CPU. The fake does, on the same inputs, the part of the
installer's work that provisioner is responsible for:

1. it boots from the kernel command line that the rendered per-MAC iPXE script passes,
   and takes its address by DHCP from the rendered dnsmasq (``ip=dhcp``);
2. it finds ``ds=nocloud-net;s=URL`` on ``/proc/cmdline`` (iPXE passes the ``;`` as is)
   and fetches ``URL/meta-data`` and ``URL/user-data`` from the boot server, as cloud-init's
   NoCloud datasource does;
3. from the rendered ``autoinstall.late-commands`` it takes the install callback (the
   ``curl ... -H 'X-Provisioner-Token: ...' -d '...' URL`` line) and POSTs it, as subiquity
   would at the end of an install; then it powers the machine off.

It prints ``PXE-E2E: ...`` markers on the first serial port, which ``qemu -nographic`` puts
on its stdout. (The rendered command line has no ``console=``, so the kernel itself writes to
the VGA screen; only this script's lines reach the serial log.)

The kernel is the one Debian's ``linux-image-amd64`` depends on, fetched with
``apt-get download``; Debian builds e1000 (qemu's PXE NIC here) as a module, so that module
and whatever it depends on go into the initramfs. The build is cached under
``PROVISIONER_TEST_PXE_CACHE`` (default ``/var/cache/provisioner/test-pxe``) in a folder named
by the kernel package, its version and a hash of everything else the payload is made from.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("PROVISIONER_TEST_PXE_CACHE", "/var/cache/provisioner/test-pxe"))
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX = Path("/bin/busybox")
NIC_MODULE = "e1000"
MARKER = "PXE-E2E:"  # what the init script prints before each of its lines

INIT = r"""#!/bin/sh
# Fake Ubuntu installer for provisioner's qemu PXE test (tests/e2e/pxe_image.py).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec >/dev/ttyS0 2>&1 </dev/null
say() { echo "PXE-E2E: $*"; }
fail() { say "FAILED: $*"; dmesg | tail -n 20; poweroff -f; sleep 60; }
say "init started on kernel $(uname -r)"

for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module.ko" || fail "insmod $module"
done
ip link set lo up
udhcpc -i eth0 -s /etc/udhcpc.script -f -q -n -t 10 -T 2 || fail "no DHCP lease on eth0"
say "eth0 has $(ip -4 -o addr show dev eth0 | sed -n 's/.* inet \([^ ]*\) .*/\1/p')"

say "cmdline: $(cat /proc/cmdline)"
ds=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^ds=nocloud-net;s=//p' | head -n 1)
[ -n "$ds" ] || fail "no ds=nocloud-net;s=URL on the kernel command line"
case "$ds" in */) ;; *) ds="$ds/" ;; esac
wget -q -O /tmp/meta-data "${ds}meta-data" || fail "GET ${ds}meta-data"
say "meta-data fetched from ${ds}meta-data"
wget -q -O /tmp/user-data "${ds}user-data" || fail "GET ${ds}user-data"
say "user-data fetched from ${ds}user-data"

# The late-command is a YAML double-quoted string: "curl ... -H 'X-Provisioner-Token: T'
# ... -d '{\"node\": ...}' URL || true"; only its \" escapes need undoing.
line=$(grep -F 'X-Provisioner-Token:' /tmp/user-data | tail -n 1)
token=$(echo "$line" | sed -n "s/.*'X-Provisioner-Token: \([^']*\)'.*/\1/p")
body=$(echo "$line" | sed -n "s/.* -d '\([^']*\)'.*/\1/p" | sed 's/\\"/"/g')
url=$(echo "$line" | sed -n 's/.* \(https\{0,1\}:[^ ]*\) || true.*/\1/p')
[ -n "$token" ] && [ -n "$body" ] && [ -n "$url" ] || fail "no callback in user-data: $line"
say "callback found: POST $url $body"
wget -q -O /tmp/reply --header "X-Provisioner-Token: $token" \
    --header 'Content-Type: application/json' --post-data "$body" "$url" \
    || fail "POST $url was refused or failed"
say "callback sent, answer: $(cat /tmp/reply)"
say "powering off"
poweroff -f
sleep 60
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc calls this with deconfig, bound or renew; the lease comes in the environment.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip -4 addr add "$ip/${mask:-24}" dev "$interface"
    [ -z "$router" ] || ip -4 route replace default via "${router%% *}" dev "$interface"
    ;;
esac
"""


class PayloadError(RuntimeError):
    """The payload could not be built (no apt lists, no busybox, a module missing)."""


@dataclass(frozen=True)
class Payload:
    kernel: Path
    initrd: Path
    kernel_package: str


def pxe_payload(cache: Path = CACHE) -> Payload:
    """The kernel and initramfs, built on first use and then taken from ``cache``."""
    package = _kernel_package()
    version = _apt_version(package)
    inputs = "\n".join(
        [package, version, _installed_version(BUSYBOX_PACKAGE), NIC_MODULE, INIT, UDHCPC_SCRIPT]
    )
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:12]
    folder = cache / f"{package}_{version}_{digest}"
    payload = Payload(folder / "vmlinuz", folder / "initrd", f"{package}={version}")
    if payload.kernel.is_file() and payload.initrd.is_file():
        return payload
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as work:
        staged = Path(work) / "payload"
        staged.mkdir()
        _build(package, version, Path(work), staged)
        try:
            staged.rename(folder)
        except OSError:
            if not payload.initrd.is_file():  # not a concurrent build that won the race
                raise
    return payload


def _build(package: str, version: str, work: Path, out: Path) -> None:
    _run("apt-get", "download", "-o", "APT::Sandbox::User=root", f"{package}={version}", cwd=work)
    (deb,) = work.glob("*.deb")
    root = work / "root"
    _run("dpkg-deb", "-x", str(deb), str(root))
    (vmlinuz,) = (root / "boot").glob("vmlinuz-*")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    modules = _module_closure(root / "lib" / "modules", NIC_MODULE)
    (out / "initrd").write_bytes(gzip.compress(_initramfs(modules), mtime=0))


def _module_closure(tree: Path, name: str) -> list[tuple[str, bytes]]:
    """``name`` and the modules it needs, dependencies first, as (name, decompressed .ko)."""
    found = {
        _module_name(path): path
        for path in tree.rglob("*.ko*")
        if path.name.endswith((".ko", ".ko.xz"))
    }
    ordered: list[tuple[str, bytes]] = []

    def visit(wanted: str) -> None:
        key = wanted.replace("-", "_")
        if any(done == key for done, _ in ordered):
            return
        if key not in found:
            raise PayloadError(f"kernel module {wanted} is not in {tree}")
        data = found[key].read_bytes()
        if found[key].name.endswith(".xz"):
            data = lzma.decompress(data)
        match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
        for dependency in filter(None, (match.group(1).decode() if match else "").split(",")):
            visit(dependency)
        ordered.append((key, data))

    visit(name)
    return ordered


def _module_name(path: Path) -> str:
    return path.name.split(".ko")[0].replace("-", "_")


def _initramfs(modules: list[tuple[str, bytes]]) -> bytes:
    archive = _Newc()
    for folder in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        archive.add(folder, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    archive.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    archive.add("init", stat.S_IFREG | 0o755, INIT.encode())
    archive.add("etc/udhcpc.script", stat.S_IFREG | 0o755, UDHCPC_SCRIPT.encode())
    for name, data in modules:
        archive.add(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data)
    order = "".join(f"{name}\n" for name, _ in modules)
    archive.add("lib/modules/load-order", stat.S_IFREG | 0o644, order.encode())
    return archive.finish()


class _Newc:
    """A cpio archive in the kernel's ``newc`` format (what ``cpio -H newc`` writes)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = [self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._chunks += [_pad4(header + name.encode() + b"\0"), _pad4(data)]
        self._inode += 1

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _kernel_package() -> str:
    out = _run("apt-cache", "depends", "--important", KERNEL_META_PACKAGE)
    match = re.search(r"Depends: (linux-image-\S+)", out)
    if match is None:
        raise PayloadError(f"{KERNEL_META_PACKAGE} depends on no kernel here:\n{out}")
    return match.group(1)


def _apt_version(package: str) -> str:
    out = _run("apt-cache", "show", "--no-all-versions", package)
    match = re.search(r"^Version: (\S+)$", out, re.MULTILINE)
    if match is None:
        raise PayloadError(f"apt knows no version of {package}")
    return match.group(1)


def _installed_version(package: str) -> str:
    if not BUSYBOX.is_file():
        raise PayloadError(f"{BUSYBOX} is missing: install {BUSYBOX_PACKAGE}")
    return _run("dpkg-query", "-W", "-f", "${Version}", package)


def _run(*argv: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=cwd, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PayloadError(f"{argv[0]}: {exc}") from exc
    if done.returncode != 0:
        hint = " (apt-get update first?)" if argv[0].startswith("apt") else ""
        raise PayloadError(f"{' '.join(argv)} failed{hint}:\n{done.stderr.strip()}")
    return done.stdout


if __name__ == "__main__":
    print(pxe_payload())
