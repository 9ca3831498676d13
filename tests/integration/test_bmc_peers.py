"""`provisioner bmc` against real BMC implementations on loopback.

* OpenIPMI's ipmi_sim (an independent IPMI implementation): what provisioner set is checked
  on the simulator's chassis side and with ``ipmitool -I lanplus -C 3``;
* sushy-tools' Redfish emulator over HTTPS: checked through its own API;
* faults: a dead BMC, a wrong password, 20 % UDP loss and a BMC answering after 2 s (the UDP
  proxy of tests/peers): each node gets the right reason in bounded time while the others
  succeed, with no traceback.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from provisioner.bmc.base import BootDevice, PowerAction, PowerState
from provisioner.bmc.fanout import FanOut, Policy, Target
from provisioner.bmc.redfish import RedfishClient
from provisioner.errors import BmcError
from provisioner.spec.types import parse_bmc_url
from tests.conftest import RunCli
from tests.peers.ipmi_sim import IpmiSim, IpmiSimFactory, ipmitool
from tests.peers.sushy import SushyEmulator
from tests.peers.udp_proxy import ProxyFactory

pytestmark = pytest.mark.integration
pytest_plugins = ("tests.peers.fixtures",)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6GFuN4SG+YD2Cpod/OiC9w02Ut6b3UUarAS03nJ2dT t"


def write_spec(
    folder: Path,
    bmcs: list[str],
    *,
    serials: list[str | None] | None = None,
    timeout: float = 5,
    retries: int = 2,
    verify_tls: bool = False,
    ca_bundle: str | None = None,
) -> Path:
    """A one-rack fleet spec whose node i has BMC ``bmcs[i]`` (password env:TEST_BMC_PW)."""
    lines = []
    for i, url in enumerate(bmcs):
        serial = serials[i] if serials else None
        lines.append(
            f"      - {{name: n{i + 1:02d}, ip: 10.9.0.{i + 11}, "
            f'mac: "02:00:00:00:01:{i + 11:02x}", '
            f'bmc: "{url}"' + (f", serial: {serial}" if serial else "") + "}"
        )
    tls = f"  verify_tls: {str(verify_tls).lower()}\n"
    if ca_bundle:
        tls += f"  ca_bundle: {ca_bundle}\n"
    spec = folder / "fleet.yaml"
    spec.write_text(
        f"""version: 1
metadata: {{site: bmc-test}}
networks:
  provisioning: {{cidr: 10.9.0.0/24, gateway: 10.9.0.1}}
ssh: {{authorized_keys: ["{KEY}"]}}
boot: {{url: "http://10.9.0.1:8080/"}}
bmc:
  username: admin
  password: env:TEST_BMC_PW
  timeout: {timeout}
  retries: {retries}
  power_on_stagger: {{count: 2, interval: 0.2}}
{tls}images:
  u: {{os: ubuntu, version: "24.04", kernel_url: "http://x/k", initrd_url: "http://x/i",
      iso_url: "http://x/iso"}}
stacks:
  s: {{driver: {{version: 570.133.20}}, fabric_manager: true}}
profiles:
  p: {{gpu: H100-SXM5-80GB, gpus: 8}}
racks:
  - name: r1
    profile: p
    stack: s
    image: u
    nodes:
"""
        + "\n".join(lines)
        + "\n"
    )
    return spec


def _lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _by_node(stdout: str) -> dict[str, dict[str, Any]]:
    return {item["node"]: item for item in _lines(stdout) if "node" in item and "ok" in item}


# ---------------------------------------------------------------------------- ipmi_sim


@pytest.fixture
def sims(ipmi_sims: IpmiSimFactory) -> list[IpmiSim]:
    return ipmi_sims.start(3, serials=["SIM0001", "SIM0002", "SIM0003"], fru_layout="compact")


def _env(sim: IpmiSim) -> dict[str, str]:
    return {"TEST_BMC_PW": sim.password}


def test_power_on_and_off_reach_the_bmc(
    sims: list[IpmiSim], run_cli: RunCli, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, [f"ipmi://127.0.0.1:{s.port}" for s in sims])
    on = run_cli("bmc", "power", "on", spec, "--wait", "15", env=_env(sims[0]))
    assert on.returncode == 0, on.stdout + on.stderr
    for sim in sims:
        assert sim.power() == "on"
        assert "Chassis Power is on" in ipmitool(sim, "chassis", "power", "status").stdout
    status = run_cli("bmc", "power", "status", spec, "-o", "json", env=_env(sims[0]))
    assert {n: r["value"] for n, r in _by_node(status.stdout).items()} == {
        "n01": "on",
        "n02": "on",
        "n03": "on",
    }
    off = run_cli("bmc", "power", "off", spec, "--nodes", "n02", "--wait", "15", env=_env(sims[0]))
    assert off.returncode == 0, off.stderr
    assert [s.power() for s in sims] == ["on", "off", "on"]


def test_pxe_sets_a_one_time_network_boot(
    sims: list[IpmiSim], run_cli: RunCli, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, [f"ipmi://127.0.0.1:{s.port}" for s in sims])
    result = run_cli("bmc", "pxe", spec, "-o", "json", env=_env(sims[0]))
    assert result.returncode == 0, result.stderr
    assert all(r["value"] == "network next boot (UEFI)" for r in _by_node(result.stdout).values())
    assert [s.boot() for s in sims] == ["pxe", "pxe", "pxe"]
    back = run_cli("bmc", "boot-disk", spec, "--nodes", "n01", env=_env(sims[0]))
    assert back.returncode == 0, back.stderr
    assert sims[0].boot() != "pxe" and sims[1].boot() == "pxe"


def test_inventory_reads_serials_and_warns_on_a_manifest_mismatch(
    sims: list[IpmiSim], run_cli: RunCli, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path,
        [f"ipmi://127.0.0.1:{s.port}" for s in sims],
        serials=["SIM0001", "SIM9999", None],
    )
    result = run_cli("bmc", "inventory", spec, "-o", "json", env=_env(sims[0]))
    assert result.returncode == 0, result.stderr
    rows = _by_node(result.stdout)
    assert [rows[n]["value"]["serial"] for n in ("n01", "n02", "n03")] == [
        "SIM0001",
        "SIM0002",
        "SIM0003",
    ]
    assert [rows[n]["value"]["serial_matches"] for n in ("n01", "n02", "n03")] == [
        True,
        False,
        None,
    ]
    warnings = [item for item in _lines(result.stdout) if "warning" in item]
    assert [w["node"] for w in warnings] == ["n02"]
    assert "SIM9999" in warnings[0]["warning"] and "SIM0002" in warnings[0]["warning"]
    text = run_cli("bmc", "inventory", spec, env=_env(sims[0]))
    assert "warning: n02" in text.stderr and "SIM0003" in text.stdout


def test_event_log_lists_and_clears(sims: list[IpmiSim], run_cli: RunCli, tmp_path: Path) -> None:
    sim = sims[0]
    sim.set_temperature(105)  # crosses the CPU sensor's upper threshold: the BMC logs events
    spec = write_spec(tmp_path, [f"ipmi://127.0.0.1:{sim.port}"])
    listed = None
    for _ in range(20):  # ipmi_sim samples the sensor file every 250 ms
        listed = run_cli("bmc", "sel", spec, "-o", "json", env=_env(sim))
        if _by_node(listed.stdout)["n01"]["value"]:
            break
        time.sleep(0.5)
    assert listed is not None and listed.returncode == 0, listed.stderr if listed else ""
    events = _by_node(listed.stdout)["n01"]["value"]
    assert events and any("temp" in (e["component"] + e["event"]).lower() for e in events)
    sim.set_temperature(45)
    cleared = run_cli("bmc", "sel", spec, "--clear", "-o", "json", env=_env(sim))
    row = _by_node(cleared.stdout)["n01"]
    # The clear returns what it cleared. On a loaded machine a first attempt may clear and
    # then miss its deadline; the retry then finds the log already empty.
    assert cleared.returncode == 0 and (row["value"] or "timeout" in row["history"]), row
    after = run_cli("bmc", "sel", spec, "-o", "json", env=_env(sim))
    assert _by_node(after.stdout)["n01"]["value"] == []
    assert (
        "SEL has no entries" in ipmitool(sim, "sel", "list").stdout
        or not ipmitool(sim, "sel", "list").stdout.strip()
    )


def test_sensors_report_temperatures(sims: list[IpmiSim], run_cli: RunCli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, [f"ipmi://127.0.0.1:{sims[0].port}"])
    result = run_cli("bmc", "sensors", spec, "-o", "json", env=_env(sims[0]))
    assert result.returncode == 0, result.stderr
    readings = {r["name"]: r for r in _by_node(result.stdout)["n01"]["value"]}
    assert readings["CPU Temp"]["kind"] == "temperature"
    assert readings["CPU Temp"]["value"] == pytest.approx(45, abs=1)


def test_ad_hoc_bmc_without_a_spec(sims: list[IpmiSim], run_cli: RunCli) -> None:
    sim = sims[0]
    args = ["--bmc", f"ipmi://127.0.0.1:{sim.port}", "--user", "admin", "--password-env", "PW"]
    result = run_cli("bmc", "power", "on", *args, "--wait", "15", env={"PW": sim.password})
    assert result.returncode == 0, result.stderr
    assert sim.power() == "on"
    missing = run_cli("bmc", "power", "status", *args, env={"PW_X": "x"})
    assert missing.returncode == 1 and "PW is not set" in missing.stderr


def test_faulty_bmcs_fail_alone_with_the_right_reason(
    ipmi_sims: IpmiSimFactory,
    udp_proxy_factory: ProxyFactory,
    dead_udp_port: int,
    run_cli: RunCli,
    tmp_path: Path,
) -> None:
    good, lossy_sim, slow_sim = ipmi_sims.start(3)
    (wrong,) = ipmi_sims.start(1, password="another-pw")
    lossy = udp_proxy_factory(lossy_sim.port, drop_rate=0.2, seed=3)
    slow = udp_proxy_factory(slow_sim.port, reply_delay=2.0)
    urls = [
        f"ipmi://127.0.0.1:{good.port}",
        f"ipmi://127.0.0.1:{dead_udp_port}",
        f"ipmi://127.0.0.1:{wrong.port}",
        f"ipmi://127.0.0.1:{lossy.port}",
        f"ipmi://127.0.0.1:{slow.port}",
    ]
    spec = write_spec(tmp_path, urls, timeout=3.0, retries=4)
    started = time.monotonic()
    result = run_cli("bmc", "power", "status", spec, "-o", "json", env=_env(good), timeout=120)
    elapsed = time.monotonic() - started
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == 1
    rows = _by_node(result.stdout)
    assert rows["n01"]["ok"] and rows["n01"]["value"] == "off"
    assert rows["n02"]["reason"] == "unreachable" and "port closed" in rows["n02"]["message"]
    # A refused login is never retried (retries lock accounts). An attempt before it may time
    # out on a loaded machine; the history shows that, and nothing follows the refusal.
    assert rows["n03"]["reason"] == "auth", json.dumps(rows["n03"])
    assert rows["n03"]["history"].count("auth") == 1 and rows["n03"]["history"][-1] == "auth"
    assert rows["n03"]["attempts"] == len(rows["n03"]["history"])
    assert rows["n04"]["ok"], json.dumps(rows["n04"])  # 20 % loss: retries get through
    assert rows["n05"]["reason"] == "timeout"
    summary = _lines(result.stdout)[-1]["summary"]
    assert sorted(summary["failed"]) == ["n02", "n03", "n05"]
    # 5 attempts of at most 3 s plus backoff for the slowest node, not minutes.
    assert elapsed < 60
    assert lossy.stats().dropped > 0


def test_text_output_lists_the_failed_nodes(
    ipmi_sim: IpmiSim, dead_udp_port: int, run_cli: RunCli, tmp_path: Path
) -> None:
    spec = write_spec(
        tmp_path,
        [f"ipmi://127.0.0.1:{ipmi_sim.port}", f"ipmi://127.0.0.1:{dead_udp_port}"],
        retries=0,
    )
    result = run_cli("bmc", "power", "status", spec, env=_env(ipmi_sim))
    assert result.returncode == 1
    assert "n02" in result.stdout and "FAILED unreachable" in result.stdout
    assert "1 node ok, 1 failed: n02 (unreachable)" in result.stderr


def test_password_never_appears_in_output(
    ipmi_sims: IpmiSimFactory, run_cli: RunCli, tmp_path: Path
) -> None:
    password = "pw-" + secrets.token_hex(6)
    (sim,) = ipmi_sims.start(1, password=password, fru_layout="compact")
    spec = write_spec(tmp_path, [f"ipmi://127.0.0.1:{sim.port}"], retries=0)
    for args in (("power", "status"), ("inventory",), ("sel",)):
        for output in ("text", "json"):
            ok = run_cli("bmc", *args, spec, "-o", output, env={"TEST_BMC_PW": password})
            bad = run_cli("bmc", *args, spec, "-o", output, env={"TEST_BMC_PW": password + "x"})
            assert ok.returncode == 0, ok.stderr
            assert bad.returncode == 1
            for run in (ok, bad):
                assert password not in run.stdout + run.stderr


# ---------------------------------------------------------------------------- Redfish


def _redfish_urls(emulator: SushyEmulator) -> list[str]:
    return [
        f"redfish+https://127.0.0.1:{emulator.port}{system.path}" for system in emulator.systems
    ]


def test_redfish_power_and_pxe(sushy: SushyEmulator, run_cli: RunCli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, _redfish_urls(sushy), timeout=20)
    env = {"TEST_BMC_PW": sushy.password}
    on = run_cli("bmc", "power", "on", spec, "--wait", "20", env=env)
    assert on.returncode == 0, on.stdout + on.stderr
    assert [sushy.power_state(i) for i in range(2)] == ["On", "On"]
    pxe = run_cli("bmc", "pxe", spec, "--nodes", "n02", env=env)
    assert pxe.returncode == 0, pxe.stderr
    assert sushy.boot_target(1) == "Pxe" and sushy.boot_target(0) != "Pxe"
    off = run_cli("bmc", "power", "off", spec, "--nodes", "n01", "--wait", "20", env=env)
    assert off.returncode == 0, off.stderr
    assert [sushy.power_state(i) for i in range(2)] == ["Off", "On"]
    inventory = run_cli("bmc", "inventory", spec, "-o", "json", env=env)
    assert inventory.returncode == 0, inventory.stderr
    uuids = {r["value"]["uuid"].lower() for r in _by_node(inventory.stdout).values()}
    assert uuids == {system.uuid for system in sushy.systems}


def test_redfish_wrong_password_is_auth(
    sushy: SushyEmulator, run_cli: RunCli, tmp_path: Path
) -> None:
    spec = write_spec(tmp_path, _redfish_urls(sushy)[:1], timeout=10)
    result = run_cli("bmc", "power", "status", spec, "-o", "json", env={"TEST_BMC_PW": "nope"})
    assert result.returncode == 1
    row = _by_node(result.stdout)["n01"]
    assert (row["reason"], row["attempts"]) == ("auth", 1)


def test_redfish_tls_is_verified_against_the_ca_bundle(
    sushy: SushyEmulator, dead_tcp_port: int, tmp_path: Path
) -> None:
    endpoint = parse_bmc_url(_redfish_urls(sushy)[0])
    trusted = RedfishClient(
        endpoint, "admin", sushy.password, 10, verify_tls=True, ca_bundle=str(sushy.cert_path)
    )
    assert trusted.get_power_state() is PowerState.OFF
    untrusted = RedfishClient(endpoint, "admin", sushy.password, 10, verify_tls=True)
    with pytest.raises(BmcError) as caught:
        untrusted.get_power_state()
    assert caught.value.reason == "unreachable" and "not trusted" in caught.value.message
    dead = RedfishClient(
        parse_bmc_url(f"redfish+https://127.0.0.1:{dead_tcp_port}"), "a", "b", 5, verify_tls=False
    )
    with pytest.raises(BmcError) as refused:
        dead.get_power_state()
    assert refused.value.reason == "unreachable"


def test_one_fan_out_drives_ipmi_and_redfish_together(
    ipmi_sim: IpmiSim, sushy: SushyEmulator
) -> None:
    targets = [
        Target("ipmi", "r", parse_bmc_url(f"ipmi://127.0.0.1:{ipmi_sim.port}"), "admin", "secret"),
        Target("redfish", "r", parse_bmc_url(_redfish_urls(sushy)[0]), "admin", sushy.password),
    ]
    with FanOut(Policy(timeout=20, verify_tls=False)) as fan:
        results = fan.run(
            targets,
            lambda client, target: (
                (
                    client.set_boot_device(BootDevice.NETWORK),
                    client.set_power(PowerAction.ON),
                    client.wait_for_power(PowerState.ON, 20),
                )
                and "done"
            ),
        )
    assert [r.ok for r in results] == [True, True], [r.as_dict() for r in results]
    assert ipmi_sim.power() == "on" and ipmi_sim.boot() == "pxe"
    assert sushy.power_state(0) == "On" and sushy.boot_target(0) == "Pxe"


# ---------------------------------------------------------------------------- the lab BMC


def test_cli_against_lab_bmcs_full_fru_sel_sensors_and_boot(
    run_cli: RunCli, tmp_path: Path
) -> None:
    """The lab's own BMC (provisioner.lab.ipmi_bmc): a full FRU image, SEL and SDR."""
    from provisioner.lab.bmc_state import MachineState
    from provisioner.lab.ipmi_bmc import BmcFarm

    states = [MachineState(product_serial=f"LABSN{i}") for i in range(3)]
    with BmcFarm(password="lab-pw") as farm:
        bmcs = [farm.add(0, state) for state in states]
        states[1].add_sel_event(0x01, 1, offset=0x09)  # temperature, upper critical going high
        spec = write_spec(
            tmp_path,
            [f"ipmi://127.0.0.1:{b.port}" for b in bmcs],
            serials=["LABSN0", "LABSN1", "WRONG"],
        )
        env = {"TEST_BMC_PW": "lab-pw"}
        inventory = run_cli("bmc", "inventory", spec, "-o", "json", env=env)
        assert inventory.returncode == 0, inventory.stderr
        rows = _by_node(inventory.stdout)
        assert [rows[f"n0{i}"]["value"]["serial"] for i in (1, 2, 3)] == [
            "LABSN0",
            "LABSN1",
            "LABSN2",
        ]
        assert rows["n01"]["value"]["board_serial"] == states[0].board_serial
        assert [w["node"] for w in _lines(inventory.stdout) if "warning" in w] == ["n03"]

        events = run_cli("bmc", "sel", spec, "--nodes", "n02", "-o", "json", env=env)
        assert len(_by_node(events.stdout)["n02"]["value"]) == 1
        run_cli("bmc", "sel", spec, "--nodes", "n02", "--clear", env=env)
        after = run_cli("bmc", "sel", spec, "--nodes", "n02", "-o", "json", env=env)
        assert _by_node(after.stdout)["n02"]["value"] == [] and states[1].sel == []

        sensors = run_cli("bmc", "sensors", spec, "--nodes", "n01", "-o", "json", env=env)
        kinds = {r["kind"] for r in _by_node(sensors.stdout)["n01"]["value"]}
        assert "temperature" in kinds and "fan" in kinds

        pxe = run_cli("bmc", "pxe", spec, env=env)
        assert pxe.returncode == 0, pxe.stderr
        assert [(s.boot_device, s.boot_uefi, s.boot_persistent) for s in states] == [
            ("network", True, False)
        ] * 3
        cycle = run_cli("bmc", "power", "on", spec, "--nodes", "n01", "--wait", "10", env=env)
        assert cycle.returncode == 0, cycle.stderr
        # The one-time override was used by that power-on and is gone; the others keep theirs.
        assert states[0].last_boot_device == "network" and states[0].boot_device == "default"
        assert states[1].boot_device == "network"
