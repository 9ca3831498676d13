"""provisioner's benchmarks: `python benchmarks/run.py` prints a markdown table.

Each row names what was measured, the figure, the goal the issue set, and how it was taken.
Timings are wall-clock medians on this machine; the synthetic fleets come from fleetgen.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import bmc, boot, bringup, configure, rollout  # noqa: E402
from benchmarks.fleetgen import write_fleet  # noqa: E402
from provisioner.render import render_fleet, write_tree  # noqa: E402
from provisioner.spec import load_fleet  # noqa: E402

SECTIONS = ("spec", "bmc", "boot", "configure", "bring-up", "plan", "rollout")


@dataclass
class Row:
    name: str
    value: str
    goal: str
    notes: str


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _timed(action: Callable[[], object], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return samples


def reference_row() -> Row:
    """A fixed pure-Python loop: this machine's speed at the moment, to read the rest by."""

    def loop() -> None:
        total = 0
        for i in range(5_000_000):
            total += i

    return Row(
        "reference: pure-Python loop, 5M additions",
        f"{_median(_timed(loop, 5)):.2f} s",
        "",
        "machine speed now (the shared 2-core VM varies by 2x); compare rows taken together",
    )


def spec_rows(work: Path, nodes: int, repeat: int) -> list[Row]:
    spec = write_fleet(work / f"fleet-{nodes}", nodes)
    workers = os.cpu_count() or 1
    outputs = iter(range(1000))

    def validate_and_render() -> None:
        out = work / f"out-{next(outputs)}"
        fleet = load_fleet(spec)
        write_tree(render_fleet(fleet, b"benchmark-callback-key-0123456789", workers), out)

    cold = _timed(validate_and_render, repeat)
    last = work / "out-rerender"
    fleet = load_fleet(spec)
    write_tree(render_fleet(fleet, b"benchmark-callback-key-0123456789", workers), last)

    def rerender() -> None:
        fleet = load_fleet(spec)
        report = write_tree(
            render_fleet(fleet, b"benchmark-callback-key-0123456789", workers), last
        )
        assert not report.written and not report.changed

    warm = _timed(rerender, repeat)
    validate = _timed(lambda: load_fleet(spec), repeat)

    def cli() -> None:
        out = work / f"out-cli-{next(outputs)}"
        subprocess.run(
            [sys.executable, "-m", "provisioner", "render", str(spec), "--out", str(out)],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    cli_samples = _timed(cli, repeat)
    files = sum(1 for p in (work / "out-rerender").rglob("*") if p.is_file())
    return [
        Row(
            f"validate+render {nodes} nodes",
            f"{_median(cold):.2f} s; {_ansible_inventory(last / 'ansible', work)}",
            "<= 2 s",
            f"in-process load + render + write {files} files to a new folder (in memory "
            f"unless --disk), median of {repeat}, {workers} workers; for comparison, "
            "ansible-core reading the rendered YAML inventory + group_vars, one run",
        ),
        Row(
            f"validate {nodes} nodes",
            f"{_median(validate):.2f} s",
            "",
            "YAML + CSV manifests + models + cross-checks",
        ),
        Row(
            f"re-render {nodes} nodes, nothing changed",
            f"{_median(warm):.2f} s",
            "",
            "compares every file, writes none",
        ),
        Row(
            f"`provisioner render` CLI {nodes} nodes",
            f"{_median(cli_samples):.2f} s",
            "",
            "whole command in a new process (imports included)",
        ),
    ]


def _ansible_inventory(rendered: Path, work: Path) -> str:
    """How long ``ansible-inventory --list`` takes on the rendered inventory (one run)."""
    found = shutil.which("ansible-inventory")
    beside = Path(sys.executable).parent / "ansible-inventory"
    ansible = found or (str(beside) if beside.exists() else None)
    if ansible is None:
        return "`ansible-inventory --list` on it: ansible-inventory not found"
    start = time.perf_counter()
    subprocess.run(
        [ansible, "-i", str(rendered / "inventory.yml"), "--list"],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp")},
    )
    return f"`ansible-inventory --list` on it: {time.perf_counter() - start:.2f} s"


def bmc_rows() -> list[Row]:
    rows = []
    for figure in bmc.run():
        goal = "<= 1.5x ideal, <= 10 s" if "64 workers" in figure.name else "(Ironic's default)"
        rows.append(
            Row(
                figure.name,
                f"{figure.seconds:.2f} s = {figure.ratio:.2f}x ideal ({figure.ideal:.2f} s)"
                + (f", {figure.failures} failed" if figure.failures else ""),
                goal,
                "in-process FanOut; 4 lab BMC server processes; ideal = N / workers x one "
                "status alone (login + probe + 9 exchanges of 50 ms)",
            )
        )
    return rows


def boot_rows(work: Path, nodes: int, kernel_bytes: int) -> list[Row]:
    return [
        Row(
            figure.name,
            figure.value(),
            f"all {figure.nodes} served, 0 failures",
            "`provisioner boot serve` in its own process; asyncio raw-socket client in this "
            "one; each node: iPXE script by MAC, kernel, meta-data + user-data (or kickstart), "
            "callback with its rendered token; wall time from the first connect to the last "
            "callback; " + figure.notes(),
        )
        for figure in boot.run(work, nodes, (kernel_bytes, 64 << 10))
    ]


def configure_rows(work: Path, spec: Path | None, key: Path | None, repeat: int) -> list[Row]:
    name = "orchestrator overhead: `run_playbook` vs plain `ansible-playbook`"
    goal = "<= 1.1x"
    if os.geteuid() != 0:
        return [Row(name, "skipped", goal, "needs the lab, which needs root")]
    if spec is None or key is None:
        with configure.own_lab(work) as (spec, key):
            figure = configure.run(work, spec, key, repeat)
    else:
        figure = configure.run(work, spec, key, repeat)
    return [
        Row(
            name,
            f"{figure.ratio:.2f}x ({_median(figure.runner):.2f} s vs "
            f"{_median(figure.plain):.2f} s)",
            goal,
            f"the same playbook (facts, ping, a command, a stat) and rendered inventory on the "
            f"{figure.hosts} lab nodes over SSH, same key, forks and Ansible settings; "
            f"ansible-runner + per-run inventory + ssh-agent + event stream vs the bare "
            f"command; alternately, median of {repeat} each",
        )
    ]


def bring_up_rows(work: Path) -> list[Row]:
    rows = []
    for k, figure in enumerate(bringup.run(work)):
        fleet, alone, caps = figure.fleet, figure.alone, figure.caps
        value = f"{figure.ratio:.2f}x ({fleet.seconds:.1f} s vs {alone.seconds:.1f} s alone)"
        failed = {**alone.not_ready, **fleet.not_ready}
        if failed:
            value += f", {len(failed)} not ready: " + "; ".join(
                f"{node}: {why}" for node, why in list(failed.items())[:3]
            )
        how = (
            f"makespan of all {fleet.nodes} vs the slowest of them ({figure.slowest}, "
            f"{figure.own:.1f} s of its own) alone; real BringUp, SQLite store, spec, lab IPMI "
            f"BMCs (FRU, boot, power) and boot events file; simulated machines and playbooks "
            f"(seeded times, 1 s here = {1 / bringup.SCALE:.0f} s of a rack; a run takes its "
            f"slowest node + {bringup.RUN_OVERHEAD:.2f} s); one run each; "
            if k == 0
            else "the same rack and times; "
        )
        rows.append(
            Row(
                figure.name,
                value,
                "<= 1.2x",
                how + f"Caps runs {caps.runs}, batch {caps.batch}, bmc {caps.bmc}, settle "
                f"{caps.settle:.3f} s; site.yml runs {_sizes(fleet.configure_batches)}, "
                f"burnin.yml runs {_sizes(fleet.burn_in_batches)}; store: "
                f"{fleet.transitions} transitions, {fleet.events} events, "
                f"{fleet.burnin_results} burn-in results",
            )
        )
    return rows


def plan_rows(work: Path, nodes: int, repeat: int) -> list[Row]:
    figure = rollout.plan_figure(work, nodes, repeat)
    return [
        Row(
            f"plan {nodes} nodes",
            f"{_median(figure.plan):.3f} s",
            "<= 1 s",
            f"make_plan + markdown for a spec that bumps one stack's driver ({figure.actions} "
            f"actions) against every node recorded ready with its facts; median of {repeat}. "
            f"Around it: loading the spec {figure.load:.2f} s, reading the snapshot out of "
            f"SQLite {figure.snapshot_read:.2f} s",
        )
    ]


def rollout_rows(work: Path, nodes: int) -> list[Row]:
    figure = rollout.rollout_figure(work, nodes)
    limits = figure.limits
    return [
        Row(
            f"rollout {figure.nodes} nodes (simulated stage durations)",
            f"{figure.ratio:.2f}x ({figure.seconds:.1f} s vs {figure.ideal:.1f} s ideal)",
            "<= 1.1x",
            f"real Upgrade over a real SQLite store: canary {limits.canary}, max_unavailable "
            f"{limits.unavailable} (most out at once, from the transitions: {figure.most_out}); "
            f"seeded per-node times: jobs end 0-1 s after the drain, upgrade 2-3 s, quick "
            f"burn-in 1-1.5 s (1 s here = 2 min of a rack); a playbook run per node, as the "
            f"upgrade does by default; ideal = the slowest canary + the rest's own times packed "
            f"into the window; {figure.upgraded} upgraded",
        )
    ]


def _sizes(batches: list[int]) -> str:
    """``5 (1+1+15+3+12 hosts)``"""
    return f"{len(batches)} ({'+'.join(map(str, batches))} hosts)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--disk",
        action="store_true",
        help="write renders to the disk's temp folder instead of /dev/shm (memory)",
    )
    parser.add_argument("--skip-bmc", action="store_true", help="leave out the BMC rows (~80 s)")
    parser.add_argument("--skip-boot", action="store_true", help="leave out the boot rows (~30 s)")
    parser.add_argument(
        "--skip-configure",
        action="store_true",
        help="leave out the orchestrator-overhead row (lab up + 10 playbook runs, ~1 min)",
    )
    parser.add_argument(
        "--configure-spec",
        type=Path,
        help="spec of a lab that is up, for the orchestrator row (default: bring one up)",
    )
    parser.add_argument("--configure-key", type=Path, help="SSH key of that lab's nodes")
    parser.add_argument(
        "--skip-bring-up",
        action="store_true",
        help="leave out the bring-up rows (32-node rack, simulated machines, ~50 s)",
    )
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only these groups of rows (repeatable; the reference row is always run)",
    )
    parser.add_argument("--boot-nodes", type=int, default=1000)
    parser.add_argument("--rollout-nodes", type=int, default=1000)
    parser.add_argument(
        "--boot-kernel-mib", type=float, default=8, help="size of the kernel each node fetches"
    )
    args = parser.parse_args()
    skipped = {
        "bmc": args.skip_bmc,
        "boot": args.skip_boot,
        "configure": args.skip_configure,
        "bring-up": args.skip_bring_up,
    }
    wanted = {
        name for name in SECTIONS if not skipped.get(name) and name in (args.only or SECTIONS)
    }
    memory = Path("/dev/shm")
    where = None if args.disk or not memory.is_dir() else str(memory)
    with tempfile.TemporaryDirectory(prefix="provisioner-bench-", dir=where) as folder:
        # Callback keys render makes (synthetic sites) go here, with the rest, not to ~.
        os.environ["XDG_STATE_HOME"] = str(Path(folder) / "state")
        rows = [reference_row()]
        if "spec" in wanted:
            rows += spec_rows(Path(folder), args.nodes, args.repeat)
        if "bmc" in wanted:
            rows += bmc_rows()
        if "boot" in wanted:
            rows += boot_rows(Path(folder), args.boot_nodes, int(args.boot_kernel_mib * 2**20))
        if "configure" in wanted:
            rows += configure_rows(
                Path(folder), args.configure_spec, args.configure_key, args.repeat
            )
        if "bring-up" in wanted:
            rows += bring_up_rows(Path(folder))
        if "plan" in wanted:
            rows += plan_rows(Path(folder), args.nodes, args.repeat)
        if "rollout" in wanted:
            rows += rollout_rows(Path(folder), args.rollout_nodes)
        print(f"renders written under {folder}", file=sys.stderr)
    print("| benchmark | result | goal | how |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.value} | {row.goal} | {row.notes} |")


if __name__ == "__main__":
    main()
