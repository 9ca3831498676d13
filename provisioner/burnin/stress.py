"""Stress checks: what each GPU and the node reached under load (GEMM, silent data corruption,
stragglers, HBM and host copies, all-reduce) against the floors, and DCGM's diagnostic.
A measurement the document lacks is judged by :func:`provisioner.burnin.missing.absent`.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import median

from provisioner.burnin.document import AgentDocument, DcgmResult, Gpu
from provisioner.burnin.floors import FIGURES, Expectation
from provisioner.burnin.missing import absent
from provisioner.burnin.verdict import Check, Verdict, number


def at_least(
    check_id: str, value: float, floor: float | None, unit: str, gpu: int | None = None
) -> Check:
    """Pass when ``value`` reaches ``floor`` (no floor: reported, passes)."""
    shown = f"{number(value)} {unit}"
    if floor is None:
        return Check(check_id, Verdict.PASS, f"{shown} (no floor)", gpu=gpu, value=value, unit=unit)
    low = value < floor
    reason = f"{shown} {'<' if low else '>='} floor {number(floor)} {unit}"
    verdict = Verdict.FAIL if low else Verdict.PASS
    return Check(check_id, verdict, reason, gpu=gpu, value=value, floor=floor, unit=unit)


def gemm(gpu: Gpu, document: AgentDocument, expected: Expectation) -> list[Check]:
    """compute.gemm (TFLOPS against the floor) and compute.sdc (repeated GEMMs agree)."""
    floor, unit, index = expected.floors.gemm_tflops, FIGURES["gemm_tflops"], gpu.index
    run = gpu.gemm
    if run is None:
        return [
            absent("compute.gemm", document, gpu=index, unit=unit, floor=floor),
            absent("compute.sdc", document, gpu=index),
        ]
    speed = at_least("compute.gemm", run.tflops, floor, unit, index)
    speed = Check(
        speed.id,
        speed.verdict,
        f"{speed.reason} ({run.dtype}, n={run.n})",
        gpu=index,
        value=speed.value,
        floor=speed.floor,
        unit=unit,
    )
    if run.sdc_mismatches:
        reason = (
            f"{run.sdc_mismatches} of {run.sdc_repeats} repeated GEMMs differ from the first "
            f"(max |diff| {run.max_abs_diff:g}), floor 0: silent data corruption"
        )
        sdc = Check(
            "compute.sdc", Verdict.FAIL, reason, gpu=index, value=run.sdc_mismatches, floor=0
        )
    elif run.sdc_repeats == 0:
        sdc = Check("compute.sdc", Verdict.WARN, "no repeated GEMMs compared", gpu=index)
    else:
        reason = f"{run.sdc_repeats} repeated GEMMs identical to the first"
        sdc = Check("compute.sdc", Verdict.PASS, reason, gpu=index, value=0, floor=0)
    return [speed, sdc]


def stragglers(document: AgentDocument, expected: Expectation) -> list[Check]:
    """compute.straggler: a GPU below ``straggler_fraction`` of the node's median GEMM."""
    speeds = {gpu.index: gpu.gemm.tflops for gpu in document.gpus if gpu.gemm is not None}
    fraction = expected.floors.straggler_fraction
    checks = []
    middle = median(speeds.values()) if speeds else 0.0
    for gpu in document.gpus:
        speed = speeds.get(gpu.index)
        if speed is None:
            checks.append(absent("compute.straggler", document, gpu=gpu.index))
            continue
        if len(speeds) < 2 or middle <= 0:
            reason = "a single GPU measured: no median to compare with"
            checks.append(Check("compute.straggler", Verdict.SKIP, reason, gpu=gpu.index))
            continue
        share = speed / middle
        slow = share < fraction
        reason = (
            f"{number(speed)} TFLOPS is {share:.2f} of the node's median {number(middle)} "
            f"({'<' if slow else '>='} {fraction:g})"
        )
        checks.append(
            Check(
                "compute.straggler",
                Verdict.FAIL if slow else Verdict.PASS,
                reason,
                gpu=gpu.index,
                value=round(share, 4),
                floor=fraction,
            )
        )
    return checks


def bandwidth(gpu: Gpu, document: AgentDocument, expected: Expectation) -> list[Check]:
    """bandwidth.hbm, bandwidth.h2d and bandwidth.d2h of one GPU against the floors."""
    floors = expected.floors
    checks = []
    for check_id, figure, measured in (
        ("bandwidth.hbm", floors.hbm_gbps, gpu.hbm),
        ("bandwidth.h2d", floors.h2d_gbps, gpu.h2d),
        ("bandwidth.d2h", floors.d2h_gbps, gpu.d2h),
    ):
        if measured is None:
            checks.append(absent(check_id, document, gpu=gpu.index, unit="GB/s", floor=figure))
        else:
            checks.append(at_least(check_id, measured.gbps, figure, "GB/s", gpu.index))
    return checks


def allreduce(document: AgentDocument, expected: Expectation) -> Check:
    """collectives.allreduce: the node's all-reduce bus bandwidth against the floor."""
    floor = expected.floors.allreduce_busbw_gbps
    if expected.gpu_count < 2:
        return Check("collectives.allreduce", Verdict.SKIP, "a single GPU: no collective")
    if document.nccl is None:
        return absent("collectives.allreduce", document, unit="GB/s", floor=floor)
    check = at_least("collectives.allreduce", document.nccl.busbw_gbps, floor, "GB/s")
    reason = f"{check.reason} bus bandwidth ({document.nccl.gpus} GPUs, {document.nccl.tool})"
    return Check(check.id, check.verdict, reason, value=check.value, floor=check.floor, unit="GB/s")


def dcgm(document: AgentDocument, expected: Expectation) -> list[Check]:
    """dcgm.diag: per GPU (and for the node's own tests) the worst of DCGM's results: a
    Fail fails, a Warn warns."""
    if document.dcgm is None:
        return [absent("dcgm.diag", document, expected=expected.dcgm)]
    by_gpu: dict[int | None, list[DcgmResult]] = defaultdict(list)
    for result in document.dcgm.results:
        by_gpu[result.gpu].append(result)
    level = document.dcgm.level
    checks = []
    for gpu in sorted(by_gpu, key=lambda g: -1 if g is None else g):
        results = by_gpu[gpu]
        bad = [r for r in results if r.status == "fail"]
        warned = [r for r in results if r.status == "warn"]
        ran = [r for r in results if r.status != "skip"]
        if bad or warned:
            shown = "; ".join(f"{r.category}/{r.test} {r.status}: {r.info}" for r in bad + warned)
            verdict = Verdict.FAIL if bad else Verdict.WARN
            checks.append(Check("dcgm.diag", verdict, f"dcgmi diag -r {level}: {shown}", gpu=gpu))
        elif ran:
            reason = f"dcgmi diag -r {level}: {len(ran)} tests passed"
            checks.append(Check("dcgm.diag", Verdict.PASS, reason, gpu=gpu))
        else:
            reason = f"dcgmi diag -r {level}: every test skipped"
            checks.append(Check("dcgm.diag", Verdict.SKIP, reason, gpu=gpu))
    if not checks:
        checks.append(Check("dcgm.diag", Verdict.WARN, f"dcgmi diag -r {level}: no results"))
    return checks
