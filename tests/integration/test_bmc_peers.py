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
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from provisioner.bmc import ipmi, redfish
from provisioner.bmc import operations as ops
from provisioner.bmc.base import BootDevice, PowerAction, PowerState
from provisioner.bmc.fanout import FanOut, Policy, Result, Target
from provisioner.bmc.redfish import RedfishClient
from provisioner.errors import BmcError
from provisioner.spec import load_fleet
from provisioner.spec.types import parse_bmc_url
from tests.conftest import DATA, RunCli
from tests.peers import bmc_errors, wait_until
from tests.peers.ipmi_sim import IpmiSim, IpmiSimFactory, ipmitool
from tests.peers.sushy import SushyEmulator, SushyFactory
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
    racks: list[str] | None = None,
    boot_mode: str | None = None,
) -> Path:
    """A fleet spec whose node i has BMC ``bmcs[i]`` (password env:TEST_BMC_PW), in rack
    ``racks[i]`` (default: all in r1); ``boot_mode`` goes into the profile."""
    nodes: dict[str, list[str]] = {}
    for i, url in enumerate(bmcs):
        serial = serials[i] if serials else None
        nodes.setdefault(racks[i] if racks else "r1", []).append(
            f"      - {{name: n{i + 1:02d}, ip: 10.9.0.{i + 11}, "
            f'mac: "02:00:00:00:01:{i + 11:02x}", '
            f'bmc: "{url}"' + (f", serial: {serial}" if serial else "") + "}"
        )
    rack_text = "".join(
        f"  - name: {rack}\n    profile: p\n    stack: s\n    image: u\n    nodes:\n"
        + "\n".join(lines)
        + "\n"
        for rack, lines in nodes.items()
    )
    profile = "{gpu: H100-SXM5-80GB, gpus: 8" + (f", boot_mode: {boot_mode}" if boot_mode else "")
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
  p: {profile}}}
racks:
{rack_text}"""
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


def _since(sim: IpmiSim, mark: int) -> list[str]:
    """The chassis_control calls ipmi_sim made after the first ``mark``."""
    return sim.calls()[mark:]


def test_power_cycle_reset_and_soft_off_reach_the_chassis(
    ipmi_sims: IpmiSimFactory, run_cli: RunCli, tmp_path: Path
) -> None:
    """What ipmi_sim's chassis_control script is asked, and what ipmitool reads back after:
    a cycle of a running node is off then on (ipmi_sim powers on again ~1 s later), of an
    off node just on; a reset is a reset pulse with power kept; a soft-off is ACPI
    ``shutdown``."""
    running, stopped = ipmi_sims.start(2)
    running.set_power(True)
    spec = write_spec(tmp_path, [f"ipmi://127.0.0.1:{s.port}" for s in (running, stopped)])
    env = _env(running)
    marks = [len(s.calls()) for s in (running, stopped)]
    cycle = run_cli("bmc", "power", "cycle", spec, "--wait", "15", "-o", "json", env=env)
    assert cycle.returncode == 0, cycle.stdout + cycle.stderr
    assert {n: r["value"] for n, r in _by_node(cycle.stdout).items()} == {"n01": "on", "n02": "on"}
    sets = [call for call in _since(running, marks[0]) if call.startswith("set power")]
    assert sets == ["set power 0", "set power 1"], running.calls()
    assert [c for c in _since(stopped, marks[1]) if c.startswith("set ")] == ["set power 1"]
    for sim in (running, stopped):
        assert "Chassis Power is on" in ipmitool(sim, "chassis", "power", "status").stdout
    assert (running.resets(), stopped.resets()) == (0, 0)

    marks = [len(s.calls()) for s in (running, stopped)]
    reset = run_cli("bmc", "power", "reset", spec, "--nodes", "n01", env=env)
    assert reset.returncode == 0, reset.stdout + reset.stderr
    assert (running.resets(), stopped.resets()) == (1, 0)
    assert [c for c in _since(running, marks[0]) if c.startswith("set ")] == ["set reset 1"]
    assert "Chassis Power is on" in ipmitool(running, "chassis", "power", "status").stdout

    soft = run_cli("bmc", "power", "soft-off", spec, "--nodes", "n02", "--wait", "15", env=env)
    assert soft.returncode == 0, soft.stdout + soft.stderr
    assert [c for c in _since(stopped, marks[1]) if c.startswith("set ")] == ["set shutdown 1"]
    assert "Chassis Power is off" in ipmitool(stopped, "chassis", "power", "status").stdout
    assert (running.power(), stopped.power()) == ("on", "off")


def test_rack_selects_the_nodes_of_that_rack(
    ipmi_sims: IpmiSimFactory, run_cli: RunCli, tmp_path: Path
) -> None:
    sims = ipmi_sims.start(3)
    spec = write_spec(
        tmp_path, [f"ipmi://127.0.0.1:{s.port}" for s in sims], racks=["r1", "r1", "r2"]
    )
    env = _env(sims[0])
    on = run_cli("bmc", "power", "on", spec, "--rack", "r2", "--wait", "15", env=env)
    assert on.returncode == 0, on.stdout + on.stderr
    assert [s.power() for s in sims] == ["off", "off", "on"]
    status = run_cli("bmc", "power", "status", spec, "--rack", "r1", "-o", "json", env=env)
    assert {n: r["value"] for n, r in _by_node(status.stdout).items()} == {
        "n01": "off",
        "n02": "off",
    }
    both = run_cli("bmc", "power", "status", spec, "--rack", "r1", "--nodes", "n02", "-o", "json",
                   env=env)  # fmt: skip
    assert list(_by_node(both.stdout)) == ["n02"]
    none = run_cli("bmc", "power", "on", spec, "--rack", "r9", env=env)
    assert none.returncode == 1 and "no nodes match --rack/--nodes" in none.stderr
    assert [s.power() for s in sims] == ["off", "off", "on"]


@pytest.mark.parametrize("selection", [("--rack", "r1"), ("--nodes", "n01")])
def test_ad_hoc_mode_refuses_rack_and_nodes(
    ipmi_sim: IpmiSim, run_cli: RunCli, selection: tuple[str, str]
) -> None:
    """--rack and --nodes select nodes of a spec; with --bmc they used to be ignored, so
    ``--nodes n01`` powered on every BMC given. Now a usage error, before any BMC is asked."""
    mark = len(ipmi_sim.calls())
    args = ["--bmc", f"ipmi://127.0.0.1:{ipmi_sim.port}", "--user", "admin", "--password-env", "PW"]
    result = run_cli("bmc", "power", "on", *args, *selection, env={"PW": ipmi_sim.password})
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Invalid value for {selection[0]}" in result.stderr
    assert "selects nodes of a fleet spec" in result.stderr
    assert ipmi_sim.calls()[mark:] == [] and ipmi_sim.power() == "off"


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
    # And per node, what the policy allows for the attempts it made: each may wait up to one
    # timeout for its BMC's lock and one for its command, with the capped backoff between
    # attempts. A node that hung past a deadline shows here.
    policy = Policy.from_spec(load_fleet(spec).document.bmc)
    for node, row in rows.items():
        attempts = row["attempts"]
        assert 1 <= attempts <= policy.retries + 1, (node, row)
        pauses = sum(min(policy.backoff_cap, policy.backoff * 2**k) for k in range(attempts - 1))
        allowed = attempts * 2 * policy.timeout + pauses + 5.0  # 5 s for a loaded machine
        assert row["seconds"] <= allowed, (node, allowed, row)


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


@pytest.mark.parametrize("right", [True, False], ids=["right-password", "wrong-password"])
@pytest.mark.parametrize("mode", ["spec", "ad-hoc"])
def test_password_never_appears_in_output(
    mode: str,
    right: bool,
    ipmi_sims: IpmiSimFactory,
    sushy_factory: SushyFactory,
    dead_udp_port: int,
    dead_tcp_port: int,
    run_cli: RunCli,
    tmp_path: Path,
) -> None:
    """IPMI (ipmi_sim) and Redfish (sushy), each beside a dead BMC of its kind, from a spec
    or from --bmc flags, with the right password or a wrong one, as text and as JSON: the
    password is in no output, stdout or stderr, whatever succeeds or fails."""
    password = "pw-" + secrets.token_hex(6)
    given = password if right else "pw-" + secrets.token_hex(6)
    (sim,) = ipmi_sims.start(1, password=password, fru_layout="compact")
    emulator = sushy_factory(1, password=password)
    urls = [
        f"ipmi://127.0.0.1:{sim.port}",
        _redfish_urls(emulator)[0],
        f"ipmi://127.0.0.1:{dead_udp_port}",
        f"redfish+https://127.0.0.1:{dead_tcp_port}",
    ]
    if mode == "spec":
        names = ["n01", "n02", "n03", "n04"]
        where = [str(write_spec(tmp_path, urls, retries=0, timeout=10))]
        env = {"TEST_BMC_PW": given}
        commands = [("power", "status"), ("inventory",), ("sel",)]
        if not right:
            commands.remove(("inventory",))  # the same failure table as power status
    else:
        names = [url.split("/")[2] for url in urls]
        where = [arg for url in urls for arg in ("--bmc", url)]
        where += ["--user", "admin", "--password-env", "BMC_PW", "--insecure", "--timeout", "10"]
        env = {"BMC_PW": given}
        commands = [("inventory",)]
    for command in commands:
        for output in ("text", "json"):
            run = run_cli("bmc", *command, *where, "-o", output, env=env)
            shown = run.stdout + run.stderr
            assert run.returncode == 1, shown  # the dead BMCs fail
            assert password not in shown and given not in shown
            assert "Traceback" not in shown
            if output == "json":
                rows = _by_node(run.stdout)
                reasons = [rows[name]["reason"] for name in names]
                working = [None, "unsupported" if command == ("sel",) else None]
                expected = [*working, "unreachable", "unreachable"]
                assert reasons == (expected if right else ["auth", "auth", *expected[2:]]), shown


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
        booted = fan.run(targets, ops.boot(BootDevice.NETWORK))
        results = fan.run(targets, ops.power(PowerAction.ON, wait=20))
    assert [r.ok for r in booted] == [True, True], [r.as_dict() for r in booted]
    assert [r.value for r in results] == ["on", "on"], [r.as_dict() for r in results]
    assert ipmi_sim.power() == "on" and ipmi_sim.boot() == "pxe"
    assert sushy.power_state(0) == "On" and sushy.boot_target(0) == "Pxe"


def _redfish_targets(emulator: SushyEmulator) -> list[Target]:
    return [
        Target(f"n{i + 1:02d}", "r1", parse_bmc_url(url), emulator.username, emulator.password)
        for i, url in enumerate(_redfish_urls(emulator))
    ]


def _in_process(targets: list[Target], operation: Any) -> dict[str, Result[Any]]:
    """One fan-out as the CLI runs it, in this process (no interpreter start per command)."""
    with FanOut(Policy(timeout=20, retries=0, verify_tls=False)) as fan:
        return {r.node: r for r in fan.run(targets, operation)}


def test_redfish_cycle_reset_and_soft_off(sushy_factory: SushyFactory, run_cli: RunCli,
                                          tmp_path: Path) -> None:  # fmt: skip
    """On sushy (power changes applied 3-4 s after the request here): a cycle or a reset of
    a running system is a ForceRestart (the emulator offers no PowerCycle), off at once and
    on again; a cycle of a system that is off powers it on; a soft-off is GracefulShutdown."""
    emulator = sushy_factory(4, power_delay=(4, 4))
    targets = _redfish_targets(emulator)

    def states() -> list[str]:
        return [emulator.power_state(i) for i in range(4)]

    # No --wait here: the fan-out keeps one command in flight per BMC (host:port), so waits
    # on systems of one Redfish service would run one after another.
    started = _in_process(targets[:3], ops.power(PowerAction.ON))
    assert all(r.ok for r in started.values()), [r.as_dict() for r in started.values()]
    wait_until(lambda: states() == ["On", "On", "On", "Off"], timeout=20, what="n01-n03 on")

    spec = write_spec(tmp_path, _redfish_urls(emulator), timeout=20)
    env = {"TEST_BMC_PW": emulator.password}
    cycle = run_cli("bmc", "power", "cycle", spec, "--nodes", "n01", "--nodes", "n04", env=env)
    assert cycle.returncode == 0, cycle.stdout + cycle.stderr
    assert states()[0] == "Off"  # the restart's off half; on again 3-4 s after the request
    reset = _in_process(targets[1:2], ops.power(PowerAction.RESET))
    assert reset["n02"].value == "reset requested", reset["n02"].as_dict()
    assert states()[1] == "Off"
    soft = _in_process(targets[2:3], ops.power(PowerAction.SOFT_OFF))
    assert soft["n03"].value == "soft-off requested", soft["n03"].as_dict()
    wait_until(
        lambda: states() == ["On", "On", "Off", "On"],
        timeout=20,
        what="n01 and n02 on again, n03 off, n04 on",
    )


def test_redfish_inventory_event_log_sensors_and_boot_disk(
    sushy: SushyEmulator, run_cli: RunCli, tmp_path: Path
) -> None:
    """sushy's systems have no SerialNumber, and its one chassis (linked from every system)
    has: that is the board serial. sushy has no LogServices at all: the event log is
    ``unsupported`` (pyghmi alone would answer an empty log, and --clear "cleared" nothing).
    Its Thermal resource gives the sensors; pyghmi reports no health for them."""
    targets = _redfish_targets(sushy)[:1]
    chassis_path = sushy.system_json(0)["Links"]["Chassis"][0]["@odata.id"]
    chassis = sushy.get_json(chassis_path)
    fru = _in_process(targets, ops.inventory)["n01"]
    assert fru.ok, fru.as_dict()
    assert fru.value is not None and fru.value["serial"] is None
    assert fru.value["board_serial"] == chassis["SerialNumber"] and chassis["SerialNumber"]

    spec = write_spec(tmp_path, _redfish_urls(sushy)[:1], timeout=20)
    listed = run_cli("bmc", "sel", spec, "-o", "json", env={"TEST_BMC_PW": sushy.password})
    assert listed.returncode == 1, listed.stdout + listed.stderr
    row = _by_node(listed.stdout)["n01"]
    assert (row["reason"], row["attempts"]) == ("unsupported", 1), row
    assert "LogServices" in row["message"]
    cleared = _in_process(targets, ops.event_log(clear=True))["n01"]
    assert (cleared.reason, cleared.value) == ("unsupported", None)

    sensors = _in_process(targets, ops.sensors)["n01"]
    assert sensors.ok and sensors.value is not None, sensors.as_dict()
    got = {r["name"]: (r["kind"], r["value"], r["units"]) for r in sensors.value}
    thermal = sushy.get_json(chassis["Thermal"]["@odata.id"])
    for temperature in thermal["Temperatures"]:
        expected = ("temperature", float(temperature["ReadingCelsius"]), "°C")
        assert got[temperature["Name"]] == expected
    for fan in thermal["Fans"]:
        assert got[fan["Name"]] == ("fan", float(fan["Reading"]), fan["ReadingUnits"])

    assert _in_process(targets, ops.boot(BootDevice.NETWORK))["n01"].ok
    assert sushy.boot_target(0) == "Pxe"
    disk = _in_process(targets, ops.boot(BootDevice.DISK))["n01"]
    assert disk.value == "disk next boot (UEFI)", disk.as_dict()
    assert sushy.boot_target(0) == "Hdd"


def test_legacy_boot_mode_of_the_profile_reaches_the_bmcs(
    sushy_factory: SushyFactory, run_cli: RunCli, tmp_path: Path
) -> None:
    """``boot_mode: legacy`` in the profile: Redfish BootSourceOverrideMode ``Legacy`` on
    sushy, and the IPMI boot flags without the EFI bit, read back with ipmitool. ipmi_sim
    cannot show it (it drops the EFI bit: a raw Set System Boot Options E0h 04h reads back
    00h 04h), so the IPMI side is the lab's pyghmi BMC, which keeps the flags."""
    from provisioner.lab.bmc_state import MachineState
    from provisioner.lab.ipmi_bmc import BmcFarm

    emulator = sushy_factory(1, password="boot-pw")
    state = MachineState()
    with BmcFarm(password="boot-pw") as farm:
        bmc = farm.add(0, state)
        bmcs = [*_redfish_urls(emulator), f"ipmi://127.0.0.1:{bmc.port}"]
        flags = [
            "ipmitool", "-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(bmc.port),
            "-U", "admin", "-P", "boot-pw", "chassis", "bootparam", "get", "5",
        ]  # fmt: skip
        for mode, redfish_mode, ipmi_mode in (
            ("legacy", "Legacy", "BIOS PC Compatible (legacy) boot"),
            ("uefi", "UEFI", "BIOS EFI boot"),
        ):
            folder = tmp_path / mode
            folder.mkdir()
            spec = write_spec(folder, bmcs, timeout=20, boot_mode=mode)
            pxe = run_cli("bmc", "pxe", spec, "-o", "json", env={"TEST_BMC_PW": "boot-pw"})
            assert pxe.returncode == 0, pxe.stdout + pxe.stderr
            label = "legacy" if mode == "legacy" else "UEFI"
            assert {r["value"] for r in _by_node(pxe.stdout).values()} == {
                f"network next boot ({label})"
            }
            boot = emulator.system_json(0)["Boot"]
            assert (boot["BootSourceOverrideTarget"], boot["BootSourceOverrideMode"]) == (
                "Pxe",
                redfish_mode,
            )
            assert (state.boot_device, state.boot_uefi) == ("network", mode == "uefi")
            shown = subprocess.run(flags, capture_output=True, text=True, timeout=60, check=False)
            assert shown.returncode == 0, shown.stderr
            assert ipmi_mode in shown.stdout and "Force PXE" in shown.stdout, shown.stdout


def test_the_recorded_bmc_errors_are_still_what_the_peers_raise() -> None:
    """tests/data/bmc/errors.json, which tests/unit/test_bmc_classify.py replays, provoked
    again on the peers (the quick cases): the same exception types, sorted the same way."""
    recorded = {r["case"]: r for r in json.loads((DATA / "bmc" / "errors.json").read_text())}
    fresh = bmc_errors.record(fast=True)
    assert len(fresh) >= 15
    for record in fresh:
        expected = recorded[record["case"]]
        assert (record["type"], record["connected"]) == (expected["type"], expected["connected"])
        classify = ipmi.classify if record["client"] == "ipmi" else redfish.classify
        reason = classify(bmc_errors.rebuild(record), record["connected"]).reason
        assert reason == expected["reason"], record


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
