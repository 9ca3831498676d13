"""``provisioner lab up|status|down``: the embedded lab rack (root only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from provisioner.cli.app import Output, OutputOpt, app
from provisioner.lab import control, host

lab_app = typer.Typer(
    help="The embedded lab: simulated BMCs, machine-container nodes, boot server, apt repo.",
    no_args_is_help=True,
)
app.add_typer(lab_app, name="lab")

LAB_SPEC = Path("inventories/lab/fleet.yaml")


def _say(output: Output) -> control.Say:
    def say(message: str) -> None:
        typer.echo(message, err=output is Output.json)

    return say


@lab_app.command("up")
def up(
    spec: Annotated[
        Path, typer.Argument(help="fleet spec of the lab (default: the embedded lab)")
    ] = LAB_SPEC,
    blank: Annotated[
        bool, typer.Option("--blank", help="leave the nodes off with empty disks")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the nodes")] = 300.0,
    output: OutputOpt = Output.text,
) -> None:
    """Start the lab daemon and install every node over PXE (unless --blank)."""
    report = control.up(spec, blank=blank, timeout=timeout, say=_say(output))
    _show([report], output)


@lab_app.command("status")
def status(output: OutputOpt = Output.text) -> None:
    """Show each lab site: daemon, nodes, power, phase, SSH."""
    reports = [control.status(folder) for folder in control.sites()]
    if not reports and output is Output.text:
        typer.echo("no lab is up")
    _show(reports, output)


@lab_app.command("down")
def down(
    site: Annotated[
        str | None, typer.Argument(help="only this site (default: every lab site)")
    ] = None,
    purge: Annotated[
        bool, typer.Option("--purge", help="also delete the cached base image and packages")
    ] = False,
    output: OutputOpt = Output.text,
) -> None:
    """Stop every lab site and remove its namespaces, processes, mounts and files."""
    folder = host.site_dir(site) if site is not None else None
    removed = control.down(folder, purge=purge, say=_say(output))
    if output is Output.json:
        typer.echo(json.dumps({"removed": removed}))


def _show(reports: list[dict[str, Any]], output: Output) -> None:
    if output is Output.json:
        typer.echo(json.dumps(reports if len(reports) != 1 else reports[0], sort_keys=True))
        return
    console = Console()
    for report in reports:
        daemon = report.get("daemon", {})
        state = "running" if daemon.get("alive") else "NOT RUNNING"
        table = Table(title=f"lab {report['site']}: daemon {daemon.get('pid')} {state}")
        for column in ("node", "address", "bmc", "power", "phase", "installed", "ssh"):
            table.add_column(column)
        for name, node in sorted(report.get("nodes", {}).items()):
            table.add_row(
                name,
                node["ip"],
                node["bmc"],
                node["power"],
                node["phase"],
                "yes" if node["installed"] else "no",
                "up" if node.get("ssh") else "-",
            )
        console.print(table)
