"""The parts of an invalid spec that are valid on their own, for the cross-checks to run on.

When fields fail validation the loader still runs the checks that span the document, so one
run reports every problem. They are given only what validates by itself: each image, stack
and profile; each network; each rack, or, when a rack fails, its nodes and ranges one by one;
each node's lab faults. What failed is left out, and :class:`Gaps` says what is missing so that
no check reports a consequence of a field already reported: a rack naming a profile whose GPU
count is out of range does not also get "unknown profile".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from provisioner.spec.models import (
    BmcNetwork,
    FleetDocument,
    Image,
    Lab,
    Networks,
    NodeRange,
    NodeSpec,
    Profile,
    ProvisioningNetwork,
    Rack,
    Stack,
)
from provisioner.spec.source import PathKey
from provisioner.spec.types import check_name

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class Gaps:
    """What of a spec did not validate (nothing, for a valid one)."""

    networks: bool = False  # the provisioning network: no address-plan checks
    nodes: bool = False  # some rack, node or range: the node names known are not all
    # kind ("profile", "stack", "image") -> names written whose entry failed; None: the
    # whole section failed, so no name of that kind can be looked up.
    names: Mapping[str, frozenset[str] | None] = field(default_factory=dict)
    # a list's path -> the written index of each item kept, for lists that lost items
    kept: Mapping[PathKey, tuple[int, ...]] = field(default_factory=dict)

    def indices(self, path: PathKey, count: int) -> Sequence[int]:
        """The written index of each of the ``count`` items kept of the list at ``path``."""
        kept = self.kept.get(path)
        return range(count) if kept is None else kept

    def unknowable(self, kind: str, name: str) -> bool:
        """Whether a reference to ``name`` cannot be checked: its entry failed on its own."""
        if kind not in self.names:
            return False
        broken = self.names[kind]
        return broken is None or name in broken


NO_GAPS = Gaps()


def valid_parts(data: Mapping[Any, Any]) -> tuple[FleetDocument, Gaps]:
    """A document of the parts of ``data`` that validate, and what was left out.

    Built without validation (``model_construct``) from validated parts, it holds only what
    the cross-checks read (networks, images, stacks, profiles, racks, lab); the provisioning
    network only when it validates (``Gaps.networks`` says when it did not).
    """
    parts: dict[str, Any] = {}
    names: dict[str, frozenset[str] | None] = {}
    for kind, model in (("image", Image), ("stack", Stack), ("profile", Profile)):
        parts[f"{kind}s"], broken = _entries(data.get(f"{kind}s"), model)
        if broken is None or broken:
            names[kind] = broken
    networks = data.get("networks")
    networks = networks if isinstance(networks, dict) else {}
    provisioning = _valid(ProvisioningNetwork, networks.get("provisioning"))
    bmc = _valid(BmcNetwork, networks.get("bmc"))  # if it fails, no BMC address checks
    if provisioning is None:  # left unset: the checks read it only when Gaps.networks is off
        parts["networks"] = Networks.model_construct(bmc=bmc)  # type: ignore[call-arg]
    else:
        parts["networks"] = Networks.model_construct(provisioning=provisioning, bmc=bmc)
    kept: dict[PathKey, tuple[int, ...]] = {}
    racks = data.get("racks")
    parts["racks"] = _racks(racks, kept)
    parts["lab"] = _lab(data.get("lab"))
    gaps = Gaps(
        networks=provisioning is None,
        nodes=bool(kept) or not (isinstance(racks, list) and racks),
        names=names,
        kept=kept,
    )
    return FleetDocument.model_construct(**parts), gaps


def _valid(model: type[_M], value: object) -> _M | None:
    if value is None:
        return None
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


def _entries(value: object, model: type[_M]) -> tuple[dict[str, _M], frozenset[str] | None]:
    """The entries of a ``name: settings`` section that validate, and the names of those that
    do not (None when the section itself is unusable: absent, empty or not a mapping)."""
    if not isinstance(value, dict) or not value:
        return {}, None
    entries: dict[str, _M] = {}
    broken: set[str] = set()
    for name, settings in value.items():
        entry = _valid(model, settings)
        try:
            check_name(name)
        except ValueError:
            entry = None
        if entry is None:
            broken.add(str(name))
        else:
            entries[name] = entry
    return entries, frozenset(broken)


def _racks(value: object, kept: dict[PathKey, tuple[int, ...]]) -> tuple[Rack, ...]:
    if not isinstance(value, list):
        return ()
    racks: list[Rack] = []
    written: list[int] = []
    for r, item in enumerate(value):
        rack = _rack(item, ("racks", r), kept)
        if rack is not None:
            racks.append(rack)
            written.append(r)
    if len(racks) != len(value):
        kept[("racks",)] = tuple(written)
    return tuple(racks)


def _rack(item: object, path: PathKey, kept: dict[PathKey, tuple[int, ...]]) -> Rack | None:
    """The rack if it validates; else the rack with only its valid nodes and ranges, if that
    validates (a rack whose own fields fail is left out whole)."""
    rack = _valid(Rack, item)
    if rack is not None or not isinstance(item, dict):
        return rack
    trimmed = dict(item)
    lists: tuple[tuple[str, type[BaseModel]], ...] = (("nodes", NodeSpec), ("ranges", NodeRange))
    for key, model in lists:
        items = item.get(key)
        if not isinstance(items, list):
            continue
        good = [i for i, spec in enumerate(items) if _valid(model, spec) is not None]
        if len(good) != len(items):
            trimmed[key] = [items[i] for i in good]
            kept[(*path, key)] = tuple(good)
    return _valid(Rack, trimmed)


def _lab(value: object) -> Lab | None:
    """The lab section, or its nodes' faults that validate."""
    lab = _valid(Lab, value)
    if lab is not None or not isinstance(value, dict):
        return lab
    faults = value.get("faults")
    if not isinstance(faults, dict):
        return None
    good: dict[str, Any] = {}
    for name, items in faults.items():
        entry = _valid(Lab, {"faults": {name: items}})
        if entry is not None:
            good.update(entry.faults)
    return Lab.model_construct(faults=good)
