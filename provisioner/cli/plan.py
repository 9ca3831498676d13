"""``provisioner plan``, ``apply`` and ``upgrade``: change a live fleet only through a plan.

``plan SPEC`` compares the spec with the recorded state (read only: planning never creates a
state database) and prints the actions per node: text, markdown for a pull-request comment,
or JSON; ``--out FILE`` saves it for ``apply``. With ``--detailed-exitcode`` it exits 0 when
nothing would change, 2 when something would, 1 on an error (as ``terraform plan`` does).

``apply FILE`` carries out a saved plan after checking, before touching anything, that the
spec and the recorded state are still what the plan was made from (it says which changed,
and exits 1). ``apply SPEC --auto-approve`` plans and applies in one go.

``upgrade SPEC --stack NAME`` rolls the nodes of the spec that are on stack NAME (``--nodes``
narrows them) to it: canary, then a window of ``max_unavailable``, draining each node
through the spec's scheduler; ``--dry-run`` prints the schedule and touches nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

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
from provisioner.cli.bringup import lab_events, progress, run_bring_up, show_outcome
from provisioner.cli.progress import render_spec
from provisioner.cli.state import StateOpt
from provisioner.plan import Plan, Snapshot, make_plan, planfile
from provisioner.plan.show import render
from provisioner.spec import Fleet, Node
from provisioner.workflows.upgrade import UpgradeOutcome


class PlanFormat(StrEnum):
    text = "text"
    markdown = "markdown"
    json = "json"


FormatOpt = Annotated[PlanFormat, typer.Option("--format", help="text, markdown or json")]


def _recorded_plan(fleet: Fleet, spec: Path, state: str | None, retire: bool) -> Plan:
    """The plan against the recorded state, read only (no database yet: nothing recorded)."""
    from provisioner.state.store import NoStateDatabase, open_store
    from provisioner.workflows.apply import current_plan

    try:
        with open_store(state, spec, create=False) as store:
            return current_plan(fleet, store, retire=retire)
    except NoStateDatabase:
        return make_plan(fleet, Snapshot({}), retire=retire)


@app.command("plan")
def plan_command(
    spec: SpecArg,
    out: Annotated[
        Path | None, typer.Option("--out", help="save the plan here, for provisioner apply")
    ] = None,
    fmt: FormatOpt = PlanFormat.text,
    retire: Annotated[
        bool,
        typer.Option("--retire", help="retire nodes gone from the spec (drain, power off)"),
    ] = False,
    detailed_exitcode: Annotated[
        bool,
        typer.Option("--detailed-exitcode", help="exit 0: no changes, 2: changes, 1: error"),
    ] = False,
    state: StateOpt = None,
) -> None:
    """Show what it takes to bring the recorded fleet to the spec."""
    fleet = load(spec)
    plan = _recorded_plan(fleet, spec, state, retire)
    if out is not None:
        planfile.save(plan, out)
    typer.echo(render(plan, fmt), nl=False)
    if out is not None:
        typer.echo(f"saved the plan to {out}: provisioner apply {out}", err=True)
    if detailed_exitcode and plan.changes:
        raise typer.Exit(2)


@app.command("apply")
def apply_command(
    target: Annotated[
        Path, typer.Argument(help="a saved plan, or a spec with --auto-approve", show_default=False)
    ],
    auto_approve: Annotated[
        bool, typer.Option("--auto-approve", help="plan the spec and apply it at once")
    ] = False,
    retire: Annotated[
        bool, typer.Option("--retire", help="with --auto-approve: retire nodes gone from it")
    ] = False,
    spec_path: Annotated[
        Path | None, typer.Option("--spec", help="the spec a saved plan was made from")
    ] = None,
    render_dir: RenderOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Carry out a saved plan (refused when the spec or the state changed since)."""
    from provisioner.state.store import open_store
    from provisioner.workflows.apply import Apply, current_plan, refuse_stale

    saved: Plan | None = None
    if auto_approve:
        spec = target
    else:
        if retire:
            fail("--retire belongs to the plan: provisioner plan SPEC --retire --out FILE")
        saved = planfile.load(target)
        spec = spec_path or Path(saved.spec)
    fleet = load(spec)
    folder = (render_dir if render_dir is not None else spec.parent / "build").absolute()
    with ExitStack() as stack:
        store = stack.enter_context(open_store(state, spec))
        plan = saved or current_plan(fleet, store, retire=retire)
        if not plan.changes:
            typer.echo("No changes: the recorded fleet matches the spec.")
            return
        if saved is None:
            typer.echo(render(plan, "text"), err=True, nl=False)
        refuse_stale(fleet, plan, store)  # before anything is rendered, let alone touched
        parts = stack.enter_context(site_parts(fleet, spec, state, folder, key, output))
        work = Apply(fleet, plan, store, parts, on_stage=lambda s: typer.echo(f"== {s}", err=True))
        render_spec(fleet, folder)
        outcome = work.run()
    for run in (outcome.bring_up, outcome.reburn):
        if run is not None:
            show_outcome(run, output)
    if outcome.upgrade is not None:
        show_upgrade(outcome.upgrade, output)
    for node, error in sorted(outcome.errors.items()):
        typer.echo(f"{node}: {error}", err=True)
    typer.echo(f"apply {outcome.run_id}: {'done' if outcome.ok else 'not all done'}")
    if not outcome.ok:
        raise typer.Exit(1)


@app.command("upgrade")
def upgrade_command(
    spec: SpecArg,
    stack: Annotated[str, typer.Option("--stack", help="the stack to roll its nodes to")],
    nodes: NodesOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the schedule; touch nothing")
    ] = False,
    render_dir: RenderOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Rolling upgrade of the nodes on stack NAME to it (canary, window, drain, burn-in)."""
    from provisioner.state.store import open_store
    from provisioner.workflows.upgrade import Upgrade, dry_run_lines

    fleet = load(spec)
    if stack not in fleet.document.stacks:
        fail(f"no stack {stack!r} in {spec} (stacks: {', '.join(fleet.document.stacks)})")
    chosen = [n for n in fleet.select(None, nodes) if n.stack == stack]
    if not chosen:
        fail(f"no node of the spec is on stack {stack}" + (" among --nodes" if nodes else ""))
    folder = (render_dir if render_dir is not None else spec.parent / "build").absolute()
    with ExitStack() as context:
        store = context.enter_context(open_store(state, spec, create=not dry_run))
        if dry_run:
            work = Upgrade(fleet, chosen, store, _NoSteps())
            for line in dry_run_lines(work):
                typer.echo(line)
            return
        render_spec(fleet, folder)
        outcome = _upgrade(fleet, chosen, store, folder, key, output)
    show_upgrade(outcome, output)
    if not outcome.ok:
        raise typer.Exit(1)


def _upgrade(
    fleet: Fleet, chosen: Sequence[Node], store: Any, folder: Path, key: Path | None, output: Output
) -> UpgradeOutcome:
    from provisioner.scheduler import for_fleet
    from provisioner.workflows.upgrade import Upgrade
    from provisioner.workflows.upgrade_steps import site_upgrade_steps

    with (
        site_upgrade_steps(fleet, folder, key=key) as steps,
        progress([n.name for n in chosen], output) as on_move,
    ):
        work = Upgrade(fleet, chosen, store, steps, scheduler=for_fleet(fleet))
        work.on_move = on_move
        return work.run()


class _NoSteps:
    """Steps for ``--dry-run``, which schedules and never calls them."""

    def upgrade(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        raise AssertionError("a dry run upgrades nothing")

    def roll_back(
        self, nodes: Sequence[str], stacks: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, str | None]:
        raise AssertionError("a dry run rolls nothing back")

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, Any]:
        raise AssertionError("a dry run burns nothing in")

    def recover(self) -> None:
        return None


def show_upgrade(outcome: UpgradeOutcome, output: Output) -> None:
    if output is Output.json:
        summary = {
            "run": outcome.run_id,
            "ok": outcome.ok,
            "seconds": round(outcome.seconds, 1),
            "upgraded": list(outcome.upgraded),
            "failed": list(outcome.failed),
            "called_off": list(outcome.called_off),
            "not_started": list(outcome.not_started),
            "halted": outcome.halted,
            "nodes": [record.as_dict() for record in outcome.nodes],
        }
        typer.echo(json.dumps({"upgrade": summary}))
        return
    for record in outcome.nodes:
        said = (
            f": {record.last_error}" if record.last_error and str(record.state) != "ready" else ""
        )
        typer.echo(f"{record.name}: {record.state}{said}")
    if outcome.halted:
        typer.echo(f"halted: {outcome.halted}", err=True)
    typer.echo(
        f"upgrade {outcome.run_id}: {count(len(outcome.upgraded), 'node')} upgraded, "
        f"{len(outcome.failed)} failed, {len(outcome.called_off)} still busy (resumed), "
        f"{len(outcome.not_started)} not started, in {outcome.seconds:.0f} s"
    )


# ---------------------------------------------------------------------------- real parts


@contextmanager
def site_parts(
    fleet: Fleet, spec: Path, state: str | None, folder: Path, key: Path | None, output: Output
) -> Iterator[Any]:
    """The parts that carry a plan out on real racks and on the lab."""
    from provisioner.scheduler import for_fleet

    parts = SiteParts(fleet, spec, state, folder, key, output, for_fleet(fleet))
    try:
        yield parts
    finally:
        parts.close()


class SiteParts:
    def __init__(
        self,
        fleet: Fleet,
        spec: Path,
        state: str | None,
        folder: Path,
        key: Path | None,
        output: Output,
        scheduler: Any,
    ) -> None:
        from provisioner.bmc.fanout import FanOut, Policy

        self.fleet, self.spec, self.state = fleet, spec, state
        self.folder, self.key, self.output = folder, key, output
        self.scheduler = scheduler
        self.fan = FanOut(Policy.from_spec(fleet.document.bmc, fleet.base_dir))

    def close(self) -> None:
        self.fan.close()

    def terraform(self) -> Mapping[str, Any] | None:
        from provisioner.runner.terraform import terraform_apply

        result = terraform_apply(self.fleet)
        typer.echo(f"terraform: {result.plan_summary}", err=True)
        return result.outputs

    def check_bmc(self, nodes: Sequence[Node]) -> Mapping[str, str | None]:
        from provisioner.bmc import operations as ops

        results = self.fan.run(ops.targets_for(self.fleet, nodes), ops.inventory)
        return {r.node: None if r.ok else f"{r.endpoint}: {r.reason}: {r.message}" for r in results}

    def power_off(self, nodes: Mapping[str, Mapping[str, Any]]) -> Mapping[str, str | None]:
        from provisioner.bmc import operations as ops
        from provisioner.bmc.base import PowerAction
        from provisioner.bmc.fanout import Target
        from provisioner.spec.types import parse_bmc_url, parse_secret_ref

        targets = [
            Target(
                node=name,
                rack="retired",
                endpoint=parse_bmc_url(fact["endpoint"]),
                username=str(fact["username"]),
                password=parse_secret_ref(fact["credential"]),
            )
            for name, fact in nodes.items()
        ]
        results = self.fan.run(targets, ops.power(PowerAction.OFF))
        return {r.node: None if r.ok else f"{r.endpoint}: {r.reason}: {r.message}" for r in results}

    def bring_up(self, nodes: Sequence[Node]) -> Any:
        return run_bring_up(
            self.fleet,
            nodes,
            spec=self.spec,
            state=self.state,
            folder=self.folder,
            key=self.key,
            boot_events=lab_events(self.spec, self.fleet),
            output=self.output,
        )

    def upgrade(self, nodes: Sequence[Node]) -> UpgradeOutcome:
        from provisioner.state.store import open_store

        with open_store(self.state, self.spec) as store:
            return _upgrade(self.fleet, nodes, store, self.folder, self.key, self.output)


# ---------------------------------------------------------------------------- drift

#: States in which a node's installed stack can be read (its OS is installed and configured).
_READABLE = ("ready", "quarantined", "draining", "upgrading", "burning_in")


@app.command("drift")
def drift_command(
    spec: SpecArg,
    nodes: NodesOpt = None,
    render_dir: RenderOpt = None,
    key: KeyOpt = None,
    state: StateOpt = None,
    output: OutputOpt = Output.text,
) -> None:
    """Read what nodes really run and list those that differ from their recorded stack.
    Exits 0 when none does, 2 when some do, 1 on an error."""
    import time

    from provisioner.state.store import open_store
    from provisioner.workflows.drift import gather, report

    fleet = load(spec)
    chosen = fleet.select(None, nodes)
    with open_store(state, spec, create=False) as store:
        recorded = store.facts("stack")
        states = {r.name: str(r.state) for r in store.nodes(fleet.document.metadata.site)}
    names = [n.name for n in chosen if states.get(n.name) in _READABLE]
    skipped = [n.name for n in chosen if states.get(n.name) not in _READABLE]
    if not names:
        fail("no selected node is configured yet (ready, quarantined, or being upgraded)")
    folder = (render_dir if render_dir is not None else spec.parent / "build").absolute()
    render_spec(fleet, folder)
    results = folder / "drift" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    found, missing = gather(folder, names, results, key=key)
    result = report(recorded, found, missing)
    if output is Output.json:
        typer.echo(
            json.dumps(
                {
                    "drift": {
                        "nodes": {n: list(d) for n, d in result.nodes.items()},
                        "unreadable": dict(result.unreadable),
                        "skipped": skipped,
                    }
                }
            )
        )
    else:
        for node, found_differences in result.nodes.items():
            if found_differences:
                typer.echo(f"{node}: drifted")
                for line in found_differences:
                    typer.echo(f"  {line}")
        for node, why in result.unreadable.items():
            typer.echo(f"{node}: could not be read: {why}", err=True)
        if skipped:
            typer.echo(f"not configured yet, not read: {', '.join(skipped)}", err=True)
        typer.echo(
            f"{count(len(result.nodes), 'node')} read: {len(result.drifted)} drifted "
            f"(documents in {results})"
        )
    if result.unreadable:
        raise typer.Exit(1)
    if result.drifted:
        raise typer.Exit(2)
