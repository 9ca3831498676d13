"""``provisioner demo``: the whole product on the embedded lab, in one command (root only).

1. the lab rack (inventories/lab/fleet.yaml: four simulated HGX H100 nodes, three with IPMI
   BMCs and one with Redfish; gpu-lab-04 carries an injected Xid 79) comes up blank: nodes
   off, disks empty, as a rack arrives;
2. ``bring-up`` of the rack: each node's BMC is checked, the node network-boots, installs,
   calls back, is configured (playbooks/site.yml against the lab's apt repository) and burned
   in; state in ``DIR/state.db``;
3. the burn-in reports go to DIR: ``burnin.html``, ``burnin.junit.xml``, ``burnin.prom``
   (Prometheus textfile) and ``burnin.json``;
4. a summary: how many nodes are ready and quarantined, and why; the lab is taken down
   (``--keep`` leaves it up).

Exits 0 when the run went as designed: the nodes the lab spec gives a fault are quarantined
and every other node is ready. The BMC password is the environment's
``PROVISIONER_LAB_BMC_PASSWORD``, else a random one made for this run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from provisioner.burnin.document import parse_document
from provisioner.burnin.report import Missing, Report, write_report
from provisioner.burnin.results import judge_all
from provisioner.cli.app import Output, OutputOpt, app, count, fail, load
from provisioner.cli.bringup import run_bring_up, show_outcome
from provisioner.cli.progress import render_spec
from provisioner.resources import lab_dir
from provisioner.spec import Fleet
from provisioner.state.lifecycle import State
from provisioner.workflows.bring_up import Outcome

PASSWORD_ENV = "PROVISIONER_LAB_BMC_PASSWORD"  # noqa: S105 - the variable's name
REPORTS = {
    "html": "burnin.html",
    "junit": "burnin.junit.xml",
    "prometheus": "burnin.prom",
    "json": "burnin.json",
}


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="folder for the state and reports")] = Path(
        "out/demo"
    ),
    keep: Annotated[bool, typer.Option("--keep", help="leave the lab up afterwards")] = False,
    output: OutputOpt = Output.text,
) -> None:
    """Bring up the embedded lab rack end to end: PXE install, configure, burn-in, reports."""
    from provisioner.lab import control, host

    host.require_root()
    started = time.monotonic()
    spec = lab_dir() / "fleet.yaml"
    os.environ.setdefault(PASSWORD_ENV, secrets.token_hex(8))  # IPMI: <= 20 bytes
    fleet = load(spec)
    site = fleet.document.metadata.site
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("state.db*"):  # a demo starts from a blank rack: a blank record
        stale.unlink()
    key = out / "lab_ed25519"
    shutil.copyfile(lab_dir() / "ssh" / "lab_ed25519", key)
    key.chmod(0o600)
    say = _say(output)
    if control.boot_events(spec, site) is not None or host.site_dir(site).exists():
        control.down(host.site_dir(site), say=say)
    control.up(spec, blank=True, say=say)
    try:
        folder = out / "render"
        render_spec(fleet, folder)
        outcome = run_bring_up(
            fleet,
            fleet.nodes,
            spec=spec,
            state=f"sqlite:///{out / 'state.db'}",
            folder=folder,
            key=key,
            boot_events=control.boot_events(spec, site),
            output=output,
        )
        show_outcome(outcome, output)
        report = _reports(fleet, out, outcome)
    finally:
        if keep:
            say(f"the lab is up: ssh -i {key} root@{fleet.nodes[0].ip}; provisioner lab down")
        else:
            control.down(host.site_dir(site), say=say)
    as_designed = _as_designed(fleet, outcome)
    say(
        f"demo: {count(len(outcome.nodes), 'node')}, {outcome.count(State.ready)} ready, "
        f"{outcome.count(State.quarantined)} quarantined, {outcome.count(State.failed)} failed "
        f"in {time.monotonic() - started:.0f} s"
    )
    for record in outcome.nodes:
        if record.state is not State.ready:
            say(f"  {record.name} {record.state}: {record.last_error}")
    say(f"reports in {out}: open {out / REPORTS['html']} ({count(len(report.nodes), 'node')})")
    if not as_designed:
        fail("the demo did not go as designed: see the nodes above")


def _say(output: Output) -> Callable[[str], None]:
    def say(message: str) -> None:
        typer.echo(message, err=output is Output.json)

    return say


def _reports(fleet: Fleet, out: Path, outcome: Outcome) -> Report:
    """The burn-in reports of the run, from the state database's saved documents, judged
    against the spec; nodes without a result are listed with their last error."""
    from provisioner.state.store import open_store

    documents = []
    missing = []
    with open_store(f"sqlite:///{out / 'state.db'}", None, create=False) as store:
        for record in outcome.nodes:
            saved = store.burnin_results(record.name)
            if not saved:
                missing.append(Missing(record.name, record.last_error or str(record.state)))
                continue
            source = f"state.db: run {saved[-1].run_id}"
            documents.append((Path(source), parse_document(saved[-1].document, source)))
    verdicts, strangers = judge_all(fleet, documents)
    report = Report(tuple(sorted(verdicts, key=lambda v: v.node)), tuple(missing + strangers))
    for fmt, name in REPORTS.items():
        write_report(report, fmt, out / name)
    return report


def _as_designed(fleet: Fleet, outcome: Outcome) -> bool:
    """The nodes with an injected fault are quarantined, all others ready."""
    lab = fleet.document.lab
    faulty = set(lab.faults) if lab is not None else set()
    return all(
        record.state is (State.quarantined if record.name in faulty else State.ready)
        for record in outcome.nodes
    )
