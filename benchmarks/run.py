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

from benchmarks import bmc, boot, configure  # noqa: E402
from benchmarks.fleetgen import write_fleet  # noqa: E402
from provisioner.render import render_fleet, write_tree  # noqa: E402
from provisioner.spec import load_fleet  # noqa: E402


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
    rows = [
        Row(
            f"validate+render {nodes} nodes",
            f"{_median(cold):.2f} s",
            "<= 2 s",
            f"in-process load + render + write {files} files to a new folder (in memory "
            f"unless --disk), median of {repeat}, {workers} workers",
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
    inventory = last / "ansible" / "inventory.yml"
    ansible = shutil.which("ansible-inventory") or str(
        Path(sys.executable).parent / "ansible-inventory"
    )
    if Path(ansible).exists():
        start = time.perf_counter()
        subprocess.run(
            [ansible, "-i", str(inventory), "--list"],
            check=True,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "ANSIBLE_LOCAL_TEMP": str(work / "ansible-tmp")},
        )
        rows.append(
            Row(
                f"`ansible-inventory --list` on the rendered {nodes}-node inventory",
                f"{time.perf_counter() - start:.2f} s",
                "(for comparison)",
                "ansible-core reading our rendered YAML inventory + group_vars, one run",
            )
        )
    return rows


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
    parser.add_argument("--boot-nodes", type=int, default=1000)
    parser.add_argument(
        "--boot-kernel-mib", type=float, default=8, help="size of the kernel each node fetches"
    )
    args = parser.parse_args()
    memory = Path("/dev/shm")
    where = None if args.disk or not memory.is_dir() else str(memory)
    with tempfile.TemporaryDirectory(prefix="provisioner-bench-", dir=where) as folder:
        rows = [reference_row(), *spec_rows(Path(folder), args.nodes, args.repeat)]
        if not args.skip_bmc:
            rows += bmc_rows()
        if not args.skip_boot:
            rows += boot_rows(Path(folder), args.boot_nodes, int(args.boot_kernel_mib * 2**20))
        if not args.skip_configure:
            rows += configure_rows(
                Path(folder), args.configure_spec, args.configure_key, args.repeat
            )
        print(f"renders written under {folder}", file=sys.stderr)
    print("| benchmark | result | goal | how |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.value} | {row.goal} | {row.notes} |")


if __name__ == "__main__":
    main()
