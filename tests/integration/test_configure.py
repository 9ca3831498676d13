"""``provisioner configure`` for real: the lab rack's four nodes get the NVIDIA stack from the
lab's apt repository through playbooks/site.yml, ansible-runner and SSH.

``lab up`` brings up site ``lp4`` (its own bridge, subnet and ports, so it never touches a lab
a developer has up). The tests run in order: a first configure brings every node to its stack,
a second changes nothing, ``burnin run`` quarantines the nodes carrying GPU faults (and only
them, with the checks that fail), ``--check --nodes`` runs one host only and changes nothing,
a node powered off through its BMC is reported unreachable and a node whose stack points at a
repository that does not answer is reported failed, while the other nodes complete; last,
driver-upgrade.yml moves a node to another stack in rollout batches. Root only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.runner.ansible import HostEvent, run_playbook
from tests.integration.labrig import LAB_FAULTS, Lab, lab_spec, running_lab

pytestmark = pytest.mark.integration

N = 4  # lab lp4
NODES = ["gpu-lab-01", "gpu-lab-02", "gpu-lab-03", "gpu-lab-04"]
# The lab spec's Xid 79 on gpu-lab-04, and gpu-lab-02's GPU 2 at PCIe gen 3.
FAULTS = "    gpu-lab-02:\n      - {kind: pcie_gen3, gpu: 2}\n" + LAB_FAULTS
CONFIGURE_TIMEOUT = 900


@dataclass
class Configured:
    rc: int
    events: list[dict[str, str]]
    summary: dict[str, Any]
    stderr: str

    @property
    def hosts(self) -> dict[str, dict[str, Any]]:
        return {recap["host"]: recap for recap in self.summary["hosts"]}

    def explain(self) -> str:
        return json.dumps(self.summary, indent=1) + "\n" + self.stderr


def _configure(lab: Lab, *args: str, spec: Path | None = None) -> Configured:
    """``provisioner configure SPEC --key KEY -o json ARGS`` (SPEC: the lab's by default)."""
    done = lab.cli(
        "configure", str(spec or lab.spec), "--key", str(lab.key), "-o", "json", *args,
        timeout=CONFIGURE_TIMEOUT,
    )  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and "summary" in lines[-1], done.stdout + done.stderr
    events = [line["event"] for line in lines[:-1]]
    return Configured(done.returncode, events, lines[-1]["summary"], done.stderr)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, lab_host: None) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lp4")
    with running_lab(root, N, lab_spec(N, faults=FAULTS)) as lab:
        yield lab


def _pins(lab: Lab) -> list[str]:
    """Every name=version pin the rendered stack of the lab's nodes asks for."""
    stack = yaml.safe_load((lab.root / "build/ansible/group_vars/stack_h100_570.yml").read_text())
    return [pin for name, pins in stack.items() if name.endswith("_deb_packages") for pin in pins]


def test_configure_brings_every_node_to_its_stack(lab: Lab) -> None:
    run = _configure(lab)
    assert run.rc == 0, run.explain()
    assert sorted(run.hosts) == NODES
    for recap in run.hosts.values():
        assert recap["status"] in ("ok", "changed") and recap["failed"] == 0, run.explain()
        assert recap["ok"] > 0 and recap["changed"] > 0
    assert {event["host"] for event in run.events} == set(NODES)
    assert any(e["status"] == "changed" for e in run.events)
    pins = _pins(lab)
    assert len(pins) >= 5, pins  # driver, fabric manager, CUDA, container toolkit, DCGM
    query = "dpkg-query -W -f='${Package}=${Version}\\n'; echo HELD; apt-mark showhold"
    for node in NODES:
        reply = lab.ssh(node, query)
        assert reply.returncode == 0, reply.stderr
        installed, held = reply.stdout.split("HELD\n")
        missing = sorted(set(pins) - set(installed.split()))
        assert not missing, f"{node} lacks {missing}"
        unheld = sorted({p.split("=")[0] for p in pins} - set(held.split()))
        assert not unheld, f"{node} does not hold {unheld}"
        smi = lab.ssh(node, "nvidia-smi -L")
        gpus = 7 if node == "gpu-lab-04" else 8  # the lab spec's xid_79: GPU 5 fell off the bus
        assert smi.returncode == 0 and smi.stdout.count("GPU ") == gpus, smi.stdout + smi.stderr


def test_second_configure_changes_nothing(lab: Lab) -> None:
    run = _configure(lab)
    assert run.rc == 0, run.explain()
    assert sorted(run.hosts) == NODES
    changed = {host: recap["changed"] for host, recap in run.hosts.items()}
    assert changed == dict.fromkeys(NODES, 0), [e for e in run.events if e["status"] == "changed"]


def test_burnin_quarantines_each_faulty_node_with_its_failing_checks(lab: Lab) -> None:
    # The spec's lab faults: gpu-lab-02's GPU 2 trains at PCIe gen 3, gpu-lab-04's GPU 5 fell
    # off the bus (Xid 79); gpu-lab-01 and gpu-lab-03 are healthy.
    results = lab.root / "burnin"
    done = lab.cli(
        "burnin", "run", str(lab.spec), "--key", str(lab.key), "--level", "quick",
        "--results", str(results), "-o", "json", timeout=CONFIGURE_TIMEOUT,
    )  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and "summary" in lines[-1], done.stdout + done.stderr
    summary = lines[-1]["summary"]
    assert done.returncode == 1, summary  # a quarantined node fails the gate
    verdicts = {node["node"]: (node["verdict"], node["failing"]) for node in summary["nodes"]}
    assert verdicts == {
        "gpu-lab-01": ("ready", []),
        "gpu-lab-02": (
            "quarantined",
            ["pcie.link[gpu 2]", "bandwidth.h2d[gpu 2]", "bandwidth.d2h[gpu 2]"],
        ),
        "gpu-lab-03": ("ready", []),
        "gpu-lab-04": ("quarantined", ["inventory.gpu_count", "xid"]),
    }, summary
    document = json.loads((results / "gpu-lab-04.json").read_text())
    assert (document["backend"], document["node"], len(document["gpus"])) == (
        "lab", "gpu-lab-04", 7,
    )  # fmt: skip
    assert document["host"]["driver_version"] == "570.133.20"  # what configure installed
    report = lab.root / "burnin.xml"
    made = lab.cli("burnin", "report", str(results), "--format", "junit", "--out", str(report))
    assert made.returncode == 0, made.stderr
    assert report.read_text().count("<failure") == 5


def test_check_mode_with_a_nodes_glob_runs_that_host_only_and_changes_nothing(lab: Lab) -> None:
    run = _configure(lab, "--check", "--nodes", "gpu-lab-02")
    assert run.rc == 0, run.explain()
    assert {host: recap["changed"] for host, recap in run.hosts.items()} == {"gpu-lab-02": 0}
    assert {event["host"] for event in run.events} == {"gpu-lab-02"}
    handed = (Path(run.summary["run_dir"]) / "inventory" / "inventory.yml").read_text()
    assert "gpu-lab-02" in handed and not re.search(r"gpu-lab-0[134]", handed)


def test_powered_off_node_is_reported_unreachable_while_the_others_complete(lab: Lab) -> None:
    off = lab.cli("bmc", "power", "off", str(lab.spec), "--nodes", "gpu-lab-03", "--wait", "30")
    assert off.returncode == 0, off.stdout + off.stderr
    done = lab.cli(
        "configure",
        str(lab.spec),
        "--key",
        str(lab.key),
        "--nodes",
        "gpu-lab-0[13]",
        timeout=CONFIGURE_TIMEOUT,
    )  # fmt: skip  (the text a person reads)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"gpu-lab-03: unreachable at '[^']+': .*\S", done.stderr), done.stderr
    folder = re.search(r"run folder (\S+)", done.stdout + done.stderr)
    assert folder is not None, done.stdout + done.stderr
    result = json.loads((Path(folder.group(1)) / "result.json").read_text())
    statuses = {recap["host"]: recap["status"] for recap in result["hosts"]}
    assert statuses == {"gpu-lab-01": "ok", "gpu-lab-03": "unreachable"}, done.stdout + done.stderr
    assert "gpu-lab-01" in done.stdout and "unreachable" in done.stdout  # the recap table


def test_node_whose_repository_fails_is_reported_failed_while_the_others_complete(
    lab: Lab,
) -> None:
    # gpu-lab-04 moves to a copy of its stack whose repositories are on a port nothing serves.
    text = lab.spec.read_text()
    stack = text.split("  h100-570:\n", 1)[1].split("  h100-580:\n", 1)[0]
    broken = stack.replace(":18242/", ":18249/")
    text = text.replace("  h100-580:\n", f"  h100-570-norepo:\n{broken}  h100-580:\n", 1)
    text = text.replace("serial: LAB0004,", "serial: LAB0004, stack: h100-570-norepo,", 1)
    assert "stack: h100-570-norepo" in text
    (lab.root / "broken").mkdir()
    spec = lab.root / "broken" / "fleet.yaml"
    spec.write_text(text)
    run = _configure(lab, "--nodes", "gpu-lab-0[24]", spec=spec)
    assert run.rc == 1, run.explain()
    assert sorted(run.hosts) == ["gpu-lab-02", "gpu-lab-04"]
    failed = run.hosts["gpu-lab-04"]
    assert failed["status"] == "failed" and failed["failed_task"], run.explain()
    assert failed["message"], run.explain()
    assert run.hosts["gpu-lab-02"]["status"] == "ok", run.explain()
    assert "gpu-lab-04" in {host["host"] for host in run.summary["hosts"] if host["failed"]}


def _driver(lab: Lab, node: str) -> str:
    reply = lab.ssh(node, "nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    assert reply.returncode == 0, reply.stderr
    return reply.stdout.split()[0]


def test_driver_upgrade_moves_a_node_to_another_stack_in_batches(lab: Lab) -> None:
    # gpu-lab-01 moves to the h100-580 stack; gpu-lab-02 stays. The lab's rollout policy
    # (canary 1, max_unavailable 1) runs them one after the other.
    text = lab.spec.read_text().replace("serial: LAB0001}", "serial: LAB0001, stack: h100-580}")
    assert "stack: h100-580}" in text
    (lab.root / "upgrade").mkdir()
    spec = lab.root / "upgrade" / "fleet.yaml"
    spec.write_text(text)
    render = lab.root / "upgrade" / "build"
    done = lab.cli("render", str(spec), "--out", str(render))
    assert done.returncode == 0, done.stderr
    events: list[HostEvent] = []
    pair = ["gpu-lab-01", "gpu-lab-02"]
    up = run_playbook(
        "driver-upgrade.yml",
        render / "ansible",
        limit=pair,
        private_key=lab.key,
        on_event=events.append,
    )
    assert up.ok, up.summary()
    assert (up.host("gpu-lab-01").changed > 0, up.host("gpu-lab-02").changed) == (True, 0)
    order = [event.host for event in events]
    last_of_first = max(i for i, host in enumerate(order) if host == "gpu-lab-01")
    assert order.index("gpu-lab-02") > last_of_first  # one batch, then the next
    assert (_driver(lab, "gpu-lab-01"), _driver(lab, "gpu-lab-02")) == ("580.65.06", "570.133.20")
    fabric = lab.ssh("gpu-lab-01", "nv-fabricmanager --version")
    assert fabric.stdout.strip() == "Fabric Manager version is : 580.65.06", fabric.stdout
    # The way back (a downgrade, driver and fabric manager together) is test_role_driver's.
