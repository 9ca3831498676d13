"""Inline SVG charts for the HTML report: bars per GPU against a floor line, and one bar
against a floor for a node figure. Pure string building; no script, no external file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from provisioner.burnin.verdict import number

GOOD = "#2f9e66"
BAD = "#d64545"
NEUTRAL = "#8a94a6"
INK = "#1f2933"
GRID = "#e4e7eb"
WIDTH, HEIGHT = 360, 178
_LEFT, _RIGHT, _TOP, _BOTTOM = 36, 40, 30, 24


def nice_top(value: float) -> float:
    """A round axis top at or above ``value`` (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 x 10^n)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
        if step * power >= value:
            return step * power
    return 10.0 * power


def bars(
    title: str,
    unit: str,
    values: Sequence[tuple[str, float | None]],
    floor: float | None,
    *,
    ceiling: bool = False,
) -> str:
    """A bar per (label, value) with the floor as a dashed line: bars that miss it are red.
    ``ceiling``: the line is a maximum (temperature), bars above it are red."""
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    measured = [v for _, v in values if v is not None]
    top = nice_top(max([*measured, floor or 0.0, 1e-9]) * 1.12)
    out = [_open(title, unit), *_grid(top)]
    slot = plot_w / max(len(values), 1)
    width = min(slot * 0.68, 34)
    for position, (label, value) in enumerate(values):
        x = _LEFT + slot * position + (slot - width) / 2
        centre = x + width / 2
        out.append(
            f'<text x="{centre:.1f}" y="{HEIGHT - 8}" class="tick" '
            f'text-anchor="middle">{escape(label)}</text>'
        )
        if value is None:
            out.append(
                f'<text x="{centre:.1f}" y="{_TOP + plot_h - 4}" class="na" '
                'text-anchor="middle">n/a</text>'
            )
            continue
        height = plot_h * min(value, top) / top
        y = _TOP + plot_h - height
        colour = NEUTRAL if floor is None else _colour(value, floor, ceiling)
        out.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" '
            f'rx="2" fill="{colour}"><title>{escape(label)}: {number(value)} '
            f"{escape(unit)}</title></rect>"
        )
        if slot >= 30:  # room for the figure above its bar (else: the bar's tooltip)
            out.append(
                f'<text x="{centre:.1f}" y="{y - 3:.1f}" class="value" '
                f'text-anchor="middle">{number(value)}</text>'
            )
    if floor is not None:
        out.append(_floor_line(floor, top, ceiling))
    out.append("</svg>")
    return "".join(out)


def _grid(top: float) -> list[str]:
    """Gridlines at 0, half and the top of the axis, labelled."""
    plot_h = HEIGHT - _TOP - _BOTTOM
    out = []
    for tick in (0.0, top / 2, top):
        y = _TOP + plot_h * (1 - tick / top)
        out.append(
            f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        out.append(
            f'<text x="{_LEFT - 4}" y="{y + 3:.1f}" class="tick" text-anchor="end">'
            f"{number(tick)}</text>"
        )
    return out


def meter(title: str, unit: str, value: float | None, floor: float | None) -> str:
    """One horizontal bar (a node figure) against its floor."""
    width, height, left, right = WIDTH, 84, 4, 62
    plot_w = width - left - right
    top = nice_top(max(value or 0.0, floor or 0.0, 1e-9) * 1.12)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        _title(title, unit),
        f'<rect x="{left}" y="30" width="{plot_w}" height="20" rx="3" fill="{GRID}"/>',
    ]
    if value is None:
        out.append(f'<text x="{left + 6}" y="44" class="na">not measured</text>')
    else:
        colour = NEUTRAL if floor is None else _colour(value, floor, False)
        bar = plot_w * min(value, top) / top
        out.append(
            f'<rect x="{left}" y="30" width="{bar:.1f}" height="20" rx="3" fill="{colour}"/>'
        )
        out.append(f'<text x="{width - right + 6}" y="45" class="big">{number(value)}</text>')
    if floor is not None:
        x = left + plot_w * floor / top
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="25" y2="55" stroke="{INK}" '
            'stroke-width="2" stroke-dasharray="4 3"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="68" class="floor" text-anchor="middle">floor '
            f"{number(floor)}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _title(title: str, unit: str) -> str:
    label = escape(title) + (f" <tspan class='unit'>{escape(unit)}</tspan>" if unit else "")
    return f'<text x="4" y="16" class="title">{label}</text>'


def _open(title: str, unit: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">'
        + _title(title, unit)
    )


def _floor_line(floor: float, top: float, ceiling: bool) -> str:
    """The dashed floor line across the plot, its label in the right margin."""
    plot_h = HEIGHT - _TOP - _BOTTOM
    y = _TOP + plot_h * (1 - min(floor, top) / top)
    x = WIDTH - _RIGHT + 4
    word = "max" if ceiling else "floor"
    return (
        f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT + 2}" y1="{y:.1f}" y2="{y:.1f}" '
        f'stroke="{INK}" stroke-width="1.5" stroke-dasharray="5 3"/>'
        f'<text x="{x}" y="{y - 2:.1f}" class="floor">{word}</text>'
        f'<text x="{x}" y="{y + 9:.1f}" class="floor">{number(floor)}</text>'
    )


def _colour(value: float, floor: float, ceiling: bool) -> str:
    bad = value > floor if ceiling else value < floor
    return BAD if bad else GOOD
