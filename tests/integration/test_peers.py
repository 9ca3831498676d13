"""The BMC peers work, checked with real clients: ipmitool and pyghmi against ipmi_sim,
requests and pyghmi's Redfish client against sushy-tools, ipmitool through the fault proxy.

Each test starts its peers in fixtures and stops them; nothing leaves loopback.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import requests
from pyghmi.exceptions import PyghmiException
from pyghmi.ipmi import command as ipmi_command
from pyghmi.redfish import command as redfish_command

from tests.peers import LOOPBACK, wait_until
from tests.peers.ipmi_records import channel_auth_probe, encode_fru, probe_completion_code
from tests.peers.ipmi_sim import IpmiSim, IpmiSimFactory, ipmitool
from tests.peers.sushy import SushyEmulator, SushyFactory, start_sushy, stop_sushy, system_uuid
from tests.peers.udp_proxy import ProxyFactory, UdpFaultProxy

pytestmark = pytest.mark.integration
pytest_plugins = ("tests.peers.fixtures",)

# With this seed, 20 % loss both ways drops 5 of ipmitool's ~30 datagrams in places its
# retransmissions recover from. (ipmitool and pyghmi both fail to open a session under
# some other loss patterns: a lost RAKP reply is retransmitted, never answered.)
LOSS_SEED = 3


def _ok(sim: IpmiSim, *args: str, port: int | None = None) -> str:
    result = ipmitool(sim, *args, port=port)
    assert result.returncode == 0, f"ipmitool {' '.join(args)}: {result.stderr}"
    return result.stdout


# --- ipmi_sim -------------------------------------------------------------------------------


def test_ipmitool_power_and_boot_device_reach_the_chassis(ipmi_sim: IpmiSim) -> None:
    assert ipmi_sim.power() == "off"
    assert "Chassis Power is off" in _ok(ipmi_sim, "chassis", "power", "status")

    _ok(ipmi_sim, "chassis", "power", "on")
    assert ipmi_sim.power() == "on"
    assert "Chassis Power is on" in _ok(ipmi_sim, "chassis", "power", "status")

    _ok(ipmi_sim, "chassis", "bootdev", "pxe")
    assert ipmi_sim.boot() == "pxe"

    _ok(ipmi_sim, "chassis", "power", "off")
    assert ipmi_sim.power() == "off"
    assert "set power 1" in ipmi_sim.calls()
    assert "set boot pxe" in ipmi_sim.calls()


def test_power_changed_on_the_chassis_side_is_what_the_bmc_reports(ipmi_sim: IpmiSim) -> None:
    ipmi_sim.set_power(True)
    assert "Chassis Power is on" in _ok(ipmi_sim, "chassis", "power", "status")


def test_ipmi_sim_refuses_a_wrong_password(ipmi_sim: IpmiSim) -> None:
    result = ipmitool(ipmi_sim, "chassis", "power", "status", password="wrong")
    assert result.returncode != 0
    assert "Unable to establish" in result.stderr


def test_each_bmc_has_its_own_port_state_and_fru_serial(ipmi_sims: IpmiSimFactory) -> None:
    first, second = ipmi_sims.start(2, serials=["GPU-SN-0001", "GPU-SN-0002"])
    assert first.port != second.port

    _ok(first, "chassis", "power", "on")
    assert (first.power(), second.power()) == ("on", "off")

    fru = _ok(second, "fru", "print", "0")
    assert "Product Serial        : GPU-SN-0002" in fru
    assert "Board Serial          : GPU-SN-0002-MB" in fru
    assert "Chassis Serial        : GPU-SN-0002-CH" in fru


def test_pyghmi_reads_a_compact_fru_and_drives_power(ipmi_sims: IpmiSimFactory) -> None:
    (sim,) = ipmi_sims.start(1, serials=["SN-COMPACT"], fru_layout="compact")
    bmc = ipmi_command.Command(
        bmc=sim.host, userid=sim.username, password=sim.password, port=sim.port
    )
    assert bmc.get_inventory_of_component("System")["Serial Number"] == "SN-COMPACT"
    bmc.set_power("on", wait=True)
    assert sim.power() == "on"
    bmc.set_bootdev("network")
    assert sim.boot() == "pxe"


def test_fru_images_are_well_formed() -> None:
    for layout in ("full", "compact"):
        image = encode_fru("SN-1", layout)
        assert sum(image[:8]) % 256 == 0
        for offset in image[2:5]:
            if offset:
                start = offset * 8
                area = image[start : start + image[start + 1] * 8]
                assert sum(area) % 256 == 0
    with pytest.raises(ValueError, match="too long"):
        encode_fru("A-SERIAL-OF-20-CHARS", "compact")


def test_sensors_follow_their_files_and_thresholds_log_sel_events(ipmi_sim: IpmiSim) -> None:
    sdr = _ok(ipmi_sim, "sdr", "list")
    assert "CPU Temp" in sdr and "45 degrees C" in sdr
    assert "Inlet Temp" in sdr and "24 degrees C" in sdr
    assert "Entries          : 0" in _ok(ipmi_sim, "sel", "info")

    ipmi_sim.set_temperature(99)
    wait_until(
        lambda: "99 degrees C" in _ok(ipmi_sim, "sdr", "list"), timeout=10, what="sensor poll"
    )
    events = _ok(ipmi_sim, "sel", "elist")
    assert "Upper Critical going high" in events and "CPU Temp" in events

    before = len(_ok(ipmi_sim, "sel", "list").splitlines())
    # A temperature event on sensor 2: generator 0x20, EvM rev 4, type 1, reading type 1,
    # event data "upper non-critical going high".
    ipmi_sim.add_sel_entry(bytes([0, 0, 0, 0, 0x20, 0, 0x04, 0x01, 0x02, 0x01, 0x07, 0, 0]))
    assert len(_ok(ipmi_sim, "sel", "list").splitlines()) == before + 1
    with pytest.raises(RuntimeError, match="Unknown command"):
        ipmi_sim.emu("no_such_command")


# --- sushy-tools ----------------------------------------------------------------------------


def test_sushy_serves_its_systems_over_https_with_basic_auth(sushy: SushyEmulator) -> None:
    members = sushy.get_json("/redfish/v1/Systems")["Members"]
    assert [member["@odata.id"] for member in members] == [s.path for s in sushy.systems]
    assert sushy.systems[0].path == f"/redfish/v1/Systems/{system_uuid(1)}"

    node = sushy.system_json("node-02")
    assert (node["Name"], node["UUID"], node["PowerState"]) == ("node-02", system_uuid(2), "Off")

    url = sushy.url("/redfish/v1/Systems")
    cafile = str(sushy.cert_path)
    assert requests.get(url, verify=cafile, timeout=10).status_code == 401
    wrong = requests.get(url, auth=("admin", "wrong"), verify=cafile, timeout=10)
    assert wrong.status_code == 401
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, timeout=10)  # self-signed: the system CA store rejects it


def test_pyghmi_redfish_client_powers_a_system_on_and_sets_pxe(sushy: SushyEmulator) -> None:
    bmc = redfish_command.Command(**sushy.pyghmi_args("node-02"))
    assert bmc.get_power() == {"powerstate": "off"}

    assert bmc.set_power("on", wait=True) == {"powerstate": "on"}
    assert sushy.power_state("node-02") == "On"
    assert sushy.power_state("node-01") == "Off"

    bmc.set_bootdev("network")
    assert sushy.boot_target("node-02") == "Pxe"

    wrong = {**sushy.pyghmi_args("node-02"), "password": "wrong"}
    with pytest.raises(PyghmiException, match="Access Denied"):
        redfish_command.Command(**wrong)


def test_sushy_power_delay_is_set_by_the_fixture(sushy_factory: SushyFactory) -> None:
    emulator = sushy_factory(1, auth=False, power_delay=(30, 30))
    reset = emulator.url(emulator.systems[0].path + "/Actions/ComputerSystem.Reset")
    response = requests.post(
        reset, json={"ResetType": "On"}, verify=str(emulator.cert_path), timeout=10
    )
    assert response.status_code == 204
    assert emulator.power_state(0) == "Off"  # applied 29-30 s later, after this test


# --- fault proxy and dead BMCs ----------------------------------------------------------------


def test_ipmitool_gets_through_20_percent_loss(
    ipmi_sim: IpmiSim, udp_proxy_factory: ProxyFactory
) -> None:
    ipmi_sim.set_power(True)
    # The drop pattern is fixed by the seed; a second try only covers timing on a loaded host.
    for _attempt in range(2):
        proxy = udp_proxy_factory(ipmi_sim.port, drop_rate=0.2, seed=LOSS_SEED)
        result = ipmitool(ipmi_sim, "chassis", "power", "status", port=proxy.port)
        proxy.stop()
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stderr
    assert "Chassis Power is on" in result.stdout
    stats = proxy.stats()
    assert stats.dropped > 0
    assert stats.forwarded_requests == stats.requests - stats.dropped_requests


@pytest.mark.parametrize(("request_delay", "reply_delay"), [(0.0, 2.0), (1.0, 1.0)])
def test_the_reply_through_a_slow_proxy_comes_after_the_delay(
    ipmi_sim: IpmiSim,
    udp_proxy_factory: ProxyFactory,
    request_delay: float,
    reply_delay: float,
) -> None:
    proxy = udp_proxy_factory(ipmi_sim.port, request_delay=request_delay, reply_delay=reply_delay)
    started = time.monotonic()
    reply = channel_auth_probe(proxy.port, timeout=15)
    elapsed = time.monotonic() - started
    assert probe_completion_code(reply) == 0
    assert elapsed >= 2.0
    assert proxy.stats().forwarded_replies == 1


def test_blackhole_swallows_everything_until_turned_off(
    ipmi_sim: IpmiSim, udp_proxy_factory: ProxyFactory
) -> None:
    proxy = udp_proxy_factory(ipmi_sim.port, blackhole=True)
    with pytest.raises(TimeoutError):
        channel_auth_probe(proxy.port, timeout=1)
    assert proxy.stats().blackholed == 1
    assert proxy.stats().forwarded_requests == 0

    proxy.blackhole = False
    assert probe_completion_code(channel_auth_probe(proxy.port)) == 0


def test_proxy_ends_after_its_lifetime(ipmi_sim: IpmiSim) -> None:
    proxy = UdpFaultProxy(ipmi_sim.port, lifetime=0.5).start()
    try:
        wait_until(lambda: not proxy.running, timeout=10, what="proxy lifetime")
        with pytest.raises(ConnectionRefusedError):
            channel_auth_probe(proxy.port, timeout=2)
    finally:
        proxy.stop()


def test_dead_bmc_ports_refuse(dead_udp_port: int, dead_tcp_port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        channel_auth_probe(dead_udp_port, timeout=2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, dead_tcp_port), timeout=2).close()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"https://{LOOPBACK}:{dead_tcp_port}/redfish/v1/", timeout=2)


# --- cleanup --------------------------------------------------------------------------------


def test_stopping_ends_the_processes_and_removes_their_directories(tmp_path: Path) -> None:
    factory = IpmiSimFactory(base_dir=tmp_path)
    (sim,) = factory.start(1)
    emulator = start_sushy(1, base_dir=tmp_path)
    factory.stop_all()
    stop_sushy(emulator)

    assert sim.process.poll() is not None
    assert emulator.process.poll() is not None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConnectionRefusedError):  # nothing listens there any more
        channel_auth_probe(sim.port, timeout=2)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, emulator.port), timeout=2).close()
