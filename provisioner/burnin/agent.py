#!/usr/bin/env python3
"""Burn-in agent: measures one GPU node and prints one JSON document. It does not judge.

It is copied to a node and run there with the node's own interpreter::

    python3 -I agent.py [--level quick|standard|extended] [--backend auto|nvml|smi|lab]
                        [--gpus-file PATH] [--out FILE] [--node NAME] [--expected-gpus N]
                        [--gemm-n N] [--gemm-seconds S]

Python >= 3.10 and the standard library only; it imports nothing of ``provisioner`` (the
controller, ``provisioner.burnin``, judges the document against floors). Found at run time
when present: ``pynvml`` (nvidia-ml-py), ``torch`` or ``cupy`` with CUDA, and on PATH
``nvidia-smi``, ``dcgmi``, ``all_reduce_perf`` (nccl-tests), ``journalctl`` or ``dmesg``.

Backends (``--backend``; ``auto`` tries nvml, then lab if its GPU file exists, then smi;
``errors`` says why the ones before could not run only when none could):

- ``nvml``: the node's GPUs through NVML (pynvml). Every call is guarded: a failing call
  records an error for its field and the run goes on.
- ``smi``: the same facts from ``nvidia-smi --query-gpu`` (CSV) when pynvml is not installed.
- ``lab``: the embedded lab's SIMULATED GPUs -- fake hardware for the lab only. It reads the
  lab's GPU document (``--gpus-file``, else ``$PROVISIONER_LAB_GPUS``, else
  ``/run/provisioner-lab/gpus.json``) and "measures" it with the lab's model (the ``LAB_*``
  constants below), so that an injected fault shows where it would on real hardware.

With nvml and smi, the stress and bandwidth checks use torch (else cupy) on every GPU at once
while another thread samples PCIe link, clock event reasons, temperature and power; without
either they are listed in ``skipped``. ``dcgmi diag -r N -j`` runs whenever ``dcgmi`` is on
PATH, whatever the backend (the lab installs a stand-in).

Exit status: 0 a document was produced, whatever the GPUs' health; 1 ``--out`` could not be
written; 2 bad arguments; 3 no backend could run (a document with ``errors`` still printed).

Levels (budgets; the durations are the ``PLANS`` parameters): ``quick`` <= 2 min (GEMM 15 s,
DCGM level 1), ``standard`` <= 15 min (GEMM 5 min, DCGM level 2), ``extended`` longer (GEMM
30 min, DCGM level 3).

The document, schema ``provisioner-burnin/1`` (a versioned interface: fields may be added,
never renamed or retyped without a new schema). ``null`` means "not measured or not
supported here"; why is in ``skipped`` or ``errors``::

    schema          "provisioner-burnin/1"
    agent_version   "1.0"
    node            --node, else the host name
    backend         "nvml" | "smi" | "lab"; null only with exit status 3
    level           "quick" | "standard" | "extended"
    expected_gpus   --expected-gpus, else null (recorded for the controller, not judged)
    started, finished   ISO-8601 UTC, "2026-11-22T08:00:00Z"
    duration_s      float seconds
    host
      hostname      str
      kernel        str (uname -r)
      driver_version        str | null  (NVIDIA driver, e.g. "570.133.20")
      cuda_driver_version   str | null  (the CUDA version the driver supports, e.g. "12.8")
      tools         {"torch", "cupy", "pynvml", "dcgmi": version | null,
                     "all_reduce_perf": its path on PATH | null (it has no version flag)}
    gpus[]          the GPUs the driver sees, by index (a GPU off the bus is absent)
      index         int (NVML / nvidia-smi index; the lab keeps its own indexes)
      name, uuid    str
      serial        str | null
      pci_bus_id    str, "00000000:18:00.0"
      memory_mib    int | null
      persistence_mode  bool | null
      ecc           {"mode": bool | null (current ECC mode),
                     "volatile_corrected", "volatile_uncorrectable",
                     "aggregate_corrected", "aggregate_uncorrectable": int | null}
      row_remap     {"correctable": int, "uncorrectable": int, "pending": bool,
                     "failure": bool} | null (null: no row remapper, before Ampere)
      retired_pages {"single_bit": int, "double_bit": int, "pending": bool} | null
                    (before Ampere only)
      pcie          {"max_gen", "max_width": int | null (what GPU and slot allow),
                     "gen", "width": int | null (the best seen while sampled),
                     "under_load": bool (true: gen/width were sampled during the GEMM
                     stress; false: read at idle, where links downshift),
                     "replay_delta": int | null (PCIe replays during the stress)}
      nvlink        {"links_up": int | null, "links_down": [int] (link numbers),
                     "error_delta": int | null (replay+recovery+CRC errors during stress)}
      thermal       {"max_temperature_c": float | null, "max_power_w": float | null,
                     "clock_events": [str] (clock event reasons seen, OR-ed over samples:
                     hw_slowdown 0x8, sw_thermal 0x20, hw_thermal 0x40, power_brake 0x80;
                     informational: gpu_idle 0x1, applications_clocks_setting 0x2,
                     sw_power_cap 0x4, sync_boost 0x10, display_clock_setting 0x100)}
      gemm          {"dtype": "bf16" | "fp16", "n": int, "tflops": float,
                     "iterations": int, "sdc_repeats": int (results compared with the
                     first), "sdc_mismatches": int, "max_abs_diff": float} | null
      hbm           {"gbps": float} | null   (device-to-device copy, bytes read + written)
      h2d, d2h      {"gbps": float} | null   (pinned host memory, one GPU at a time)
    xid             {"source": "journalctl" | "dmesg" | "lab" | null,
                     "events": [{"xid": int, "pci": str ("0000:9a:00", as the log says),
                                 "gpu": int | null (a visible GPU's index), "line": str}]}
    nccl            {"tool": "all_reduce_perf" | "torch" | "lab", "gpus": int,
                     "busbw_gbps": float (all_reduce_perf: its "Avg bus bandwidth"),
                     "bytes": int (message size), "max_busbw_gbps": float | null,
                     "wrong": int | null (all_reduce_perf's #wrong)}
                    | null (skipped: fewer than 2 GPUs or no tool; or failed: see errors)
    dcgm            {"version": str | null, "level": int, "exit_code": int,
                     "results": [{"category": str, "test": str,
                                  "gpu": int | null (null: the whole node, as 3.x's
                                                     software tests, or not a GPU),
                                  "status": "pass" | "fail" | "warn" | "skip" (a
                                            status not known here: "warn", info says),
                                  "info": str (DCGM's warnings then info, "; "-joined)}]}
                    | null (dcgmi not on PATH, or its output unreadable: see errors)
    skipped         [{"check": "gemm" | "hbm" | "h2d" | "d2h" | "nccl" | "dcgm", "reason": str}]
                    (reasons: the NO_ENGINE, NO_COLLECTIVE_TOOL, TOO_FEW_GPUS, NO_DCGMI texts)
    errors          [{"check": str, "message": str}] (a call that failed; never a verdict)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

SCHEMA = "provisioner-burnin/1"
AGENT_VERSION = "1.0"
EXIT_OK, EXIT_NO_OUTPUT, EXIT_USAGE, EXIT_NO_BACKEND = 0, 1, 2, 3
LEVELS = ("quick", "standard", "extended")
BACKENDS = ("auto", "nvml", "smi", "lab")
MIB = 1 << 20
GIB = 1 << 30
T = TypeVar("T")

# Reasons in ``skipped`` (the controller may match on them).
NO_ENGINE = "neither torch nor cupy with CUDA is installed"
NO_COLLECTIVE_TOOL = "neither all_reduce_perf nor torch with CUDA is installed"
TOO_FEW_GPUS = "fewer than 2 GPUs"
NO_DCGMI = "dcgmi is not on PATH"

# NVML's clock event reason bits (nvml.h, nvmlClocksEventReason*; formerly ThrottleReason*).
CLOCK_EVENTS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal"),
    (0x40, "hw_thermal"),
    (0x80, "power_brake"),
    (0x100, "display_clock_setting"),
)
# gpu-burn's silent-data-corruption rule: a repeat differs from the first result by more than
# this share of the result's magnitude.
SDC_REL_TOL = 1e-3
# PCIe transfer rate per lane by generation, GT/s (gen 3 on: 128b/130b, so rate ~ bandwidth).
PCIE_GT_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}


@dataclass(frozen=True)
class Plan:
    """What one level runs: sizes, repeats and durations of every check, and time limits."""

    level: str
    gemm_seconds: float  # the GEMM stress (and the sampling under it) lasts this long
    dcgm_level: int  # dcgmi diag -r
    dcgm_timeout: float
    nccl_timeout: float
    gemm_n: int = 8192
    gemm_batch: int = 50  # matmuls timed together; the last one is compared with the first
    gemm_warmup: int = 5
    hbm_bytes: int = 2 * GIB
    hbm_iterations: int = 20
    pcie_bytes: int = GIB
    pcie_iterations: int = 10
    nccl_bytes: int = GIB
    nccl_iterations: int = 20
    sample_interval: float = 0.5


PLANS = {
    "quick": Plan("quick", gemm_seconds=15.0, dcgm_level=1, dcgm_timeout=180.0, nccl_timeout=120.0),
    "standard": Plan(
        "standard", gemm_seconds=300.0, dcgm_level=2, dcgm_timeout=900.0, nccl_timeout=300.0,
        hbm_bytes=8 * GIB, hbm_iterations=100, pcie_iterations=40, nccl_bytes=4 * GIB,
        nccl_iterations=50,
    ),
    "extended": Plan(
        "extended", gemm_seconds=1800.0, dcgm_level=3, dcgm_timeout=3600.0, nccl_timeout=900.0,
        hbm_bytes=8 * GIB, hbm_iterations=400, pcie_iterations=100, nccl_bytes=8 * GIB,
        nccl_iterations=100,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------- the lab's model
# The lab's GPUs are SIMULATED (fake hardware for the lab only). These constants are the model
# its "measurements" follow: healthy values from GPU-FACTS (public figures), faults applied.
LAB_GPUS_FILE = "/run/provisioner-lab/gpus.json"
LAB_GPUS_ENV = "PROVISIONER_LAB_GPUS"
LAB_GPUS_SCHEMA = "provisioner-lab-gpus/1"
LAB_DRIVER_VERSION_FILE = "/usr/share/provisioner-lab/driver-version"
LAB_GEMM_EFFICIENCY = 0.80  # max-achievable matmul ~80 % of bf16 dense peak (798/989 on H100)
LAB_JITTER = 0.005  # deterministic per-GPU spread of the measured values, +-0.5 %
LAB_HBM_EFFICIENCY = 0.89  # D2D copy ~3.0 of 3.35 TB/s on H100
LAB_PCIE_GEN5_X16_GBPS = 53.0  # H2D/D2H per direction on Gen5 x16 (Azure sees 52-55)
LAB_ALLREDUCE_BUSBW_GBPS = 370.0  # NVLink4 8-GPU ring all-reduce bus bandwidth
LAB_NVLINK_DOWN_FACTOR = 0.5  # all-reduce bus bandwidth when any GPU has a link down
LAB_PCIE_ALLREDUCE_BUSBW_GBPS = 20.0  # all-reduce over PCIe when the GPUs have no NVLink
LAB_MAX_TEMPERATURE_C = 67.0
LAB_MAX_POWER_W = 680.0
LAB_SDC_MISMATCH_SHARE = 0.25  # share of the repeats a corrupting GPU gets wrong
LAB_SDC_MAX_ABS_DIFF = 0.125


# --------------------------------------------------------------------------- the run's record


class Report:
    """The run's ``errors`` and ``skipped`` lists; safe to add to from several threads."""

    def __init__(self) -> None:
        self.errors: list[dict[str, str]] = []
        self.skipped: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def error(self, check: str, message: str) -> None:
        """Record a failed call once (a sampler repeating it adds nothing)."""
        self._add(self.errors, {"check": check, "message": message.strip()})

    def skip(self, check: str, reason: str) -> None:
        self._add(self.skipped, {"check": check, "reason": reason})

    def _add(self, entries: list[dict[str, str]], entry: dict[str, str]) -> None:
        with self._lock:
            if entry not in entries:
                entries.append(entry)


def guarded(report: Report, check: str, step: Callable[[], T]) -> T | None:
    """``step()``, or None after recording why it failed: one check never ends the run."""
    try:
        return step()
    except Exception as exc:  # anything a driver, library or tool throws at us
        report.error(check, f"{type(exc).__name__}: {exc}")
        return None


@dataclass(frozen=True)
class Ran:
    """A finished tool: exit status and output (124 timed out, 126/127 could not start)."""

    rc: int
    out: str
    err: str


def run_tool(argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> Ran:
    """Run a tool without a shell; never raises."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        return Ran(127, "", str(exc))
    except subprocess.TimeoutExpired as exc:
        return Ran(124, _text(exc.stdout) or "", f"{argv[0]} timed out after {timeout:g} s")
    except OSError as exc:
        return Ran(126, "", str(exc))
    return Ran(done.returncode, done.stdout, done.stderr)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def iso_utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# --------------------------------------------------------------------------- pure arithmetic


def tflops(n: int, iterations: int, seconds: float) -> float:
    """Square GEMM throughput: 2 n^3 floating-point operations per product."""
    if seconds <= 0:
        raise ValueError("GEMM time must be positive")
    return 2.0 * n**3 * iterations / seconds / 1e12


def gbps(bytes_per_iteration: int, iterations: int, seconds: float) -> float:
    """Bandwidth in GB/s (10^9 bytes per second)."""
    if seconds <= 0:
        raise ValueError("copy time must be positive")
    return bytes_per_iteration * iterations / seconds / 1e9


def busbw(algbw: float, ranks: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: algbw x 2(n-1)/n."""
    if ranks < 1:
        raise ValueError("an all-reduce needs at least one rank")
    return algbw * 2.0 * (ranks - 1) / ranks


def is_mismatch(abs_diff: float, scale: float, rel_tol: float = SDC_REL_TOL) -> bool:
    """A repeat differs from the first result beyond tolerance (NaN counts as a mismatch)."""
    return not abs_diff <= rel_tol * abs(scale)


@dataclass
class SdcTally:
    """gpu-burn's check: each repeat's max |difference| from the first result, counted."""

    scale: float  # max |first result|, the magnitude the tolerance is relative to
    repeats: int = 0
    mismatches: int = 0
    max_abs_diff: float = 0.0

    def add(self, abs_diff: float) -> None:
        self.repeats += 1
        if abs_diff == abs_diff:  # not NaN
            self.max_abs_diff = max(self.max_abs_diff, abs_diff)
        if is_mismatch(abs_diff, self.scale):
            self.mismatches += 1


def decode_clock_events(mask: int) -> list[str]:
    """Names of the clock event reason bits set in ``mask``, lowest bit first."""
    return [name for bit, name in CLOCK_EVENTS if mask & bit]


def pcie_share(gen: int | None, width: int | None, ref_gen: int = 5, ref_width: int = 16) -> float:
    """The share of a Gen ``ref_gen`` x``ref_width`` link's bandwidth a link has (0 if unknown)."""
    if gen not in PCIE_GT_S or not width or ref_gen not in PCIE_GT_S:
        return 0.0
    return PCIE_GT_S[gen] / PCIE_GT_S[ref_gen] * width / ref_width


def gemm_result(
    dtype: str, n: int, iterations: int, seconds: float, tally: SdcTally
) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "n": n,
        "tflops": round(tflops(n, iterations, seconds), 1),
        "iterations": iterations,
        "sdc_repeats": tally.repeats,
        "sdc_mismatches": tally.mismatches,
        "max_abs_diff": tally.max_abs_diff,
    }


@dataclass
class LoadSamples:
    """One GPU's samples under load: the best link seen, the hottest and hungriest moment."""

    count: int = 0
    gen: int | None = None
    width: int | None = None
    temperature: float | None = None
    power: float | None = None
    mask: int = 0

    def add(self, sample: Mapping[str, Any]) -> None:
        self.count += 1
        self.gen = _larger(self.gen, _int(sample.get("gen")))
        self.width = _larger(self.width, _int(sample.get("width")))
        self.temperature = _larger(self.temperature, _float(sample.get("temperature")))
        self.power = _larger(self.power, _float(sample.get("power")))
        mask = _int(sample.get("mask"))
        if mask is not None:
            self.mask |= mask

    def apply(self, gpu: dict[str, Any], under_load: bool) -> None:
        """Write the samples into a GPU record (gen/width only where something was seen)."""
        pcie, thermal = gpu["pcie"], gpu["thermal"]
        if self.gen is not None:
            pcie["gen"] = self.gen
        if self.width is not None:
            pcie["width"] = self.width
        pcie["under_load"] = under_load and self.count > 0
        thermal["max_temperature_c"] = self.temperature
        thermal["max_power_w"] = None if self.power is None else round(self.power, 1)
        thermal["clock_events"] = decode_clock_events(self.mask)


def _larger(old: Any, new: Any) -> Any:
    if new is None:
        return old
    return new if old is None else max(old, new)


def delta(before: int | None, after: int | None) -> int | None:
    """A counter's growth, or None when either reading is missing."""
    if before is None or after is None:
        return None
    return after - before


# --------------------------------------------------------------------------- GPU records


ECC_COUNTERS = (
    "volatile_corrected",
    "volatile_uncorrectable",
    "aggregate_corrected",
    "aggregate_uncorrectable",
)


def new_gpu(index: int, name: str, uuid: str, pci_bus_id: str) -> dict[str, Any]:
    """A GPU record with every field of the schema, nothing measured yet."""
    return {
        "index": index,
        "name": name,
        "uuid": uuid,
        "serial": None,
        "pci_bus_id": pci_bus_id,
        "memory_mib": None,
        "persistence_mode": None,
        "ecc": {"mode": None, **dict.fromkeys(ECC_COUNTERS)},
        "row_remap": None,
        "retired_pages": None,
        "pcie": {
            "max_gen": None,
            "max_width": None,
            "gen": None,
            "width": None,
            "under_load": False,
            "replay_delta": None,
        },
        "nvlink": {"links_up": None, "links_down": [], "error_delta": None},
        "thermal": {"max_temperature_c": None, "max_power_w": None, "clock_events": []},
        "gemm": None,
        "hbm": None,
        "h2d": None,
        "d2h": None,
    }


def pci_key(text: str) -> tuple[int, int, int] | None:
    """(domain, bus, device) of "00000000:9A:00.0", "PCI:0000:9a:00" or "9a:00.0"."""
    parts = text.strip().removeprefix("PCI:").split(":")
    if len(parts) == 2:
        parts = ["0", *parts]
    if len(parts) != 3:
        return None
    try:
        return int(parts[0], 16), int(parts[1], 16), int(parts[2].split(".")[0], 16)
    except ValueError:
        return None


# --------------------------------------------------------------------------- nvidia-smi parsers

# --query-gpu fields of the smi backend (names from ``nvidia-smi --help-query-gpu``).
SMI_FIELDS = (
    "index",
    "name",
    "uuid",
    "serial",
    "pci.bus_id",
    "driver_version",
    "memory.total",
    "persistence_mode",
    "ecc.mode.current",
    "ecc.errors.corrected.volatile.total",
    "ecc.errors.uncorrected.volatile.total",
    "ecc.errors.corrected.aggregate.total",
    "ecc.errors.uncorrected.aggregate.total",
    "remapped_rows.correctable",
    "remapped_rows.uncorrectable",
    "remapped_rows.pending",
    "remapped_rows.failure",
    "retired_pages.single_bit_ecc.count",
    "retired_pages.double_bit.count",
    "retired_pages.pending",
    "pcie.link.gen.current",
    "pcie.link.gen.max",
    "pcie.link.width.current",
    "pcie.link.width.max",
    "temperature.gpu",
    "power.draw",
    "clocks_event_reasons.active",
)
SMI_SAMPLE_FIELDS = frozenset(
    {
        "index",
        "pcie.link.gen.current",
        "pcie.link.width.current",
        "temperature.gpu",
        "power.draw",
        "clocks_event_reasons.active",
        "clocks_throttle_reasons.active",
    }
)
# A field an older driver does not know -> its older name (drivers before R535).
SMI_FALLBACKS = {"clocks_event_reasons.active": "clocks_throttle_reasons.active"}
SMI_TEXT_FIELDS = frozenset(
    {"name", "uuid", "serial", "pci.bus_id", "driver_version", "vbios_version"}
    | {"gpu_name", "gpu_uuid", "gpu_serial", "gpu_bus_id"}
)
_SMI_WORDS = {
    "enabled": True,
    "disabled": False,
    "yes": True,
    "no": False,
    "active": True,
    "not active": False,
}
_SMI_NUMBER = re.compile(r"^(-?\d+(?:\.\d+)?)(?:\s*[A-Za-z%/]+)?$")
_SMI_INVALID_FIELD = re.compile(r'Field "([^"]+)" is not a valid field to query')


def smi_value(field_name: str, raw: str) -> Any:
    """One CSV cell as a value: None for "[N/A]"/"[Not Supported]", bool, int (also hex), float."""
    text = raw.strip()
    if not text or text.startswith("[") or text.upper() == "N/A":
        return None
    if field_name in SMI_TEXT_FIELDS:
        return text
    word = _SMI_WORDS.get(text.lower())
    if word is not None:
        return word
    if text.lower().startswith("0x"):
        try:
            return int(text, 16)
        except ValueError:
            return text
    number = _SMI_NUMBER.match(text)
    if number:
        digits = number.group(1)
        return float(digits) if "." in digits else int(digits)
    return text


def split_smi_csv(fields: Sequence[str], text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of ``--format=csv[,noheader][,nounits]`` output, and the lines that are not rows."""
    rows: list[dict[str, Any]] = []
    other: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = next(csv.reader([line], skipinitialspace=True))
        if len(cells) != len(fields):
            other.append(line.strip())
        elif [cell.split(" [")[0].strip() for cell in cells] != list(fields):  # not the header
            rows.append(
                {name: smi_value(name, cell) for name, cell in zip(fields, cells, strict=True)}
            )
    return rows, other


def parse_smi_csv(fields: Sequence[str], text: str) -> list[dict[str, Any]]:
    """``nvidia-smi --query-gpu=FIELDS --format=csv,...`` output as one dict per GPU."""
    return split_smi_csv(fields, text)[0]


def parse_smi_banner(text: str) -> dict[str, str | None]:
    """Driver and CUDA versions from the header of ``nvidia-smi``'s summary table."""
    driver = re.search(r"Driver Version:\s*([0-9][0-9.]*)", text)
    cuda = re.search(r"CUDA Version:\s*([0-9][0-9.]*)", text)
    return {
        "driver_version": driver.group(1) if driver else None,
        "cuda_version": cuda.group(1) if cuda else None,
    }


_NVLINK_GPU = re.compile(r"^GPU (\d+):")
_NVLINK_LINK = re.compile(r"^\s*Link (\d+):\s*(.*)$")


def parse_nvlink_status(text: str) -> list[dict[str, Any]]:
    """``nvidia-smi nvlink -s``: per GPU the links up (a speed) and down (``<inactive>``)."""
    gpus: list[dict[str, Any]] = []
    for line in text.splitlines():
        gpu = _NVLINK_GPU.match(line)
        if gpu:
            gpus.append({"gpu": int(gpu.group(1)), "up": [], "down": []})
            continue
        link = _NVLINK_LINK.match(line)
        if link and gpus:
            state = "down" if "inactive" in link.group(2).lower() else "up"
            gpus[-1][state].append(int(link.group(1)))
    return gpus


def gpu_from_smi(row: Mapping[str, Any]) -> dict[str, Any]:
    """A GPU record from one ``--query-gpu`` row (``SMI_FIELDS``, parsed)."""
    gpu = new_gpu(
        int(row["index"]),
        str(row.get("name") or ""),
        str(row.get("uuid") or ""),
        str(row.get("pci.bus_id") or ""),
    )
    gpu["serial"] = row.get("serial")
    gpu["memory_mib"] = _int(row.get("memory.total"))
    gpu["persistence_mode"] = _bool(row.get("persistence_mode"))
    gpu["ecc"] = {
        "mode": _bool(row.get("ecc.mode.current")),
        "volatile_corrected": _int(row.get("ecc.errors.corrected.volatile.total")),
        "volatile_uncorrectable": _int(row.get("ecc.errors.uncorrected.volatile.total")),
        "aggregate_corrected": _int(row.get("ecc.errors.corrected.aggregate.total")),
        "aggregate_uncorrectable": _int(row.get("ecc.errors.uncorrected.aggregate.total")),
    }
    gpu["row_remap"] = _smi_row_remap(row)
    if gpu["row_remap"] is None:
        gpu["retired_pages"] = _smi_retired_pages(row)
    gpu["pcie"].update(
        max_gen=_int(row.get("pcie.link.gen.max")),
        max_width=_int(row.get("pcie.link.width.max")),
        gen=_int(row.get("pcie.link.gen.current")),
        width=_int(row.get("pcie.link.width.current")),
    )
    return gpu


def sample_from_smi(row: Mapping[str, Any]) -> dict[str, Any]:
    """A load sample from one row of the sampling query."""
    mask = row.get("clocks_event_reasons.active", row.get("clocks_throttle_reasons.active"))
    return {
        "gen": row.get("pcie.link.gen.current"),
        "width": row.get("pcie.link.width.current"),
        "temperature": row.get("temperature.gpu"),
        "power": row.get("power.draw"),
        "mask": mask,
    }


def _bool(value: Any) -> bool | None:
    if value is None or isinstance(value, str):
        return None
    return bool(value)


def _smi_row_remap(row: Mapping[str, Any]) -> dict[str, Any] | None:
    names = ("correctable", "uncorrectable", "pending", "failure")
    values = [row.get(f"remapped_rows.{name}") for name in names]
    if all(value is None for value in values):
        return None
    correctable, uncorrectable, pending, failure = values
    return {
        "correctable": _int(correctable) or 0,
        "uncorrectable": _int(uncorrectable) or 0,
        "pending": bool(pending),
        "failure": bool(failure),
    }


def _smi_retired_pages(row: Mapping[str, Any]) -> dict[str, Any] | None:
    single = row.get("retired_pages.single_bit_ecc.count")
    double = row.get("retired_pages.double_bit.count")
    pending = row.get("retired_pages.pending")
    if single is None and double is None and pending is None:
        return None
    return {
        "single_bit": _int(single) or 0,
        "double_bit": _int(double) or 0,
        "pending": bool(pending),
    }


# --------------------------------------------------------------------------- other parsers

XID_PATTERN = re.compile(r"NVRM: Xid \(((?:PCI:)?[0-9a-fA-F:.]+)\).*?: (\d+),")


def parse_xid_log(text: str, pci_bus_ids: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Xid events of a kernel log; ``gpu`` is the index of the GPU at that PCI address, if seen."""
    indexes = {pci_key(bus): index for bus, index in (pci_bus_ids or {}).items()}
    events = []
    for line in text.splitlines():
        found = XID_PATTERN.search(line)
        if found:
            pci = found.group(1).removeprefix("PCI:")
            events.append(
                {
                    "xid": int(found.group(2)),
                    "pci": pci,
                    "gpu": indexes.get(pci_key(pci)),
                    "line": line.strip(),
                }
            )
    return events


_DCGM_STATUS = {
    "pass": "pass",
    "fail": "fail",
    "warn": "warn",
    "warning": "warn",
    "skip": "skip",
    "skipped": "skip",
    "not run": "skip",
    "notrun": "skip",
}


def parse_dcgm_diag(text: str) -> dict[str, Any]:
    """``dcgmi diag -j`` of DCGM 3.x ("DCGM GPU Diagnostic") or 4.x ("DCGM Diagnostic").

    Returns ``{"version", "results": [{category, test, gpu, status, info}], "error"}``: one
    result per GPU, ``gpu`` null for a result of the whole node (3.x software tests list every
    GPU, "0,1,2,..."); ``error`` is DCGM's ``runtime_error``. Raises ValueError when the text
    holds no diagnostic document.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON document in the dcgmi output")
    try:
        data, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError as exc:
        raise ValueError(f"dcgmi printed JSON that does not parse: {exc}") from None
    root = (
        data.get("DCGM Diagnostic", data.get("DCGM GPU Diagnostic"))
        if isinstance(data, dict)
        else None
    )
    if not isinstance(root, dict):
        raise ValueError("neither 'DCGM Diagnostic' nor 'DCGM GPU Diagnostic' in dcgmi's JSON")
    results = [
        result
        for category in _objects(root.get("test_categories"))
        for test in _objects(category.get("tests"))
        for result in _dcgm_results(str(category.get("category", "")), test)
    ]
    error = root.get("runtime_error") or data.get("runtime_error")
    return {"version": _dcgm_version(data, root), "results": results, "error": error}


def _objects(value: Any) -> list[dict[str, Any]]:
    """The dicts of a JSON list (DCGM 3.x leaves nulls in its arrays)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _dcgm_results(category: str, test: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    name = str(test.get("name", ""))
    for result in _objects(test.get("results")):
        raw = str(result.get("status", ""))
        status = _DCGM_STATUS.get(raw.strip().lower())
        info = _dcgm_messages(result)
        if status is None:
            status = "warn"
            info = f"unrecognised DCGM status {raw!r}" + (f"; {info}" if info else "")
        yield {
            "category": category,
            "test": name,
            "gpu": _dcgm_gpu(result),
            "status": status,
            "info": info,
        }


def _dcgm_gpu(result: Mapping[str, Any]) -> int | None:
    """The GPU of a result; None for the whole node or an entity that is not a GPU."""
    if "entity_id" in result:  # 4.x: one entity per result
        group = str(result.get("entity_group", "GPU"))
        return _int(result["entity_id"]) if group.upper() == "GPU" else None
    ids = result.get("gpu_ids", result.get("gpu_id"))  # 3.x: "3", 3, or "0,1,2" (all GPUs)
    return _int(ids) if isinstance(ids, (int, str)) and not isinstance(ids, bool) else None


def _dcgm_messages(result: Mapping[str, Any]) -> str:
    messages: list[str] = []
    for key in ("warnings", "info"):
        value = result.get(key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                item = item.get("warning", item.get("message"))
            if item:
                messages.append(str(item).strip())
    return "; ".join(messages)


def _dcgm_version(data: Mapping[str, Any], root: Mapping[str, Any]) -> str | None:
    metadata = data.get("metadata")
    if isinstance(metadata, dict):
        for key in ("version", "DCGM version"):
            if metadata.get(key):
                return str(metadata[key])
    version = root.get("version")
    return str(version) if version else None


def parse_all_reduce_perf(text: str) -> dict[str, Any]:
    """nccl-tests' ``all_reduce_perf`` output: average and best bus bandwidth, #wrong.

    ``busbw_gbps`` is the "# Avg bus bandwidth" line; ``max_busbw_gbps`` and ``wrong`` come
    from the result rows (out-of-place and in-place). Raises ValueError without the average.
    """
    average = re.search(r"^#\s*Avg bus bandwidth\s*:\s*([0-9.]+)", text, re.MULTILINE)
    if average is None:
        raise ValueError("no '# Avg bus bandwidth' line in the all_reduce_perf output")
    best: float | None = None
    wrong: int | None = None
    for line in text.splitlines():
        cells = line.split()
        if len(cells) < 10 or line.lstrip().startswith("#") or not cells[0].isdigit():
            continue
        for busbw_cell, wrong_cell in ((cells[-6], cells[-5]), (cells[-2], cells[-1])):
            best = _larger(best, _float(busbw_cell))
            count = _int(wrong_cell) if wrong_cell.isdigit() else None
            if count is not None:
                wrong = (wrong or 0) + count
    return {"busbw_gbps": float(average.group(1)), "max_busbw_gbps": best, "wrong": wrong}


# --------------------------------------------------------------------------- stress engines


class Engine(Protocol):
    """torch or cupy on CUDA: one GEMM stress and the copy bandwidths, per device ordinal."""

    name: str

    def count(self) -> int: ...

    def gemm(self, device: int, plan: Plan) -> dict[str, Any]: ...

    def bandwidth(self, device: int, kind: str, nbytes: int, iterations: int) -> float: ...


class TorchEngine:
    """The checks in PyTorch (bf16 where the GPU has it, else fp16)."""

    name = "torch"

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def count(self) -> int:
        return int(self.torch.cuda.device_count())

    def gemm(self, device: int, plan: Plan) -> dict[str, Any]:
        torch = self.torch
        with torch.cuda.device(device):
            bf16 = bool(torch.cuda.is_bf16_supported())
            dtype = torch.bfloat16 if bf16 else torch.float16
            n = plan.gemm_n
            a = torch.rand(n, n, device="cuda", dtype=dtype) - 0.5
            b = torch.rand(n, n, device="cuda", dtype=dtype) - 0.5
            out = torch.empty_like(a)
            reference = torch.matmul(a, b).float()
            tally = SdcTally(scale=float(reference.abs().max().item()))

            def batch(count: int) -> None:
                for _ in range(count):
                    torch.matmul(a, b, out=out)

            batch(plan.gemm_warmup)
            seconds, iterations = 0.0, 0
            deadline = time.monotonic() + plan.gemm_seconds
            while iterations == 0 or time.monotonic() < deadline:
                seconds += _torch_seconds(torch, lambda: batch(plan.gemm_batch))
                iterations += plan.gemm_batch
                tally.add(float((out.float() - reference).abs().max().item()))
        return gemm_result("bf16" if bf16 else "fp16", n, iterations, seconds, tally)

    def bandwidth(self, device: int, kind: str, nbytes: int, iterations: int) -> float:
        torch = self.torch
        with torch.cuda.device(device):
            on_gpu = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            if kind == "hbm":
                source, target, factor = on_gpu, torch.empty_like(on_gpu), 2  # read + write
            else:
                host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                source, target, factor = (host, on_gpu, 1) if kind == "h2d" else (on_gpu, host, 1)

            def copies(count: int) -> None:
                for _ in range(count):
                    target.copy_(source, non_blocking=True)

            copies(1)
            seconds = _torch_seconds(torch, lambda: copies(iterations))
        return gbps(factor * nbytes, iterations, seconds)


def _torch_seconds(torch: Any, work: Callable[[], None]) -> float:
    """GPU time of ``work`` on the current stream, by CUDA events."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / 1000.0


class CupyEngine:
    """The checks in CuPy (fp16: CuPy has no bfloat16)."""

    name = "cupy"

    def __init__(self, cupy: Any, numpy: Any) -> None:
        self.cupy, self.numpy = cupy, numpy

    def count(self) -> int:
        return int(self.cupy.cuda.runtime.getDeviceCount())

    def gemm(self, device: int, plan: Plan) -> dict[str, Any]:
        cp = self.cupy
        with cp.cuda.Device(device):
            n = plan.gemm_n
            a = (cp.random.random((n, n), dtype=cp.float32) - 0.5).astype(cp.float16)
            b = (cp.random.random((n, n), dtype=cp.float32) - 0.5).astype(cp.float16)
            out = cp.empty_like(a)
            reference = cp.matmul(a, b).astype(cp.float32)
            tally = SdcTally(scale=float(cp.abs(reference).max()))

            def batch(count: int) -> None:
                for _ in range(count):
                    cp.matmul(a, b, out=out)

            batch(plan.gemm_warmup)
            seconds, iterations = 0.0, 0
            deadline = time.monotonic() + plan.gemm_seconds
            while iterations == 0 or time.monotonic() < deadline:
                seconds += _cupy_seconds(cp, lambda: batch(plan.gemm_batch))
                iterations += plan.gemm_batch
                tally.add(float(cp.abs(out.astype(cp.float32) - reference).max()))
        return gemm_result("fp16", n, iterations, seconds, tally)

    def bandwidth(self, device: int, kind: str, nbytes: int, iterations: int) -> float:
        cp, np = self.cupy, self.numpy
        with cp.cuda.Device(device):
            on_gpu = cp.empty(nbytes, dtype=cp.uint8)
            if kind == "hbm":
                other = cp.empty_like(on_gpu)

                def copy() -> None:
                    cp.copyto(other, on_gpu)

            else:
                pinned = cp.cuda.alloc_pinned_memory(nbytes)
                host = np.frombuffer(pinned, dtype=np.uint8, count=nbytes)

                def copy() -> None:
                    if kind == "h2d":
                        on_gpu.set(host)
                    else:
                        on_gpu.get(out=host)

            copy()

            def copies() -> None:
                for _ in range(iterations):
                    copy()

            seconds = _cupy_seconds(cp, copies)
        return gbps((2 if kind == "hbm" else 1) * nbytes, iterations, seconds)


def _cupy_seconds(cp: Any, work: Callable[[], None]) -> float:
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    work()
    end.record()
    end.synchronize()
    return float(cp.cuda.get_elapsed_time(start, end)) / 1000.0


def find_engine(report: Report) -> Engine | None:
    """torch with CUDA, else cupy with CUDA, else None (an import that breaks is an error)."""
    for module, make in (("torch", _torch_engine), ("cupy", _cupy_engine)):
        try:
            engine = make()
        except ImportError:
            continue
        except Exception as exc:  # a broken CUDA install: say so, try the next
            report.error("engine", f"{module}: {type(exc).__name__}: {exc}")
            continue
        if engine is not None:
            return engine
    return None


def _torch_engine() -> Engine | None:
    torch = importlib.import_module("torch")
    return TorchEngine(torch) if torch.cuda.is_available() and torch.cuda.device_count() else None


def _cupy_engine() -> Engine | None:
    cupy = importlib.import_module("cupy")
    numpy = importlib.import_module("numpy")
    return CupyEngine(cupy, numpy) if cupy.cuda.runtime.getDeviceCount() else None


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Samples the backend's GPUs every ``interval`` seconds in a thread while in use."""

    def __init__(
        self, probe: Callable[[], Mapping[int, Mapping[str, Any]]], interval: float, report: Report
    ) -> None:
        self.probe, self.interval, self.report = probe, interval, report
        self.samples: dict[int, LoadSamples] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="burnin-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def take(self) -> None:
        """One sample of every GPU."""
        readings = guarded(self.report, "sample", self.probe) or {}
        for index, reading in readings.items():
            self.samples.setdefault(index, LoadSamples()).add(reading)

    def _run(self) -> None:
        while True:
            self.take()
            if self._stop.wait(self.interval):
                return


# --------------------------------------------------------------------------- backends


class BackendUnavailable(Exception):
    """This backend cannot run on this node (the message says why)."""


class Backend:
    """What every backend answers; nvml and smi share the real stress and collectives."""

    name = ""
    tool_env: Mapping[str, str] | None = None  # environment of the tools it runs (dcgmi)

    def inventory(self, report: Report) -> list[dict[str, Any]]:
        raise NotImplementedError

    def versions(self, report: Report) -> tuple[str | None, str | None]:
        """(driver version, CUDA version the driver supports)."""
        raise NotImplementedError

    def counters(self) -> dict[int, dict[str, int | None]]:
        """Per GPU index: PCIe ``replay`` and ``nvlink`` error counters (for deltas)."""
        return {}

    def sample(self) -> dict[int, dict[str, Any]]:
        """Per GPU index: ``gen``, ``width``, ``temperature``, ``power``, clock event ``mask``."""
        return {}

    def measure(self, gpus: list[dict[str, Any]], plan: Plan, report: Report) -> Engine | None:
        return measure_hardware(self, gpus, plan, report)

    def collective(
        self, gpus: list[dict[str, Any]], plan: Plan, engine: Engine | None, report: Report
    ) -> dict[str, Any] | None:
        return hardware_collective(len(gpus), plan, engine, report)

    def kernel_log(self, report: Report) -> tuple[str | None, str]:
        return read_kernel_log(report)

    def close(self) -> None:
        return None


class _Unsupported:
    """What a guarded NVML call gives when the GPU does not have the function."""


UNSUPPORTED = _Unsupported()


def _known(value: Any) -> Any:
    return None if value is UNSUPPORTED else value


class NvmlBackend(Backend):
    """The node's GPUs through NVML (nvidia-ml-py's ``pynvml``); every call guarded."""

    name = "nvml"

    def __init__(self, nv: Any, report: Report) -> None:
        self.nv, self.report = nv, report
        self.handles: dict[int, Any] = {}
        self.links: dict[int, list[int]] = {}
        count = _known(self._call("nvml", "nvmlDeviceGetCount"))
        for index in range(count if isinstance(count, int) else 0):
            handle = _known(self._call(f"gpu{index}", "nvmlDeviceGetHandleByIndex", index))
            if handle is not None:  # a GPU lost after enumeration: recorded, not listed
                self.handles[index] = handle

    def _call(self, check: str, function: str, *args: Any, quiet: Sequence[int] = ()) -> Any:
        """``pynvml.function(*args)``; None after recording an error, UNSUPPORTED if unsupported."""
        call = getattr(self.nv, function, None)
        if call is None:
            self.report.error(check, f"pynvml has no {function}")
            return None
        try:
            return call(*args)
        except Exception as exc:  # pynvml.NVMLError and its per-code subclasses
            code = getattr(exc, "value", None)
            if code == getattr(self.nv, "NVML_ERROR_NOT_SUPPORTED", 3) or code in quiet:
                return UNSUPPORTED
            self.report.error(check, f"{function}: {exc}")
            return None

    def _get(self, index: int, what: str, function: str, *args: Any) -> Any:
        return _known(self._call(f"gpu{index}.{what}", function, self.handles[index], *args))

    def inventory(self, report: Report) -> list[dict[str, Any]]:
        return [self._gpu(index) for index in sorted(self.handles)]

    def _gpu(self, index: int) -> dict[str, Any]:
        pci = self._get(index, "pci", "nvmlDeviceGetPciInfo")
        gpu = new_gpu(
            index,
            _text(self._get(index, "name", "nvmlDeviceGetName")) or "",
            _text(self._get(index, "uuid", "nvmlDeviceGetUUID")) or "",
            _text(getattr(pci, "busId", None)) or "",
        )
        gpu["serial"] = _text(self._get(index, "serial", "nvmlDeviceGetSerial"))
        memory = self._get(index, "memory", "nvmlDeviceGetMemoryInfo")
        gpu["memory_mib"] = int(memory.total) // MIB if memory is not None else None
        persistence = self._get(index, "persistence_mode", "nvmlDeviceGetPersistenceMode")
        gpu["persistence_mode"] = None if persistence is None else persistence == 1
        gpu["ecc"] = self._ecc(index)
        gpu["row_remap"], gpu["retired_pages"] = self._memory_repair(index)
        gpu["pcie"].update(
            max_gen=self._get(index, "pcie", "nvmlDeviceGetMaxPcieLinkGeneration"),
            max_width=self._get(index, "pcie", "nvmlDeviceGetMaxPcieLinkWidth"),
            gen=self._get(index, "pcie", "nvmlDeviceGetCurrPcieLinkGeneration"),
            width=self._get(index, "pcie", "nvmlDeviceGetCurrPcieLinkWidth"),
        )
        gpu["nvlink"] = self._nvlink(index)
        return gpu

    def _ecc(self, index: int) -> dict[str, Any]:
        nv = self.nv
        mode = self._get(index, "ecc", "nvmlDeviceGetEccMode")  # (current, pending)
        corrected = getattr(nv, "NVML_MEMORY_ERROR_TYPE_CORRECTED", 0)
        uncorrected = getattr(nv, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1)
        volatile = getattr(nv, "NVML_VOLATILE_ECC", 0)
        aggregate = getattr(nv, "NVML_AGGREGATE_ECC", 1)

        def count(kind: int, counter: int) -> int | None:
            return _int(self._get(index, "ecc", "nvmlDeviceGetTotalEccErrors", kind, counter))

        return {
            "mode": None if mode is None else mode[0] == 1,
            "volatile_corrected": count(corrected, volatile),
            "volatile_uncorrectable": count(uncorrected, volatile),
            "aggregate_corrected": count(corrected, aggregate),
            "aggregate_uncorrectable": count(uncorrected, aggregate),
        }

    def _memory_repair(self, index: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Row remapping (Ampere on), else retired pages (NOT_SUPPORTED before Ampere)."""
        remap = self._call(
            f"gpu{index}.row_remap", "nvmlDeviceGetRemappedRows", self.handles[index]
        )
        if remap is None:
            return None, None
        if remap is not UNSUPPORTED:
            correctable, uncorrectable, pending, failure = remap
            return {
                "correctable": int(correctable),
                "uncorrectable": int(uncorrectable),
                "pending": bool(pending),
                "failure": bool(failure),
            }, None
        nv = self.nv
        single = self._get(
            index,
            "retired_pages",
            "nvmlDeviceGetRetiredPages",
            getattr(nv, "NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS", 0),
        )
        double = self._get(
            index,
            "retired_pages",
            "nvmlDeviceGetRetiredPages",
            getattr(nv, "NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR", 1),
        )
        pending = self._get(index, "retired_pages", "nvmlDeviceGetRetiredPagesPendingStatus")
        if single is None and double is None and pending is None:
            return None, None
        return None, {
            "single_bit": len(single or ()),
            "double_bit": len(double or ()),
            "pending": pending == 1,
        }

    def _nvlink(self, index: int) -> dict[str, Any]:
        """Links up and down; a link number NVML does not support is no link at all."""
        up: list[int] = []
        down: list[int] = []
        failed = 0
        invalid = getattr(self.nv, "NVML_ERROR_INVALID_ARGUMENT", 2)
        for link in range(int(getattr(self.nv, "NVML_NVLINK_MAX_LINKS", 18))):
            state = self._call(
                f"gpu{index}.nvlink",
                "nvmlDeviceGetNvLinkState",
                self.handles[index],
                link,
                quiet=(invalid,),
            )
            if state is None:
                failed += 1
            elif state is not UNSUPPORTED:
                (up if state == 1 else down).append(link)
        self.links[index] = up
        links_up = None if failed and not up and not down else len(up)
        return {"links_up": links_up, "links_down": down, "error_delta": None}

    def counters(self) -> dict[int, dict[str, int | None]]:
        return {
            index: {
                "replay": _int(self._get(index, "pcie", "nvmlDeviceGetPcieReplayCounter")),
                "nvlink": self._nvlink_errors(index),
            }
            for index in self.handles
        }

    def _nvlink_errors(self, index: int) -> int | None:
        """Replay + recovery + CRC (flit, data) errors over the links that are up."""
        links = self.links.get(index) or []
        if not links:
            return None
        total = 0
        for link in links:
            for counter in range(4):  # NVML_NVLINK_ERROR_DL_REPLAY, _RECOVERY, _CRC_FLIT, _CRC_DATA
                value = _int(
                    self._get(index, "nvlink", "nvmlDeviceGetNvLinkErrorCounter", link, counter)
                )
                if value is None:
                    return None
                total += value
        return total

    def sample(self) -> dict[int, dict[str, Any]]:
        return {index: self._sample(index) for index in self.handles}

    def _sample(self, index: int) -> dict[str, Any]:
        events = "nvmlDeviceGetCurrentClocksEventReasons"
        if not hasattr(self.nv, events):
            events = "nvmlDeviceGetCurrentClocksThrottleReasons"
        power_mw = _float(self._get(index, "power", "nvmlDeviceGetPowerUsage"))
        return {
            "gen": self._get(index, "pcie", "nvmlDeviceGetCurrPcieLinkGeneration"),
            "width": self._get(index, "pcie", "nvmlDeviceGetCurrPcieLinkWidth"),
            "temperature": self._get(
                index,
                "temperature",
                "nvmlDeviceGetTemperature",
                getattr(self.nv, "NVML_TEMPERATURE_GPU", 0),
            ),
            "power": None if power_mw is None else power_mw / 1000.0,
            "mask": self._get(index, "clock_events", events),
        }

    def versions(self, report: Report) -> tuple[str | None, str | None]:
        driver = _text(_known(self._call("driver", "nvmlSystemGetDriverVersion")))
        cuda = _int(_known(self._call("driver", "nvmlSystemGetCudaDriverVersion")))
        return driver, None if cuda is None else f"{cuda // 1000}.{cuda % 1000 // 10}"

    def close(self) -> None:
        self._call("nvml", "nvmlShutdown")


def open_nvml(report: Report) -> Backend:
    try:
        nv = importlib.import_module("pynvml")
    except ImportError as exc:
        raise BackendUnavailable(f"pynvml (nvidia-ml-py) is not installed: {exc}") from None
    try:
        nv.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        raise BackendUnavailable(f"nvmlInit failed: {exc}") from None
    return NvmlBackend(nv, report)


@dataclass
class SmiAnswer:
    """A ``--query-gpu`` call: rows, the fields asked in the end, what was dropped or odd."""

    rows: list[dict[str, Any]]
    fields: list[str]
    dropped: list[str]
    other_lines: list[str]
    rc: int
    message: str


def smi_query(fields: Sequence[str], env: Mapping[str, str] | None = None) -> SmiAnswer:
    """Query nvidia-smi; a field this driver does not know is renamed (older name) or dropped."""
    wanted, dropped = list(fields), []
    for _ in range(len(fields) + len(SMI_FALLBACKS)):
        ran = run_tool(
            ["nvidia-smi", "--query-gpu=" + ",".join(wanted), "--format=csv,noheader,nounits"],
            timeout=120,
            env=env,
        )
        invalid = _SMI_INVALID_FIELD.search(ran.out + ran.err) if ran.rc else None
        if invalid is None or invalid.group(1) not in wanted:
            break
        name = invalid.group(1)
        position = wanted.index(name)
        if SMI_FALLBACKS.get(name) and SMI_FALLBACKS[name] not in wanted:
            wanted[position] = SMI_FALLBACKS[name]
        else:
            dropped.append(wanted.pop(position))
    rows, other = split_smi_csv(wanted, ran.out)
    message = (ran.out if not rows else "") + ran.err
    return SmiAnswer(rows, wanted, dropped, other if rows else [], ran.rc, message.strip()[:1000])


class SmiBackend(Backend):
    """The node's GPUs through ``nvidia-smi`` (no pynvml): inventory, health, samples."""

    name = "smi"

    def __init__(self, answer: SmiAnswer) -> None:
        self.answer = answer
        self.sample_fields = [name for name in answer.fields if name in SMI_SAMPLE_FIELDS]

    def inventory(self, report: Report) -> list[dict[str, Any]]:
        for name in self.answer.dropped:
            report.error("smi", f"this nvidia-smi does not know the field {name!r}")
        for line in self.answer.other_lines:
            report.error("smi", f"nvidia-smi: {line}")
        gpus = [gpu_from_smi(row) for row in self.answer.rows if _int(row.get("index")) is not None]
        self._nvlink(gpus, report)
        return sorted(gpus, key=lambda gpu: int(gpu["index"]))

    def _nvlink(self, gpus: list[dict[str, Any]], report: Report) -> None:
        ran = run_tool(["nvidia-smi", "nvlink", "-s"], timeout=120)
        if ran.rc:
            report.error(
                "nvlink", f"nvidia-smi nvlink -s exited {ran.rc}: {(ran.out + ran.err)[:500]}"
            )
            return
        status = {entry["gpu"]: entry for entry in parse_nvlink_status(ran.out)}
        for gpu in gpus:
            entry = status.get(gpu["index"], {"up": [], "down": []})
            gpu["nvlink"].update(links_up=len(entry["up"]), links_down=entry["down"])

    def sample(self) -> dict[int, dict[str, Any]]:
        if "index" not in self.sample_fields:
            return {}
        answer = smi_query(self.sample_fields)
        return {
            int(row["index"]): sample_from_smi(row)
            for row in answer.rows
            if _int(row.get("index")) is not None
        }

    def versions(self, report: Report) -> tuple[str | None, str | None]:
        drivers = [row.get("driver_version") for row in self.answer.rows]
        banner = parse_smi_banner(run_tool(["nvidia-smi"], timeout=120).out)
        return next(filter(None, drivers), banner["driver_version"]), banner["cuda_version"]


def open_smi(report: Report) -> Backend:
    if shutil.which("nvidia-smi") is None:
        raise BackendUnavailable("nvidia-smi is not on PATH")
    answer = smi_query(SMI_FIELDS)
    if not answer.rows and answer.rc not in (0, 6):  # 6: "No devices were found"
        raise BackendUnavailable(f"nvidia-smi exited {answer.rc}: {answer.message}")
    return SmiBackend(answer)


# --------------------------------------------------------------------------- the lab backend


class LabBackend(Backend):
    """The embedded lab's SIMULATED GPUs (fake hardware, for the lab only).

    Inventory and health come from the lab's GPU document; "measurements" follow the lab's
    model (``LAB_*``): GEMM at 80 % of peak times the GPU's throughput, HBM at 89 %, PCIe by
    the trained link, all-reduce by NVLink state, SDC mismatches when ``sdc`` is set, clock
    events from ``throttle_reasons``, Xids from ``kernel_log``. GPUs marked
    ``present: false`` are not seen, as a GPU off the bus is not.
    """

    name = "lab"

    def __init__(self, path: str, document: Mapping[str, Any]) -> None:
        self.path, self.document = path, document
        self.present = [gpu for gpu in document.get("gpus", []) if gpu.get("present", True)]
        self.tool_env = {**os.environ, LAB_GPUS_ENV: path}

    def inventory(self, report: Report) -> list[dict[str, Any]]:
        return sorted((lab_gpu(gpu) for gpu in self.present), key=lambda gpu: int(gpu["index"]))

    def versions(self, report: Report) -> tuple[str | None, str | None]:
        with contextlib.suppress(OSError):
            driver = Path(LAB_DRIVER_VERSION_FILE).read_text(encoding="utf-8").strip()
            if driver:
                return driver, self._cuda()
        ran = run_tool(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            timeout=60,
            env=self.tool_env,
        )
        lines = ran.out.split() if ran.rc == 0 else []
        return (lines[0] if lines else None), self._cuda()

    def _cuda(self) -> str | None:
        return parse_smi_banner(run_tool(["nvidia-smi"], 60, self.tool_env).out)["cuda_version"]

    def measure(self, gpus: list[dict[str, Any]], plan: Plan, report: Report) -> Engine | None:
        by_index = {int(gpu["index"]): gpu for gpu in self.present}
        for gpu in gpus:
            lab_measure(gpu, by_index[gpu["index"]], plan)
        return None

    def collective(
        self, gpus: list[dict[str, Any]], plan: Plan, engine: Engine | None, report: Report
    ) -> dict[str, Any] | None:
        if len(self.present) < 2:
            report.skip("nccl", TOO_FEW_GPUS)
            return None
        return {
            "tool": "lab",
            "gpus": len(self.present),
            "busbw_gbps": lab_busbw(self.present),
            "bytes": plan.nccl_bytes,
            "max_busbw_gbps": None,
            "wrong": None,
        }

    def kernel_log(self, report: Report) -> tuple[str | None, str]:
        return "lab", "\n".join(str(line) for line in self.document.get("kernel_log", []))


def open_lab(gpus_file: str | None) -> Backend:
    path = gpus_file or os.environ.get(LAB_GPUS_ENV) or LAB_GPUS_FILE
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackendUnavailable(f"no lab GPU file at {path}") from None
    except (OSError, ValueError) as exc:
        raise BackendUnavailable(f"cannot read the lab GPU file {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("schema") != LAB_GPUS_SCHEMA:
        raise BackendUnavailable(f"{path} is not a {LAB_GPUS_SCHEMA} document")
    return LabBackend(str(Path(path).resolve()), document)


def lab_gpu(lab: Mapping[str, Any]) -> dict[str, Any]:
    """Inventory and health of one simulated GPU, as NVML would report them."""
    gpu = new_gpu(int(lab["index"]), str(lab["name"]), str(lab["uuid"]), str(lab["pci_bus_id"]))
    ecc = lab.get("ecc", {})
    pcie = lab.get("pcie", {})
    nvlink = lab.get("nvlink", {})
    links, down = int(nvlink.get("links", 0)), [int(link) for link in nvlink.get("down", [])]
    gpu.update(
        serial=lab.get("serial"), memory_mib=_int(lab.get("memory_mib")), persistence_mode=True
    )
    gpu["ecc"] = {"mode": True, **{key: _int(ecc.get(key, 0)) for key in ECC_COUNTERS}}
    remap = lab.get("row_remap")
    if isinstance(remap, dict):
        gpu["row_remap"] = {
            "correctable": int(remap.get("correctable", 0)),
            "uncorrectable": int(remap.get("uncorrectable", 0)),
            "pending": bool(remap.get("pending")),
            "failure": bool(remap.get("failure")),
        }
    gpu["pcie"].update(
        max_gen=_int(pcie.get("max_gen")),
        max_width=_int(pcie.get("max_width")),
        gen=_int(pcie.get("gen")),
        width=_int(pcie.get("width")),
        under_load=True,
        replay_delta=0,
    )
    gpu["nvlink"] = {"links_up": links - len(down), "links_down": down, "error_delta": 0}
    return gpu


def lab_jitter(key: str) -> float:
    """A fixed factor within 1 +- LAB_JITTER for one GPU (derived from its UUID)."""
    fraction = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32
    return 1.0 + (2.0 * fraction - 1.0) * LAB_JITTER


def lab_measure(gpu: dict[str, Any], lab: Mapping[str, Any], plan: Plan) -> None:
    """The lab model's stress results for one simulated GPU."""
    throughput = float(lab.get("throughput", 1.0))
    peak = lab.get("peak", {})
    jitter = lab_jitter(str(lab.get("uuid", gpu["index"])))
    rate = float(peak.get("bf16_dense_tflops", 0.0)) * LAB_GEMM_EFFICIENCY * throughput * jitter
    n = plan.gemm_n
    iterations = max(plan.gemm_batch, int(plan.gemm_seconds * rate * 1e12 / (2 * n**3)))
    repeats = iterations // plan.gemm_batch
    corrupt = bool(lab.get("sdc"))
    gpu["gemm"] = {
        "dtype": "bf16",
        "n": n,
        "tflops": round(rate, 1),
        "iterations": iterations,
        "sdc_repeats": repeats,
        "sdc_mismatches": max(1, int(repeats * LAB_SDC_MISMATCH_SHARE)) if corrupt else 0,
        "max_abs_diff": LAB_SDC_MAX_ABS_DIFF if corrupt else 0.0,
    }
    hbm = float(peak.get("hbm_tbps", 0.0)) * 1000.0 * LAB_HBM_EFFICIENCY * throughput * jitter
    gpu["hbm"] = {"gbps": round(hbm, 1)}
    link = gpu["pcie"]
    pcie = LAB_PCIE_GEN5_X16_GBPS * pcie_share(link["gen"], link["width"]) * jitter
    gpu["h2d"] = {"gbps": round(pcie, 1)}
    gpu["d2h"] = {"gbps": round(pcie, 1)}
    events = [str(name) for name in lab.get("throttle_reasons", [])]
    gpu["thermal"] = {
        "max_temperature_c": LAB_MAX_TEMPERATURE_C,
        "max_power_w": LAB_MAX_POWER_W,
        "clock_events": events,
    }


def lab_busbw(present: Sequence[Mapping[str, Any]]) -> float:
    """All-reduce bus bandwidth of the simulated GPUs on the bus, by their NVLink state."""
    if all(int(gpu.get("nvlink", {}).get("links", 0)) == 0 for gpu in present):
        return LAB_PCIE_ALLREDUCE_BUSBW_GBPS
    any_down = any(gpu.get("nvlink", {}).get("down") for gpu in present)
    return LAB_ALLREDUCE_BUSBW_GBPS * (LAB_NVLINK_DOWN_FACTOR if any_down else 1.0)


def open_backend(
    choice: str, gpus_file: str | None, report: Report
) -> tuple[Backend | None, list[str]]:
    """The backend asked for (``auto``: nvml, lab, smi in turn) and why others could not run."""
    openers: dict[str, Callable[[], Backend]] = {
        "nvml": lambda: open_nvml(report),
        "lab": lambda: open_lab(gpus_file),
        "smi": lambda: open_smi(report),
    }
    reasons: list[str] = []
    for name in ("nvml", "lab", "smi") if choice == "auto" else (choice,):
        try:
            return openers[name](), reasons
        except BackendUnavailable as exc:
            reasons.append(f"{name}: {exc}")
    return None, reasons


# --------------------------------------------------------------------------- hardware checks


def measure_hardware(
    backend: Backend, gpus: list[dict[str, Any]], plan: Plan, report: Report
) -> Engine | None:
    """GEMM on every GPU at once while sampling, then HBM/H2D/D2H; counters' deltas around."""
    before = backend.counters()
    sampler = Sampler(backend.sample, plan.sample_interval, report)
    engine = find_engine(report)
    if engine is None:
        for check in ("gemm", "hbm", "h2d", "d2h"):
            report.skip(check, NO_ENGINE)
        sampler.take()  # at idle: links may show downshifted
    else:
        pairs = _device_pairs(engine, gpus, report)
        with sampler:
            run_gemm(engine, pairs, plan, report)
        run_bandwidth(engine, pairs, plan, report)
    for gpu in gpus:
        sampler.samples.get(gpu["index"], LoadSamples()).apply(gpu, under_load=engine is not None)
    after = backend.counters()
    for gpu in gpus:
        old, new = before.get(gpu["index"], {}), after.get(gpu["index"], {})
        gpu["pcie"]["replay_delta"] = delta(old.get("replay"), new.get("replay"))
        gpu["nvlink"]["error_delta"] = delta(old.get("nvlink"), new.get("nvlink"))
    return engine


def _device_pairs(
    engine: Engine, gpus: list[dict[str, Any]], report: Report
) -> list[tuple[dict[str, Any], int]]:
    """GPU records with their CUDA ordinals (CUDA_DEVICE_ORDER=PCI_BUS_ID: the same order)."""
    count = engine.count()
    if count != len(gpus):
        report.error(
            "engine",
            f"{engine.name} sees {count} GPUs, the backend {len(gpus)}; "
            f"stress runs on the first {min(count, len(gpus))}",
        )
    return [(gpu, ordinal) for ordinal, gpu in enumerate(gpus[:count])]


def run_gemm(
    engine: Engine, pairs: Sequence[tuple[dict[str, Any], int]], plan: Plan, report: Report
) -> None:
    """The GEMM stress on every GPU at once, one thread each."""

    def one(gpu: dict[str, Any], device: int) -> None:
        gpu["gemm"] = guarded(report, "gemm", lambda: engine.gemm(device, plan))

    threads = [threading.Thread(target=one, args=pair, daemon=True) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=plan.gemm_seconds + 600)


def run_bandwidth(
    engine: Engine, pairs: Sequence[tuple[dict[str, Any], int]], plan: Plan, report: Report
) -> None:
    """HBM, H2D and D2H of one GPU at a time (GPUs share PCIe switches)."""
    sizes = {
        "hbm": (plan.hbm_bytes, plan.hbm_iterations),
        "h2d": (plan.pcie_bytes, plan.pcie_iterations),
        "d2h": (plan.pcie_bytes, plan.pcie_iterations),
    }
    for gpu, device in pairs:
        for kind, (nbytes, iterations) in sizes.items():
            measure = partial(engine.bandwidth, device, kind, nbytes, iterations)
            value = guarded(report, kind, measure)
            gpu[kind] = None if value is None else {"gbps": round(float(value), 1)}


def hardware_collective(
    count: int, plan: Plan, engine: Engine | None, report: Report
) -> dict[str, Any] | None:
    """Intra-node all-reduce: nccl-tests if installed, else torch.distributed, else skipped."""
    if count < 2:
        report.skip("nccl", TOO_FEW_GPUS)
        return None
    tool = shutil.which("all_reduce_perf")
    if tool:
        return guarded(report, "nccl", lambda: all_reduce_perf(tool, count, plan))
    if engine is not None and engine.name == "torch":
        return guarded(report, "nccl", lambda: torch_all_reduce(count, plan))
    report.skip("nccl", NO_COLLECTIVE_TOOL)
    return None


def all_reduce_perf(tool: str, count: int, plan: Plan) -> dict[str, Any]:
    size = str(plan.nccl_bytes)
    options = f"-b {size} -e {size} -f 2 -g {count} -n {plan.nccl_iterations} -w 5 -c 1"
    argv = [tool, *options.split()]
    ran = run_tool(argv, timeout=plan.nccl_timeout)
    try:
        parsed = parse_all_reduce_perf(ran.out)
    except ValueError as exc:
        raise RuntimeError(f"all_reduce_perf exited {ran.rc}: {exc}: {ran.err[-500:]}") from None
    return {"tool": "all_reduce_perf", "gpus": count, "bytes": plan.nccl_bytes, **parsed}


def torch_all_reduce(count: int, plan: Plan) -> dict[str, Any]:
    """One process per GPU on localhost (this file with ``--nccl-worker``); rank 0 reports."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = f"{count},{port},{plan.nccl_bytes},{plan.nccl_iterations}"
    argv = [sys.executable, "-I", str(Path(__file__).resolve()), "--nccl-worker"]
    workers = [
        subprocess.Popen(
            [*argv, f"{rank},{spec}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for rank in range(count)
    ]
    deadline = time.monotonic() + plan.nccl_timeout
    outputs = []
    for worker in workers:  # one deadline for all: a rank that died leaves the others waiting
        try:
            outputs.append(worker.communicate(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            worker.kill()
            outputs.append(worker.communicate())
    if workers[0].returncode != 0:
        raise RuntimeError(
            f"torch all-reduce worker exited {workers[0].returncode}: {outputs[0][1][-500:]}"
        )
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    return {
        "tool": "torch",
        "gpus": count,
        "busbw_gbps": round(float(result["busbw_gbps"]), 1),
        "bytes": plan.nccl_bytes,
        "max_busbw_gbps": None,
        "wrong": None,
    }


def nccl_worker(spec: str) -> int:
    """``--nccl-worker RANK,WORLD,PORT,BYTES,ITERATIONS``: one rank of the torch all-reduce."""
    rank, world, port, nbytes, iterations = (int(part) for part in spec.split(","))
    torch = importlib.import_module("torch")
    dist = importlib.import_module("torch.distributed")
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device="cuda")
        for _ in range(5):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        dist.barrier(device_ids=[rank])
        start = time.perf_counter()
        for _ in range(iterations):
            dist.all_reduce(buffer)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iterations
    finally:
        dist.destroy_process_group()
    if rank == 0:
        algbw = nbytes / seconds / 1e9
        print(json.dumps({"algbw_gbps": algbw, "busbw_gbps": busbw(algbw, world)}))
    return 0


def run_dcgm(plan: Plan, env: Mapping[str, str] | None, report: Report) -> dict[str, Any] | None:
    """``dcgmi diag -r LEVEL -j`` when dcgmi is on PATH (any backend)."""
    tool = shutil.which("dcgmi", path=(env or os.environ).get("PATH"))
    if tool is None:
        report.skip("dcgm", NO_DCGMI)
        return None
    ran = run_tool([tool, "diag", "-r", str(plan.dcgm_level), "-j"], plan.dcgm_timeout, env)
    try:
        parsed = parse_dcgm_diag(ran.out)
    except ValueError as exc:
        report.error("dcgm", f"dcgmi diag exited {ran.rc}: {exc}: {(ran.err or ran.out)[-500:]}")
        return None
    if parsed["error"]:
        report.error("dcgm", f"DCGM runtime error: {parsed['error']}")
    return {
        "version": parsed["version"],
        "level": plan.dcgm_level,
        "exit_code": ran.rc,
        "results": parsed["results"],
    }


def read_kernel_log(report: Report) -> tuple[str | None, str]:
    """The kernel log since boot: journalctl, else dmesg."""
    journal = run_tool(["journalctl", "-k", "-b", "-o", "short-monotonic", "--no-pager"], 300)
    lines = [line for line in journal.out.splitlines() if line and not line.startswith("--")]
    if journal.rc == 0 and lines:
        return "journalctl", journal.out
    dmesg = run_tool(["dmesg"], 120)
    if dmesg.rc == 0:
        return "dmesg", dmesg.out
    report.error(
        "xid",
        f"cannot read the kernel log: journalctl: {journal.err.strip()[:300]}; "
        f"dmesg: {dmesg.err.strip()[:300]}",
    )
    return None, ""


# --------------------------------------------------------------------------- the document


def tools(env: Mapping[str, str] | None) -> dict[str, str | None]:
    """Versions of the optional tools (packages are looked up, not imported)."""
    found = {module: _package_version(module) for module in ("torch", "cupy", "pynvml")}
    path = (env or os.environ).get("PATH")
    dcgmi = shutil.which("dcgmi", path=path)
    if dcgmi:
        version = re.search(r"version:\s*(\S+)", run_tool([dcgmi, "--version"], 60, env).out)
        found["dcgmi"] = version.group(1) if version else "unknown"
    else:
        found["dcgmi"] = None
    found["all_reduce_perf"] = shutil.which("all_reduce_perf", path=path)
    return found


def _package_version(module: str) -> str | None:
    distributions = importlib.metadata.packages_distributions().get(module, [])
    for name in distributions or [module]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


@dataclass
class Findings:
    """What a backend found, before it is put into the document."""

    gpus: list[dict[str, Any]] = field(default_factory=list)
    xid: dict[str, Any] = field(default_factory=lambda: {"source": None, "events": []})
    nccl: dict[str, Any] | None = None
    dcgm: dict[str, Any] | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None


def run_checks(backend: Backend, plan: Plan, report: Report) -> Findings:
    """Every check in turn; a check that breaks is an error, the next one still runs."""
    found = Findings()
    found.gpus = guarded(report, "inventory", lambda: backend.inventory(report)) or []
    versions = guarded(report, "driver", lambda: backend.versions(report)) or (None, None)
    found.driver_version, found.cuda_driver_version = versions
    engine = guarded(report, "stress", lambda: backend.measure(found.gpus, plan, report))
    found.nccl = guarded(
        report, "nccl", lambda: backend.collective(found.gpus, plan, engine, report)
    )
    found.dcgm = guarded(report, "dcgm", lambda: run_dcgm(plan, backend.tool_env, report))
    source, log = guarded(report, "xid", lambda: backend.kernel_log(report)) or (None, "")
    bus_ids = {gpu["pci_bus_id"]: gpu["index"] for gpu in found.gpus}
    found.xid = {"source": source, "events": parse_xid_log(log, bus_ids)}
    return found


def build_document(
    args: argparse.Namespace,
    backend: Backend | None,
    found: Findings,
    report: Report,
    started: float,
) -> dict[str, Any]:
    env = backend.tool_env if backend is not None else None
    host = {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "driver_version": found.driver_version,
        "cuda_driver_version": found.cuda_driver_version,
        "tools": guarded(report, "tools", lambda: tools(env)) or {},
    }
    finished = time.time()
    return {
        "schema": SCHEMA,
        "agent_version": AGENT_VERSION,
        "node": args.node or host["hostname"],
        "backend": backend.name if backend is not None else None,
        "level": args.level,
        "expected_gpus": args.expected_gpus,
        "started": iso_utc(started),
        "finished": iso_utc(finished),
        "duration_s": round(finished - started, 3),
        "host": host,
        "gpus": found.gpus,
        "xid": found.xid,
        "nccl": found.nccl,
        "dcgm": found.dcgm,
        "skipped": report.skipped,
        "errors": report.errors,
    }


def write_document(document: Mapping[str, Any], out: str | None) -> None:
    """Print the document, or write it to ``out`` atomically (a reader never sees half)."""
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    target = Path(out)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        Path(temporary).chmod(0o644)
        Path(temporary).replace(target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- command line


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a count (0 or more)")
    return value


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value

    return convert


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; argparse exits 2 on bad arguments."""
    parser = argparse.ArgumentParser(
        prog="agent.py", description="Measure this GPU node; print one JSON document."
    )
    parser.add_argument("--level", choices=LEVELS, default="standard")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--gpus-file", help=f"the lab's GPU document (default {LAB_GPUS_FILE})")
    parser.add_argument("--out", help="write the document here (atomically), not to stdout")
    parser.add_argument("--node", help="node name in the document (default: host name)")
    parser.add_argument("--expected-gpus", type=_count, help="recorded for the controller")
    parser.add_argument("--gemm-n", type=_positive(int), help="GEMM size (default 8192)")
    parser.add_argument("--gemm-seconds", type=_positive(float), help="GEMM stress duration")
    parser.add_argument("--nccl-worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def plan_for(args: argparse.Namespace) -> Plan:
    plan = PLANS[args.level]
    if args.gemm_n:
        plan = replace(plan, gemm_n=args.gemm_n)
    if args.gemm_seconds:
        plan = replace(plan, gemm_seconds=args.gemm_seconds)
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.nccl_worker:
        return nccl_worker(args.nccl_worker)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA ordinals = NVML indexes
    started = time.time()
    report = Report()
    backend, reasons = open_backend(args.backend, args.gpus_file, report)
    found = Findings()
    if backend is None:
        for reason in reasons:
            report.error("backend", reason)
    else:
        try:
            found = run_checks(backend, plan_for(args), report)
        finally:
            guarded(report, "backend", backend.close)
    document = build_document(args, backend, found, report, started)
    try:
        write_document(document, args.out)
    except OSError as exc:
        print(f"agent.py: cannot write {args.out}: {exc}", file=sys.stderr)
        return EXIT_NO_OUTPUT
    return EXIT_OK if backend is not None else EXIT_NO_BACKEND


if __name__ == "__main__":
    sys.exit(main())
