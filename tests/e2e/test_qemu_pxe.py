"""The rendered dnsmasq and iPXE scripts network-boot a real PXE ROM: qemu (TCG), e1000, iPXE.

One network namespace of our own (``pxe-e2e-<pid>``) holds a bridge named like the spec's
provisioning interface (``prov-lab0``) with the gateway's address, and a tap for qemu. In it
run the rendered dnsmasq (DHCP + TFTP; only command-line options added) and the boot server
(``provisioner boot serve``), which serves ``pxe_image``'s fake installer as the image's kernel
and initrd. qemu's e1000 option ROM is iPXE: it takes the node's reserved address by DHCP, is
told (tag ``ipxe``) to chain ``boot.ipxe`` over HTTP, chains the node's per-MAC script and
boots the kernel; the fake installer fetches its autoinstall data and POSTs the install
callback, then powers off. A MAC not in the spec ends at the rendered "no boot script" lines.
A firmware PXE client would first fetch undionly.kpxe or ipxe.efi over TFTP; qemu's ROM skips
that step, so a TFTP client inside the namespace shows that dnsmasq serves those files.

Needs root and qemu-system-x86, ipxe-qemu, ipxe, dnsmasq-base, busybox-static, iproute2.
Without them the module is skipped, except under CI (``CI`` set), where that is a failure.
The payload is built once and cached (see ``pxe_image``); a cold build downloads the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from provisioner.spec import Fleet, load_fleet
from tests.conftest import LAB_SPEC, REPO
from tests.e2e.pxe_image import MARKER, PayloadError, pxe_payload
from tests.peers import bounded_command, log_tail, stop_process_group, wait_until

pytestmark = pytest.mark.integration

NODE = "gpu-lab-01"
STRANGER_MAC = "02:00:0a:c8:00:63"  # in no spec
BOOT_TIMEOUT = 180.0  # seconds from qemu start to power-off; ~30 s seen on 2 TCG cores
LAB_LIFETIME = 900.0  # dnsmasq and the boot server die after this even if teardown never runs
NAMESPACE_PREFIX = "pxe-e2e-"
TAP = "pxe-tap0"
DEAD_END = "No bootable device."  # SeaBIOS, when every boot device has failed
FIRMWARE_FILES = {  # what dnsmasq.conf's dhcp-boot lines name, from Debian's ipxe package
    "undionly.kpxe": Path("/usr/lib/ipxe/undionly.kpxe"),
    "ipxe.efi": Path("/usr/lib/ipxe/ipxe.efi"),
}
E1000_ROM = Path("/usr/lib/ipxe/qemu/efi-e1000.rom")  # ipxe-qemu: qemu's e1000 option ROM
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "dnsmasq": "dnsmasq-base",
    "ip": "iproute2",
    "busybox": "busybox-static",
    "timeout": "coreutils",
}
SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"


def _missing() -> list[str]:
    missing = [] if os.geteuid() == 0 else ["root (namespaces, a tap device)"]
    missing += [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if not _which(tool)]
    missing += [f"{path} ({pkg})" for path, pkg in _files() if not path.is_file()]
    return missing


def _files() -> list[tuple[Path, str]]:
    return [(E1000_ROM, "ipxe-qemu"), *((path, "ipxe") for path in FIRMWARE_FILES.values())]


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=SBIN_PATH)


MISSING = _missing()
if MISSING and not os.environ.get("CI"):
    pytest.skip(f"the qemu PXE test needs {', '.join(MISSING)}", allow_module_level=True)


@dataclass(frozen=True)
class PxeLab:
    """The namespace, its servers and their records, shared by the module's VMs."""

    fleet: Fleet
    namespace: str
    work: Path
    render: Path
    tftp_root: Path
    leases: Path
    dnsmasq_log: Path
    events: Path
    boot_log: Path

    @property
    def boot_url(self) -> str:
        return str(self.fleet.document.boot.url)

    @property
    def bridge(self) -> str:
        return self.fleet.document.networks.provisioning.interface or "prov-lab0"

    @property
    def gateway(self) -> IPv4Address:
        return self.fleet.document.networks.provisioning.gateway

    def served(self, client: str) -> dict[str, int]:
        """Path -> HTTP status of every request ``client`` made to the boot server."""
        return {e["path"]: e["status"] for e in self.boot_events() if e["client"] == client}

    def boot_events(self) -> list[dict[str, Any]]:
        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line]

    def leased(self, mac: str) -> str | None:
        """The address dnsmasq's lease file gives ``mac``, if any."""
        for line in self.leases.read_text().splitlines() if self.leases.exists() else []:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == mac:
                return fields[2]
        return None

    def netns(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def report(self, run: VmRun | None = None) -> str:
        """What to show when an assertion fails: the VM's console and the servers' logs."""
        logs = [("boot server", self.boot_log), ("events", self.events)]
        text = "".join(f"\n--- {name}:\n{log_tail(path, 2500)}" for name, path in logs)
        text += f"\n--- dnsmasq:\n{log_tail(self.dnsmasq_log, 1500)}"
        if run is None:
            return text
        return f"\n--- console, {run.seconds:.0f} s:\n{run.console[-3000:]}{text}"


@dataclass(frozen=True)
class VmRun:
    console: str
    returncode: int | None  # None: still running when the test stopped it
    started: float  # time.time() at qemu's start
    seconds: float


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PxeLab]:
    if MISSING:
        pytest.fail(f"CI must run the qemu PXE test; missing {', '.join(MISSING)}")
    work = tmp_path_factory.mktemp("pxe")
    spec, render, tftp_root, images = (work / p for p in ("fleet.yaml", "render", "tftp", "img"))
    fleet = _render_lab_spec(spec, render, tftp_root)
    _lay_out(fleet, tftp_root, images)
    _remove_stale_namespaces()
    namespace = f"{NAMESPACE_PREFIX}{os.getpid()}"
    lab = PxeLab(
        fleet,
        namespace,
        work,
        render,
        tftp_root,
        leases=work / "dnsmasq.leases",
        dnsmasq_log=work / "dnsmasq.log",
        events=work / "boot-events.jsonl",
        boot_log=work / "boot-server.log",
    )
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(_ip, "netns", "delete", namespace, check=False)
        _make_network(lab)
        dnsmasq = _start_in(lab, _dnsmasq_argv(lab), lab.dnsmasq_log, LAB_LIFETIME)
        cleanup.callback(stop_process_group, dnsmasq)
        _wait_for_line(dnsmasq, lab.dnsmasq_log, "TFTP root is", "dnsmasq", lab)
        server = _start_in(lab, _boot_server_argv(lab, spec, images), lab.boot_log, LAB_LIFETIME)
        cleanup.callback(stop_process_group, server)
        _wait_for_line(server, lab.boot_log, f"ready {lab.boot_url}", "the boot server", lab)
        yield lab


def _render_lab_spec(spec: Path, render: Path, tftp_root: Path) -> Fleet:
    """The lab spec, its TFTP root moved into ``tftp_root``, rendered by the CLI."""
    document = yaml.safe_load(LAB_SPEC.read_text())
    document["boot"]["tftp_root"] = str(tftp_root)
    spec.write_text(yaml.safe_dump(document, sort_keys=False))
    done = subprocess.run(
        [sys.executable, "-m", "provisioner", "render", str(spec), "--out", str(render)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return load_fleet(spec)


def _lay_out(fleet: Fleet, tftp_root: Path, images: Path) -> None:
    """Firmware PXE binaries in the TFTP root; the fake installer where the image URLs say."""
    tftp_root.mkdir()
    for name, source in FIRMWARE_FILES.items():
        shutil.copyfile(source, tftp_root / name)
    try:
        payload = pxe_payload()
    except PayloadError as exc:
        pytest.fail(f"cannot build the PXE payload: {exc}")
    image = fleet.image(fleet.by_name[NODE])
    for url, source in ((image.kernel_url, payload.kernel), (image.initrd_url, payload.initrd)):
        target = images / urlsplit(str(url)).path.removeprefix("/images/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # a copy: the server serves no symlinks out of images/


def _make_network(lab: PxeLab) -> None:
    network = lab.fleet.document.networks.provisioning
    bridge, ns = lab.bridge, lab.namespace
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "link", "add", bridge, "type", "bridge", "forward_delay", "0")
    _ip("-n", ns, "addr", "add", f"{network.gateway}/{network.cidr.prefixlen}", "dev", bridge)
    _ip("-n", ns, "link", "set", bridge, "up")
    _ip("-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap")
    _ip("-n", ns, "link", "set", TAP, "master", bridge, "up")


def _dnsmasq_argv(lab: PxeLab) -> list[str]:
    return [
        "dnsmasq",
        f"--conf-file={lab.render / 'dnsmasq' / 'dnsmasq.conf'}",
        "--no-daemon",  # also: stays root, so it reads the TFTP root under pytest's 0700 tmp
        f"--pid-file={lab.work / 'dnsmasq.pid'}",
        f"--dhcp-leasefile={lab.leases}",
        "--log-dhcp",
        "--log-facility=-",  # stderr, not the host's syslog
    ]


def _boot_server_argv(lab: PxeLab, spec: Path, images: Path) -> list[str]:
    url = urlsplit(lab.boot_url)
    return [
        *(sys.executable, "-m", "provisioner", "boot", "serve", str(spec)),
        *("--render", str(lab.render), "--images", str(images)),
        *("--listen", f"{url.hostname}:{url.port}", "--events", str(lab.events)),
    ]


def _start_in(lab: PxeLab, argv: list[str], log: Path, lifetime: float) -> subprocess.Popen[bytes]:
    """``argv`` in the namespace, in its own process group, output to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", lab.namespace, *bounded_command(argv, lifetime)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PATH": SBIN_PATH},
            start_new_session=True,
        )


def _wait_for_line(
    process: subprocess.Popen[bytes], log: Path, text: str, what: str, lab: PxeLab
) -> None:
    try:
        wait_until(
            lambda: process.poll() is not None or text in log.read_text(errors="replace"),
            timeout=30,
            what=f"{what} to print {text!r}",
        )
    except TimeoutError as exc:
        pytest.fail(f"{exc}{lab.report()}")
    if process.poll() is not None:
        pytest.fail(f"{what} exited with {process.returncode}{lab.report()}")


def _ip(*argv: str, check: bool = True) -> None:
    done = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(argv)}: {done.stderr.strip()}")


def _remove_stale_namespaces() -> None:
    """Namespaces this test left behind in runs that were killed (their pid is gone)."""
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    for name in re.findall(rf"^{NAMESPACE_PREFIX}(\d+)\b", listing, re.MULTILINE):
        if not Path(f"/proc/{name}").exists():
            _ip("netns", "delete", f"{NAMESPACE_PREFIX}{name}", check=False)


def boot_vm(lab: PxeLab, mac: str, name: str, until: Callable[[str], bool] | None = None) -> VmRun:
    """Network-boot a VM with ``mac`` until it powers off, ``until(console)`` holds, the
    firmware has nothing left to boot, or ``BOOT_TIMEOUT`` passes; qemu is stopped in every
    case. The console comes back as plain text (see ``_plain``)."""
    path = lab.work / f"{name}.console"
    argv = [
        *("qemu-system-x86_64", "-accel", "tcg", "-m", "512"),
        *("-nographic", "-no-reboot", "-display", "none"),
        *("-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no"),
        *("-device", f"e1000,netdev=n0,mac={mac},bootindex=1"),
    ]

    def finished() -> bool:
        text = path.read_text(errors="replace")
        return DEAD_END in text or (until is not None and until(_plain(text)))

    started, clock = time.time(), time.monotonic()
    qemu = _start_in(lab, argv, path, BOOT_TIMEOUT + 10)
    try:
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: qemu.poll() is not None or finished(), BOOT_TIMEOUT, 0.2)
        returncode = qemu.poll()
    finally:
        stop_process_group(qemu)
    text = _plain(path.read_text(errors="replace"))
    return VmRun(text, returncode, started, time.monotonic() - clock)


def _plain(console: str) -> str:
    """The serial console as plain lines: no escape sequences, no carriage returns, and what
    a backspace erased (iPXE's spinner and progress counters) gone."""
    text = re.sub(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)", "", console).replace("\r", "")
    while "\x08" in text:
        erased = re.sub(r"[^\x08\n]\x08", "", text)
        if erased == text:
            return text.replace("\x08", "")
        text = erased
    return text


def _echo_lines(script: Path, label: str | None = None) -> list[str]:
    """What an iPXE script's ``echo`` commands print (in the block after ``:label``)."""
    lines = script.read_text().splitlines()
    if label is not None:
        lines = lines[lines.index(f":{label}") + 1 :]
    return [line.removeprefix("echo ") for line in lines if line.startswith("echo ")]


def _dhcp_boot_files(log: str, mac: str) -> set[tuple[bool, str]]:
    """(tagged ipxe?, boot file) of each DHCP reply dnsmasq logged for ``mac``."""
    transactions: dict[str, dict[str, Any]] = {}
    for xid, message in re.findall(r"dnsmasq-dhcp\[\d+\]: (\d+) (.*)", log):
        seen = transactions.setdefault(xid, {"macs": set(), "tags": set(), "files": set()})
        if found := re.match(r"DHCP[A-Z]+\([^)]*\) (?:\S+ )?([0-9a-f:]{17})", message):
            seen["macs"].add(found.group(1))
        if found := re.match(r"tags: (.*)", message):
            seen["tags"].update(tag.strip() for tag in found.group(1).split(","))
        if found := re.match(
            r"(?:bootfile name:|sent .* option: 67 bootfile-name) +(\S+)", message
        ):
            seen["files"].add(found.group(1))
    return {
        ("ipxe" in seen["tags"], file)
        for seen in transactions.values()
        if mac in seen["macs"]
        for file in seen["files"]
    }


def test_dnsmasq_serves_the_firmware_pxe_binaries_over_tftp(lab: PxeLab) -> None:
    for name, source in FIRMWARE_FILES.items():
        fetched = lab.work / f"tftp-{name}"
        done = lab.netns("busybox", "tftp", "-g", "-r", name, "-l", str(fetched), str(lab.gateway))
        assert done.returncode == 0, done.stderr + lab.report()
        assert fetched.read_bytes() == source.read_bytes()
        # dnsmasq logs the transfer once it has the last ACK, which may be after busybox exits.
        sent = f"sent {lab.tftp_root / name} to"
        wait_until(lambda line=sent: line in lab.dnsmasq_log.read_text(), 10, what=sent)
    missing = lab.netns(
        "busybox", "tftp", "-g", "-r", "pxelinux.0", "-l", "/dev/null", str(lab.gateway)
    )
    assert missing.returncode != 0, "a file not in the TFTP root was served"


def test_node_in_the_spec_boots_the_installer_which_fetches_its_data_and_calls_back(
    lab: PxeLab, record_property: Callable[[str, object], None]
) -> None:
    node = lab.fleet.by_name[NODE]
    mac_script = lab.render / "boot" / "ipxe" / f"{node.mac.replace(':', '-')}.ipxe"
    run = boot_vm(lab, node.mac, NODE)
    report = lab.report(run)
    assert run.returncode == 0, f"the VM did not power itself off{report}"

    # iPXE ran the node's rendered script; the fake installer went all the way.
    for line in [
        *_echo_lines(mac_script)[:1],
        f"{MARKER} user-data fetched",
        f"{MARKER} callback sent",
    ]:
        assert line in run.console, f"console lacks {line!r}{report}"

    # dnsmasq leased the reserved address, told iPXE to chain boot.ipxe over HTTP and a
    # client without iPXE's option 175 (the installer's udhcpc) to fetch undionly.kpxe.
    assert lab.leased(node.mac) == str(node.ip), report
    dnsmasq_log = lab.dnsmasq_log.read_text()
    assert f"DHCPACK({lab.bridge}) {node.ip} {node.mac} {node.name}" in dnsmasq_log
    assert _dhcp_boot_files(dnsmasq_log, node.mac) == {
        (True, f"{lab.boot_url}ipxe/boot.ipxe"),
        (False, "undionly.kpxe"),
    }, report

    # The boot server handed over the chain script, the node's script, the image, its data.
    image = lab.fleet.image(node)
    wanted = [f"{lab.boot_url}ipxe/boot.ipxe", f"{lab.boot_url}ipxe/{mac_script.name}"]
    wanted += [str(image.kernel_url), str(image.initrd_url)]
    wanted += [f"{lab.boot_url}autoinstall/{NODE}/{name}" for name in ("meta-data", "user-data")]
    served = lab.served(str(node.ip))
    assert {urlsplit(url).path: 200 for url in wanted}.items() <= served.items(), report

    callbacks = [e for e in lab.boot_events() if e["kind"] == "callback"]
    assert [(e["node"], e["client"], e["accepted"], e["body"]) for e in callbacks] == [
        (NODE, str(node.ip), True, {"node": NODE, "event": "installed"})
    ], report
    callback_after = callbacks[0]["time"] - run.started
    record_property("vm_start_to_callback_s", round(callback_after, 1))
    record_property("vm_start_to_poweroff_s", round(run.seconds, 1))
    print(
        f"\n{NODE}: callback {callback_after:.1f} s after qemu started, off at {run.seconds:.1f} s"
    )


def test_mac_not_in_the_spec_gets_the_chain_script_and_stops_at_no_boot_script(
    lab: PxeLab,
) -> None:
    unknown = _echo_lines(lab.render / "boot" / "ipxe" / "boot.ipxe", label="unknown")
    expected = [line.replace("${netX/mac}", STRANGER_MAC) for line in unknown]
    assert expected and STRANGER_MAC in expected[0]
    run = boot_vm(lab, STRANGER_MAC, "stranger", until=lambda text: expected[-1] in text)
    report = lab.report(run)
    for line in expected:
        assert line in run.console, f"console lacks {line!r}{report}"
    assert MARKER not in run.console, report

    address = lab.leased(STRANGER_MAC)
    pool = lab.fleet.document.networks.provisioning.dhcp_range
    assert address is not None and pool is not None and IPv4Address(address) in pool, report
    served = lab.served(address)
    assert served == {
        urlsplit(lab.boot_url).path + "ipxe/boot.ipxe": 200,
        urlsplit(lab.boot_url).path + f"ipxe/{STRANGER_MAC.replace(':', '-')}.ipxe": 404,
    }, report
