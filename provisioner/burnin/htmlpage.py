"""The HTML burn-in report: one self-contained page (inline CSS and SVG, no script, no
external URL) a person reads at a glance: counts of ready and quarantined nodes, a table of
nodes with their failing checks, then per node its verdict, the failing checks in red with
their reasons, per-GPU bars of each figure against its floor, and a check x GPU grid."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from provisioner.burnin.charts import bars, meter
from provisioner.burnin.report import Report
from provisioner.burnin.verdict import CHECK_IDS, Check, NodeVerdict, Verdict

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f6f8;color:#1f2933;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0}
.meta{color:#52606d;margin:2px 0 0}
.tiles{display:flex;gap:14px;margin:18px 0 22px}
.tile{flex:1;border-radius:10px;padding:14px 18px;color:#fff;font-size:15px}
.tile b{display:block;font-size:32px;line-height:1.1}
.tile.ready{background:#2f9e66}.tile.bad{background:#d64545}.tile.missing{background:#7b8794}
.card{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.12);
 padding:18px 22px;margin:0 0 18px}
.card.quarantined{border-left:6px solid #d64545}.card.ready{border-left:6px solid #2f9e66}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e4e7eb;vertical-align:top}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#52606d}
.badge{display:inline-block;border-radius:999px;padding:2px 10px;font-size:12px;font-weight:700;
 letter-spacing:.05em;color:#fff;vertical-align:middle;margin-left:8px}
.badge.ready{background:#2f9e66}.badge.quarantined{background:#d64545}
.badge.missing{background:#7b8794}
.head{display:flex;align-items:baseline;justify-content:space-between;gap:12px}
ul.checks{list-style:none;padding:0;margin:12px 0}
ul.checks li{padding:5px 10px;border-radius:6px;margin:3px 0}
ul.checks li.fail{background:#fde8e8;color:#9b1c1c}
ul.checks li.warn{background:#fff4dc;color:#7a4d00}
code{font:12.5px ui-monospace,"DejaVu Sans Mono",monospace}
.charts{display:flex;flex-wrap:wrap;gap:10px 20px;margin:10px 0;align-items:flex-start}
.ring{padding-top:8px}
svg text{font-family:system-ui,"DejaVu Sans",sans-serif;fill:#1f2933}
svg .title{font-size:13px;font-weight:700}svg .unit{font-weight:400;fill:#52606d}
svg .tick{font-size:10px;fill:#52606d}svg .value{font-size:9.5px}
svg .na{font-size:11px;fill:#7b8794}svg .big{font-size:15px;font-weight:700}
svg .floor{font-size:10px;font-weight:700}
table.grid{width:auto;margin-top:10px;border-collapse:separate;border-spacing:2px}
table.grid td,table.grid th{padding:2px 4px;border:0;font-size:12px}
table.grid td.c{width:24px;height:18px;text-align:center;border-radius:3px;color:#fff;
 font-weight:700}
td.pass{background:#2f9e66}td.fail{background:#d64545}td.warn{background:#f0a30a}
td.skip{background:#cbd2d9}td.none{background:transparent}
.legend span{display:inline-block;margin-right:14px;font-size:12px;color:#52606d}
.legend i{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:4px;
 vertical-align:-1px}
details summary{cursor:pointer;color:#52606d;margin-top:8px}
"""
_MARK = {Verdict.PASS: "", Verdict.FAIL: "✗", Verdict.WARN: "!", Verdict.SKIP: "–"}


def to_html(report: Report) -> str:
    nodes = sorted(report.nodes, key=lambda n: (n.ready, n.node))
    summary = report.summary()
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>GPU burn-in report: {summary['ready']} of {summary['nodes']} ready</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>GPU burn-in report</h1>",
        f'<p class="meta">generated {escape(report.generated)} · {summary["nodes"]} nodes</p>',
        _tiles(summary),
        _table(nodes, report),
        *(_node(node) for node in nodes),
        _missing(report),
        "</main></body></html>\n",
    ]
    return "\n".join(part for part in parts if part)


def _tiles(summary: dict[str, int]) -> str:
    return (
        '<div class="tiles">'
        f'<div class="tile ready"><b>{summary["ready"]}</b>ready</div>'
        f'<div class="tile bad"><b>{summary["quarantined"]}</b>quarantined</div>'
        f'<div class="tile missing"><b>{summary["missing"]}</b>no result</div></div>'
    )


def _table(nodes: Sequence[NodeVerdict], report: Report) -> str:
    rows = []
    for node in nodes:
        failing = ", ".join(sorted({c.id for c in node.failing})) or "–"
        rows.append(
            f'<tr><td><a href="#node-{escape(node.node)}">{escape(node.node)}</a></td>'
            f"<td>{_badge(node.verdict)}</td><td>{escape(node.level)}</td>"
            f"<td>{len(node.gpus)}</td><td>{len(node.warnings)}</td>"
            f"<td><code>{escape(failing)}</code></td></tr>"
        )
    for missing in report.missing:
        rows.append(
            f"<tr><td>{escape(missing.node)}</td><td>{_badge('missing', 'no result')}</td>"
            f"<td></td><td></td><td></td><td>{escape(missing.reason)}</td></tr>"
        )
    head = "<tr><th>node</th><th>verdict</th><th>level</th><th>GPUs</th><th>warnings</th>"
    return (
        f'<section class="card"><table>{head}<th>failing checks</th></tr>'
        + "".join(rows)
        + "</table></section>"
    )


def _badge(verdict: str, text: str | None = None) -> str:
    return f'<span class="badge {escape(verdict)}">{escape((text or verdict).upper())}</span>'


def _node(node: NodeVerdict) -> str:
    minutes, seconds = divmod(round(node.duration_s), 60)
    meta = " · ".join(
        [
            f"level {escape(node.level)}",
            f"backend {escape(node.backend)}",
            f"driver {escape(node.driver_version or 'none')}",
            f"{len(node.gpus)} GPUs",
            f"{minutes} min {seconds} s",
            f"started {escape(node.started)}",
        ]
    )
    shown = "" if node.ready else " open"
    grid = (
        f"<details{shown}><summary>all checks ({len(node.checks)})</summary>{_grid(node)}</details>"
    )
    return (
        f'<section class="card {node.verdict}" id="node-{escape(node.node)}">'
        f'<div class="head"><h2>{escape(node.node)}{_badge(node.verdict)}</h2></div>'
        f'<p class="meta">{meta}</p>'
        f"{_checks(node.failing, 'fail', len(node.gpus))}"
        f"{_checks(node.warnings, 'warn', len(node.gpus))}"
        f"{_charts(node)}{grid}</section>"
    )


def _checks(checks: Sequence[Check], kind: str, gpus: int) -> str:
    """One line per check id and reason, naming the GPUs it holds for."""
    if not checks:
        return ""
    grouped: dict[tuple[str, str], list[int | None]] = {}
    for check in checks:
        grouped.setdefault((check.id, check.reason), []).append(check.gpu)
    items = [
        f'<li class="{kind}"><code>{escape(check_id)}</code>{_gpus(indices, gpus)}: '
        f"{escape(reason)}</li>"
        for (check_id, reason), indices in list(grouped.items())[:12]
    ]
    if len(grouped) > 12:
        items.append(f'<li class="{kind}">and {len(grouped) - 12} more</li>')
    return f'<ul class="checks">{"".join(items)}</ul>'


def _gpus(gpus: Sequence[int | None], present: int) -> str:
    indices = [gpu for gpu in gpus if gpu is not None]
    if not indices:
        return ""
    if len(indices) == present > 1:
        return f" all {present} GPUs"
    return f" GPU{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices))}"


def _charts(node: NodeVerdict) -> str:
    floors = node.floors
    gpus = node.gpus
    charts = [
        bars("GEMM", "TFLOPS", [(str(g.index), g.gemm_tflops) for g in gpus], floors.gemm_tflops),
        bars("HBM copy", "GB/s", [(str(g.index), g.hbm_gbps) for g in gpus], floors.hbm_gbps),
        bars("Host → GPU", "GB/s", [(str(g.index), g.h2d_gbps) for g in gpus], floors.h2d_gbps),
        bars("GPU → host", "GB/s", [(str(g.index), g.d2h_gbps) for g in gpus], floors.d2h_gbps),
        bars(
            "Temperature",
            "°C",
            [(str(g.index), g.max_temperature_c) for g in gpus],
            floors.max_temperature_c,
            ceiling=True,
        ),
    ]
    ring = meter(
        f"All-reduce, {node.allreduce_gpus or len(gpus)} GPUs",
        "GB/s",
        node.allreduce_busbw_gbps,
        floors.allreduce_busbw_gbps,
    )
    return f'<div class="charts">{"".join(charts)}<div class="ring">{ring}</div></div>'


def _grid(node: NodeVerdict) -> str:
    indices = sorted(
        {g.index for g in node.gpus} | {c.gpu for c in node.checks if c.gpu is not None}
    )
    cells = {(c.id, c.gpu): c for c in node.checks}
    ids = [check_id for check_id in CHECK_IDS if any(c.id == check_id for c in node.checks)]
    head = "<tr><th>check</th><th>node</th>" + "".join(f"<th>{i}</th>" for i in indices)
    rows = []
    for check_id in ids:
        row = [f"<td><code>{escape(check_id)}</code></td>"]
        for gpu in [None, *indices]:
            check = cells.get((check_id, gpu))
            if check is None:
                row.append('<td class="c none"></td>')
            else:
                row.append(
                    f'<td class="c {check.verdict}" title="{escape(check.reason)}">'
                    f"{_MARK[check.verdict]}</td>"
                )
        rows.append("<tr>" + "".join(row) + "</tr>")
    legend = "".join(
        f'<span><i class="{v}" style="background:{colour}"></i>{v}</span>'
        for v, colour in (
            ("pass", "#2f9e66"),
            ("warn", "#f0a30a"),
            ("fail", "#d64545"),
            ("skip", "#cbd2d9"),
        )
    )
    return (
        f'<table class="grid">{head}</tr>{"".join(rows)}</table>'
        f'<p class="legend">{legend} <span>columns: node, then GPU index</span></p>'
    )


def _missing(report: Report) -> str:
    if not report.missing:
        return ""
    items = "".join(
        f"<li class='fail'><code>{escape(m.node)}</code>: {escape(m.reason)}</li>"
        for m in report.missing
    )
    return f'<section class="card"><h2>No result</h2><ul class="checks">{items}</ul></section>'
