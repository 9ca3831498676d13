"""OpenIPMI ``ipmi_sim`` BMCs on loopback, one process each, chassis state in files.

Each BMC gets its own work directory with ``lan.conf``, ``sim.emu``, a state directory and a
chassis directory. ipmi_sim runs ``chassis.sh CHASSIS_DIR get power boot`` and
``chassis.sh CHASSIS_DIR set power 1 boot pxe``; the script keeps the answers in files there:

- ``power``: ``0`` or ``1``; ``boot``: the last boot device ipmi_sim passed (``default``,
  ``pxe``, ``cdrom``, ``bios`` ...; ipmitool's ``bootdev disk`` arrives as ``default``);
- ``resets``: one line per reset pulse; ``calls``: every call, e.g. ``set power 1``;
- ``cpu_temp`` and ``inlet_temp``: sensor readings in degrees C, polled by ipmi_sim.

FRU 0 holds an IPMI FRU image with the serial; the SEL is enabled (empty at start); the SDR
repository has two threshold temperature sensors, ``CPU Temp`` (1) and ``Inlet Temp`` (2).
A loopback emulator console takes emu commands at run time (``IpmiSim.emu``). The FRU and
SDR bytes come from ``ipmi_records``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.peers import (
    LOOPBACK,
    bounded_command,
    free_tcp_port,
    free_udp_port,
    log_tail,
    stop_process_group,
)
from tests.peers.ipmi_records import (
    BMC_ADDR,
    COMPACT_FRU_SIZE,
    FruLayout,
    emu_bytes,
    encode_fru,
    temperature_sdr,
)

DEFAULT_USERNAME = "admin"
DEFAULT_PASSWORD = "secret"
CPU_TEMP_SENSOR = 1
INLET_TEMP_SENSOR = 2

CHASSIS_SCRIPT = r"""#!/bin/sh
# chassis_control for ipmi_sim: DIR get PARM... | DIR set PARM VALUE [PARM VALUE...]
dir=$1
op=$2
shift 2
echo "$op $*" >> "$dir/calls"
put() { printf '%s\n' "$2" > "$dir/$1.tmp" && mv "$dir/$1.tmp" "$dir/$1"; }
case $op in
get)
    for parm in "$@"; do
        case $parm in
        power) echo "power:$(cat "$dir/power")" ;;
        boot) echo "boot:$(cat "$dir/boot")" ;;
        *) echo "Invalid parameter: $parm"; exit 1 ;;
        esac
    done
    ;;
set)
    while [ $# -gt 0 ]; do
        if [ $# -lt 2 ]; then echo "No value for $1"; exit 1; fi
        parm=$1
        val=$2
        shift 2
        case $parm in
        power) put power "$val" ;;
        shutdown) put power 0 ;;
        reset) echo "$val" >> "$dir/resets" ;;
        boot) put boot "$val" ;;
        identify) if [ $# -gt 0 ]; then shift; fi ;;
        *) echo "Invalid parameter: $parm"; exit 1 ;;
        esac
    done
    ;;
*) echo "Unsupported operation: $op"; exit 1 ;;
esac
"""


@dataclass
class IpmiSim:
    """One running ipmi_sim BMC. ``host``/``port`` is its IPMI-over-LAN (UDP) address."""

    name: str
    host: str
    port: int
    username: str
    password: str
    serial: str
    guid: str
    fru_layout: FruLayout
    workdir: Path
    chassis_dir: Path
    console_port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    def _read(self, name: str) -> str:
        return (self.chassis_dir / name).read_text().strip()

    def _write(self, name: str, value: str) -> None:
        staged = self.chassis_dir / f".{name}.staged"  # not chassis.sh's temporary name
        staged.write_text(f"{value}\n")
        staged.replace(self.chassis_dir / name)

    def power(self) -> str:
        """Chassis power as the BMC holds it, from the chassis side: ``on`` or ``off``."""
        return "on" if self._read("power") == "1" else "off"

    def boot(self) -> str:
        """The boot device last set through the BMC (``default`` at start)."""
        return self._read("boot")

    def resets(self) -> int:
        """How many reset pulses (``chassis power reset``) the chassis received."""
        path = self.chassis_dir / "resets"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def calls(self) -> list[str]:
        """Every chassis_control call so far, e.g. ``["get power", "set power 1"]``."""
        path = self.chassis_dir / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def set_power(self, on: bool) -> None:
        """Change power from the chassis side (a button press, a PSU failure)."""
        self._write("power", "1" if on else "0")

    def set_temperature(self, celsius: int, sensor: Literal["cpu", "inlet"] = "cpu") -> None:
        """Set a sensor reading (0-255); ipmi_sim polls the file every 250 ms."""
        if not 0 <= celsius <= 255:
            raise ValueError(f"raw sensor reading out of range: {celsius}")
        self._write(f"{sensor}_temp", str(celsius))

    def emu(self, command: str, timeout: float = 5.0) -> str:
        """Run one ipmi_sim emulator command on its console, return its output.

        E.g. ``sel_add 0x20 0x02 ...`` or ``mc_disable 0x20``; ``RuntimeError`` when the
        simulator answers with an error (``**...``).
        """
        with socket.create_connection((LOOPBACK, self.console_port), timeout=timeout) as sock:
            _read_prompt(sock)
            sock.sendall(command.encode() + b"\n")
            reply = _read_prompt(sock)
        lines = [line.strip() for line in reply.splitlines()[1:]]  # [0] echoes the command
        output = "\n".join(line for line in lines if line and line != ">")
        if "**" in output:
            raise RuntimeError(f"ipmi_sim rejected {command!r}: {output}")
        return output

    def add_sel_entry(self, event: bytes, record_type: int = 0x02) -> str:
        """Append a SEL record: 13 bytes after the record type (timestamp, generator, EvM
        revision, sensor type, sensor number, event dir/type, event data 1-3)."""
        if len(event) != 13:
            raise ValueError("a SEL record body is 13 bytes")
        return self.emu(f"sel_add 0x{BMC_ADDR:02x} 0x{record_type:02x} {emu_bytes(event)}")


def _read_prompt(sock: socket.socket) -> str:
    """Read console output up to the ``> `` prompt; telnet negotiation bytes removed."""
    data = b""
    while not data.endswith(b"> "):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    cleaned = bytearray()
    index = 0
    while index < len(data):
        if data[index] == 0xFF:  # IAC, command byte, option byte
            index += 3
            continue
        cleaned.append(data[index])
        index += 1
    return cleaned.decode(errors="replace")


def ipmitool(
    sim: IpmiSim,
    *args: str,
    port: int | None = None,
    password: str | None = None,
    retries: int | None = None,
    interval: int | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``ipmitool -I lanplus -C 3`` against ``sim`` (or ``port``, e.g. a proxy's).

    ``retries`` and ``interval`` map to ipmitool's ``-R`` (default 4) and ``-N`` (seconds
    between retransmissions, default 1). Cipher suite 3 because ipmi_sim has no SHA-256
    suites and ipmitool's default (17) hangs for ~10 s first. Never raises on failure.
    """
    argv = ["ipmitool", "-I", "lanplus", "-C", "3", "-H", sim.host, "-p", str(port or sim.port)]
    argv += ["-U", sim.username, "-P", sim.password if password is None else password]
    if retries is not None:
        argv += ["-R", str(retries)]
    if interval is not None:
        argv += ["-N", str(interval)]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class IpmiSimFactory:
    """Starts ipmi_sim BMCs on free loopback ports; ``stop_all`` ends them all."""

    def __init__(self, base_dir: Path | None = None, lifetime: float = 600.0) -> None:
        self.base_dir = base_dir
        self.lifetime = lifetime
        self.sims: list[IpmiSim] = []
        self._count = 0

    def start(
        self,
        count: int = 1,
        *,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        serials: Sequence[str] | None = None,
        fru_layout: FruLayout = "full",
        power_on: bool = False,
        ready_timeout: float = 20.0,
    ) -> list[IpmiSim]:
        """Start ``count`` BMCs and wait until each answers ``chassis power status``.

        Serials default to ``SIM0001``, ``SIM0002`` ... in start order, per factory.
        """
        if serials is not None and len(serials) != count:
            raise ValueError("one serial per BMC")
        started = []
        for index in range(count):
            self._count += 1
            serial = serials[index] if serials is not None else f"SIM{self._count:04d}"
            name = f"sim{self._count}"
            sim = self._start_one(
                name, username, password, serial, fru_layout, power_on, ready_timeout
            )
            started.append(sim)
        return started

    def _start_one(
        self,
        name: str,
        username: str,
        password: str,
        serial: str,
        fru_layout: FruLayout,
        power_on: bool,
        ready_timeout: float,
    ) -> IpmiSim:
        failure: RuntimeError | None = None
        for _attempt in range(3):  # a free port may be taken before ipmi_sim binds it
            workdir = Path(tempfile.mkdtemp(prefix=f"ipmi-{name}-", dir=self.base_dir))
            sim = self._launch(workdir, name, username, password, serial, fru_layout, power_on)
            self.sims.append(sim)
            try:
                _wait_ready(sim, ready_timeout)
            except RuntimeError as exc:
                hung = sim.process.poll() is None
                self.stop(sim)
                if hung:  # up but not answering: another port would not help
                    raise
                failure = exc
                continue
            return sim
        assert failure is not None
        raise failure

    def _launch(
        self,
        workdir: Path,
        name: str,
        username: str,
        password: str,
        serial: str,
        fru_layout: FruLayout,
        power_on: bool,
    ) -> IpmiSim:
        if any(char.isspace() or char == '"' for char in str(workdir) + username + password):
            raise ValueError("no spaces or quotes in paths and credentials for ipmi_sim")
        chassis_dir = workdir / "chassis"
        state_dir = workdir / "state"
        chassis_dir.mkdir()
        state_dir.mkdir()
        (chassis_dir / "power").write_text("1\n" if power_on else "0\n")
        (chassis_dir / "boot").write_text("default\n")
        (chassis_dir / "cpu_temp").write_text("45\n")
        (chassis_dir / "inlet_temp").write_text("24\n")
        script = workdir / "chassis.sh"
        script.write_text(CHASSIS_SCRIPT)
        script.chmod(0o755)
        fru = encode_fru(serial, fru_layout)
        (workdir / "fru.bin").write_bytes(fru)
        fru_size = COMPACT_FRU_SIZE if fru_layout == "compact" else 256
        guid = uuid.uuid4().hex
        port = free_udp_port()
        console_port = free_tcp_port()
        (workdir / "lan.conf").write_text(
            f'name "{name}"\n'
            f"set_working_mc 0x{BMC_ADDR:02x}\n"
            "  startlan 1\n"
            f"    addr {LOOPBACK} {port}\n"
            "    priv_limit admin\n"
            "    allowed_auths_admin md5 straight\n"
            f"    guid {guid}\n"
            "  endlan\n"
            f"  console {LOOPBACK} {console_port}\n"
            f'  chassis_control "{script} {chassis_dir}"\n'
            f'  user 2 true "{username}" "{password}" admin 10 md5 straight\n'
        )
        mc = f"0x{BMC_ADDR:02x}"
        lines = [
            f"mc_setbmc {mc}",
            f"mc_add {mc} 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr",
            f"sel_enable {mc} 1000 0x0a",
            f'mc_add_fru_data {mc} 0 0x{fru_size:x} file 0 "{workdir / "fru.bin"}"',
        ]
        for number, sensor, label, upper in (
            (CPU_TEMP_SENSOR, "cpu", "CPU Temp", (85, 95, 105)),
            (INLET_TEMP_SENSOR, "inlet", "Inlet Temp", (40, 45, 50)),
        ):
            lines += [
                f'sensor_add {mc} 0 {number} 0x01 0x01 poll 250 file "{chassis_dir}/{sensor}_temp"',
                f"main_sdr_add {mc} {emu_bytes(temperature_sdr(number, label, upper))}",
                f"sensor_set_threshold {mc} 0 {number} settable 111000 "
                f"{upper[2]} {upper[1]} {upper[0]} 0 0 0",
                f"sensor_set_event_support {mc} 0 {number} enable scanning per-state "
                "000111111000000 000111111000000 000111111000000 000111111000000",
            ]
        lines.append(f"mc_enable {mc}")
        (workdir / "sim.emu").write_text("\n".join(lines) + "\n")
        argv = ["ipmi_sim", "-c", str(workdir / "lan.conf"), "-f", str(workdir / "sim.emu")]
        argv += ["-s", str(state_dir), "-n"]
        with (workdir / "ipmi_sim.log").open("wb") as log:
            process = subprocess.Popen(
                bounded_command(argv, self.lifetime),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return IpmiSim(
            name=name,
            host=LOOPBACK,
            port=port,
            username=username,
            password=password,
            serial=serial,
            guid=guid,
            fru_layout=fru_layout,
            workdir=workdir,
            chassis_dir=chassis_dir,
            console_port=console_port,
            process=process,
        )

    def stop(self, sim: IpmiSim) -> None:
        """Kill ``sim``'s process group and remove its work directory."""
        stop_process_group(sim.process)
        shutil.rmtree(sim.workdir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            self.sims.remove(sim)

    def stop_all(self) -> None:
        for sim in list(self.sims):
            self.stop(sim)


def _wait_ready(sim: IpmiSim, timeout: float) -> None:
    """Wait until ``chassis power status`` answers; ``RuntimeError`` with the log if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sim.process.poll() is not None:
            break
        try:
            result = ipmitool(sim, "chassis", "power", "status", retries=0, interval=1, timeout=5)
        except subprocess.TimeoutExpired:
            continue
        if result.returncode == 0 and "Chassis Power is" in result.stdout:
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"ipmi_sim {sim.name} on {sim.host}:{sim.port} not ready "
        f"(exit {sim.process.poll()}):\n{log_tail(sim.workdir / 'ipmi_sim.log')}"
    )
