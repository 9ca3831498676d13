"""The controller judges: an agent document and what the spec expects of the node in, a
:class:`NodeVerdict` out (``ready`` when no check fails, else ``quarantined``).

Check ids are stable (:data:`provisioner.burnin.verdict.CHECK_IDS`): JUnit test names and
Prometheus labels use them. Node checks: inventory.gpu_count, inventory.driver_version, xid,
collectives.allreduce, agent.errors (dcgm.diag too, for DCGM's node-wide tests); every other
check is per GPU present. A measurement the agent skipped warns with its reason, unless the
level or the spec leaves it out (see :mod:`provisioner.burnin.missing`).
"""

from __future__ import annotations

from typing import Any

from provisioner.burnin import health, stress
from provisioner.burnin.document import AgentDocument, parse_document
from provisioner.burnin.floors import Expectation
from provisioner.burnin.missing import unmatched_errors
from provisioner.burnin.verdict import Check, GpuFigures, NodeVerdict


def judge(document: AgentDocument | dict[str, Any], expected: Expectation) -> NodeVerdict:
    """Judge ``document`` (parsed, or the decoded JSON) against ``expected``."""
    if not isinstance(document, AgentDocument):
        document = parse_document(document)
    checks = health.inventory(document, expected)
    for gpu in document.gpus:
        checks += health.ecc(gpu)
        checks.append(health.memory(gpu))
        checks += health.pcie(gpu, expected, expected.floors)
        checks += health.nvlink(gpu, expected)
        checks += health.thermal(gpu, expected.floors)
        checks += stress.gemm(gpu, document, expected)
        checks += stress.bandwidth(gpu, document, expected)
    checks.append(health.xid(document))
    checks += stress.stragglers(document, expected)
    checks.append(stress.allreduce(document, expected))
    checks += stress.dcgm(document, expected)
    checks.append(unmatched_errors(document, checks))
    return NodeVerdict(
        node=document.node,
        level=document.level,
        backend=document.backend or "none",
        started=document.started,
        finished=document.finished,
        duration_s=document.duration_s,
        driver_version=document.host.driver_version,
        floors=expected.floors,
        checks=tuple(sorted(checks, key=Check.sort_key)),
        gpus=tuple(figures(document)),
        allreduce_busbw_gbps=document.nccl.busbw_gbps if document.nccl else None,
        allreduce_gpus=document.nccl.gpus if document.nccl else None,
    )


def figures(document: AgentDocument) -> list[GpuFigures]:
    """Each GPU's measured figures, for reports."""
    return [
        GpuFigures(
            index=gpu.index,
            name=gpu.name,
            uuid=gpu.uuid,
            serial=gpu.serial,
            pci_bus_id=gpu.pci_bus_id,
            gemm_tflops=gpu.gemm.tflops if gpu.gemm else None,
            hbm_gbps=gpu.hbm.gbps if gpu.hbm else None,
            h2d_gbps=gpu.h2d.gbps if gpu.h2d else None,
            d2h_gbps=gpu.d2h.gbps if gpu.d2h else None,
            max_temperature_c=gpu.thermal.max_temperature_c,
            max_power_w=gpu.thermal.max_power_w,
        )
        for gpu in document.gpus
    ]
