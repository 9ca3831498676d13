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
from provisioner.spec.source import PathKey, SourceMap, display_name, format_path
from provisioner.spec.types import (
    BmcEndpoint,
    bmc_at,
    check_name,
    ipv4_plus,
    mac_plus,
    parse_bmc_url,
)


class Expander:
    def __init__(self, document: FleetDocument, source: SourceMap, base_dir: Path) -> None:
        self.document = document
        self.source = source
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        self._manifests: dict[Path, tuple[ManifestFile | None, list[Problem]]] = {}

    def problem(self, path: PathKey, message: str, where: Location | None = None) -> None:
        self.problems.append(Problem(where or self.source.locate(path), format_path(path), message))

    def expand(self) -> list[Node]:
        nodes: list[Node] = []
        for r, rack in enumerate(self.document.racks):
            for n, spec in enumerate(rack.nodes):
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
            for g, node_range in enumerate(rack.ranges):
                nodes.extend(self._range(rack, node_range, ("racks", r, "ranges", g)))
        return nodes

    # ------------------------------------------------------------------ ranges

    def _range(self, rack: Rack, spec: NodeRange, path: PathKey) -> list[Node]:
        rows = self._rows(spec, path)
        if rows is None:
            return []
        first_bmc = spec.first_bmc
        if first_bmc is not None and spec.bmc_step == "address":
            try:
                IPv4Address(first_bmc.host)
            except ValueError:
                self.problem(
                    (*path, "first_bmc"),
                    f"to count BMC addresses from {first_bmc.host!r} it must be an IPv4 "
                    "address (or set bmc_step: port)",
                )
                return []
        nodes: list[Node] = []
        for i in range(spec.count):
            index = spec.first_index + i
            name = self._name(spec, rack, index, path)
            row = rows[i] if rows else None
            try:
                ip = ipv4_plus(spec.first_ip, i)
            except ValueError as exc:
                self.problem((*path, "first_ip"), str(exc))
                return nodes
            bmc = self._bmc(spec, first_bmc, i, row, path, name)
            mac = row.provisioning_mac if row else self._mac(spec, i, path)
            if name is None or bmc is None or mac is None:
                continue
            given: frozenset[str] = frozenset()
            if row is not None:
                given = frozenset(
                    attr
                    for attr, value in (
                        ("mac", True),
                        ("serial", row.serial),
                        ("bmc_mac", row.bmc_mac),
                        ("bmc", first_bmc is None and row.bmc_address),
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

    def _name(self, spec: NodeRange, rack: Rack, index: int, path: PathKey) -> str | None:
        text = spec.name.format(index=index, rack=rack.name)
        try:
            return check_name(text)
        except ValueError as exc:
            self.problem((*path, "name"), f"index {index}: {exc}")
            return None

    def _mac(self, spec: NodeRange, i: int, path: PathKey) -> str | None:
        assert spec.first_mac is not None
        try:
            return mac_plus(spec.first_mac, i)
        except ValueError as exc:
            self.problem((*path, "first_mac"), str(exc))
            return None

    def _bmc(
        self,
        spec: NodeRange,
        first: BmcEndpoint | None,
        i: int,
        row: ManifestRow | None,
        path: PathKey,
        name: str | None,
    ) -> BmcEndpoint | None:
        counted: BmcEndpoint | None = None
        if first is not None:
            try:
                if spec.bmc_step == "port":
                    counted = first.with_port(first.port + i)
                else:
                    counted = first.with_host(str(ipv4_plus(IPv4Address(first.host), i)))
            except ValueError as exc:
                self.problem((*path, "first_bmc"), str(exc))
                return None
        listed: BmcEndpoint | None = None
        if row is not None and row.bmc_address:
            text = row.bmc_address
            try:
                if "://" in text:
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
                (*path, "first_bmc"),
                f"{name}: no BMC address: give first_bmc or a bmc_address column in the manifest",
            )
        return found

    # ------------------------------------------------------------------ manifests

    def _rows(self, spec: NodeRange, path: PathKey) -> list[ManifestRow] | None:
        """The manifest row for each slot of the range; [] when the range has no manifest,
        None when the manifest cannot be joined."""
        if spec.manifest is None:
            return []
        manifest_path = Path(spec.manifest.path)
        if not manifest_path.is_absolute():
            manifest_path = self.base_dir / manifest_path
        key = manifest_path.resolve()
        path_text = format_path((*path, "manifest"))
        if key not in self._manifests:
            self._manifests[key] = read_manifest(
                manifest_path,
                display_name(manifest_path),
                {str(field): header for field, header in spec.manifest.columns.items()},
                path_text,
            )
            self.problems.extend(self._manifests[key][1])
        manifest, problems = self._manifests[key]
        if manifest is None:
            if not problems:
                self.problem((*path, "manifest"), "cannot read the manifest")
            return None
        if spec.manifest.join == "position":
            if len(manifest.rows) != spec.count:
                self.problem(
                    (*path, "manifest"),
                    f"the manifest {display_name(manifest_path)} has {len(manifest.rows)} "
                    f"rows but the range counts {spec.count} nodes",
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
                    f"serial {serial!r} is not in the manifest {display_name(manifest_path)}",
                )
            else:
                rows.append(row)
        return rows if len(rows) == spec.count else None
