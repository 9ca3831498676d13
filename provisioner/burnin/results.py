"""Results on the controller: where the agent is, the documents a run fetched (one
``<node>.json`` per node in the results folder, beside the saved ``report.json``), and the
report made from them: judged against the spec when there is one, else the saved verdicts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from provisioner.burnin.document import (
    AgentDocument,
    BurninDocumentError,
    Level,
    load_document,
    parse_document,
)
from provisioner.burnin.floors import expectation_for
from provisioner.burnin.judge import judge
from provisioner.burnin.report import REPORT_SCHEMA, Missing, Report, load_report
from provisioner.burnin.verdict import NodeVerdict
from provisioner.errors import BurninFailed
from provisioner.spec import Fleet

if TYPE_CHECKING:
    from provisioner.runner.ansible import PlaybookResult

AGENT = "agent.py"
REPORT_FILE = "report.json"


def agent_path() -> Path:
    """The agent file the playbook copies to each node (inside the installed package)."""
    path = Path(str(resources.files("provisioner.burnin").joinpath(AGENT)))
    if not path.is_file():
        raise BurninFailed(f"the burn-in agent is missing from this installation ({path})")
    return path


@dataclass(frozen=True, slots=True)
class Inputs:
    """Agent documents and saved reports, read from the files and folders given."""

    documents: tuple[tuple[Path, AgentDocument], ...]
    saved: tuple[Report, ...]


def gather(paths: Sequence[Path]) -> Inputs:
    """Read agent documents and saved reports from files, and from folders' ``*.json``."""
    documents: list[tuple[Path, AgentDocument]] = []
    saved: list[Report] = []
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob("*.json"))
            if not files:
                raise BurninFailed(f"{path}: no burn-in results (*.json) in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise BurninFailed(f"{path}: no such file or folder")
        for file in files:
            _take(file, documents, saved)
    return Inputs(tuple(documents), tuple(saved))


def _take(path: Path, documents: list[tuple[Path, AgentDocument]], saved: list[Report]) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BurninDocumentError(f"{path}: cannot read: {exc}") from exc
    if isinstance(data, dict) and data.get("schema") == REPORT_SCHEMA:
        saved.append(load_report(path))
    else:
        documents.append((path, parse_document(data, str(path))))


def judge_all(
    fleet: Fleet, documents: Sequence[tuple[Path, AgentDocument]], level: Level | None = None
) -> tuple[list[NodeVerdict], list[Missing]]:
    """Judge each document against what the spec expects of its node."""
    verdicts: list[NodeVerdict] = []
    missing: list[Missing] = []
    seen: dict[str, Path] = {}
    for path, document in documents:
        if document.node in seen:
            raise BurninFailed(
                f"two results for node {document.node}: {seen[document.node]} and {path}"
            )
        seen[document.node] = path
        node = fleet.by_name.get(document.node)
        if node is None:
            missing.append(Missing(document.node, f"{path}: node not in the spec"))
            continue
        verdict = judge(document, expectation_for(fleet, node, level))
        verdicts.append(replace(verdict, source=str(path)))
    return verdicts, missing


def build_report(inputs: Inputs, fleet: Fleet | None) -> Report:
    """The report of ``inputs``: documents judged against ``fleet`` when given (saved
    verdicts fill in nodes without a document), else the saved verdicts alone."""
    saved = {v.node: v for report in inputs.saved for v in report.nodes}
    saved_missing = {m.node: m for report in inputs.saved for m in report.missing}
    if fleet is not None:
        verdicts, missing = judge_all(fleet, inputs.documents)
    else:
        known = saved.keys() | saved_missing.keys()
        unjudged = [str(path) for path, doc in inputs.documents if doc.node not in known]
        if unjudged:
            shown = ", ".join(unjudged[:3]) + (" ..." if len(unjudged) > 3 else "")
            raise BurninFailed(
                f"no saved verdict for {shown}: judging needs the floors and expectations of "
                "the spec (give --spec SPEC), or a results folder with its report.json"
            )
        verdicts, missing = [], []
    judged = {v.node for v in verdicts} | {m.node for m in missing}
    verdicts += [v for node, v in saved.items() if node not in judged]
    judged |= set(saved)
    missing += [m for node, m in saved_missing.items() if node not in judged]
    if not verdicts and not missing:
        raise BurninFailed("no burn-in results to report")
    return Report(tuple(sorted(verdicts, key=lambda v: v.node)), tuple(missing))


def collect(
    results_dir: Path, hosts: Sequence[str], reasons: Mapping[str, str]
) -> tuple[list[tuple[Path, AgentDocument]], list[Missing]]:
    """The documents ``burnin.yml`` fetched into ``results_dir``, and for each host that has
    none (or a bad one) why: ``reasons`` (the run's word on the host), else "no result"."""
    documents: list[tuple[Path, AgentDocument]] = []
    missing: list[Missing] = []
    for host in hosts:
        path = results_dir / f"{host}.json"
        if not path.is_file():
            missing.append(Missing(host, reasons.get(host) or "no result fetched"))
            continue
        try:
            document = load_document(path)
        except BurninDocumentError as exc:
            missing.append(Missing(host, str(exc)))
            continue
        if document.node != host:
            missing.append(Missing(host, f"{path}: the document is of node {document.node!r}"))
            continue
        documents.append((path, document))
    return documents, missing


def reasons_from(played: PlaybookResult, hosts: Sequence[str]) -> dict[str, str]:
    """Why each host that did not finish a playbook run well did not, as far as the run
    tells (hosts that did are left out)."""
    failed = {recap.host: recap for recap in played.failed}
    reasons = {}
    for host in hosts:
        if host in failed:
            recap = failed[host]
            reasons[host] = f"{recap.status} at {recap.failed_task!r}: {recap.message}"
        elif host in played.not_run:
            reasons[host] = "not run (the play ended before this host)"
        elif played.error:
            reasons[host] = f"no result: {played.error}"
    return reasons
