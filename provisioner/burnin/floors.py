"""What a node is held to in burn-in: the floors of its GPU SKU and what its spec promises.

Floors come from the catalog (``catalog.yaml``, ``burnin`` of each SKU, with their sources);
a profile's ``burnin.floors`` overrides them field by field. The :class:`Expectation` adds
what the spec says the node is: how many GPUs of which model, which driver, how many NVLink
links per GPU (NVSwitch profiles), whether its stack installs DCGM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from provisioner.burnin.document import Level
from provisioner.spec import Fleet, Node
from provisioner.spec.catalog import load_catalog
from provisioner.spec.models import BurninFloors

# Figures a floor applies to, in report order, with their units.
FIGURES: dict[str, str] = {
    "gemm_tflops": "TFLOPS",
    "hbm_gbps": "GB/s",
    "h2d_gbps": "GB/s",
    "d2h_gbps": "GB/s",
    "allreduce_busbw_gbps": "GB/s",
    "max_temperature_c": "°C",
}


@dataclass(frozen=True, slots=True)
class Floors:
    """Per-GPU floors (``allreduce_busbw_gbps`` is per node; ``max_temperature_c`` is a
    ceiling); None: the figure is reported, not judged."""

    gemm_tflops: float | None
    hbm_gbps: float | None
    h2d_gbps: float | None
    d2h_gbps: float | None
    allreduce_busbw_gbps: float | None
    max_temperature_c: float | None
    straggler_fraction: float = 0.9
    pcie_replays_max: int = 80

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Floors:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the spec promises about one node; ``None`` fields are not checked."""

    gpu_count: int
    nvml_names: tuple[str, ...]
    driver_version: str | None
    nvlink_links: int | None  # per GPU, NVSwitch profiles only
    pcie_gen: int | None
    floors: Floors
    dcgm: bool = True  # the stack installs DCGM: its diagnostic is expected
    level: Level | None = None  # the level asked for (None: the document's)


def catalog_floors(sku: str) -> Floors:
    """The catalog's floors for the GPU SKU ``sku`` (a catalog key, e.g. H100-SXM5-80GB)."""
    catalog = load_catalog()
    try:
        own = catalog.gpus[sku].burnin
    except KeyError:
        raise KeyError(f"no GPU SKU {sku!r} in the catalog") from None
    return Floors(
        **own.model_dump(),
        straggler_fraction=catalog.burnin.straggler_fraction,
        pcie_replays_max=catalog.burnin.pcie_replays_max,
    )


def with_overrides(floors: Floors, overrides: BurninFloors) -> Floors:
    """``floors`` with each field the profile sets replaced by the profile's value."""
    chosen = {name: value for name, value in overrides.model_dump().items() if value is not None}
    return replace(floors, **chosen)


def floors_for(fleet: Fleet, node: Node) -> Floors:
    """The floors ``node`` is held to: its SKU's, overridden by its profile's."""
    profile = fleet.profile(node)
    return with_overrides(catalog_floors(profile.gpu), profile.burnin.floors)


def expectation_for(fleet: Fleet, node: Node, level: Level | None = None) -> Expectation:
    """What the spec promises about ``node`` (``level``: the one asked for, else the
    profile's)."""
    profile = fleet.profile(node)
    sku = fleet.sku(profile)
    stack = fleet.stack(node)
    return Expectation(
        gpu_count=profile.gpus,
        nvml_names=sku.nvml_names,
        driver_version=stack.driver.version,
        nvlink_links=sku.nvlink_links if fleet.nvswitch(profile) and sku.nvlink_links else None,
        pcie_gen=sku.pcie_gen,
        floors=floors_for(fleet, node),
        dcgm=stack.dcgm is not None,
        level=level or profile.burnin.level,
    )
