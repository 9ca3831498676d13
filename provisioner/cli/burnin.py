"""``provisioner burnin``: stress the selected nodes' GPUs and judge them against floors.

``burnin run SPEC`` renders the spec (as ``configure`` does), runs playbooks/burnin.yml on
the selected nodes (copy the agent, run it at the level asked, fetch its JSON document into
the results folder), judges each document against the spec (floors of the node's GPU SKU,
overridden by its profile; GPU count, model, driver, NVLink links) and saves the verdicts
as ``report.json`` beside the documents. Prints a line per node (verdict, failing checks);
exits 1 when a node is quarantined or gave no result.

``burnin report RESULTS... --format F --out FILE`` makes a report (json, junit, prometheus,
html) from agent documents and results folders. With ``--spec`` every document is judged
again against the spec; without it the verdicts saved in the folders' report.json are used
(judging needs the spec's floors and expectations, so a loose document without a saved
verdict is an error). Exits 0 whatever the verdicts: it reports, the run gates.
"""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from provisioner.burnin.report import Report, write_report
from provisioner.burnin.results import (
    REPORT_FILE,
    agent_path,
    build_report,
    collect,
    gather,
    judge_all,
    reasons_from,
)
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
from provisioner.cli.progress import render_spec, run_live
from provisioner.runner.ansible import PlaybookResult
from provisioner.spec import Fleet

PLAYBOOK = "burnin.yml"

burnin_app = typer.Typer(
    help="Burn-in: stress each node's GPUs and judge the results against floors.",
    no_args_is_help=True,
)
app.add_typer(burnin_app, name="burnin")


class LevelChoice(StrEnum):
    quick = "quick"
    standard = "standard"
    extended = "extended"


class Format(StrEnum):
    json = "json"
    junit = "junit"
    prometheus = "prometheus"
    html = "html"


@burnin_app.command("run")
def run(
    spec: SpecArg,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    level: Annotated[
        LevelChoice | None,
        typer.Option("--level", help="quick, standard or extended (default: the profile's)"),
    ] = None,
    render_dir: RenderOpt = None,
    key: KeyOpt = None,
    results: Annotated[
        Path | None,
        typer.Option(
            "--results",
            help="new or empty folder for the results "
            "(default: burnin/<UTC time>/ in the render folder)",
        ),
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Burn in the selected nodes (playbooks/burnin.yml) and judge them against floors."""
    fleet = load(spec)
    chosen = fleet.select(rack, nodes)
    if not chosen:
        fail("no nodes match --rack/--nodes in the spec")
    if key is not None and not key.is_file():
        fail(f"--key {key}: no such file")
    folder = render_dir if render_dir is not None else spec.parent / "build"
    results_dir = _results_dir(results, folder)
    render_spec(fleet, folder)
    hosts = [node.name for node in chosen]
    extravars = {"burnin_agent_path": str(agent_path()), "burnin_results_dir": str(results_dir)}
    if level is not None:
        extravars["burnin_level"] = level.value
    title = f"burn-in {PLAYBOOK}"
    played = run_live(
        PLAYBOOK, hosts, folder, key=key, output=output, title=title, extravars=extravars
    )
    _conclude(fleet, hosts, results_dir, played, level, output)


def _conclude(
    fleet: Fleet,
    hosts: list[str],
    results_dir: Path,
    played: PlaybookResult,
    level: LevelChoice | None,
    output: Output,
) -> None:
    """Judge what the run fetched, save report.json, show the verdicts, exit 1 unless every
    node is ready."""
    if played.status == "canceled":
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)
    documents, missing = collect(results_dir, hosts, reasons_from(played, hosts))
    verdicts, strangers = judge_all(fleet, documents, level.value if level else None)
    report = Report(tuple(verdicts), tuple(missing + strangers))
    write_report(report, "json", results_dir / REPORT_FILE)
    _show(report, output, results_dir, played)
    if not report.ok:
        raise typer.Exit(1)


@burnin_app.command("report")
def report(
    results: Annotated[
        list[Path],
        typer.Argument(help="agent documents (JSON) or results folders", show_default=False),
    ],
    fmt: Annotated[Format, typer.Option("--format", help="json, junit, prometheus or html")],
    out: Annotated[Path, typer.Option("--out", help="file to write")],
    spec: Annotated[
        Path | None,
        typer.Option("--spec", help="judge against this fleet spec (default: saved verdicts)"),
    ] = None,
) -> None:
    """Write a burn-in report (JSON, JUnit XML, Prometheus textfile or HTML)."""
    fleet = load(spec) if spec is not None else None
    made = build_report(gather(results), fleet)
    write_report(made, fmt.value, out)
    summary = made.summary()
    typer.echo(
        f"wrote {out}: {count(summary['nodes'], 'node')}, {summary['ready']} ready, "
        f"{summary['quarantined']} quarantined, {summary['missing']} without result"
    )


def _results_dir(results: Path | None, folder: Path) -> Path:
    if results is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        results = folder / "burnin" / stamp
    results = results.absolute()
    if results.exists() and (not results.is_dir() or any(results.iterdir())):
        fail(f"--results {results}: not a new or empty folder")
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--results {results}: {exc}")
    return results


def _show(report: Report, output: Output, results_dir: Path, played: PlaybookResult) -> None:
    summary = report.summary()
    if output is Output.json:
        line = {
            "summary": {
                "ok": report.ok,
                **summary,
                "results_dir": str(results_dir),
                "report": str(results_dir / REPORT_FILE),
                "nodes": [
                    {
                        "node": v.node,
                        "verdict": v.verdict,
                        "failing": [c.name for c in v.failing],
                        "warnings": len(v.warnings),
                    }
                    for v in report.nodes
                ],
                "missing": [{"node": m.node, "reason": m.reason} for m in report.missing],
                "run": played.as_dict(),
            }
        }
        typer.echo(json.dumps(line))
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ("node", "verdict", "failing checks"):
        table.add_column(column)
    for verdict in report.nodes:
        style = "green" if verdict.ready else "bold red"
        failing = "; ".join(f"{c.name}: {c.reason}" for c in verdict.failing[:4])
        if len(verdict.failing) > 4:
            failing += f"; and {len(verdict.failing) - 4} more"
        table.add_row(Text(verdict.node), Text(verdict.verdict, style=style), Text(failing))
    for missing in report.missing:
        table.add_row(Text(missing.node), Text("no result", style="bold red"), Text(missing.reason))
    Console(soft_wrap=True, file=sys.stdout).print(table)
    typer.echo(
        f"{summary['ready']} ready, {summary['quarantined']} quarantined, "
        f"{summary['missing']} without result; results in {results_dir}",
        err=not report.ok,
    )
