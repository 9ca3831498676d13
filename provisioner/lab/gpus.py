"""Simulated GPUs of a lab node: the document a lab node reads instead of its (absent) GPUs.

This is FAKE hardware, for the lab only: real nodes have NVML. Each lab node gets one JSON
document (``/run/provisioner-lab/gpus.json`` inside the node) describing the GPUs its spec
profile promises (SKU, count, NVSwitch) with the faults the spec's ``lab.faults`` inject.
The burn-in agent's simulated backend and the lab build of ``nvidia-smi`` read it, so the
same checks that judge a real H100 judge these, and an injected fault shows where it would
on real hardware:

=========================  ==================================================================
fault                      what the document says
=========================  ==================================================================
missing_gpu                the GPU is ``present: false`` (fell off the bus / not enumerated)
xid_79                     an Xid 79 line for its PCI address in ``kernel_log``; the GPU is
                           ``present: false`` as the driver loses it after that error
ecc_uncorrectable          ``ecc.volatile_uncorrectable`` and ``ecc.aggregate_uncorrectable``
row_remap_pending          ``row_remap.pending: true`` (a reset is needed to remap)
pcie_gen3                  ``pcie.gen`` 3 where the SKU trains at 5 (a bad riser or slot)
slow_gpu                   ``throughput`` 0.6 of the SKU's (thermal or power throttling)
nvlink_down                one NVLink link in ``nvlink.down``
silent_data_corruption     ``sdc: true``: GEMM results differ from the reference
=========================  ==================================================================

A node fault (``secure_boot``: the firmware has Secure Boot on) touches no GPU: it is not in
``faults`` but in ``platform`` (``{"secure_boot": true}``), which the rack also writes to the
node's ``/run/provisioner-lab/secureboot`` for the lab's ``mokutil``.

Identities (UUID, serial, PCI addresses) are derived from the node name, so they are stable
across ``lab up`` runs and distinct across nodes.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from provisioner.spec import Fleet, Node
from provisioner.spec.catalog import GpuSku

SCHEMA = "provisioner-lab-gpus/1"
PATH_IN_NODE = "/run/provisioner-lab/gpus.json"
# PCI buses of the eight GPUs of an HGX H100 baseboard (as seen on common 8-GPU servers).
_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB, 0x19, 0x2B, 0x3B, 0x5E, 0x9B, 0xAC)
_SLOW_FACTOR = 0.6


def gpu_document(fleet: Fleet, node: Node) -> dict[str, Any]:
    """The simulated-GPU document of ``node``."""
    profile = fleet.profile(node)
    sku = fleet.sku(profile)
    lab = fleet.document.lab
    every = lab.faults.get(node.name, ()) if lab is not None else ()
    faults = [f for f in every if not f.node_level]
    gpus = [_gpu(node.name, index, profile.gpu, sku) for index in range(profile.gpus)]
    kernel_log: list[str] = []
    for fault in faults:
        _inject(gpus[fault.gpu], fault.kind, kernel_log)
    return {
        "schema": SCHEMA,
        "lab_build": True,
        "node": node.name,
        "sku": profile.gpu,
        "architecture": sku.architecture,
        "nvswitch": fleet.nvswitch(profile),
        "faults": [{"kind": f.kind, "gpu": f.gpu} for f in faults],
        "platform": {"secure_boot": any(f.kind == "secure_boot" for f in every)},
        "gpus": gpus,
        "kernel_log": kernel_log,
    }


def _gpu(node: str, index: int, sku_name: str, sku: GpuSku) -> dict[str, Any]:
    seed = hashlib.sha256(f"{node}/{index}".encode()).digest()
    bus = _BUSES[index % len(_BUSES)] + 0x100 * (index // len(_BUSES))
    memory_mib = {80: 81559, 141: 143771, 180: 183359}.get(int(sku.memory_gb))
    return {
        "index": index,
        "present": True,
        "name": sku.nvml_names[0],
        "uuid": f"GPU-{uuid.UUID(bytes=seed[:16], version=4)}",
        "serial": str(1650000000000 + int.from_bytes(seed[16:22]) % 10**12),
        "pci_bus_id": f"00000000:{bus:02X}:00.0",
        "memory_mib": memory_mib or int(sku.memory_gb * 1024),
        "pcie": {"max_gen": sku.pcie_gen, "max_width": 16, "gen": sku.pcie_gen, "width": 16},
        "nvlink": {"links": sku.nvlink_links, "down": []},
        "ecc": {
            "volatile_corrected": 0,
            "volatile_uncorrectable": 0,
            "aggregate_corrected": 0,
            "aggregate_uncorrectable": 0,
        },
        "row_remap": {"pending": False, "failure": False, "correctable": 0, "uncorrectable": 0},
        "xid": [],
        "throttle_reasons": [],
        "throughput": 1.0,
        "sdc": False,
        "peak": {"bf16_dense_tflops": sku.bf16_dense_tflops, "hbm_tbps": sku.hbm_tbps},
        "sku": sku_name,
    }


def _inject(gpu: dict[str, Any], kind: str, kernel_log: list[str]) -> None:
    address = gpu["pci_bus_id"][4:].rsplit(".", 1)[0]  # "0000:9A:00", as NVRM prints it
    if kind == "missing_gpu":
        gpu["present"] = False
    elif kind == "xid_79":
        gpu["xid"].append(79)
        gpu["present"] = False
        kernel_log.append(
            f"NVRM: Xid (PCI:{address}): 79, pid=0, name=nvidia-smi, GPU has fallen off the bus."
        )
        kernel_log.append(f"NVRM: GPU {address}: GPU has fallen off the bus.")
    elif kind == "ecc_uncorrectable":
        gpu["ecc"]["volatile_uncorrectable"] = 2
        gpu["ecc"]["aggregate_uncorrectable"] = 2
        gpu["xid"].append(48)
        kernel_log.append(
            f"NVRM: Xid (PCI:{address}): 48, pid=0, name=lab, An uncorrectable double bit "
            "error (DBE) has been detected on GPU in the framebuffer."
        )
    elif kind == "row_remap_pending":
        gpu["row_remap"]["pending"] = True
        gpu["row_remap"]["uncorrectable"] = 1
    elif kind == "pcie_gen3":
        gpu["pcie"]["gen"] = 3
    elif kind == "slow_gpu":
        gpu["throughput"] = _SLOW_FACTOR
        gpu["throttle_reasons"].append("hw_slowdown")
    elif kind == "nvlink_down":
        if gpu["nvlink"]["links"]:
            gpu["nvlink"]["down"].append(gpu["nvlink"]["links"] - 1)
    elif kind == "silent_data_corruption":
        gpu["sdc"] = True
    else:  # the spec's Literal keeps this unreachable; a new kind must be handled here
        raise ValueError(f"unknown lab fault {kind!r}")
