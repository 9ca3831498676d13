"""``provisioner bring-up``: a rack from racked and cabled to ready or quarantined.

The spec is rendered into the render folder first (as ``configure`` does). Install callbacks
are read from the boot server's events file: ``--boot-events FILE`` when a boot server runs
on its own (``provisioner boot serve --events FILE``); the lab's when the spec's lab is up;
else the bring-up serves the render folder itself, at ``boot.url``'s port, for as long as it
runs (events in ``boot-events.jsonl`` there). Progress: a live table of nodes on a terminal,
a line per move when piped, one JSON line per move with ``-o json``; then each node's end
state and a count. Exits 0 when every node is ready, 1 otherwise, 130 when interrupted (run
it again to carry on).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from provisioner import boot
from provisioner.cli.app import (
    KeyOpt,
    NodesOpt,
    Output,
    OutputOpt,
    RenderOpt,
    SpecArg,
    app,
    count,
    fail,
    load,
)
from provisioner.cli.progress import render_spec
from provisioner.cli.state import StateOpt
from provisioner.spec import Fleet, Node
from provisioner.workflows.bring_up import BringUp, Caps, Move, Outcome, Timeouts, site_steps

LIVE_ROWS = 40
_STYLE = {"ready": "green", "failed": "bold red", "quarantined": "bold red"}


@app.command("bring-up")
def bring_up(
    spec: SpecArg,
    rack: Annotated[list[str], typer.Option("--rack", help="the rack(s) to bring up")],
    nodes: NodesOpt = None,
    render_dir: RenderOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    boot_events: Annotated[
        Path | None,
        typer.Option(
            "--boot-events",
            help="events file of the boot server that runs (default: the lab's, else serve)",
        ),
    ] = None,
    install_timeout: Annotated[
        float, typer.Option("--install-timeout", help="seconds from power-on to the callback")
    ] = Timeouts().install,
    runs: Annotated[
        int, typer.Option("--runs", help="playbook runs at once (each a batch of nodes)")
    ] = Caps().runs,
    output: OutputOpt = Output.text,
) -> None:
    """Power on, network-install, configure and burn in a rack's nodes, each as far as it
    goes; a re-run carries on where each node stopped."""
    fleet = load(spec)
    chosen = fleet.select(rack, nodes)
    if not chosen:
        fail("no nodes match --rack/--nodes in the spec")
    if key is not None and not key.is_file():
        fail(f"--key {key}: no such file")
    if boot_events is None:
        boot_events = lab_events(spec, fleet)
    folder = (render_dir if render_dir is not None else spec.parent / "build").absolute()
    render_spec(fleet, folder)
    timeouts = Timeouts(install=install_timeout)
    outcome = run_bring_up(
        fleet,
        chosen,
        spec=spec,
        state=state,
        folder=folder,
        key=key,
        boot_events=boot_events,
        caps=Caps(runs=runs),
        timeouts=timeouts,
        output=output,
    )
    show_outcome(outcome, output)
    if not outcome.ok:
        raise typer.Exit(1)


def lab_events(spec: Path, fleet: Fleet) -> Path | None:
    """The events file of the lab running this spec, if one does."""
    from provisioner.lab import control

    return control.boot_events(spec, fleet.document.metadata.site)


def run_bring_up(
    fleet: Fleet,
    chosen: Sequence[Node],
    *,
    spec: Path,
    state: str | None,
    folder: Path,
    key: Path | None,
    boot_events: Path | None,
    caps: Caps | None = None,
    timeouts: Timeouts | None = None,
    output: Output = Output.text,
) -> Outcome:
    """Run a bring-up with the progress display of ``output``."""
    from provisioner.state.store import open_store  # SQLAlchemy only when asked for

    with ExitStack() as stack:
        if boot_events is None:
            boot_events = folder / "boot-events.jsonl"
            server = stack.enter_context(boot.for_fleet(fleet, folder, events=boot_events))
            typer.echo(f"serving network boot at {server.url}", err=True)
        store = stack.enter_context(open_store(state, spec))
        steps = stack.enter_context(site_steps(fleet, folder, boot_events, key=key))
        typer.echo(
            f"bring-up of {count(len(chosen), 'node')}; state {store.url}; "
            f"callbacks from {boot_events}",
            err=True,
        )
        with progress([node.name for node in chosen], output) as on_move:
            work = BringUp(
                fleet, chosen, store, steps, caps=caps or Caps(), timeouts=timeouts or Timeouts()
            )
            work.on_move = on_move
            return work.run()


@contextmanager
def progress(names: Sequence[str], output: Output) -> Iterator[Callable[[Move], None]]:
    """Where each move goes: JSON lines, plain lines, or a live board on a terminal."""
    if output is Output.json:
        yield lambda move: typer.echo(json.dumps({"move": move.as_dict()}))
        return
    console = Console(stderr=True)
    if not console.is_terminal:

        def line(move: Move) -> None:
            said = move.error or move.detail
            source = move.source or "-"
            typer.echo(f"{move.node}: {source} -> {move.target}" + (f": {said}" if said else ""))

        yield line
        return
    board = Board(names)
    with Live(board, console=console, refresh_per_second=4, transient=True):
        yield board.update


class Board:
    """The live view of a bring-up: a row per node (state, for how long, what it said)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.last: dict[str, Move] = {}
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def update(self, move: Move) -> None:
        with self._lock:
            self.last[move.node] = move

    def __rich__(self) -> RenderableType:
        with self._lock:
            last = dict(self.last)
        states = [str(last[n].target) if n in last else "waiting" for n in self.names]
        tally = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
        title = Text(f"bring-up: {tally}; {time.monotonic() - self.started:.0f} s", style="bold")
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("node", "state", "for", "last word"):
            table.add_column(column, overflow="ellipsis", no_wrap=True)
        now = time.time()
        shown = self.names[:LIVE_ROWS]
        for name, state in zip(shown, states, strict=False):
            move = last.get(name)
            said = (move.error or move.detail or "") if move else ""
            since = f"{now - move.at:.0f} s" if move else ""
            table.add_row(name, Text(state, style=_STYLE.get(state, "")), since, said)
        parts: list[RenderableType] = [title, table]
        if len(self.names) > LIVE_ROWS:
            parts.append(Text(f"and {len(self.names) - LIVE_ROWS} more nodes", style="dim"))
        return Group(*parts)


def show_outcome(outcome: Outcome, output: Output) -> None:
    """Each node's end state and last error, and a count per state."""
    tally: dict[str, int] = {}
    for record in outcome.nodes:
        tally[str(record.state)] = tally.get(str(record.state), 0) + 1
    if output is Output.json:
        summary = {
            "run": outcome.run_id,
            "ok": outcome.ok,
            "seconds": round(outcome.seconds, 1),
            "counts": tally,
            "nodes": [record.as_dict() for record in outcome.nodes],
            "errors": dict(outcome.errors),
        }
        typer.echo(json.dumps({"summary": summary}))
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("node", "state", "last error"):
        table.add_column(column, overflow="fold")
    for record in outcome.nodes:
        state = str(record.state)
        if record.failed_in is not None and state == "failed":
            state = f"failed in {record.failed_in}"
        table.add_row(
            Text(record.name),
            Text(state, style=_STYLE.get(str(record.state), "")),
            Text(record.last_error or "" if str(record.state) != "ready" else ""),
        )
    Console(soft_wrap=True, file=sys.stdout).print(table)
    for name, error in outcome.errors.items():
        typer.echo(f"{name}: the bring-up stopped on an unexpected error: {error}", err=True)
    parts = ", ".join(f"{number} {name}" for name, number in tally.items())
    typer.echo(
        f"{count(len(outcome.nodes), 'node')}: {parts} in {outcome.seconds:.0f} s "
        f"(run {outcome.run_id})"
    )
