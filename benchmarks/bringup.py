"""Bring-up benchmark: the makespan of a 32-node rack bring-up against the time the slowest
of those nodes takes when it is brought up alone.

The workflow is the real one (:class:`provisioner.workflows.bring_up.BringUp`: a thread per
node, the power-on stagger, the BMC cap, the batched playbook runs) over a real SQLite state
store and a real fleet spec of one rack. The BMC steps are real too: ``SiteSteps`` checks
each node's FRU serial, sets a one-time network boot and powers it on over IPMI, against a
:class:`~provisioner.lab.ipmi_bmc.BmcFarm` of lab BMCs on loopback in this process; and the
"booted" and "installed" steps read a real boot events file through ``SiteSteps``.

What takes minutes on a real rack is simulated (:class:`SimulatedSteps`), with seeded random
durations per node, all real times scaled by :data:`SCALE` (a node's 10-30 minutes take 5-15 s
here). The spec's power-on stagger and ``Caps.settle`` are scaled the same way, so that every
wait the workflow adds keeps its proportion; its other costs (store writes, threads, IPMI
exchanges, judging documents) are not scaled, so they weigh more here than on a real rack.

Every run uses the same durations; the slowest node is the one whose own durations add up
to the most, and each run starts on fresh BMCs (every machine off), spec and store.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from provisioner.boot.server import BootEvent
from provisioner.burnin.results import collect, judge_all
from provisioner.lab.bmc_state import MachineState, PowerAction
from provisioner.lab.ipmi_bmc import BmcFarm
from provisioner.spec import Fleet, load_fleet
from provisioner.state.lifecycle import State
from provisioner.state.store import Store, open_store
from provisioner.workflows.bring_up import (
    BringUp,
    BurninOutcome,
    Caps,
    SiteSteps,
    Timeouts,
)

REPO = Path(__file__).resolve().parent.parent
HEALTHY = REPO / "tests" / "data" / "burnin" / "documents" / "healthy.json"
PASSWORD = "bench-bu-bmc-pw"  # noqa: S105 - the lab BMCs' own, made up here
NODES = 32
#: Benchmark seconds per real second: one second here stands for two minutes of a rack.
SCALE = 1 / 120
#: The spec's default power-on stagger (4 nodes every 5 s per rack), scaled.
STAGGER = (4, 5.0 * SCALE)
#: What one playbook run costs whatever its hosts do (connections, facts, the play's own
#: bookkeeping): about 30 s on a real rack, scaled.
RUN_OVERHEAD = 30.0 * SCALE
POLL = 0.05
#: Playbook runs at once for the second row, beside the default (8, the fewest that met the
#: goal in every seed tried, 11-13: 4 runs gave 1.09-1.21x, 2 gave 1.16-1.30x).
FEWER_RUNS = 2


@dataclass(frozen=True, slots=True)
class Durations:
    """One simulated node's own times, in benchmark seconds."""

    boot: float  # power on -> its firmware fetches its iPXE script (POST is slow on HGX)
    install: float  # -> its installer calls back
    first_boot: float  # -> SSH answers in the installed OS
    configure: float  # its share of site.yml: driver, toolkits, reboot
    burn_in: float  # the agent's run at the profile's level

    @property
    def total(self) -> float:
        return self.boot + self.install + self.first_boot + self.configure + self.burn_in


def draw(names: Sequence[str], seed: int = 11) -> dict[str, Durations]:
    """Seeded random durations: real minutes (boot 1-3, install 4-12, first boot 0.5-1,
    configure 3-7, burn-in 2-5) scaled by :data:`SCALE`."""
    rng = random.Random(seed)
    minute = 60.0 * SCALE
    return {
        name: Durations(
            boot=rng.uniform(1, 3) * minute,
            install=rng.uniform(4, 12) * minute,
            first_boot=rng.uniform(0.5, 1) * minute,
            configure=rng.uniform(3, 7) * minute,
            burn_in=rng.uniform(2, 5) * minute,
        )
        for name in names
    }


class SimulatedSteps:
    """A SIMULATION of the slow parts of a bring-up, for the benchmark only: this machine
    (2 cores) cannot run 32 lab machine containers installing an OS and running apt and
    Ansible, and the benchmark measures the pipeline, not those.

    Real: the BMC steps and the boot events file, through ``site`` (:class:`SiteSteps`).
    Simulated: each machine, started by its lab BMC's power-on with a one-time network boot
    (``on_power``), writes the boot server's events at its own times (a file fetched, then
    the install callback) and answers SSH after its first boot. A ``configure`` or
    ``burn_in`` call stands for one playbook run over its nodes (Ansible's linear strategy):
    it takes the longest of its nodes' own times plus :data:`RUN_OVERHEAD`. A burn-in run
    then leaves each node's agent document in the run's results folder (the recorded healthy
    H100 fixture, named for the node) and the controller's real code collects and judges
    them against the spec."""

    def __init__(
        self, fleet: Fleet, folder: Path, durations: Mapping[str, Durations], site: SiteSteps
    ) -> None:
        self.fleet = fleet
        self.folder = folder
        self.durations = durations
        self.site = site
        self.configure_batches: list[int] = []
        self.burn_in_batches: list[int] = []
        self._events = site.events.path
        self._lock = threading.Lock()
        self._reachable_at: dict[str, float] = {}
        self._document = json.loads(HEALTHY.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ the machines

    def on_power(self, node: str, state: MachineState, action: PowerAction) -> None:
        """The lab BMC powered ``node`` on (or reset it): when it was told to boot from the
        network, its firmware, installer and first boot run on their own timers."""
        if action not in ("on", "cycle", "reset") or state.last_boot_device != "network":
            return
        own = self.durations[node]
        now = time.time()
        booted = now + own.boot
        installed = booted + own.install
        with self._lock:
            self._reachable_at[node] = installed + own.first_boot
        self._later(booted, node, "fetch", f"/nodes/{node}/boot.ipxe")
        self._later(installed, node, "callback", f"/callback/{node}")

    def _later(self, at: float, node: str, kind: str, path: str) -> None:
        """Write the boot server's event for ``node`` at ``at`` (Unix time)."""

        def write() -> None:
            event = BootEvent(kind, "10.0.0.1", path, 200, True, node=node)
            with self._lock, self._events.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(event.as_dict(), sort_keys=True) + "\n")

        timer = threading.Timer(max(0.0, at - time.time()), write)
        timer.daemon = True
        timer.start()

    # ------------------------------------------------------------------ Steps

    def check_bmc(self, node: str) -> str:
        return self.site.check_bmc(node)

    def network_boot(self, node: str) -> str:
        return self.site.network_boot(node)

    def booted(self, node: str, since: float) -> bool:
        return self.site.booted(node, since)

    def installed(self, node: str, since: float) -> bool:
        return self.site.installed(node, since)

    def reachable(self, node: str) -> bool:
        with self._lock:
            at = self._reachable_at.get(node)
        return at is not None and time.time() >= at

    def configure(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        self.configure_batches.append(len(nodes))
        time.sleep(max(self.durations[n].configure for n in nodes) + RUN_OVERHEAD)
        return dict.fromkeys(nodes)

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        self.burn_in_batches.append(len(nodes))
        time.sleep(max(self.durations[n].burn_in for n in nodes) + RUN_OVERHEAD)
        results_dir = self.folder / "burnin" / run_id
        results_dir.mkdir(parents=True, exist_ok=True)
        for node in nodes:  # what burnin.yml's fetch leaves
            document = {**self._document, "node": node}
            document["host"] = {**document["host"], "hostname": node}
            (results_dir / f"{node}.json").write_text(json.dumps(document), encoding="utf-8")
        documents, missing = collect(results_dir, nodes, {})
        out: dict[str, BurninOutcome | str] = {m.node: m.reason for m in missing}
        verdicts, strangers = judge_all(self.fleet, documents)
        out |= {m.node: m.reason for m in strangers}
        paths = {document.node: path for path, document in documents}
        for verdict in verdicts:
            raw = json.loads(paths[verdict.node].read_text(encoding="utf-8"))
            out[verdict.node] = BurninOutcome(verdict, raw)
        return out

    def recover(self) -> None:
        pass  # nothing outlives a simulated run

    def fetched(self, node: str, since: float) -> BurninOutcome | None:
        return None  # every run starts on a fresh store


# ---------------------------------------------------------------------------- the rig

SPEC = """\
version: 1
metadata: {{site: bench-bring-up}}
networks:
  provisioning:
    cidr: 10.240.0.0/24
    gateway: 10.240.0.1
    dns: [10.240.0.1]
    domain: bench.provisioner.internal
    dhcp_range: {{start: 10.240.0.200, end: 10.240.0.250}}
  bmc: {{cidr: 127.0.0.0/8}}
ssh:
  user: root
  authorized_keys: ["{key}"]
boot: {{url: "http://10.240.0.1:8080/"}}
bmc:
  username: admin
  password: file:bmc-password
  concurrency: 16
  timeout: 10
  retries: 2
  power_on_stagger: {{count: {stagger_count}, interval: {stagger_interval}}}
images:
  ubuntu-2404:
    os: ubuntu
    version: "24.04"
    kernel_url: http://10.240.0.1:8080/images/ubuntu-24.04/vmlinuz
    initrd_url: http://10.240.0.1:8080/images/ubuntu-24.04/initrd
    iso_url: http://10.240.0.1:8080/images/ubuntu-24.04/ubuntu-24.04-live-server-amd64.iso
stacks:
  h100-570:
    driver: {{version: 570.133.20, kernel_modules: open}}
    cuda: "12.8"
    container_toolkit: 1.17.5
    dcgm: 4.1.1
    fabric_manager: true
profiles:
  hgx-h100:
    gpu: H100-SXM5-80GB
    gpus: 8
    nvswitch: true
    burnin: {{level: standard}}
racks:
  - name: bench1
    profile: hgx-h100
    stack: h100-570
    image: ubuntu-2404
    nodes:
{nodes}"""
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6GFuN4SG+YD2Cpod/OiC9w02Ut6b3UUarAS03nJ2dT bench"


def node_names(count: int = NODES) -> list[str]:
    return [f"gpu-bench-{k:02d}" for k in range(1, count + 1)]


def write_spec(folder: Path, ports: Mapping[str, int]) -> Path:
    """A one-rack spec of the nodes in ``ports`` (their lab BMCs' IPMI ports)."""
    lines = [
        f'      - {{name: {name}, ip: 10.240.0.{10 + k}, mac: "02:00:0a:f0:00:{10 + k:02x}", '
        f'bmc: "ipmi://127.0.0.1:{port}", serial: BENCH{k:04d}}}\n'
        for k, (name, port) in enumerate(ports.items(), start=1)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "bmc-password"
    secret.touch(mode=0o600)  # before the secret is in it
    secret.write_text(PASSWORD)
    spec = folder / "fleet.yaml"
    count, interval = STAGGER
    spec.write_text(
        SPEC.format(key=KEY, stagger_count=count, stagger_interval=interval, nodes="".join(lines))
    )
    return spec


@dataclass
class Rig:
    fleet: Fleet
    store: Store
    steps: SimulatedSteps


@contextmanager
def rig(folder: Path, durations: Mapping[str, Durations]) -> Iterator[Rig]:
    """Lab BMCs on loopback (every machine off), a spec naming them, a fresh SQLite store
    and the steps, in ``folder``."""
    with ExitStack() as stack:
        farm = stack.enter_context(BmcFarm(username="admin", password=PASSWORD))
        states: dict[str, MachineState] = {}
        ports: dict[str, int] = {}
        for k, name in enumerate(durations, start=1):
            states[name] = MachineState(product_serial=f"BENCH{k:04d}")
            ports[name] = farm.add(0, states[name]).port
        fleet = load_fleet(write_spec(folder, ports))
        site = SiteSteps(fleet, folder, folder / "boot-events.jsonl")
        stack.callback(site.close)
        steps = SimulatedSteps(fleet, folder, durations, site)
        for name, state in states.items():
            state.on_power = partial(steps.on_power, name)
        store = stack.enter_context(open_store(f"sqlite:///{folder / 'state.db'}", None))
        yield Rig(fleet, store, steps)


@dataclass
class Run:
    """One measured bring-up."""

    nodes: int
    seconds: float
    configure_batches: list[int]
    burn_in_batches: list[int]
    transitions: int
    events: int
    burnin_results: int
    not_ready: dict[str, str]


def bring_up(
    folder: Path, durations: Mapping[str, Durations], chosen: Sequence[str], caps: Caps
) -> Run:
    """Bring ``chosen`` up on a fresh rig in ``folder``; the run as measured."""
    with rig(folder, durations) as built:
        store, steps = built.store, built.steps
        nodes = [built.fleet.by_name[name] for name in chosen]
        work = BringUp(built.fleet, nodes, store, steps, caps=caps, timeouts=Timeouts(poll=POLL))
        started = time.perf_counter()
        outcome = work.run()
        seconds = time.perf_counter() - started
        return Run(
            len(nodes),
            seconds,
            steps.configure_batches,
            steps.burn_in_batches,
            sum(len(store.history(name)) for name in chosen),
            len(store.events(outcome.run_id)),
            sum(len(store.burnin_results(name)) for name in chosen),
            {
                r.name: f"{r.state}: {r.last_error}"
                for r in outcome.nodes
                if r.state is not State.ready
            },
        )


@dataclass
class Figure:
    name: str
    caps: Caps
    fleet: Run
    alone: Run
    slowest: str
    own: float  # the slowest node's own simulated time, in benchmark seconds

    @property
    def ratio(self) -> float:
        return self.fleet.seconds / self.alone.seconds


def scaled_caps(**overrides: Any) -> Caps:
    """:class:`Caps` with its default settle scaled like every other time here."""
    return replace(Caps(settle=Caps().settle * SCALE), **overrides)


def run(
    work: Path, runs: Sequence[int] = (Caps().runs, FEWER_RUNS), seed: int = 11
) -> list[Figure]:
    """The slowest node alone, then all :data:`NODES` together once per ``runs`` (playbook
    runs at once; the other caps are the defaults)."""
    names = node_names()
    durations = draw(names, seed)
    slowest = max(names, key=lambda name: durations[name].total)
    alone = bring_up(work / "bring-up-alone", durations, [slowest], scaled_caps())
    figures = []
    for count in runs:
        caps = scaled_caps(runs=count)
        together = bring_up(work / f"bring-up-{count}-runs", durations, names, caps)
        name = f"bring-up {NODES} nodes (lab)"
        if count != Caps().runs:
            name += f", --runs {count}"
        figures.append(Figure(name, caps, together, alone, slowest, durations[slowest].total))
    return figures
