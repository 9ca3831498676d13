"""The lab's fake IPMI BMC, driven by the real clients: pyghmi's Command and ipmitool lanplus.

Every BMC here is served on loopback by a BmcFarm started in a fixture (in this process, or
as ``python -m provisioner.lab.ipmi_bmc`` in another) and stopped after the test. Clients
run in daemon threads joined against a deadline, so a hung client fails a test instead of
hanging the run.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import Any, TypeVar

import pytest
from pyghmi.exceptions import IpmiException
from pyghmi.ipmi.command import Command
from pyghmi.ipmi.private import session as pyghmi_session

from provisioner.lab.bmc_state import MachineState, PowerAction
from provisioner.lab.ipmi_bmc import BmcFarm, LabBmc

pytestmark = pytest.mark.integration
USER, PASSWORD = "admin", "lab-secret-1"
T = TypeVar("T")
R = TypeVar("R")


@pytest.fixture
def farm() -> Iterator[BmcFarm]:
    farm = BmcFarm("127.0.0.1", USER, PASSWORD).start()
    yield farm
    farm.stop()


@contextmanager
def client(port: int, password: str = PASSWORD) -> Iterator[Command]:
    """A pyghmi session, logged out afterwards.

    pyghmi 1.6.19 keeps every session it opened in ``Session.initting_sessions`` (it deletes
    the entry under a bytes key, but stored it under the str one): the next Command with the
    same BMC and credentials would get that old object and hang (session alive) or raise
    TypeError (logged out). Dropping the entry after login avoids both.
    """
    try:
        command = Command("127.0.0.1", USER, password, port=port)
    finally:
        pyghmi_session.Session.initting_sessions.pop(
            ("127.0.0.1", USER, password, port, None), None
        )
    try:
        yield command
    finally:
        command.ipmi_session.logout()


def ipmitool(port: int, *args: str, password: str = PASSWORD) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("ipmitool")
    if tool is None:
        pytest.fail("ipmitool is not installed (scripts/bootstrap installs it)")
    command = [tool, "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(port)]
    return subprocess.run(
        [*command, "-U", USER, "-E", "-N", "1", "-R", "2", *args],
        env={**os.environ, "IPMI_PASSWORD": password},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ipmitool_ok(port: int, *args: str) -> str:
    done = ipmitool(port, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def fan_out(work: Callable[[T], R], items: Iterable[T], workers: int, deadline: float) -> list[R]:
    """Run ``work`` over ``items`` in ``workers`` daemon threads; fail after ``deadline`` s."""
    todo: queue.Queue[tuple[int, T]] = queue.Queue()
    for entry in enumerate(items):
        todo.put(entry)
    results: dict[int, R] = {}
    errors: list[BaseException] = []

    def run() -> None:
        while True:
            try:
                index, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = work(item)
            except BaseException as error:
                errors.append(error)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), f"clients still busy after {deadline}s"
    assert not errors, errors[:3]
    return [results[index] for index in sorted(results)]


def get_power(port: int) -> str:
    with client(port) as command:
        return str(command.get_power()["powerstate"])


# --- power --------------------------------------------------------------------------------


def test_pyghmi_power_on_off_cycle_changes_the_machine_and_calls_back(farm: BmcFarm) -> None:
    seen: list[tuple[str, PowerAction]] = []
    state = MachineState(on_power=lambda machine, action: seen.append((machine.power, action)))
    bmc = farm.add(0, state)
    with client(bmc.port) as command:
        assert command.get_power() == {"powerstate": "off"}
        command.set_power("on")
        assert command.get_power() == {"powerstate": "on"}
        command.set_power("on")  # already on: nothing happens, no callback
        command.set_power("reset")
        command.set_power("off")
        assert command.get_power() == {"powerstate": "off"}
        with pytest.raises(IpmiException, match="present state"):
            command.set_power("reset")  # a stopped machine cannot be reset
    assert seen == [("on", "on"), ("on", "reset"), ("off", "off")]
    assert state.power == "off"


def test_ipmitool_power_status_on_cycle_off(farm: BmcFarm) -> None:
    bmc = farm.add(0)
    assert ipmitool_ok(bmc.port, "power", "status").strip() == "Chassis Power is off"
    assert "Up/On" in ipmitool_ok(bmc.port, "power", "on")
    assert ipmitool_ok(bmc.port, "power", "status").strip() == "Chassis Power is on"
    assert (bmc.state.power, bmc.state.power_changes) == ("on", 1)
    assert "Cycle" in ipmitool_ok(bmc.port, "power", "cycle")
    assert (bmc.state.power, bmc.state.power_changes) == ("on", 2)
    assert "Down/Off" in ipmitool_ok(bmc.port, "power", "off")
    assert (bmc.state.power, bmc.state.power_changes) == ("off", 3)
    assert "System Power         : off" in ipmitool_ok(bmc.port, "chassis", "status")


# --- boot override --------------------------------------------------------------------------


def test_one_time_network_uefi_override_is_kept_then_cleared_by_power_cycle(
    farm: BmcFarm,
) -> None:
    bmc = farm.add(0, MachineState(power="on"))
    state = bmc.state
    with client(bmc.port) as command:
        command.set_bootdev("network", uefiboot=True)
        assert (state.boot_device, state.boot_uefi, state.boot_persistent) == (
            "network",
            True,
            False,
        )
        assert command.get_bootdev() == {
            "bootdev": "network",
            "persistent": False,
            "uefimode": True,
        }
        shown = ipmitool_ok(bmc.port, "chassis", "bootparam", "get", "5")
        assert "Boot Flag Valid" in shown
        assert "Options apply to only next boot" in shown
        assert "BIOS EFI boot" in shown
        assert "Force PXE" in shown

        command.set_power("reset")  # the machine boots once from the network ...
        assert (state.last_boot_device, state.last_boot_uefi) == ("network", True)
        assert state.boot_device == "default"  # ... and the override is gone
        assert command.get_bootdev()["bootdev"] == "default"
    shown = ipmitool_ok(bmc.port, "chassis", "bootparam", "get", "5")
    assert "Boot Flag Invalid" in shown
    assert "No override" in shown


def test_ipmitool_bootdev_and_persistent_override_survives_power_cycle(farm: BmcFarm) -> None:
    bmc = farm.add(0, MachineState(power="on"))
    ipmitool_ok(bmc.port, "chassis", "bootdev", "disk", "options=persistent")
    assert (bmc.state.boot_device, bmc.state.boot_persistent) == ("hd", True)
    ipmitool_ok(bmc.port, "power", "cycle")
    assert bmc.state.last_boot_device == "hd"
    with client(bmc.port) as command:
        assert command.get_bootdev() == {"bootdev": "hd", "persistent": True, "uefimode": False}


# --- inventory, SEL, sensors ------------------------------------------------------------------


def test_fru_serials_read_by_pyghmi_and_ipmitool(farm: BmcFarm) -> None:
    state = MachineState(
        product_serial="SN-H100-0042",
        board_serial="MB-7781",
        chassis_serial="CH-0042",
        manufacturer="Lab Systems",
        product_name="HGX-Lab-8",
    )
    bmc = farm.add(0, state)
    with client(bmc.port) as command:
        system = command.get_inventory_of_component("System")
        inventory = dict(command.get_inventory())
    assert system["Serial Number"] == "SN-H100-0042"
    assert system["Board serial number"] == "MB-7781"
    assert system["Chassis serial number"] == "CH-0042"
    assert system["Manufacturer"] == "Lab Systems"
    assert system["Product name"] == "HGX-Lab-8"
    assert system["UUID"].lower() == str(state.system_guid)
    assert inventory["System"]["Serial Number"] == "SN-H100-0042"
    shown = ipmitool_ok(bmc.port, "fru", "print", "0")
    assert " Product Serial        : SN-H100-0042" in shown.splitlines()
    assert " Board Serial          : MB-7781" in shown.splitlines()
    assert " Chassis Serial        : CH-0042" in shown.splitlines()


def test_sel_listed_and_cleared_by_pyghmi_and_ipmitool(farm: BmcFarm) -> None:
    bmc = farm.add(0)
    state = bmc.state
    state.add_sel_event(0x08, 6, 1)  # PSU1: failure detected
    state.add_sel_event(0x01, 1, 9, event_type=0x01, event_data=(0x59, 50, 45))
    listed = ipmitool_ok(bmc.port, "sel", "elist").splitlines()
    assert len(listed) == 2
    assert "PSU1 Status | Failure detected | Asserted" in listed[0]
    assert "Inlet Temp | Upper Critical going high" in listed[1]
    with client(bmc.port) as command:
        events = command.get_event_log()
        assert [(e["component"], e["event"]) for e in events] == [
            ("PSU1 Status", "Failure"),
            ("Inlet Temp", "Upper critical"),
        ]
        assert command.get_event_log(clear=True) == events
        assert state.sel == []
        assert command.get_event_log() == []
    assert "SEL has no entries" in ipmitool(bmc.port, "sel", "list").stderr
    state.add_sel_event(0x08, 7, 0)
    ipmitool_ok(bmc.port, "sel", "clear")
    assert state.sel == []


def test_sensors_read_by_pyghmi_and_ipmitool(farm: BmcFarm) -> None:
    bmc = farm.add(0)
    bmc.state.sensor("Inlet Temp").value = 47.0  # above its 45 °C critical threshold
    bmc.state.sensor("PSU2 Status").states = 0x03  # present, failed
    with client(bmc.port) as command:
        readings = {reading.name: reading for reading in command.get_sensor_data()}
    assert readings["Inlet Temp"].value == 47.0
    assert readings["Inlet Temp"].units == "°C"
    assert "upper critical threshold" in readings["Inlet Temp"].states
    assert readings["FAN1"].value == 8400.0
    assert readings["FAN1"].units == "RPM"
    assert readings["PSU1 Status"].states == ["Present"]
    assert readings["PSU2 Status"].states == ["Present", "Failure"]
    rows = {
        line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]]
        for line in ipmitool_ok(bmc.port, "sdr", "list").splitlines()
    }
    assert rows["Inlet Temp"] == ["47 degrees C", "cr"]
    assert rows["CPU1 Temp"] == ["46 degrees C", "ok"]
    assert rows["FAN2"] == ["8300 RPM", "ok"]
    assert rows["PSU1 Status"] == ["0x01", "ok"]


# --- authentication and cipher suites -------------------------------------------------------


def test_wrong_password_and_unknown_user_are_refused(farm: BmcFarm) -> None:
    bmc = farm.add(0)
    with pytest.raises(IpmiException, match=r"^Incorrect password provided$"):
        Command("127.0.0.1", USER, "not-the-password", port=bmc.port)
    with pytest.raises(IpmiException, match=r"^Unauthorized name in RAKP2$"):
        Command("127.0.0.1", "mallory", PASSWORD, port=bmc.port)
    refused = ipmitool(bmc.port, "power", "status", password="not-the-password")
    assert refused.returncode != 0
    assert "Chassis Power" not in refused.stdout


def _open_session(port: int, auth: int, integrity: int, confidentiality: int) -> int:
    """Send one RMCP+ Open Session request; return the response's status code."""
    payload = bytes([7, 0, 0, 0]) + struct.pack("<I", 0xA0A1A2A3)
    for kind, algorithm in enumerate((auth, integrity, confidentiality)):
        payload += bytes([kind, 0, 0, 8, algorithm, 0, 0, 0])
    packet = b"\x06\x00\xff\x07\x06\x10" + bytes(8) + struct.pack("<H", len(payload)) + payload
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
        sock.settimeout(5)
        sock.sendto(packet, ("127.0.0.1", port))
        reply = sock.recv(512)
    assert reply[5] & 0x3F == 0x11  # open session response
    assert reply[16] == 7  # our message tag
    return reply[17]


def test_only_cipher_suite_3_is_accepted(farm: BmcFarm) -> None:
    bmc = farm.add(0)
    assert _open_session(bmc.port, 1, 1, 1) == 0  # HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128
    assert _open_session(bmc.port, 3, 4, 1) == 0x11  # SHA-256 (suite 17): no match
    assert _open_session(bmc.port, 0, 0, 0) == 0x11  # suite 0, no authentication: no match


# --- many BMCs, delayed replies, the command line ---------------------------------------------


def _free_port_range(count: int) -> int:
    """The first of ``count`` consecutive free UDP ports below the ephemeral range."""
    for _ in range(50):
        first = random.randrange(10000, 32000 - count)
        probes: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return first
    pytest.fail(f"no {count} consecutive free UDP ports")


@pytest.fixture
def served_200() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """200 BMCs served by one ``python -m provisioner.lab.ipmi_bmc`` process."""
    first = _free_port_range(200)
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "provisioner.lab.ipmi_bmc", "--address", "127.0.0.1"),
            *("--ports", f"{first}-{first + 199}", "--user", USER, "--password-env", "LAB_PW"),
        ],
        env={**os.environ, "LAB_PW": PASSWORD},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith(f"ready 127.0.0.1 {first}-{first + 199} 200 BMCs"), line
        yield first, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        finally:
            process.kill()


def test_200_bmcs_in_one_process_answer_32_concurrent_clients(
    served_200: tuple[int, subprocess.Popen[str]],
) -> None:
    first, process = served_200
    started = time.monotonic()
    states = fan_out(get_power, range(first, first + 200), workers=32, deadline=120)
    elapsed = time.monotonic() - started
    assert states == ["off"] * 200
    print(f"200 BMCs, 32 clients: {elapsed:.2f} s, {200 / elapsed:.0f} BMC/s")
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0  # SIGTERM ends it cleanly ...
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
        probe.bind(("127.0.0.1", first))  # ... and its sockets are closed


def test_delayed_replies_do_not_block_the_other_bmcs() -> None:
    delay = 0.05
    with BmcFarm("127.0.0.1", USER, PASSWORD, reply_delay=delay) as farm:
        bmcs: list[LabBmc] = [farm.add(0) for _ in range(101)]
        alone = time.monotonic()
        assert get_power(bmcs[0].port) == "off"
        alone = time.monotonic() - alone
        # A login and get_power are 8 request/reply exchanges, each reply delayed.
        assert alone >= 8 * delay
        started = time.monotonic()
        states = fan_out(get_power, [bmc.port for bmc in bmcs[1:]], workers=50, deadline=60)
        elapsed = time.monotonic() - started
    assert states == ["off"] * 100
    print(f"one poll {alone:.3f} s; 100 BMCs with 50 clients {elapsed:.2f} s")
    # Served one reply at a time this would take 100 x 8 x 0.05 = 40 s.
    assert elapsed < 100 * delay / 2


def test_stopped_farm_closes_its_sockets() -> None:
    farm = BmcFarm("127.0.0.1", USER, PASSWORD).start()
    port = farm.add(0).port
    assert get_power(port) == "off"
    farm.stop()
    with closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as probe:
        probe.bind(("127.0.0.1", port))
    with pytest.raises(RuntimeError):
        farm.add(0)


def test_command_line_refuses_a_missing_password_variable() -> None:
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k != "NO_SUCH_PW"}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "provisioner.lab.ipmi_bmc", "--ports", "9001-9002"),
            *("--password-env", "NO_SUCH_PW"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "NO_SUCH_PW is not set" in done.stderr
