"""BMC commands: power, one-time network boot, FRU inventory, event log, sensors.

Each runs over the nodes a spec selects (``--rack``, ``--nodes GLOB``) or, like ipmitool,
over BMCs given on the command line (``--bmc URL --user NAME --password-env VAR``). Every
node gets a result; the command exits 1 and lists the failed nodes if any failed.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from provisioner.bmc import operations as ops
from provisioner.bmc.base import BmcClient, BootDevice, PowerAction
from provisioner.bmc.fanout import FanOut, Policy, Result, Target, failed
from provisioner.cli.app import NodesOpt, Output, OutputOpt, RackOpt, app, count, fail, load
from provisioner.spec.types import parse_bmc_url

T = TypeVar("T")

bmc_app = typer.Typer(
    help="Talk to BMCs over IPMI or Redfish: power, network boot, inventory, event log.",
    no_args_is_help=True,
)
app.add_typer(bmc_app, name="bmc")


class PowerCommand(StrEnum):
    status = "status"
    on = "on"
    off = "off"
    soft_off = "soft-off"
    cycle = "cycle"
    reset = "reset"


SpecOpt = Annotated[
    Path | None, typer.Argument(help="fleet spec (omit with --bmc)", show_default=False)
]
BmcOpt = Annotated[
    list[str] | None,
    typer.Option("--bmc", help="ad hoc: ipmi://HOST[:PORT] or redfish+https://HOST[:PORT]/..."),
]
UserOpt = Annotated[str | None, typer.Option("--user", help="ad hoc: BMC user name")]
PasswordEnvOpt = Annotated[
    str | None,
    typer.Option("--password-env", help="ad hoc: environment variable holding the password"),
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="ad hoc Redfish: accept any TLS certificate")
]
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", help="seconds per attempt (spec: bmc.timeout)")
]
ConcurrencyOpt = Annotated[
    int | None, typer.Option("--concurrency", help="BMCs at once (spec: bmc.concurrency)")
]


class Selection:
    """Targets and policy from a spec, or from --bmc flags."""

    def __init__(
        self,
        spec: Path | None,
        rack: list[str] | None,
        nodes: list[str] | None,
        bmc: list[str] | None,
        user: str | None,
        password_env: str | None,
        insecure: bool,
        timeout: float | None,
        concurrency: int | None,
    ) -> None:
        # Options that do not go together are usage errors (exit 2, as typer's own are).
        if bmc:
            if spec is not None:
                raise click.UsageError("give a spec or --bmc, not both")
            if rack or nodes:  # they would select nothing here
                raise typer.BadParameter(
                    "selects nodes of a fleet spec; with --bmc the BMCs given are the "
                    "targets: leave it out, or give a spec instead of --bmc",
                    param_hint="--rack" if rack else "--nodes",
                )
            self.targets, self.policy = _ad_hoc(bmc, user, password_env, insecure)
        elif spec is None:
            raise click.UsageError("give a fleet spec, or --bmc URL --user NAME --password-env VAR")
        else:
            fleet = load(spec)
            chosen = fleet.select(rack, nodes)
            if not chosen:
                fail("no nodes match --rack/--nodes in the spec")
            self.targets = ops.targets_for(fleet, chosen)
            self.policy = Policy.from_spec(fleet.document.bmc, fleet.base_dir)
        if timeout is not None:
            self.policy = replace(self.policy, timeout=timeout)
        if concurrency is not None:
            self.policy = replace(self.policy, concurrency=concurrency)


def _ad_hoc(
    urls: list[str], user: str | None, password_env: str | None, insecure: bool
) -> tuple[list[Target], Policy]:
    if not user or not password_env:
        raise click.UsageError("--bmc needs --user NAME and --password-env VAR")
    password = os.environ.get(password_env)
    if password is None:
        fail(f"environment variable {password_env} is not set")
    targets = []
    for url in urls:
        try:
            endpoint = parse_bmc_url(url)
        except ValueError as exc:
            fail(f"--bmc: {exc}")
        name = endpoint.host if endpoint.port in (443, 623) else f"{endpoint.host}:{endpoint.port}"
        targets.append(Target(name, "-", endpoint, user, password))
    return targets, Policy(verify_tls=not insecure)


def _fan_out(
    selection: Selection,
    operation: Callable[[BmcClient, Target], T],
    output: Output,
    title: str,
    stagger: bool = False,
) -> list[Result[T]]:
    """Run, showing live progress on a terminal or one JSON line per node as it finishes."""
    lock = threading.Lock()
    interactive = output is Output.text and sys.stderr.isatty()
    progress = (
        Progress(
            TextColumn(f"{title}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        if interactive
        else None
    )
    task = progress.add_task(title, total=len(selection.targets), failed=0) if progress else None
    failures = 0

    def on_result(result: Result[T]) -> None:
        nonlocal failures
        with lock:
            failures += not result.ok
            if output is Output.json:
                typer.echo(json.dumps(result.as_dict(), default=str))
            elif progress is not None and task is not None:
                progress.update(task, advance=1, failed=failures)

    with FanOut(selection.policy) as fan:
        if progress is not None:
            with progress:
                return fan.run(selection.targets, operation, stagger=stagger, on_result=on_result)
        return fan.run(selection.targets, operation, stagger=stagger, on_result=on_result)


def _finish(results: Sequence[Result[Any]], output: Output) -> None:
    bad = failed(results)
    if output is Output.json:
        typer.echo(
            json.dumps(
                {"summary": {"ok": len(results) - len(bad), "failed": [r.node for r in bad]}}
            )
        )
    else:
        line = f"{count(len(results) - len(bad), 'node')} ok, {len(bad)} failed"
        if bad:
            line += ": " + ", ".join(f"{r.node} ({r.reason})" for r in bad)
        typer.echo(line, err=bool(bad))
    if bad:
        raise typer.Exit(1)


def _table(
    results: Sequence[Result[Any]], columns: Sequence[str], row: Callable[[Any], list[str]]
) -> None:
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in ["node", *columns]:
        table.add_column(column)
    for result in results:
        if result.ok:
            table.add_row(result.node, *row(result.value))
        else:
            message = f"FAILED {result.reason}: {result.message}"
            table.add_row(result.node, message, *[""] * (len(columns) - 1))
    Console(soft_wrap=True).print(table)


def _boot(selection: Selection, device: BootDevice, persistent: bool, output: Output) -> None:
    title = "pxe" if device is BootDevice.NETWORK else "boot disk"
    results = _fan_out(selection, ops.boot(device, persistent), output, title)
    if output is Output.text:
        _table(results, ["boot"], lambda value: [str(value)])
    _finish(results, output)


# ---------------------------------------------------------------------------- commands


@bmc_app.command()
def power(
    action: Annotated[PowerCommand, typer.Argument(help="status, on, off, soft-off, cycle, reset")],
    spec: SpecOpt = None,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    bmc: BmcOpt = None,
    user: UserOpt = None,
    password_env: PasswordEnvOpt = None,
    insecure: InsecureOpt = False,
    timeout: TimeoutOpt = None,
    concurrency: ConcurrencyOpt = None,
    wait: Annotated[
        float | None, typer.Option("--wait", help="seconds to wait for the final state")
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Read or change power. `on` and `cycle` are staggered per rack (bmc.power_on_stagger);
    `cycle`, `reset` and `soft-off` are retried only when the BMC could not be reached."""
    selection = Selection(
        spec, rack, nodes, bmc, user, password_env, insecure, timeout, concurrency
    )
    if action is PowerCommand.status:
        results = _fan_out(selection, ops.power_status, output, "power status")
    else:
        operation = ops.power(PowerAction(action.value), wait)
        stagger = action in (PowerCommand.on, PowerCommand.cycle)
        results = _fan_out(selection, operation, output, f"power {action}", stagger=stagger)
    if output is Output.text:
        _table(results, ["power"], lambda value: [str(value)])
    _finish(results, output)


@bmc_app.command()
def pxe(
    spec: SpecOpt = None,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    bmc: BmcOpt = None,
    user: UserOpt = None,
    password_env: PasswordEnvOpt = None,
    insecure: InsecureOpt = False,
    timeout: TimeoutOpt = None,
    concurrency: ConcurrencyOpt = None,
    persistent: Annotated[bool, typer.Option(help="every boot, not just the next")] = False,
    output: OutputOpt = Output.text,
) -> None:
    """Boot from the network next time (UEFI or legacy from the node's profile)."""
    selection = Selection(
        spec, rack, nodes, bmc, user, password_env, insecure, timeout, concurrency
    )
    _boot(selection, BootDevice.NETWORK, persistent, output)


@bmc_app.command("boot-disk")
def boot_disk(
    spec: SpecOpt = None,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    bmc: BmcOpt = None,
    user: UserOpt = None,
    password_env: PasswordEnvOpt = None,
    insecure: InsecureOpt = False,
    timeout: TimeoutOpt = None,
    concurrency: ConcurrencyOpt = None,
    persistent: Annotated[bool, typer.Option(help="every boot, not just the next")] = False,
    output: OutputOpt = Output.text,
) -> None:
    """Boot from disk next time (undo a network boot request)."""
    selection = Selection(
        spec, rack, nodes, bmc, user, password_env, insecure, timeout, concurrency
    )
    _boot(selection, BootDevice.DISK, persistent, output)


@bmc_app.command()
def inventory(
    spec: SpecOpt = None,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    bmc: BmcOpt = None,
    user: UserOpt = None,
    password_env: PasswordEnvOpt = None,
    insecure: InsecureOpt = False,
    timeout: TimeoutOpt = None,
    concurrency: ConcurrencyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """FRU identity; warns for each node whose serial differs from the vendor manifest."""
    selection = Selection(
        spec, rack, nodes, bmc, user, password_env, insecure, timeout, concurrency
    )
    results = _fan_out(selection, ops.inventory, output, "inventory")
    if output is Output.text:
        _table(
            results,
            ["serial", "product", "manufacturer"],
            lambda fru: [fru["serial"] or "-", fru["product"] or "-", fru["manufacturer"] or "-"],
        )
    for result in results:
        if result.ok and result.value and result.value["serial_matches"] is False:
            message = (
                f"warning: {result.node}: the BMC reports serial {result.value['serial']!r}, "
                f"the manifest says {result.value['expected_serial']!r} (wrong slot or cabling?)"
            )
            if output is Output.json:
                typer.echo(json.dumps({"warning": message, "node": result.node}))
            else:
                typer.echo(message, err=True)
    _finish(results, output)


@bmc_app.command()
def sel(
    spec: SpecOpt = None,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    bmc: BmcOpt = None,
    user: UserOpt = None,
    password_env: PasswordEnvOpt = None,
    insecure: InsecureOpt = False,
    timeout: TimeoutOpt = None,
    concurrency: ConcurrencyOpt = None,
    clear: Annotated[bool, typer.Option("--clear", help="clear it after reading")] = False,
    output: OutputOpt = Output.text,
) -> None:
    """The system event log of each node (read and cleared in one step with --clear)."""
    selection = Selection(
        spec, rack, nodes, bmc, user, password_env, insecure, timeout, concurrency
    )
    results = _fan_out(selection, ops.event_log(clear), output, "sel")
    if output is Output.text:
        for result in results:
            if not result.ok:
                typer.echo(f"{result.node}: FAILED {result.reason}: {result.message}")
                continue
            entries = result.value or []
            typer.echo(
                f"{result.node}: {count(len(entries), 'event')}{' (cleared)' if clear else ''}"
            )
            for entry in entries:
                typer.echo(
                    f"  {entry['timestamp'] or '-'}  {entry['severity']:8}  "
                    f"{entry['component']}: {entry['event']}"
                )
    _finish(results, output)


@bmc_app.command()
def sensors(
    spec: SpecOpt = None,
    rack: RackOpt = None,
    nodes: NodesOpt = None,
    bmc: BmcOpt = None,
    user: UserOpt = None,
    password_env: PasswordEnvOpt = None,
    insecure: InsecureOpt = False,
    timeout: TimeoutOpt = None,
    concurrency: ConcurrencyOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Temperatures, fans and power supplies of each node."""
    selection = Selection(
        spec, rack, nodes, bmc, user, password_env, insecure, timeout, concurrency
    )
    results = _fan_out(selection, ops.sensors, output, "sensors")
    if output is Output.text:
        for result in results:
            if not result.ok:
                typer.echo(f"{result.node}: FAILED {result.reason}: {result.message}")
                continue
            typer.echo(f"{result.node}:")
            for reading in result.value or []:
                value = "-" if reading["value"] is None else f"{reading['value']:g}"
                typer.echo(
                    f"  {reading['kind']:12} {reading['name']:24} {value:>8} {reading['units']:6} "
                    f"{reading['health']}"
                )
    _finish(results, output)
