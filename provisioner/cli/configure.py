"""``provisioner configure``: the NVIDIA stack (playbooks/site.yml) on the nodes a spec selects.

The spec is rendered first into the render folder (``--render DIR``, default ``build/`` beside
the spec); a folder rendered before is brought up to date, writing only what changed and
keeping its callback key, so Ansible never reads a stale inventory. Ansible is then handed
only the selected nodes. A terminal shows each host's progress live; ``-o json`` prints one
JSON line per task result and a summary line. Exits 1 listing each failed host with the task
that failed and why.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from provisioner.cli.app import Output, OutputOpt, SpecArg, app, count, fail, load
from provisioner.render import render_fleet, write_tree
from provisioner.render.writer import check_target, site_key
from provisioner.runner.ansible import HostEvent, HostStatus, PlaybookResult, run_playbook
from provisioner.spec import Fleet

PLAYBOOK = "site.yml"
_LIVE_ROWS = 24  # hosts shown one per row; more are summed up
_STYLE = {
    HostStatus.OK: "green",
    HostStatus.CHANGED: "yellow",
    HostStatus.FAILED: "bold red",
    HostStatus.UNREACHABLE: "bold red",
    HostStatus.SKIPPED: "cyan",
}


@app.command()
def configure(
    spec: SpecArg,
    rack: Annotated[list[str] | None, typer.Option("--rack", help="only these racks")] = None,
    nodes: Annotated[list[str] | None, typer.Option("--nodes", help="node name glob(s)")] = None,
    check: Annotated[
        bool, typer.Option("--check", help="report what would change, change nothing")
    ] = False,
    render_dir: Annotated[
        Path | None,
        typer.Option("--render", help="render folder (default: build/ beside the spec)"),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="SSH private key (default: your ssh-agent and SSH config)"),
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Install and configure the NVIDIA stack (driver, fabric manager, CUDA, container
    toolkit, DCGM) on the selected nodes with Ansible."""
    fleet = load(spec)
    chosen = fleet.select(rack, nodes)
    if not chosen:
        fail("no nodes match --rack/--nodes in the spec")
    if key is not None and not key.is_file():
        fail(f"--key {key}: no such file")
    folder = render_dir if render_dir is not None else spec.parent / "build"
    _render(fleet, folder)
    hosts = [node.name for node in chosen]
    if output is Output.json:
        result = run_playbook(
            PLAYBOOK,
            folder / "ansible",
            limit=hosts,
            private_key=key,
            check=check,
            on_event=lambda event: typer.echo(json.dumps({"event": event.as_dict()})),
        )
    else:
        result = _run_with_progress(hosts, folder, key, check)
    _finish(result, output, check)


def _render(fleet: Fleet, folder: Path) -> None:
    check_target(folder)
    report = write_tree(
        render_fleet(fleet, site_key(fleet, folder), workers=os.cpu_count() or 1), folder
    )
    typer.echo(f"rendered {count(len(fleet.nodes), 'node')}: {report.summary()}", err=True)


def _run_with_progress(
    hosts: Sequence[str], folder: Path, key: Path | None, check: bool
) -> PlaybookResult:
    board = _Board(hosts)
    console = Console(stderr=True)
    if not console.is_terminal:
        # Piped or logged: a line per failure as it happens; why comes with the recap.
        def note(event: HostEvent) -> None:
            if event.status in (HostStatus.FAILED, HostStatus.UNREACHABLE):
                typer.echo(f"{event.host}: {event.status} at {event.task!r}", err=True)

        return _run(hosts, folder, key, check, note)
    with Live(board, console=console, refresh_per_second=4, transient=True):
        return _run(hosts, folder, key, check, board.update)


def _run(
    hosts: Sequence[str],
    folder: Path,
    key: Path | None,
    check: bool,
    on_event: Callable[[HostEvent], None],
) -> PlaybookResult:
    return run_playbook(
        PLAYBOOK, folder / "ansible", limit=hosts, private_key=key, check=check, on_event=on_event
    )


class _Board:
    """The live view: one row per host (or, for many hosts, counts per state)."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.hosts = list(hosts)
        self.last: dict[str, HostEvent] = {}
        self.done: dict[str, HostEvent] = {}  # failed or unreachable: nothing more runs there
        self.changed: dict[str, int] = dict.fromkeys(hosts, 0)
        self.tasks: dict[str, int] = dict.fromkeys(hosts, 0)
        self.started = time.monotonic()

    def update(self, event: HostEvent) -> None:
        self.last[event.host] = event
        self.tasks[event.host] = self.tasks.get(event.host, 0) + 1
        if event.status is HostStatus.CHANGED:
            self.changed[event.host] = self.changed.get(event.host, 0) + 1
        if event.status in (HostStatus.FAILED, HostStatus.UNREACHABLE):
            self.done[event.host] = event

    def __rich__(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        title = Text(
            f"configure {PLAYBOOK}: {count(len(self.hosts), 'host')}, {len(self.done)} failed, "
            f"{elapsed:.0f} s",
            style="bold",
        )
        if len(self.hosts) <= _LIVE_ROWS:
            table = Table(box=None, pad_edge=False, header_style="bold")
            for column in ("host", "tasks", "changed", "last task", "result"):
                table.add_column(column)
            for host in self.hosts:
                event = self.last.get(host)
                state = Text("waiting", style="dim")
                if event is not None:
                    state = Text(str(event.status), style=_STYLE[event.status])
                table.add_row(
                    host,
                    str(self.tasks.get(host, 0)),
                    str(self.changed.get(host, 0)),
                    event.task if event else "",
                    state,
                )
            return Group(title, table)
        running = sum(1 for h in self.hosts if h in self.last and h not in self.done)
        lines = [
            title,
            Text(f"{running} running, {len(self.hosts) - len(self.last)} waiting"),
        ]
        for event in list(self.done.values())[-5:]:
            lines.append(Text(f"{event.host}: {event.status} at {event.task!r}", style="red"))
        return Group(*lines)


def _finish(result: PlaybookResult, output: Output, check: bool) -> None:
    bad = result.failed
    if output is Output.json:
        typer.echo(json.dumps({"summary": result.as_dict()}))
    else:
        if result.hosts:
            _recap(result)
        line = f"{count(len(result.hosts) - len(bad), 'host')} ok, {len(bad)} failed"
        if check:
            line += " (check mode: nothing was changed)"
        typer.echo(f"{line}; run folder {result.run_dir}", err=bool(bad))
        for recap in bad:
            typer.echo(
                f"  {recap.host}: {recap.status} at {recap.failed_task!r}: {recap.message}",
                err=True,
            )
        if result.not_run:
            typer.echo(f"  not run: {', '.join(result.not_run)}", err=True)
    if result.status == "canceled":
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)
    if not result.ok:
        if not bad and output is Output.text:
            typer.echo(f"error: {result.summary()}", err=True)
        raise typer.Exit(1)


def _recap(result: PlaybookResult) -> None:
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("host", "status", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(column)
    for recap in result.hosts:
        table.add_row(
            recap.host,
            Text(str(recap.status), style=_STYLE[recap.status]),
            str(recap.ok),
            str(recap.changed),
            str(recap.failed),
            str(recap.unreachable),
            str(recap.skipped),
        )
    Console(soft_wrap=True, file=sys.stdout).print(table)
