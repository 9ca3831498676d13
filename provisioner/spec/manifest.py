"""Vendor CSV manifests: one row per server with serial, BMC MAC, BMC address, provisioning MAC.

Vendors name their columns as they like ("System S/N", "NIC1 MAC" ...); the spec maps ours to
theirs with ``manifest.columns``. Unknown columns are ignored; every row keeps its line number
so a bad MAC is reported as ``vendor/r01.csv:8``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import Location, Problem
from provisioner.spec.types import normalize_mac

FIELDS = ("serial", "bmc_mac", "bmc_address", "provisioning_mac")
REQUIRED = ("provisioning_mac",)


@dataclass(frozen=True, slots=True)
class ManifestRow:
    location: Location
    serial: str | None
    bmc_mac: str | None
    bmc_address: str | None
    provisioning_mac: str


@dataclass(frozen=True, slots=True)
class ManifestFile:
    location: Location  # the file itself (line 0)
    rows: tuple[ManifestRow, ...]
    bad_rows: int = 0  # rows with a problem (reported), left out of ``rows``
    columns: frozenset[str] = frozenset()  # our fields the header has

    def by_serial(self) -> dict[str, ManifestRow]:
        return {row.serial: row for row in self.rows if row.serial}


def read_manifest(
    path: Path,
    display: str,
    columns: Mapping[str, str],
    path_text: str,
    required: frozenset[str] = frozenset(REQUIRED),
    named_at: Location | None = None,
) -> tuple[ManifestFile | None, list[Problem]]:
    """Read and check one CSV; returns the rows and every problem found in it.

    ``named_at`` is where the spec names the file: a file that cannot be read is reported
    there. ``required`` are our field names that must have a column."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = named_at or Location(display)
        return None, [
            Problem(where, f"{path_text}.path", f"cannot read manifest {display}: {reason}")
        ]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return None, [Problem(Location(display, line), path_text, f"not UTF-8 text ({exc.reason})")]
    problems: list[Problem] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        return None, [Problem(Location(display, 1), path_text, f"not a CSV file: {exc}")]
    if header is None:
        return None, [
            Problem(Location(display), path_text, "the manifest is empty (no header row)")
        ]
    header = [name.strip() for name in header]
    index: dict[str, int] = {}
    for field in FIELDS:
        wanted = columns.get(field, field)
        matches = [i for i, name in enumerate(header) if name.lower() == wanted.lower()]
        if matches:
            index[field] = matches[0]
        elif field in required or field in columns:
            problems.append(
                Problem(
                    Location(display, 1),
                    path_text,
                    f"no column {wanted!r} in the header (columns: {', '.join(header)})",
                )
            )
    if problems:
        return None, problems
    rows: list[ManifestRow] = []
    bad_rows = 0
    seen_serials: dict[str, int] = {}
    try:
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            row = _row(record, index, Location(display, line), path_text, problems)
            if row is not None and row.serial:
                first = seen_serials.setdefault(row.serial, line)
                if first != line:
                    problems.append(
                        Problem(
                            row.location,
                            path_text,
                            f"serial {row.serial!r} appears twice (also line {first})",
                        )
                    )
                    row = None
            if row is None:
                bad_rows += 1
            else:
                rows.append(row)
    except csv.Error as exc:
        problems.append(Problem(Location(display, reader.line_num), path_text, f"CSV: {exc}"))
        bad_rows += 1
    manifest = ManifestFile(Location(display), tuple(rows), bad_rows, frozenset(index))
    return manifest, problems


def _cell(record: list[str], index: Mapping[str, int], field: str) -> str | None:
    position = index.get(field)
    if position is None or position >= len(record):
        return None
    text = record[position].strip()
    return text or None


def _row(
    record: list[str],
    index: Mapping[str, int],
    where: Location,
    path_text: str,
    problems: list[Problem],
) -> ManifestRow | None:
    macs: dict[str, str | None] = {}
    ok = True
    for field in ("provisioning_mac", "bmc_mac"):
        raw = _cell(record, index, field)
        if raw is None:
            macs[field] = None
            if field == "provisioning_mac":
                problems.append(Problem(where, f"{path_text}.{field}", "empty provisioning MAC"))
                ok = False
            continue
        try:
            macs[field] = normalize_mac(raw)
        except ValueError as exc:
            problems.append(Problem(where, f"{path_text}.{field}", str(exc)))
            ok = False
    if not ok:
        return None
    provisioning_mac = macs["provisioning_mac"]
    assert provisioning_mac is not None
    return ManifestRow(
        location=where,
        serial=_cell(record, index, "serial"),
        bmc_mac=macs["bmc_mac"],
        bmc_address=_cell(record, index, "bmc_address"),
        provisioning_mac=provisioning_mac,
    )
