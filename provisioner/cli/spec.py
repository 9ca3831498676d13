"""Spec commands: validate, render, inventory (Ansible's dynamic-inventory protocol)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioner import __version__
from provisioner.cli.app import Output, OutputOpt, SpecArg, app, count, fail, load
from provisioner.errors import SpecError
from provisioner.render import render_fleet, write_tree
from provisioner.render.inventory import build_inventory
from provisioner.render.writer import check_target, site_key
from provisioner.spec import Fleet, load_fleet


def _summary(fleet: Fleet) -> dict[str, Any]:
    doc = fleet.document
    return {
        "site": doc.metadata.site,
        "racks": len(doc.racks),
        "nodes": len(fleet.nodes),
        "gpus": sum(fleet.profile(node).gpus for node in fleet.nodes),
        "profiles": sorted({node.profile for node in fleet.nodes}),
        "stacks": sorted({node.stack for node in fleet.nodes}),
        "images": sorted({node.image for node in fleet.nodes}),
    }


@app.command()
def validate(spec: SpecArg, output: OutputOpt = Output.text) -> None:
    """Check a fleet spec; print every problem as file:line: field: message."""
    try:
        fleet = load_fleet(spec)
    except SpecError as exc:
        if output is Output.json:
            typer.echo(json.dumps({"ok": False, "problems": [p.as_dict() for p in exc.problems]}))
        else:
            for problem in exc.problems:
                typer.echo(str(problem), err=True)
            errors = sum(1 for p in exc.problems if p.severity == "error")
            typer.echo(f"{spec}: {errors} error{'s' if errors != 1 else ''}", err=True)
        raise typer.Exit(1) from None
    summary = _summary(fleet)
    if output is Output.json:
        problems = [p.as_dict() for p in fleet.warnings]
        typer.echo(json.dumps({"ok": True, "problems": problems, "summary": summary}))
        return
    for warning in fleet.warnings:
        typer.echo(str(warning), err=True)
    typer.echo(
        f"{spec}: ok: site {summary['site']}, {count(summary['racks'], 'rack')}, "
        f"{count(summary['nodes'], 'node')}, {count(summary['gpus'], 'GPU')}"
    )


@app.command()
def render(
    spec: SpecArg,
    out: Annotated[Path, typer.Option("--out", help="folder to write into")],
    output: OutputOpt = Output.text,
) -> None:
    """Write the Ansible inventory, dnsmasq, iPXE, autoinstall/kickstart and Terraform files."""
    fleet = load(spec)
    check_target(out)
    key = site_key(fleet, out)
    report = write_tree(render_fleet(fleet, key, workers=os.cpu_count() or 1), out)
    if output is Output.json:
        typer.echo(
            json.dumps(
                {
                    "out": str(out),
                    "files": report.total,
                    "new": report.written,
                    "changed": report.changed,
                    "unchanged": report.unchanged,
                    "removed": report.removed,
                }
            )
        )
        return
    typer.echo(f"rendered {count(len(fleet.nodes), 'node')}: {report.summary()}")


@app.command()
def inventory(
    spec: SpecArg,
    list_: Annotated[bool, typer.Option("--list", help="all groups and hosts (JSON)")] = False,
    host: Annotated[str | None, typer.Option("--host", help="one host's variables")] = None,
) -> None:
    """Ansible dynamic inventory: `ansible-inventory -i WRAPPER --list` reads this."""
    if list_ == (host is not None):
        fail("give exactly one of --list or --host NAME")
    built = build_inventory(load(spec))
    if list_:
        typer.echo(json.dumps(built.dynamic_list(), sort_keys=True))
        return
    assert host is not None
    if host not in built.host_vars:
        fail(f"no host {host!r} in {spec}")
    typer.echo(json.dumps(built.merged_vars(host), sort_keys=True))


@app.command()
def version() -> None:
    """Print provisioner's version."""
    typer.echo(__version__)
