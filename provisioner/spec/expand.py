"""Racks to concrete nodes: listed nodes as written, ranges joined with their vendor manifest.

A range gives the name pattern, the count and the first address; the manifest gives each
server's MACs, serial and (optionally) BMC address, joined by position (row *i* is slot *i*) or
by serial (the spec lists serials in slot order; the CSV may hold a whole delivery).
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from provisioner.errors import Location, Problem
from provisioner.spec.fleet import Node, Origin
from provisioner.spec.manifest import ManifestFile, ManifestRow, read_manifest
from provisioner.spec.models import FleetDocument, NodeRange, Rack
from provisioner.spec.partial import NO_GAPS, Gaps
from provisioner.spec.source import PathKey, SourceMap, display_name, format_path
from provisioner.spec.types import (
    BmcEndpoint,
    bmc_at,
    check_name,
    ipv4_int,
    ipv4_plus,
    mac_plus,
    parse_bmc_url,
)


class Expander:
    def __init__(
        self, document: FleetDocument, source: SourceMap, base_dir: Path, gaps: Gaps = NO_GAPS
    ) -> None:
        self.document = document
        self.source = source
        self.base_dir = base_dir
        self.gaps = gaps  # what of the document failed validation (its racks' positions)
        self.problems: list[Problem] = []
        self._manifests: dict[
            tuple[Path, tuple[tuple[str, str], ...], tuple[str, ...]], ManifestFile | None
        ] = {}

    def problem(self, path: PathKey, message: str, where: Location | None = None) -> None:
        self.problems.append(Problem(where or self.source.locate(path), format_path(path), message))

    def expand(self) -> list[Node]:
        nodes: list[Node] = []
        racks = self.document.racks
        for r, rack in zip(self.gaps.indices(("racks",), len(racks)), racks, strict=True):
            listed = self.gaps.indices(("racks", r, "nodes"), len(rack.nodes))
            for n, spec in zip(listed, rack.nodes, strict=True):
                nodes.append(
                    Node(
                        name=spec.name,
                        rack=rack.name,
                        ip=spec.ip,
                        mac=spec.mac,
                        bmc=spec.bmc,
                        profile=spec.profile or rack.profile,
                        stack=spec.stack or rack.stack,
                        image=spec.image or rack.image,
                        serial=spec.serial,
                        bmc_mac=spec.bmc_mac,
                        origin=Origin(("racks", r, "nodes", n)),
                    )
                )
            ranged = self.gaps.indices(("racks", r, "ranges"), len(rack.ranges))
            for g, node_range in zip(ranged, rack.ranges, strict=True):
                nodes.extend(self._range(rack, node_range, ("racks", r, "ranges", g)))
        return nodes

    # ------------------------------------------------------------------ ranges

    def _range(self, rack: Rack, spec: NodeRange, path: PathKey) -> list[Node]:
        manifest, shown = self._manifest(spec, path) if spec.manifest else (None, "")
        rows = self._rows(spec, path, manifest, shown)
        columns = manifest.columns if manifest is not None else frozenset()
        if rows is None or not self._bmc_source(spec, path, columns):
            return []
        names = self._names(spec, rack, path)
        if not names:
            return []
        nodes: list[Node] = []
        for i in range(spec.count):
            row = rows[i] if rows else None
            try:
                ip = ipv4_plus(spec.first_ip, i)
            except ValueError as exc:
                self.problem((*path, "first_ip"), str(exc))
                return nodes
            name = names[i]
            bmc = self._bmc(spec, i, row, path, name)
            mac = row.provisioning_mac if row else self._mac(spec, i, path, name)
            if bmc is None or mac is None:
                continue
            given: frozenset[str] = frozenset()
            if row is not None:
                given = frozenset(
                    attr
                    for attr, value in (
                        ("mac", True),
                        ("serial", row.serial),
                        ("bmc_mac", row.bmc_mac),
                        ("bmc", spec.first_bmc is None and row.bmc_address),
                    )
                    if value
                )
            nodes.append(
                Node(
                    name=name,
                    rack=rack.name,
                    ip=ip,
                    mac=mac,
                    bmc=bmc,
                    profile=spec.profile or rack.profile,
                    stack=spec.stack or rack.stack,
                    image=spec.image or rack.image,
                    serial=row.serial if row else None,
                    bmc_mac=row.bmc_mac if row else None,
                    origin=Origin(path, i, row.location if row else None, given),
                )
            )
        return nodes

    def _names(self, spec: NodeRange, rack: Rack, path: PathKey) -> list[str]:
        """The range's host names; a pattern that makes bad names is reported once."""
        names = [
            spec.name.format(index=spec.first_index + i, rack=rack.name) for i in range(spec.count)
        ]
        bad: list[tuple[int, str]] = []
        for i, name in enumerate(names):
            try:
                check_name(name)
            except ValueError as exc:
                bad.append((spec.first_index + i, str(exc)))
        if bad:
            index, message = bad[0]
            more = (
                f" ({len(bad)} of the range's {spec.count} names are invalid)"
                if len(bad) > 1
                else ""
            )
            self.problem((*path, "name"), f"index {index}: {message}{more}")
            return []
        return names

    def _bmc_source(self, spec: NodeRange, path: PathKey, columns: frozenset[str]) -> bool:
        """Whether the range has a way to give each node a BMC (checked once per range)."""
        first = spec.first_bmc
        if first is not None and spec.bmc_step == "address" and ipv4_int(first.host) is None:
            self.problem(
                (*path, "first_bmc"),
                f"to count BMC addresses from {first.host!r} it must be an IPv4 address "
                "(or set bmc_step: port)",
            )
            return False
        if first is None and "bmc_address" not in columns:
            self.problem(
                (*path, "first_bmc"),
                "no BMC address: give first_bmc or a bmc_address column in the manifest",
            )
            return False
        return True

    def _mac(self, spec: NodeRange, i: int, path: PathKey, name: str) -> str | None:
        assert spec.first_mac is not None
        try:
            mac = mac_plus(spec.first_mac, i)
            if mac[1] in "13579bdf":
                raise ValueError(f"{mac} is a multicast MAC address, not a NIC's")
        except ValueError as exc:
            self.problem((*path, "first_mac"), f"{name}: {exc}")
            return None
        return mac

    def _bmc(
        self, spec: NodeRange, i: int, row: ManifestRow | None, path: PathKey, name: str
    ) -> BmcEndpoint | None:
        first = spec.first_bmc
        counted: BmcEndpoint | None = None
        if first is not None:
            try:
                if spec.bmc_step == "port":
                    counted = first.with_port(first.port + i)
                else:
                    counted = first.with_host(str(ipv4_plus(IPv4Address(first.host), i)))
            except ValueError as exc:
                self.problem((*path, "first_bmc"), f"{name}: {exc}")
                return None
        listed: BmcEndpoint | None = None
        if row is not None and row.bmc_address:
            text = row.bmc_address
            try:
                if "://" in text or "@" in text:
                    listed = parse_bmc_url(text)
                elif counted is not None:
                    listed = counted.with_host(bmc_at(counted.protocol, text).host)
                else:
                    listed = bmc_at(spec.bmc_protocol, text)
            except ValueError as exc:
                self.problem((*path, "manifest", "bmc_address"), str(exc), row.location)
                return None
        if counted is not None and listed is not None and counted.key != listed.key:
            self.problem(
                (*path, "manifest", "bmc_address"),
                f"{name}: the manifest gives BMC {listed.url} but first_bmc counts to "
                f"{counted.url} (cabling or manifest mix-up?)",
                row.location if row else None,
            )
            return None
        found = counted or listed
        if found is None:
            self.problem(
                (*path, "manifest", "bmc_address"),
                f"{name}: no BMC address: the row's bmc_address is empty and the range has "
                "no first_bmc",
                row.location if row else None,
            )
        return found

    # ------------------------------------------------------------------ manifests

    def _manifest(self, spec: NodeRange, path: PathKey) -> tuple[ManifestFile | None, str]:
        assert spec.manifest is not None
        manifest_path = Path(spec.manifest.path)
        if not manifest_path.is_absolute():
            manifest_path = self.base_dir / manifest_path
        columns = {str(field): header for field, header in spec.manifest.columns.items()}
        required = {"provisioning_mac"} | ({"serial"} if spec.manifest.join == "serial" else set())
        key = (manifest_path.resolve(), tuple(sorted(columns.items())), tuple(sorted(required)))
        shown = display_name(manifest_path)
        if key not in self._manifests:
            manifest, problems = read_manifest(
                manifest_path,
                shown,
                columns,
                format_path((*path, "manifest")),
                frozenset(required),
                self.source.locate((*path, "manifest", "path")),
            )
            self._manifests[key] = manifest
            self.problems.extend(problems)
        return self._manifests[key], shown

    def _rows(
        self, spec: NodeRange, path: PathKey, manifest: ManifestFile | None, shown: str
    ) -> list[ManifestRow] | None:
        """The manifest row for each slot of the range; [] when the range has no manifest,
        None when the manifest cannot be joined (its problems are reported)."""
        if spec.manifest is None:
            return []
        if manifest is None or manifest.bad_rows:
            return None  # each problem is reported already; a join would only mislead
        if spec.manifest.join == "position":
            if len(manifest.rows) != spec.count:
                self.problem(
                    (*path, "manifest"),
                    f"the manifest {shown} has {len(manifest.rows)} rows but the range "
                    f"counts {spec.count} nodes",
                )
                return None
            return list(manifest.rows)
        assert spec.serials is not None
        by_serial = manifest.by_serial()
        rows: list[ManifestRow] = []
        for s, serial in enumerate(spec.serials):
            row = by_serial.get(serial)
            if row is None:
                self.problem(
                    (*path, "serials", s),
                    f"serial {serial!r} is not in the manifest {shown}",
                )
            else:
                rows.append(row)
        return rows if len(rows) == spec.count else None
