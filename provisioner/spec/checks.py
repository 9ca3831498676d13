"""Checks that span the whole spec, run on the fields that are valid on their own.

Each finding is a :class:`Problem` with file:line and field path; all are collected, none stops
the others. Errors make the spec invalid; warnings are printed and the spec still loads.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Mapping

from provisioner.errors import Location, Problem
from provisioner.spec.catalog import load_catalog
from provisioner.spec.fleet import Node, locate
from provisioner.spec.models import FleetDocument, driver_at_least
from provisioner.spec.partial import NO_GAPS, Gaps
from provisioner.spec.source import PathKey, SourceMap, format_path
from provisioner.spec.types import ipv4_int

_Found = dict[tuple[PathKey, str, str], list[tuple[Node, str]]]  # (place, field, reason) -> hits


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    pool = list(choices)
    lowered = {choice.lower(): choice for choice in pool}
    if word.lower() in lowered:
        return f" (did you mean {lowered[word.lower()]!r}?)"
    starts = [choice for choice in pool if choice.lower().startswith(word.lower())]
    if len(starts) == 1:
        return f" (did you mean {starts[0]!r}?)"
    close = difflib.get_close_matches(word, pool, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    if pool and len(pool) <= 8:
        return f" (known: {', '.join(sorted(pool))})"
    return ""


class Checker:
    def __init__(
        self,
        document: FleetDocument,
        source: SourceMap,
        nodes: list[Node],
        gaps: Gaps = NO_GAPS,
    ) -> None:
        self.doc = document
        self.source = source
        self.nodes = nodes
        # What failed validation: checks that would need it are left out, never guessed.
        self.gaps = gaps
        self.problems: list[Problem] = []

    # ------------------------------------------------------------------ reporting

    def at(self, path: PathKey, message: str, severity: str = "error") -> None:
        self.problems.append(
            Problem(self.source.locate(path), format_path(path), message, severity)
        )

    def at_node(self, node: Node, attribute: str, message: str) -> None:
        where, path = locate(self.source, node.origin, attribute)
        if node.origin.ordinal is not None:
            message = f"{node.name}: {message}"
        self.problems.append(Problem(where, path, message))

    def where_node(self, node: Node, attribute: str) -> Location:
        return locate(self.source, node.origin, attribute)[0]

    # ------------------------------------------------------------------ all checks

    def run(self) -> list[Problem]:
        self.references()
        self.catalog_rules()
        self.network_plan()
        self.duplicates()
        self.addresses()
        self.lab()
        return self.problems

    def references(self) -> None:
        kinds: dict[str, Mapping[str, object]] = {
            "profile": self.doc.profiles,
            "stack": self.doc.stacks,
            "image": self.doc.images,
        }
        gaps = self.gaps
        racks = self.doc.racks
        for r, rack in zip(gaps.indices(("racks",), len(racks)), racks, strict=True):
            holders: list[tuple[PathKey, object]] = [(("racks", r), rack)]
            for part, items in (("nodes", rack.nodes), ("ranges", rack.ranges)):
                written = gaps.indices(("racks", r, part), len(items))
                holders += [
                    (("racks", r, part, i), item) for i, item in zip(written, items, strict=True)
                ]
            for path, holder in holders:
                for kind, known in kinds.items():
                    name = getattr(holder, kind)
                    if name is not None and name not in known and not gaps.unknowable(kind, name):
                        self.at(
                            (*path, kind),
                            f"unknown {kind} {name!r}{did_you_mean(name, known)}",
                        )

    def catalog_rules(self) -> None:
        catalog = load_catalog()
        for name, profile in self.doc.profiles.items():
            if profile.gpu not in catalog.gpus:
                self.at(
                    ("profiles", name, "gpu"),
                    f"unknown GPU SKU {profile.gpu!r}{did_you_mean(profile.gpu, catalog.gpus)}",
                )
        for name, stack in self.doc.stacks.items():
            driver = stack.driver.version
            if stack.cuda is not None:
                needed = catalog.min_driver_for_cuda(stack.cuda)
                if needed is None:
                    known = ", ".join(catalog.cuda_min_driver)
                    self.at(
                        ("stacks", name, "cuda"),
                        f"CUDA {stack.cuda} is not in the catalog (known: {known})",
                    )
                elif not driver_at_least(driver, needed):
                    self.at(
                        ("stacks", name, "cuda"),
                        f"CUDA {stack.cuda} needs driver >= {needed}, "
                        f"but stacks.{name}.driver.version is {driver}",
                    )
            if stack.driver.kernel_modules == "open" and not driver_at_least(
                driver, catalog.open_modules_min_driver
            ):
                self.at(
                    ("stacks", name, "driver", "kernel_modules"),
                    f"driver {driver} has no open kernel modules "
                    f"(they start at {catalog.open_modules_min_driver})",
                )
        self._combinations()

    def _combinations(self) -> None:
        """Rules about a profile and a stack used together on some node."""
        catalog = load_catalog()
        pairs: dict[tuple[str, str], list[str]] = defaultdict(list)
        for node in self.nodes:
            racks = pairs[(node.profile, node.stack)]
            if node.rack not in racks:
                racks.append(node.rack)
        for (profile_name, stack_name), racks in pairs.items():
            profile = self.doc.profiles.get(profile_name)
            stack = self.doc.stacks.get(stack_name)
            if profile is None or stack is None or profile.gpu not in catalog.gpus:
                continue
            sku = catalog.gpus[profile.gpu]
            nvswitch = sku.nvswitch_default if profile.nvswitch is None else profile.nvswitch
            used = f"used together in rack{'s' if len(racks) > 1 else ''} {', '.join(racks)}"
            if nvswitch and not stack.fabric_manager:
                self.at(
                    ("stacks", stack_name, "fabric_manager"),
                    f"profile {profile_name} has NVSwitch ({profile.gpu}) but this stack does "
                    f"not enable fabric_manager; without it the GPUs cannot use NVLink ({used})",
                )
            if not nvswitch and stack.fabric_manager:
                self.at(
                    ("stacks", stack_name, "fabric_manager"),
                    f"profile {profile_name} has no NVSwitch; nvidia-fabricmanager will not "
                    f"start there ({used})",
                    severity="warning",
                )
            if (
                sku.architecture in catalog.open_modules_only
                and stack.driver.kernel_modules != "open"
            ):
                self.at(
                    ("stacks", stack_name, "driver", "kernel_modules"),
                    f"{profile.gpu} ({sku.architecture}) supports only the open kernel modules, "
                    f"but this stack uses {stack.driver.kernel_modules} (profile "
                    f"{profile_name}, {used})",
                )

    def network_plan(self) -> None:
        net = None if self.gaps.networks else self.doc.networks.provisioning
        base: PathKey = ("networks", "provisioning")
        if net is not None and net.gateway not in net.cidr:
            self.at((*base, "gateway"), f"gateway {net.gateway} is outside {net.cidr}")
        if net is not None and net.dhcp_range is not None:
            for end in ("start", "end"):
                address = getattr(net.dhcp_range, end)
                if address not in net.cidr:
                    self.at((*base, "dhcp_range", end), f"{address} is outside {net.cidr}")
            if net.gateway in net.dhcp_range:
                self.at((*base, "dhcp_range"), f"the gateway {net.gateway} is inside the range")
        bmc = self.doc.networks.bmc
        if bmc is not None and bmc.gateway is not None and bmc.gateway not in bmc.cidr:
            self.at(("networks", "bmc", "gateway"), f"gateway {bmc.gateway} is outside {bmc.cidr}")

    def addresses(self) -> None:
        found: _Found = defaultdict(list)
        if not self.gaps.networks:
            self._provisioning_addresses(found)
        self._bmc_addresses(found)
        for (_, attribute, problem), hits in found.items():
            self._address_problem(attribute, problem, hits)

    # Integer comparisons below: they run once per node, for fleets of tens of thousands.

    def _provisioning_addresses(self, found: _Found) -> None:
        net = self.doc.networks.provisioning
        low, high = int(net.cidr.network_address), int(net.cidr.broadcast_address)
        gateway = int(net.gateway)
        pool = net.dhcp_range
        pool_low, pool_high = (int(pool.start), int(pool.end)) if pool else (1, 0)
        pool_text = f"{pool.start}-{pool.end}" if pool else ""
        for node in self.nodes:
            ip = int(node.ip)
            reason = None
            if not low <= ip <= high:
                reason = f"outside the provisioning network {net.cidr}"
            elif ip == low and net.cidr.prefixlen < 31:
                reason = "the network address"
            elif ip == high and net.cidr.prefixlen < 31:
                reason = "the broadcast address"
            elif ip == gateway:
                reason = "the gateway's address"
            elif pool_low <= ip <= pool_high:
                reason = f"inside the DHCP dynamic range {pool_text}"
            if reason is not None:
                found[(node.origin.path, "ip", reason)].append((node, str(node.ip)))

    def _bmc_addresses(self, found: _Found) -> None:
        """BMC addresses (not host names) inside the BMC network, and none of its network,
        broadcast or gateway address."""
        net = self.doc.networks.bmc
        if net is None:
            return
        low, high = int(net.cidr.network_address), int(net.cidr.broadcast_address)
        taken: dict[int, str] = {}
        if net.cidr.prefixlen < 31:
            taken[low] = f"the network address of the BMC network {net.cidr}"
            taken[high] = f"the broadcast address of the BMC network {net.cidr}"
        if net.gateway is not None:
            taken.setdefault(int(net.gateway), "the BMC network's gateway address")
        outside = f"outside the BMC network {net.cidr}"
        for node in self.nodes:
            ip = ipv4_int(node.bmc.host)
            if ip is None:
                continue
            reason = outside if not low <= ip <= high else taken.get(ip)
            if reason is not None:
                found[(node.origin.path, "bmc", reason)].append((node, node.bmc.host))

    def _address_problem(self, attribute: str, reason: str, hits: list[tuple[Node, str]]) -> None:
        """One problem per written place: a range whose addresses all miss the network
        is one mistake, said once, not once per node."""
        node, shown = hits[0]
        label = "BMC " if attribute == "bmc" else ""
        if len(hits) == 1:
            self.at_node(node, attribute, f"{label}{shown} is {reason}")
            return
        last, last_shown = hits[-1]
        where, path = locate(self.source, node.origin, attribute)
        self.problems.append(
            Problem(
                where,
                path,
                f"{len(hits)} nodes ({node.name} {label}{shown} .. {last.name} {last_shown}) "
                f"are {reason}",
            )
        )

    def duplicates(self) -> None:
        kinds = ("node name", "IP", "MAC", "BMC endpoint", "serial")
        seen: dict[str, dict[object, tuple[Node, str]]] = {kind: {} for kind in kinds}
        names, ips, macs, bmcs, serials = (seen[kind] for kind in kinds)
        clashes: list[tuple[str, object, Node, str]] = []
        for node in self.nodes:
            claims = [
                (names, "node name", node.name, "name"),
                (ips, "IP", node.ip, "ip"),
                (macs, "MAC", node.mac, "mac"),
                (bmcs, "BMC endpoint", node.bmc.key, "bmc"),
            ]
            if node.bmc_mac is not None:
                claims.append((macs, "MAC", node.bmc_mac, "bmc_mac"))
            if node.serial:
                claims.append((serials, "serial", node.serial, "serial"))
            for table, kind, value, attribute in claims:
                first = table.setdefault(value, (node, attribute))
                if first[0] is not node or first[1] != attribute:
                    clashes.append((kind, value, node, attribute))
        for kind, value, node, attribute in clashes:
            other, other_attr = seen[kind][value]
            where = self.where_node(other, other_attr)
            if where.file == self.where_node(node, attribute).file:
                where = Location("", where.line)
            shown = value if kind != "BMC endpoint" else node.bmc.url
            if kind == "node name":
                message = f"duplicate node name {shown} (also at {_short(where)})"
            else:
                message = f"duplicate {kind} {shown}: also {other.name}'s ({_short(where)})"
            self.at_node(node, attribute, message)

    def lab(self) -> None:
        if self.doc.lab is None:
            return
        names = {node.name: node for node in self.nodes}
        for name, faults in self.doc.lab.faults.items():
            node = names.get(name)
            if node is None and self.gaps.nodes:
                continue  # it may be one of the nodes that failed validation
            if node is None:
                self.at(
                    ("lab", "faults", name), f"unknown node {name!r}{did_you_mean(name, names)}"
                )
                continue
            gpus = self.doc.profiles[node.profile].gpus if node.profile in self.doc.profiles else 0
            for f, fault in enumerate(faults):
                if gpus and fault.gpu >= gpus and not fault.node_level:
                    self.at(
                        ("lab", "faults", name, f, "gpu"),
                        f"GPU {fault.gpu} does not exist: {name} has {gpus} GPUs (0-{gpus - 1})",
                    )


def _short(where: Location) -> str:
    return f"line {where.line}" if not where.file else str(where)
