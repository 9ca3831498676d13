"""``provisioner configure``: the NVIDIA stack (playbooks/site.yml) on the nodes a spec selects.

The spec is rendered first into the render folder (``--render DIR``, default ``build/`` beside
the spec); a folder rendered before is brought up to date, writing only what changed, with the
site's same callback key, so Ansible never reads a stale inventory. Ansible is then handed
only the selected nodes. A terminal shows each host's progress live; ``-o json`` prints one
JSON line per task result and a summary line. Exits 1 listing each failed host with the task
that failed and why.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from provisioner.cli.app import (
    KeyOpt,
    NodesOpt,
    Output,
    OutputOpt,
    RackOpt,
    RenderOpt,
    SpecArg,
    app,
    count,
    fail,
    load,
)
from provisioner.cli.progress import print_recap, render_spec, run_live
from provisioner.runner.ansible import PlaybookResult

PLAYBOOK = "site.yml"


@app.command()
def configure(
    spec: SpecArg,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    check: Annotated[
        bool, typer.Option("--check", help="report what would change, change nothing")
    ] = False,
    render_dir: RenderOpt = None,
    key: KeyOpt = None,
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
    render_spec(fleet, folder)
    hosts = [node.name for node in chosen]
    result = run_live(
        PLAYBOOK, hosts, folder, key=key, output=output, title=f"configure {PLAYBOOK}", check=check
    )
    _finish(result, output, check)


def _finish(result: PlaybookResult, output: Output, check: bool) -> None:
    bad = result.failed
    if output is Output.json:
        typer.echo(json.dumps({"summary": result.as_dict()}))
    else:
        if result.hosts:
            print_recap(result)
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
