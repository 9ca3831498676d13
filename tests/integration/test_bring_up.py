"""``provisioner bring-up`` on a blank lab rack, killed with SIGKILL again and again.

Site ``lp5`` comes up blank (nodes off, disks empty). The bring-up runs against a copy of its
spec in which gpu-lab-03's BMC address is a port where nothing answers (a dead BMC); the lab
itself serves the node's BMC at the real address, so the node itself is fine. Install
callbacks come from the lab's boot server events file (``--boot-events``).

The tests run in order, each a bring-up process of its own: killed during power-on (gpu-lab-02
between its BMC check and its network boot), killed while nodes wait for their install
callback, killed mid-playbook (site.yml; meanwhile a second bring-up of the same rack is
refused, naming the first), killed mid-burn-in, killed after burn-in documents were
fetched and before they were saved, killed after one was saved and before its node moved;
then a last run to the end. Points that an outside observer can time are hit with
``kill -9`` from the test; the two inside the controller's own bookkeeping with
``PROVISIONER_KILL_AT``, which makes the process SIGKILL itself there.

At the end: gpu-lab-01, -02 and -04 are ready and gpu-lab-03 failed in powering_on with the
BMC's error; each node was network-booted and installed exactly once; each ready node has
exactly one burn-in result; no playbook run of a killed bring-up outlived the next run's
start; and the BMC password (unique to this module) is nowhere in the state database, the
render and run folders or the logs. Root only.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from provisioner.state.lifecycle import State
from provisioner.state.records import NodeRecord
from provisioner.state.store import open_store
from tests.conftest import REPO
from tests.integration.labrig import Lab, lab_spec, running_lab

pytestmark = pytest.mark.integration

N = 5  # lab lp5
NODES = ["gpu-lab-01", "gpu-lab-02", "gpu-lab-03", "gpu-lab-04"]
DEAD = "gpu-lab-03"
ALIVE = [node for node in NODES if node != DEAD]
PASSWORD = f"bu-{secrets.token_hex(6)}"  # unique: searched for in everything written
RUN_TIMEOUT = 900


@dataclass
class Rig:
    lab: Lab
    spec: Path
    render: Path
    url: str
    events: Path
    logs: Path
    runs: int = 0
    orphans: set[int] = field(default_factory=set)  # processes of a killed site.yml run

    def start(self, kill_at: str | None = None) -> subprocess.Popen[bytes]:
        """A bring-up of the rack in the background, its output in logs/<k>.{out,err}."""
        self.runs += 1
        env = dict(self.lab.env)
        if kill_at:
            env["PROVISIONER_KILL_AT"] = kill_at
        argv = [
            str(REPO / ".venv/bin/provisioner"), "bring-up", str(self.spec), "--rack", "lab1",
            "--render", str(self.render), "--key", str(self.lab.key), "--state", self.url,
            "--boot-events", str(self.events), "-o", "json",
        ]  # fmt: skip
        out = (self.logs / f"{self.runs}.out").open("wb")
        err = (self.logs / f"{self.runs}.err").open("wb")
        return subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=self.lab.root)

    def log(self) -> str:
        return (self.logs / f"{self.runs}.out").read_text() + (
            self.logs / f"{self.runs}.err"
        ).read_text()

    def nodes(self) -> dict[str, NodeRecord]:
        if not self.url.startswith("sqlite:///") or not Path(self.url[10:]).exists():
            return {}
        with open_store(self.url, None, create=False) as store:
            return {record.name: record for record in store.nodes()}

    def states(self) -> dict[str, State]:
        return {name: record.state for name, record in self.nodes().items()}

    def wait(self, process: subprocess.Popen[bytes], what: str, until: Callable[[], bool]) -> None:
        """Wait until ``until()`` while the bring-up runs; fail if it ends first."""
        deadline = time.monotonic() + RUN_TIMEOUT
        while not until():
            assert process.poll() is None, f"the bring-up ended before {what}:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {what} in {RUN_TIMEOUT} s:\n{self.log()}"
            time.sleep(0.2)

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        process.kill()  # SIGKILL
        assert process.wait(30) == -signal.SIGKILL

    def finish(self, process: subprocess.Popen[bytes]) -> int:
        return process.wait(RUN_TIMEOUT)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, lab_host: None) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("lp5")
    env = {"PROVISIONER_LAB_BMC_PASSWORD": PASSWORD}
    with running_lab(root, N, lab_spec(N, faults=""), env, blank=True) as lab:
        text = lab.spec.read_text()
        # gpu-lab-03's BMC, as the bring-up sees it: a port where nothing answers. Short BMC
        # timeouts so that it fails in seconds.
        for old, new in (
            (f"127.0.0.1:192{N}3", f"127.0.0.1:192{N}9"),
            ("  timeout: 10\n", "  timeout: 2\n"),
            ("  retries: 2\n", "  retries: 1\n"),
        ):
            assert old in text, old
            text = text.replace(old, new)
        spec = root / "bring-up.yaml"
        spec.write_text(text)
        logs = root / "logs"
        logs.mkdir()
        yield Rig(
            lab,
            spec,
            root / "render",
            f"sqlite:///{root / 'state.db'}",
            root / "state" / lab.site / "boot-events.jsonl",
            logs,
        )


def _summary(rig: Rig) -> str:
    """The summary line of the last run's JSON output."""
    lines = (rig.logs / f"{rig.runs}.out").read_text().splitlines()
    return next(line for line in reversed(lines) if line.startswith('{"summary"'))


def _site_runs(rig: Rig, playbook: str) -> list[Path]:
    return sorted((rig.render / "ansible" / "runs").glob(f"*-{playbook}*"))


def _run_says(rig: Rig, playbook: str, text: str) -> bool:
    for run in _site_runs(rig, playbook):
        stdout = run / "artifacts" / "stdout"
        if stdout.is_file() and text in stdout.read_text(errors="replace"):
            return True
    return False


def _sessions_of(folder: Path) -> set[int]:
    """Live processes whose command line names a run folder under ``folder``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(folder) in command:
                found.add(int(entry.name))
    return found


def test_killed_during_power_on(rig: Rig) -> None:
    run = rig.start(kill_at="power-on:gpu-lab-02")
    assert rig.finish(run) == -signal.SIGKILL, rig.log()
    states = rig.states()
    assert sorted(states) == NODES
    assert states["gpu-lab-02"] is State.powering_on  # checked its BMC, never network-booted


def test_killed_waiting_for_callbacks(rig: Rig) -> None:
    run = rig.start()
    rig.wait(run, "a node installing", lambda: State.installing in rig.states().values())
    rig.kill(run)  # within a poll of a node waiting for its callback (installs take seconds)
    assert State.burning_in not in rig.states().values()


def test_killed_mid_playbook_and_a_second_bring_up_is_refused_meanwhile(rig: Rig) -> None:
    run = rig.start()
    rig.wait(run, "site.yml under way", lambda: _run_says(rig, "site", "TASK [nvidia_driver"))
    second = rig.lab.cli(
        "bring-up", str(rig.spec), "--rack", "lab1", "--render", str(rig.render),
        "--key", str(rig.lab.key), "--state", rig.url, "--boot-events", str(rig.events),
    )  # fmt: skip
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"pid {run.pid}" in second.stderr and "bring-up-" in second.stderr, second.stderr
    rig.kill(run)
    assert State.configuring in rig.states().values()
    rig.orphans = _sessions_of(rig.render / "ansible" / "runs")
    assert rig.orphans, "the killed bring-up left no playbook run behind to end"


def test_killed_mid_burn_in_after_orphaned_runs_were_ended(rig: Rig) -> None:
    run = rig.start()
    rig.wait(run, "a node burning in", lambda: State.burning_in in rig.states().values())
    left = _sessions_of(rig.render / "ansible" / "runs") & rig.orphans
    assert not left, f"processes of the killed run still alive: {left}"
    rig.wait(run, "the agent running", lambda: _run_says(rig, "burnin", "Run the burn-in agent"))
    rig.kill(run)
    assert State.burning_in in rig.states().values()


def test_killed_after_fetching_before_saving_burn_in_results(rig: Rig) -> None:
    run = rig.start(kill_at="burnin-fetched:*")
    assert rig.finish(run) == -signal.SIGKILL, rig.log()
    fetched = sorted((rig.render / "burnin").glob("*/gpu-lab-*.json"))
    assert fetched, "no burn-in document was fetched"
    with open_store(rig.url, None, create=False) as store:
        assert not any(store.burnin_results(node) for node in ALIVE)


def test_killed_after_saving_a_result_before_moving_its_node(rig: Rig) -> None:
    run = rig.start(kill_at="burnin-saved:gpu-lab-02")
    assert rig.finish(run) == -signal.SIGKILL, rig.log()
    assert rig.states()["gpu-lab-02"] is State.burning_in
    with open_store(rig.url, None, create=False) as store:
        assert len(store.burnin_results("gpu-lab-02")) == 1


def test_last_run_finishes_every_node_where_it_should(rig: Rig) -> None:
    run = rig.start()
    assert rig.finish(run) == 1, rig.log()  # the dead BMC's node failed
    summary = json.loads(_summary(rig))["summary"]
    assert summary["counts"] == {"ready": 3, "failed": 1}, summary
    nodes = rig.nodes()
    assert {name: nodes[name].state for name in ALIVE} == dict.fromkeys(ALIVE, State.ready)
    dead = nodes[DEAD]
    assert dead.state is State.failed and dead.failed_in is State.powering_on
    assert dead.last_error is not None and f"192{N}9" in dead.last_error, dead.last_error
    with open_store(rig.url, None, create=False) as store:
        for node in ALIVE:
            history = [row.to_state for row in store.history(node)]
            assert history.count(State.pxe_booting) == 1, (node, history)
            assert history.count(State.installing) == 1, (node, history)
            assert history[-1] is State.ready
            assert len(store.burnin_results(node)) == 1, node
            assert store.burnin_results(node)[0].verdict == "ready"
        assert not store.burnin_results(DEAD)
    # The lab's own count: each node's disk was installed once, and never again.
    status = rig.lab.root / "state" / rig.lab.site / "status.json"
    machines = json.loads(status.read_text())["nodes"]
    assert {name: machines[name]["installs"] for name in ALIVE} == dict.fromkeys(ALIVE, 1)
    callbacks: dict[str, int] = {}
    for line in rig.events.read_text().splitlines():
        event = json.loads(line)
        if event.get("kind") == "callback" and event.get("accepted"):
            callbacks[event["node"]] = callbacks.get(event["node"], 0) + 1
    assert callbacks == dict.fromkeys(ALIVE, 1)


def _upgraded_spec(rig: Rig) -> Path:
    """The bring-up's spec as a pull request would change it: the rack on h100-580, two nodes
    out at once."""
    text = rig.spec.read_text()
    for old, new in (("    stack: h100-570\n", "    stack: h100-580\n"),
                     ("  max_unavailable: 1\n", "  max_unavailable: 2\n")):  # fmt: skip
        assert old in text, old
        text = text.replace(old, new)
    spec = rig.spec.with_name("upgrade.yaml")
    spec.write_text(text)
    return spec


def test_a_rolling_upgrade_of_the_ready_nodes_keeps_its_window_and_leaves_no_drift(
    rig: Rig,
) -> None:
    """The three ready nodes, from h100-570 to h100-580 through driver-upgrade.yml for real:
    the canary alone first, then never more than two out at once (from the transitions);
    each node on the new stack, and drift finds nothing; a hold lifted by hand is found."""
    spec = _upgraded_spec(rig)
    render = rig.lab.root / "render-upgrade"
    common = ("--state", rig.url, "--render", str(render), "--key", str(rig.lab.key))
    planned = rig.lab.cli("plan", str(spec), "--state", rig.url, "--format", "json",
                          "--detailed-exitcode")  # fmt: skip
    assert planned.returncode == 2, planned.stdout + planned.stderr
    assert json.loads(planned.stdout)["summary"] == {"bring-up": 1, "upgrade-stack": 3}
    done = rig.lab.cli("upgrade", str(spec), "--stack", "h100-580", *common, "-o", "json",
                       timeout=RUN_TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])["upgrade"]
    assert sorted(summary["upgraded"]) == ALIVE and not summary["failed"], summary
    out: set[str] = set()
    most = 0
    with open_store(rig.url, None, create=False) as store:
        rows = sorted((r.id, r.node, r.to_state) for n in ALIVE for r in store.history(n))
        stacks = store.facts("stack")
    upgrade_rows = [row for row in rows if row[2] in (State.draining, State.upgrading)]
    first = upgrade_rows[0][1]  # the canary: ready again before any other node is drained
    canary_done = max(i for i, node, to in rows if node == first and to is State.ready)
    assert all(i > canary_done for i, node, to in upgrade_rows if node != first)
    for _, node, to in rows:
        if to in (State.draining, State.upgrading) or (to is State.burning_in and node in out):
            out.add(node)
        else:
            out.discard(node)
        most = max(most, len(out))
    assert most == 2
    assert {stacks[n]["name"] for n in ALIVE} == {"h100-580"}
    drift = rig.lab.cli("drift", str(spec), *common, timeout=300)
    assert drift.returncode == 0, drift.stdout + drift.stderr
    assert "3 nodes read: 0 drifted" in drift.stdout
    lifted = rig.lab.ssh("gpu-lab-02", "apt-mark unhold nvidia-utils-580")
    assert lifted.returncode == 0, lifted.stderr
    drift = rig.lab.cli("drift", str(spec), *common, timeout=300)
    assert drift.returncode == 2, drift.stdout + drift.stderr
    assert "gpu-lab-02: drifted\n  nvidia-utils-580: not held" in drift.stdout
    rig.lab.ssh("gpu-lab-02", "apt-mark hold nvidia-utils-580")
    replanned = rig.lab.cli("plan", str(spec), "--state", rig.url, "--format", "json")
    assert json.loads(replanned.stdout)["summary"] == {"bring-up": 1}, replanned.stdout


def test_a_rollout_killed_mid_way_resumes_and_a_failure_past_the_budget_rolls_back(
    rig: Rig,
) -> None:
    """Back to h100-570, one node at a time and no failure allowed: the run is SIGKILLed
    once the canary is drained, before its playbook (a kill after the playbook, which the
    re-run runs again, is the unit tests' case; here it would cost a fourth real upgrade);
    the re-run takes the canary up where it stopped, with the stack it had kept from the drain,
    then gpu-lab-02 fails its burn-in (a GPU lost, written into its simulated hardware):
    it goes back to h100-580 for real, stays quarantined, and the rollout halts before
    gpu-lab-04. No node was upgraded twice."""
    text = _upgraded_spec(rig).read_text()
    text = text.replace("    stack: h100-580\n", "    stack: h100-570\n")
    text = text.replace("  max_unavailable: 2\n", "  max_unavailable: 1\n")
    text = text.replace("  max_failures: 1\n", "  max_failures: 0\n")
    spec = rig.spec.with_name("back.yaml")
    spec.write_text(text)
    with open_store(rig.url, None, create=False) as store:
        before = {n: _upgrades(store, n) for n in ALIVE}
    render = rig.lab.root / "render-back"
    argv = [str(REPO / ".venv/bin/provisioner"), "upgrade", str(spec), "--stack", "h100-570",
            "--state", rig.url, "--render", str(render), "--key", str(rig.lab.key),
            "-o", "json"]  # fmt: skip
    killed = subprocess.run(argv, env={**rig.lab.env, "PROVISIONER_KILL_AT": "drained:*"},
                            cwd=rig.lab.root, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, check=False)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    canary = next(n for n, record in rig.nodes().items() if record.state is State.draining)
    assert canary == "gpu-lab-01"
    hardware = rig.lab.root / "state" / rig.lab.site / "nodes" / "gpu-lab-02" / "hardware"
    original = (hardware / "gpus.json").read_text()
    lost = json.loads(original)
    lost["gpus"][3]["present"] = False  # the GPU fell off the bus
    (hardware / "gpus.json").write_text(json.dumps(lost))
    try:
        done = subprocess.run(argv, env=rig.lab.env, cwd=rig.lab.root, capture_output=True,
                              text=True, timeout=RUN_TIMEOUT, check=False)  # fmt: skip
    finally:
        (hardware / "gpus.json").write_text(original)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])["upgrade"]
    assert summary["upgraded"] == ["gpu-lab-01"] and summary["failed"] == ["gpu-lab-02"]
    assert summary["not_started"] == ["gpu-lab-04"] and "max_failures (0)" in summary["halted"]
    nodes = rig.nodes()
    failed = nodes["gpu-lab-02"]
    assert failed.state is State.quarantined, failed
    assert "gpu_count" in (failed.last_error or "") and "rolled back to stack h100-580" in (
        failed.last_error or ""
    )
    assert nodes["gpu-lab-04"].state is State.ready
    with open_store(rig.url, None, create=False) as store:
        stacks = store.facts("stack")
        after = {n: _upgrades(store, n) for n in ALIVE}
    assert {n: stacks[n]["name"] for n in ALIVE} == {
        "gpu-lab-01": "h100-570", "gpu-lab-02": "h100-580", "gpu-lab-04": "h100-580"
    }  # fmt: skip
    assert {n: after[n] - before[n] for n in ALIVE} == {
        "gpu-lab-01": 1, "gpu-lab-02": 1, "gpu-lab-04": 0
    }  # fmt: skip
    # The way back ran for real: the node's packages are h100-580's again, held.
    smi = rig.lab.ssh("gpu-lab-02", "dpkg-query -W -f='${Version}' nvidia-utils-580")
    assert smi.stdout == "580.65.06-0ubuntu1", smi.stdout + smi.stderr


def _upgrades(store: Any, node: str) -> int:
    """How many times the node went draining -> upgrading, ever."""
    return sum(
        1
        for row in store.history(node)
        if (row.from_state, row.to_state) == (State.draining, State.upgrading)
    )


def test_the_bmc_password_is_nowhere_written(rig: Rig) -> None:
    """The state database, the render and its run folders, the bring-up logs, the lab's own
    folder and logs (the nodes' consoles too; their disks are left out)."""
    secret = PASSWORD.encode()
    disks = {"disk", "disk.new", "live", "live-rw", "root", "images", "cp", "tmp"}
    searched = 0
    for path in rig.lab.root.rglob("*"):
        if disks & set(path.relative_to(rig.lab.root).parts) or not path.is_file():
            continue
        searched += 1
        assert secret not in path.read_bytes(), f"the BMC password is in {path}"
    assert searched > 100, searched
    assert (rig.lab.root / "state.db").is_file()
    assert len(_site_runs(rig, "site")) >= 2 and len(_site_runs(rig, "burnin")) >= 2
