"""A validated fleet: the document plus its expanded, concrete nodes.

``Fleet`` is what every other layer consumes. Nodes are plain frozen dataclasses (a fleet may
hold tens of thousands); each remembers where it was written so a later check can still point
at file:line.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address
from pathlib import Path

from provisioner.errors import Location, Problem
from provisioner.spec.catalog import GpuSku, load_catalog
from provisioner.spec.models import FleetDocument, Image, Profile, Stack
from provisioner.spec.source import PathKey, SourceMap, format_path
from provisioner.spec.types import BmcEndpoint, SecretRef

# Which range field a node's value came from, when it came from a range.
_RANGE_FIELD = {"name": "name", "ip": "first_ip", "mac": "first_mac", "bmc": "first_bmc"}
_MANIFEST_FIELD = {
    "mac": "provisioning_mac",
    "bmc": "bmc_address",
    "serial": "serial",
    "bmc_mac": "bmc_mac",
}


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a node was written: a listed node (``ordinal`` None) or the n-th of a range."""

    path: PathKey  # ("racks", 0, "nodes", 2) or ("racks", 0, "ranges", 1)
    ordinal: int | None = None
    row: Location | None = None  # the vendor manifest row, if any
    from_manifest: frozenset[str] = frozenset()  # node fields whose value the row gave


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    rack: str
    ip: IPv4Address
    mac: str
    bmc: BmcEndpoint
    profile: str
    stack: str
    image: str
    serial: str | None
    bmc_mac: str | None
    origin: Origin


@dataclass(frozen=True)
class Fleet:
    document: FleetDocument
    nodes: tuple[Node, ...]
    source: SourceMap
    spec_path: Path
    warnings: tuple[Problem, ...] = field(default=())

    # ------------------------------------------------------------------ lookups

    @property
    def base_dir(self) -> Path:
        return self.spec_path.parent

    @cached_property
    def by_name(self) -> dict[str, Node]:
        return {node.name: node for node in self.nodes}

    def profile(self, node: Node) -> Profile:
        return self.document.profiles[node.profile]

    def stack(self, node: Node) -> Stack:
        return self.document.stacks[node.stack]

    def image(self, node: Node) -> Image:
        return self.document.images[node.image]

    def sku(self, profile: Profile) -> GpuSku:
        return load_catalog().gpus[profile.gpu]

    def nvswitch(self, profile: Profile) -> bool:
        if profile.nvswitch is not None:
            return profile.nvswitch
        return self.sku(profile).nvswitch_default

    @cached_property
    def _rack_credentials(self) -> dict[str, tuple[str, SecretRef]]:
        return {
            rack.name: (rack.bmc.username, rack.bmc.password)
            for rack in self.document.racks
            if rack.bmc is not None
        }

    def bmc_credentials(self, node: Node) -> tuple[str, SecretRef]:
        """The username and password *reference* for a node's BMC (rack override first)."""
        fleet_wide = (self.document.bmc.username, self.document.bmc.password)
        return self._rack_credentials.get(node.rack, fleet_wide)

    def select(
        self, racks: Iterable[str] | None = None, patterns: Sequence[str] | None = None
    ) -> list[Node]:
        """Nodes in the given racks whose names match any glob (all when not given)."""
        wanted_racks = set(racks) if racks else None
        chosen = []
        for node in self.nodes:
            if wanted_racks is not None and node.rack not in wanted_racks:
                continue
            if patterns and not any(fnmatch.fnmatchcase(node.name, p) for p in patterns):
                continue
            chosen.append(node)
        return chosen

    # ------------------------------------------------------------------ positions

    def locate(self, node: Node, attribute: str) -> tuple[Location, str]:
        """Where ``node``'s ``attribute`` was written, as (file:line, field path)."""
        return locate(self.source, node.origin, attribute)


def locate(source: SourceMap, origin: Origin, attribute: str) -> tuple[Location, str]:
    base = origin.path
    if origin.row is not None and attribute in origin.from_manifest:
        return origin.row, format_path((*base, "manifest", _MANIFEST_FIELD[attribute]))
    if attribute in ("profile", "stack", "image"):
        path: PathKey = (*base, attribute)
        if source.exact(path) is None:
            path = (*base[:2], attribute)  # inherited from the rack
    elif origin.ordinal is None:
        path = (*base, attribute)
    else:
        path = (*base, _RANGE_FIELD.get(attribute, attribute))
    return source.locate(path), format_path(path)
