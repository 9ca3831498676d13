"""What the commands that run a playbook share: render the spec into the render folder, run
the playbook with live progress (a board of hosts on a terminal, a line per failure when
piped, one JSON line per task result with ``-o json``), and print the recap table."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from provisioner.cli.app import Output, count
from provisioner.render import render_fleet, write_tree
from provisioner.render.writer import check_target, site_key
from provisioner.runner.ansible import HostEvent, HostStatus, PlaybookResult, run_playbook
from provisioner.spec import Fleet

LIVE_ROWS = 24  # hosts shown one per row; more are summed up
STYLE = {
    HostStatus.OK: "green",
    HostStatus.CHANGED: "yellow",
    HostStatus.FAILED: "bold red",
    HostStatus.UNREACHABLE: "bold red",
    HostStatus.SKIPPED: "cyan",
}


def render_spec(fleet: Fleet, folder: Path) -> None:
    """Bring the render folder up to date (only what changed is written)."""
    check_target(folder)
    report = write_tree(
        render_fleet(fleet, site_key(fleet, folder), workers=os.cpu_count() or 1), folder
    )
    typer.echo(f"rendered {count(len(fleet.nodes), 'node')}: {report.summary()}", err=True)


def run_live(
    playbook: str,
    hosts: Sequence[str],
    folder: Path,
    *,
    key: Path | None,
    output: Output,
    title: str,
    check: bool = False,
    extravars: Mapping[str, Any] | None = None,
) -> PlaybookResult:
    """Run ``playbook`` on ``hosts`` of the rendered ``folder``, showing progress."""

    def run(on_event: Callable[[HostEvent], None]) -> PlaybookResult:
        return run_playbook(
            playbook,
            folder / "ansible",
            limit=hosts,
            private_key=key,
            check=check,
            extravars=extravars,
            on_event=on_event,
        )

    if output is Output.json:
        return run(lambda event: typer.echo(json.dumps({"event": event.as_dict()})))
    console = Console(stderr=True)
    if not console.is_terminal:
        # Piped or logged: a line per failure as it happens; why comes with the recap.
        def note(event: HostEvent) -> None:
            if event.status in (HostStatus.FAILED, HostStatus.UNREACHABLE):
                typer.echo(f"{event.host}: {event.status} at {event.task!r}", err=True)

        return run(note)
    board = Board(hosts, title)
    with Live(board, console=console, refresh_per_second=4, transient=True):
        return run(board.update)


class Board:
    """The live view: one row per host (or, for many hosts, counts per state)."""

    def __init__(self, hosts: Sequence[str], title: str) -> None:
        self.hosts = list(hosts)
        self.title = title
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
            f"{self.title}: {count(len(self.hosts), 'host')}, {len(self.done)} failed, "
            f"{elapsed:.0f} s",
            style="bold",
        )
        if len(self.hosts) <= LIVE_ROWS:
            table = Table(box=None, pad_edge=False, header_style="bold")
            for column in ("host", "tasks", "changed", "last task", "result"):
                table.add_column(column)
            for host in self.hosts:
                event = self.last.get(host)
                state = Text("waiting", style="dim")
                if event is not None:
                    state = Text(str(event.status), style=STYLE[event.status])
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


def print_recap(result: PlaybookResult) -> None:
    """Ansible's PLAY RECAP as a table on stdout."""
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("host", "status", "ok", "changed", "failed", "unreachable", "skipped"):
        table.add_column(column)
    for recap in result.hosts:
        table.add_row(
            recap.host,
            Text(str(recap.status), style=STYLE[recap.status]),
            str(recap.ok),
            str(recap.changed),
            str(recap.failed),
            str(recap.unreachable),
            str(recap.skipped),
        )
    Console(soft_wrap=True, file=sys.stdout).print(table)
