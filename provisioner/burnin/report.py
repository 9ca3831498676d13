"""Burn-in reports from judged nodes: JSON, JUnit XML, Prometheus textfile (HTML: see
:mod:`provisioner.burnin.htmlpage`). Pure: a :class:`Report` in, text out;
:func:`write_report` writes atomically (node_exporter's textfile collector may be reading).

* JSON (``provisioner-burnin-report/1``): every node's verdict, checks, figures and floors,
  and the nodes that gave no result; ``burnin run`` saves it as ``report.json`` and
  :func:`load_report` reads it back.
* JUnit: a testsuite per node, a testcase per node x check (x GPU), ``<failure>`` with the
  reason for a fail, ``<skipped>`` for a skip; a warn passes with the reason in
  ``<system-out>``. A node without a result is a testsuite with one ``<error>``.
* Prometheus: ``provisioner_burnin_*`` gauges labelled ``node`` (and ``gpu``, ``check``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.burnin.document import BurninDocumentError
from provisioner.burnin.verdict import NodeVerdict, Verdict

REPORT_SCHEMA = "provisioner-burnin-report/1"
FORMATS = ("json", "junit", "prometheus", "html")
# provisioner_burnin_check_status values: ordered by severity, so max() is the worst.
STATUS_VALUE = {Verdict.PASS: 0, Verdict.SKIP: 1, Verdict.WARN: 2, Verdict.FAIL: 3}


@dataclass(frozen=True, slots=True)
class Missing:
    """A node that was targeted but gave no judged result, and why."""

    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class Report:
    nodes: tuple[NodeVerdict, ...]
    missing: tuple[Missing, ...] = ()
    generated: str = field(
        default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )

    @property
    def ok(self) -> bool:
        """Every node ready and none missing."""
        return not self.missing and all(node.ready for node in self.nodes)

    def summary(self) -> dict[str, int]:
        ready = sum(1 for node in self.nodes if node.ready)
        return {
            "nodes": len(self.nodes) + len(self.missing),
            "ready": ready,
            "quarantined": len(self.nodes) - ready,
            "missing": len(self.missing),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": REPORT_SCHEMA,
            "generated": self.generated,
            "summary": self.summary(),
            "nodes": [node.as_dict() for node in self.nodes],
            "missing": [{"node": m.node, "reason": m.reason} for m in self.missing],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            nodes=tuple(NodeVerdict.from_dict(item) for item in data["nodes"]),
            missing=tuple(Missing(str(m["node"]), str(m["reason"])) for m in data["missing"]),
            generated=str(data["generated"]),
        )


def load_report(path: Path) -> Report:
    """A report saved as JSON (``report.json`` of a results folder)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BurninDocumentError(f"{path}: cannot read the report: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != REPORT_SCHEMA:
        raise BurninDocumentError(f"{path}: not a burn-in report ({REPORT_SCHEMA})")
    try:
        return Report.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise BurninDocumentError(f"{path}: damaged burn-in report: {exc!r}") from exc


def render(report: Report, fmt: str) -> str:
    """The report as text in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return to_json(report)
    if fmt == "junit":
        return to_junit(report)
    if fmt == "prometheus":
        return to_prometheus(report)
    if fmt == "html":
        from provisioner.burnin.htmlpage import to_html

        return to_html(report)
    raise ValueError(f"unknown report format {fmt!r} (known: {', '.join(FORMATS)})")


def write_report(report: Report, fmt: str, path: Path) -> None:
    """Write the report to ``path`` atomically (a temporary file renamed into place)."""
    text = render(report, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        Path(temporary).chmod(0o644)
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def to_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=1) + "\n"


# ------------------------------------------------------------------------------------- JUnit


def to_junit(report: Report) -> str:
    root = ET.Element("testsuites", name="provisioner burn-in")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for node in report.nodes:
        suite = _suite(node)
        root.append(suite)
        for key in totals:
            totals[key] += int(suite.get(key, "0"))
    for missing in report.missing:
        suite = ET.SubElement(
            root,
            "testsuite",
            name=missing.node,
            tests="1",
            failures="0",
            errors="1",
            skipped="0",
            time="0",
        )
        case = ET.SubElement(suite, "testcase", classname=f"burnin.{missing.node}", name="result")
        ET.SubElement(case, "error", message=missing.reason, type="no-result").text = missing.reason
        totals["tests"] += 1
        totals["errors"] += 1
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _suite(node: NodeVerdict) -> ET.Element:
    counts = node.counts()
    suite = ET.Element(
        "testsuite",
        name=node.node,
        tests=str(len(node.checks)),
        failures=str(counts["fail"]),
        errors="0",
        skipped=str(counts["skip"]),
        time=f"{node.duration_s:.3f}",
        timestamp=node.started.removesuffix("Z"),
        hostname=node.node,
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("verdict", node.verdict),
        ("level", node.level),
        ("backend", node.backend),
        ("driver_version", node.driver_version or ""),
    ):
        ET.SubElement(properties, "property", name=name, value=value)
    for check in node.checks:
        case = ET.SubElement(
            suite, "testcase", classname=f"burnin.{node.node}", name=check.name, time="0"
        )
        if check.verdict is Verdict.FAIL:
            ET.SubElement(case, "failure", message=check.reason, type="fail").text = check.reason
        elif check.verdict is Verdict.SKIP:
            ET.SubElement(case, "skipped", message=check.reason)
        prefix = "WARN: " if check.verdict is Verdict.WARN else ""
        ET.SubElement(case, "system-out").text = prefix + check.reason
    return suite


# -------------------------------------------------------------------------------- Prometheus

_GPU_FIGURES = (
    ("gemm_tflops", "bf16/fp16 dense GEMM throughput of the GPU in burn-in, TFLOPS."),
    ("hbm_gbps", "HBM device-to-device copy bandwidth of the GPU in burn-in, GB/s."),
    ("h2d_gbps", "Host-to-device copy bandwidth of the GPU in burn-in, GB/s."),
    ("d2h_gbps", "Device-to-host copy bandwidth of the GPU in burn-in, GB/s."),
    ("max_temperature_c", "Highest GPU temperature seen in burn-in, degrees Celsius."),
)

Sample = tuple[dict[str, str], float]


def to_prometheus(report: Report) -> str:
    """The Prometheus text format, for node_exporter's textfile collector."""
    lines = _verdict_families(report.nodes) + _figure_families(report.nodes)
    lines += _family(
        "result_missing",
        "1 for a targeted node that gave no burn-in result.",
        [({"node": m.node}, 1.0) for m in report.missing],
    )
    return "\n".join(lines) + "\n"


def _verdict_families(nodes: Sequence[NodeVerdict]) -> list[str]:
    lines: list[str] = []
    lines += _family(
        "node_ready",
        "1 when the node passed burn-in (no check failed), else 0.",
        [({"node": n.node}, float(n.ready)) for n in nodes],
    )
    lines += _family(
        "checks",
        "Burn-in checks of the node by verdict (pass, warn, fail, skip).",
        [({"node": n.node, "verdict": v}, c) for n in nodes for v, c in n.counts().items()],
    )
    lines += _family(
        "check_status",
        "Verdict of one check (gpu empty for node checks): 0 pass, 1 skip, 2 warn, 3 fail.",
        [
            (
                {"node": n.node, "check": c.id, "gpu": "" if c.gpu is None else str(c.gpu)},
                STATUS_VALUE[c.verdict],
            )
            for n in nodes
            for c in n.checks
        ],
    )
    return lines


def _figure_families(nodes: Sequence[NodeVerdict]) -> list[str]:
    lines: list[str] = []
    for figure, text in _GPU_FIGURES:
        samples = [
            ({"node": n.node, "gpu": str(g.index)}, value)
            for n in nodes
            for g in n.gpus
            if (value := getattr(g, figure)) is not None
        ]
        lines += _family(figure, text, samples)
    lines += _family(
        "allreduce_busbw_gbps",
        "All-reduce bus bandwidth across the node's GPUs in burn-in, GB/s.",
        [
            ({"node": n.node}, n.allreduce_busbw_gbps)
            for n in nodes
            if n.allreduce_busbw_gbps is not None
        ],
    )
    lines += _family(
        "floor",
        "Floor the node's figure was judged against (max_temperature_c: a ceiling).",
        [
            ({"node": n.node, "figure": name}, value)
            for n in nodes
            for name, value in n.floors.as_dict().items()
            if value is not None
        ],
    )
    lines += _family(
        "duration_seconds",
        "How long the node's burn-in ran.",
        [({"node": n.node}, n.duration_s) for n in nodes],
    )
    return lines


def _family(name: str, text: str, samples: Iterable[tuple[dict[str, str], float]]) -> list[str]:
    rows = list(samples)
    if not rows:
        return []
    metric = f"provisioner_burnin_{name}"
    lines = [f"# HELP {metric} {_escape_help(text)}", f"# TYPE {metric} gauge"]
    for labels, value in rows:
        shown = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
        lines.append(f"{metric}{{{shown}}} {_value(value)}")
    return lines


def _value(value: float) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
