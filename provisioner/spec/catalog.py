"""The GPU catalog (``catalog.yaml``): SKUs with their peaks, and the CUDA/driver rules."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from provisioner.spec.types import version_tuple

Architecture = Literal["ampere", "ada", "hopper", "blackwell"]


class SkuFloors(BaseModel):
    """Burn-in floors of a SKU (sources in catalog.yaml); None: reported, not judged."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gemm_tflops: float
    hbm_gbps: float
    h2d_gbps: float
    d2h_gbps: float
    allreduce_busbw_gbps: float | None
    max_temperature_c: float


class BurninRules(BaseModel):
    """Burn-in rules for every SKU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    straggler_fraction: float = Field(gt=0, lt=1)
    pcie_replays_max: int = Field(ge=0)


class GpuSku(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    architecture: Architecture
    memory_gb: float
    bf16_dense_tflops: float
    hbm_tbps: float
    pcie_gen: int
    nvlink_links: int
    nvswitch_default: bool
    nvml_names: tuple[str, ...]
    burnin: SkuFloors


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: dict[str, GpuSku]
    open_modules_only: tuple[Architecture, ...]
    open_modules_min_driver: str
    cuda_min_driver: dict[str, str]
    burnin: BurninRules

    def min_driver_for_cuda(self, cuda: str) -> str | None:
        """The minimum driver for a CUDA version ("12.8" or "12.8.1"), or None if unknown."""
        major_minor = ".".join(cuda.split(".")[:2])
        return self.cuda_min_driver.get(major_minor)

    def driver_supports_cuda(self, driver: str, cuda: str) -> bool:
        needed = self.min_driver_for_cuda(cuda)
        return needed is not None and version_tuple(driver) >= version_tuple(needed)


@cache
def load_catalog() -> Catalog:
    text = resources.files("provisioner.spec").joinpath("catalog.yaml").read_text("utf-8")
    return Catalog.model_validate(yaml.safe_load(text))
