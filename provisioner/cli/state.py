"""``provisioner status`` and ``provisioner history``: what the state database recorded.

``status SPEC`` shows each node of the spec (``--rack``/``--nodes`` select) with its rack,
lifecycle state, since when and last error; nodes the database does not know yet show as
``not enrolled``; a last line counts nodes per state. ``history NODE`` shows a node's
transitions (time, from -> to, run, detail or error) and its burn-in results.

The database is ``--state URL``, else ``$PROVISIONER_STATE``, else the file beside the spec
(``fleet.yaml`` -> ``fleet.state.db``). Looking never creates one: when it does not exist yet
both commands exit 1 saying so. ``-o json`` prints one JSON document.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from provisioner.cli.app import (
    NodesOpt,
    Output,
    OutputOpt,
    RackOpt,
    SpecArg,
    app,
    count,
    fail,
    load,
)
from provisioner.state.lifecycle import State
from provisioner.state.records import BurninRecord, NodeRecord, TransitionRecord

NOT_ENROLLED = "not enrolled"
_ORDER = [*(str(s) for s in State), NOT_ENROLLED]
_STYLE = {"ready": "green", "failed": "bold red", "quarantined": "bold red", "retired": "dim"}

StateOpt = Annotated[
    str | None,
    typer.Option(
        "--state",
        help="state database URL (sqlite:///PATH or postgresql://...; default: "
        "$PROVISIONER_STATE, else SPEC's stem + .state.db beside it)",
    ),
]


def _time(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}Z"


def _state_text(record: NodeRecord | None) -> str:
    if record is None:
        return NOT_ENROLLED
    if record.state is State.failed and record.failed_in is not None:
        return f"failed in {record.failed_in}"
    return str(record.state)


@app.command()
def status(
    spec: SpecArg,
    state: StateOpt = None,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Show each node's recorded lifecycle state (rack, state, since, last error)."""
    from provisioner.state.store import open_store  # SQLAlchemy only when asked for

    fleet = load(spec)
    chosen = fleet.select(rack, nodes)
    if not chosen:
        fail("no nodes match --rack/--nodes in the spec")
    with open_store(state, spec, create=False) as store:
        recorded = {record.name: record for record in store.nodes()}
    rows = [(node.name, node.rack, recorded.get(node.name)) for node in chosen]
    counts = Counter(str(r.state) if r else NOT_ENROLLED for _, _, r in rows)
    tally = {name: counts[name] for name in _ORDER if counts[name]}
    if output is Output.json:
        listed = [
            r.as_dict() if r else {"node": name, "rack": rack_name, "state": NOT_ENROLLED}
            for name, rack_name, r in rows
        ]
        typer.echo(json.dumps({"nodes": listed, "counts": tally}))
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("node", "rack", "state", "since", "last error"):
        table.add_column(column, overflow="fold")
    for name, rack_name, record in rows:
        text = _state_text(record)
        table.add_row(
            Text(name),
            Text(rack_name),
            Text(text, style=_STYLE.get(str(record.state) if record else "", "")),
            Text(_time(record.since) if record else ""),
            Text((record.last_error or "") if record else ""),
        )
    _print(table)
    parts = ", ".join(f"{number} {name}" for name, number in tally.items())
    typer.echo(f"{count(len(rows), 'node')}: {parts}")


@app.command()
def history(
    node: Annotated[str, typer.Argument(help="node name", show_default=False)],
    spec: Annotated[
        Path | None, typer.Option("--spec", help="fleet spec whose state database to read")
    ] = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Show a node's recorded transitions and burn-in results."""
    from provisioner.state.store import open_store  # SQLAlchemy only when asked for

    with open_store(state, spec, create=False) as store:
        record = store.node(node)
        if record is None:
            fail(f"{node}: no such node in the state database {store.url}")
        moves = store.history(node)
        results = store.burnin_results(node)
    if output is Output.json:
        body: dict[str, Any] = {
            **record.as_dict(),
            "transitions": [move.as_dict() for move in moves],
            "burnin": [result.as_dict() for result in results],
        }
        typer.echo(json.dumps(body))
        return
    line = f"{node}: {_state_text(record)} since {_time(record.since)}"
    if record.last_error:
        line += f"; last error: {record.last_error}"
    typer.echo(line)
    _show_moves(moves)
    _show_results(results)


def _show_moves(moves: list[TransitionRecord]) -> None:
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("time", "move", "run", "detail"):
        table.add_column(column, overflow="fold")
    for move in moves:
        source = str(move.from_state) if move.from_state else "-"
        said = "; ".join(part for part in (move.detail, move.error) if part)
        style = "bold red" if move.error else ""
        table.add_row(
            Text(_time(move.at)),
            Text(f"{source} -> {move.to_state}"),
            Text(move.run_id),
            Text(said, style=style),
        )
    _print(table)


def _show_results(results: list[BurninRecord]) -> None:
    if not results:
        typer.echo("no burn-in results")
        return
    typer.echo("burn-in results:")
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("time", "run", "verdict", "level", "failing checks"):
        table.add_column(column, overflow="fold")
    for result in results:
        failing = [_check_name(c) for c in result.checks if _field(c, "verdict") == "fail"]
        table.add_row(
            Text(_time(result.at)),
            Text(result.run_id),
            Text(result.verdict, style="green" if result.verdict == "ready" else "bold red"),
            Text(result.level or ""),
            Text(", ".join(failing)),
        )
    _print(table)


def _print(table: Table) -> None:
    """Whole lines when the output is not a terminal (a pipe, a file): nothing cut off."""
    console = Console(soft_wrap=True, file=sys.stdout)
    if not console.is_terminal:
        console = Console(soft_wrap=True, file=sys.stdout, width=10_000)
    console.print(table)


def _field(check: Any, key: str) -> Any:
    return check.get(key) if isinstance(check, dict) else None


def _check_name(check: Any) -> str:
    gpu = _field(check, "gpu")
    name = str(_field(check, "id"))
    return name if gpu is None else f"{name}[gpu {gpu}]"
