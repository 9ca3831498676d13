"""The controller's judgement of one node: a :class:`Check` per check (and GPU), the measured
figures, the floors used, and the node's verdict (``ready`` unless a check fails).

Pure data with a dict form (``as_dict`` / ``from_dict``): ``burnin run`` saves the verdicts
in the results folder's ``report.json`` so reports can be made again without the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from provisioner.burnin.floors import Floors

READY = "ready"
QUARANTINED = "quarantined"


class Verdict(StrEnum):
    PASS = "pass"  # noqa: S105 - a verdict, not a password
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


# Check ids, in report order (stable: JUnit test names and Prometheus labels use them).
CHECK_IDS: tuple[str, ...] = (
    "inventory.gpu_count",
    "inventory.gpu_model",
    "inventory.driver_version",
    "ecc.mode",
    "ecc.uncorrectable",
    "memory.row_remap",
    "memory.retired_pages",
    "pcie.link",
    "pcie.replay",
    "nvlink.links",
    "nvlink.errors",
    "xid",
    "thermal.clock_events",
    "thermal.temperature",
    "compute.gemm",
    "compute.sdc",
    "compute.straggler",
    "bandwidth.hbm",
    "bandwidth.h2d",
    "bandwidth.d2h",
    "collectives.allreduce",
    "dcgm.diag",
    "agent.errors",
)
_ORDER = {check: position for position, check in enumerate(CHECK_IDS)}


@dataclass(frozen=True, slots=True)
class Check:
    """One check's outcome on a node (``gpu`` None) or on one of its GPUs."""

    id: str
    verdict: Verdict
    reason: str
    gpu: int | None = None
    value: float | str | None = None
    floor: float | None = None
    unit: str = ""

    @property
    def name(self) -> str:
        """``compute.gemm[gpu 3]``, or the id for a node check."""
        return self.id if self.gpu is None else f"{self.id}[gpu {self.gpu}]"

    def sort_key(self) -> tuple[int, int]:
        return (_ORDER.get(self.id, len(_ORDER)), -1 if self.gpu is None else self.gpu)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "gpu": self.gpu,
            "verdict": str(self.verdict),
            "reason": self.reason,
            "value": self.value,
            "floor": self.floor,
            "unit": self.unit,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Check:
        return cls(
            id=str(data["id"]),
            verdict=Verdict(data["verdict"]),
            reason=str(data["reason"]),
            gpu=data.get("gpu"),
            value=data.get("value"),
            floor=data.get("floor"),
            unit=str(data.get("unit") or ""),
        )


@dataclass(frozen=True, slots=True)
class GpuFigures:
    """What one GPU measured (None: not measured) and who it is."""

    index: int
    name: str
    uuid: str
    serial: str | None
    pci_bus_id: str
    gemm_tflops: float | None = None
    hbm_gbps: float | None = None
    h2d_gbps: float | None = None
    d2h_gbps: float | None = None
    max_temperature_c: float | None = None
    max_power_w: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GpuFigures:
        known: dict[str, Any] = {name: data.get(name) for name in cls.__slots__}
        return cls(**known)


@dataclass(frozen=True, slots=True)
class NodeVerdict:
    """A node's burn-in result as judged by the controller."""

    node: str
    level: str
    backend: str
    started: str
    finished: str
    duration_s: float
    driver_version: str | None
    floors: Floors
    checks: tuple[Check, ...]
    gpus: tuple[GpuFigures, ...] = ()
    allreduce_busbw_gbps: float | None = None
    allreduce_gpus: int | None = None
    source: str | None = field(default=None, compare=False)  # the agent document's file

    @property
    def verdict(self) -> str:
        return QUARANTINED if self.failing else READY

    @property
    def ready(self) -> bool:
        return not self.failing

    @property
    def failing(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.verdict is Verdict.FAIL)

    @property
    def warnings(self) -> tuple[Check, ...]:
        return tuple(check for check in self.checks if check.verdict is Verdict.WARN)

    def counts(self) -> dict[str, int]:
        """How many checks ended in each verdict."""
        tally = dict.fromkeys((str(v) for v in Verdict), 0)
        for check in self.checks:
            tally[str(check.verdict)] += 1
        return tally

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "verdict": self.verdict,
            "level": self.level,
            "backend": self.backend,
            "started": self.started,
            "finished": self.finished,
            "duration_s": self.duration_s,
            "driver_version": self.driver_version,
            "counts": self.counts(),
            "failing": [check.name for check in self.failing],
            "floors": self.floors.as_dict(),
            "gpus": [gpu.as_dict() for gpu in self.gpus],
            "allreduce_busbw_gbps": self.allreduce_busbw_gbps,
            "allreduce_gpus": self.allreduce_gpus,
            "checks": [check.as_dict() for check in self.checks],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeVerdict:
        return cls(
            node=str(data["node"]),
            level=str(data["level"]),
            backend=str(data["backend"]),
            started=str(data["started"]),
            finished=str(data["finished"]),
            duration_s=float(data["duration_s"]),
            driver_version=data.get("driver_version"),
            floors=Floors.from_dict(data["floors"]),
            checks=tuple(Check.from_dict(item) for item in data["checks"]),
            gpus=tuple(GpuFigures.from_dict(item) for item in data.get("gpus") or ()),
            allreduce_busbw_gbps=data.get("allreduce_busbw_gbps"),
            allreduce_gpus=data.get("allreduce_gpus"),
            source=data.get("source"),
        )


def number(value: float) -> str:
    """A figure as people read it: 600, 474.6, 2981, 13.1."""
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}"
