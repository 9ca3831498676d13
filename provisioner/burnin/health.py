"""Health checks: what the node and each GPU report about themselves (inventory, ECC, memory
remapping, PCIe and NVLink links, Xid events, clocks and temperature). Pure functions of the
agent's document and the node's expectation; thresholds cite GPU-FACTS.md's sources.
"""

from __future__ import annotations

from provisioner.burnin.document import AgentDocument, Gpu, Xid, XidEvent
from provisioner.burnin.floors import Expectation, Floors
from provisioner.burnin.missing import absent
from provisioner.burnin.verdict import Check, Verdict, number

# Xids that fail a node (Azure's HPC health checks' list); 63 is a row-remap *recording*
# event, informational. Names from NVIDIA's Xid catalog.
XID_NAMES: dict[int, str] = {
    48: "double-bit ECC error",
    56: "display engine error",
    57: "error programming video memory interface",
    58: "unstable video memory interface",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapping failure",
    68: "video processor exception",
    69: "graphics engine class error",
    73: "NVENC2 error",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    80: "corrupted data sent to GPU",
    81: "VGA subsystem error",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}
FATAL_XIDS = frozenset(XID_NAMES) - {63}
# Clock events (NVML clocks-event reasons) that mean the GPU is being held back.
FAILING_CLOCK_EVENTS = ("hw_slowdown", "hw_thermal", "power_brake", "sw_thermal")
# NVIDIA's dynamic page retirement: a board with this many retired pages is due for RMA.
RETIRED_PAGES_RMA = 60


def inventory(document: AgentDocument, expected: Expectation) -> list[Check]:
    """inventory.gpu_count, inventory.driver_version (node) and inventory.gpu_model (GPUs)."""
    found = len(document.gpus)
    count = Check(
        "inventory.gpu_count",
        Verdict.PASS if found == expected.gpu_count else Verdict.FAIL,
        f"{found} of {expected.gpu_count} GPUs" + _missing(document, expected.gpu_count),
        value=found,
        floor=expected.gpu_count,
    )
    checks = [count, _driver(document.host.driver_version, expected.driver_version)]
    for gpu in document.gpus:
        good = not expected.nvml_names or gpu.name in expected.nvml_names
        want = " or ".join(repr(name) for name in expected.nvml_names)
        reason = f"{gpu.name!r}" + ("" if good else f", expected {want}")
        checks.append(
            Check(
                "inventory.gpu_model",
                Verdict.PASS if good else Verdict.FAIL,
                reason,
                gpu=gpu.index,
                value=gpu.name,
            )
        )
    return checks


def _missing(document: AgentDocument, expected: int) -> str:
    indices = {gpu.index for gpu in document.gpus}
    gone = [index for index in range(expected) if index not in indices]
    if not gone or len(gone) != expected - len(document.gpus):
        return ""
    return f" (missing: GPU {', '.join(map(str, gone))})"


def _driver(found: str | None, expected: str | None) -> Check:
    if expected is None:
        return Check("inventory.driver_version", Verdict.SKIP, "no driver version in the spec")
    if found is None:
        return Check(
            "inventory.driver_version",
            Verdict.FAIL,
            f"no driver loaded (expected {expected})",
            floor=None,
        )
    good = found == expected
    reason = f"driver {found}" + ("" if good else f", the spec's stack pins {expected}")
    return Check(
        "inventory.driver_version", Verdict.PASS if good else Verdict.FAIL, reason, value=found
    )


def ecc(gpu: Gpu) -> list[Check]:
    """ecc.mode and ecc.uncorrectable of one GPU."""
    index, counts = gpu.index, gpu.ecc
    if counts.mode is None:
        mode = Check("ecc.mode", Verdict.SKIP, "ECC mode not reported", gpu=index)
    elif counts.mode:
        mode = Check("ecc.mode", Verdict.PASS, "ECC on", gpu=index)
    else:
        mode = Check("ecc.mode", Verdict.FAIL, "ECC off (nvidia-smi -e 1, then reboot)", gpu=index)
    volatile, aggregate = counts.volatile_uncorrectable, counts.aggregate_uncorrectable
    if volatile is None and aggregate is None:
        errors = Check("ecc.uncorrectable", Verdict.SKIP, "ECC counts not reported", gpu=index)
    elif volatile:
        errors = Check(
            "ecc.uncorrectable",
            Verdict.FAIL,
            f"{volatile} uncorrectable ECC errors since boot (volatile), floor 0",
            gpu=index,
            value=volatile,
            floor=0,
        )
    elif aggregate:
        errors = Check(
            "ecc.uncorrectable",
            Verdict.WARN,
            f"{aggregate} uncorrectable ECC errors in the GPU's lifetime, none since boot",
            gpu=index,
            value=aggregate,
        )
    else:
        errors = Check("ecc.uncorrectable", Verdict.PASS, "0 uncorrectable", gpu=index, value=0)
    return [mode, errors]


def memory(gpu: Gpu) -> Check:
    """memory.row_remap (Ampere and later) or memory.retired_pages (before)."""
    remap, pages = gpu.row_remap, gpu.retired_pages
    if remap is not None:
        rows = f"{remap.correctable} correctable, {remap.uncorrectable} uncorrectable rows remapped"
        if remap.failure:
            return Check(
                "memory.row_remap",
                Verdict.FAIL,
                f"row remapping failed ({rows}): RMA",
                gpu=gpu.index,
            )
        if remap.pending:
            reason = f"row remap pending ({rows}): reset the GPU or reboot, then run again"
            return Check("memory.row_remap", Verdict.FAIL, reason, gpu=gpu.index)
        return Check("memory.row_remap", Verdict.PASS, rows, gpu=gpu.index)
    if pages is not None:
        total = pages.single_bit + pages.double_bit
        listed = f"{pages.single_bit} single-bit, {pages.double_bit} double-bit pages retired"
        if pages.pending:
            reason = f"page retirement pending ({listed}): reboot, then run again"
            return Check("memory.retired_pages", Verdict.FAIL, reason, gpu=gpu.index)
        if total >= RETIRED_PAGES_RMA:
            reason = f"{listed}: {total} >= {RETIRED_PAGES_RMA}, due for RMA"
            return Check("memory.retired_pages", Verdict.FAIL, reason, gpu=gpu.index, value=total)
        verdict = Verdict.WARN if pages.double_bit else Verdict.PASS
        return Check("memory.retired_pages", verdict, listed, gpu=gpu.index, value=total)
    return Check(
        "memory.row_remap",
        Verdict.SKIP,
        "neither row remapping nor retired pages reported",
        gpu=gpu.index,
    )


def pcie(gpu: Gpu, expected: Expectation, floors: Floors) -> list[Check]:
    """pcie.link (read under load: links downshift at idle) and pcie.replay."""
    link, index = gpu.pcie, gpu.index
    want_gen = expected.pcie_gen or link.max_gen
    want_width = link.max_width or 16
    if link.gen is None or link.width is None or want_gen is None:
        state = Check("pcie.link", Verdict.SKIP, "PCIe link not reported", gpu=index)
    else:
        shown = f"gen {link.gen} x{link.width}"
        if link.gen >= want_gen and link.width >= want_width:
            state = Check("pcie.link", Verdict.PASS, shown, gpu=index, value=link.gen)
        else:
            reason = f"{shown} < gen {want_gen} x{want_width}"
            if link.under_load:
                verdict, reason = Verdict.FAIL, reason + " under load"
            else:
                verdict, reason = Verdict.WARN, reason + " (read at idle, where links downshift)"
            state = Check("pcie.link", verdict, reason, gpu=index, value=link.gen, floor=want_gen)
    replays = link.replay_delta
    if replays is None:
        replay = Check("pcie.replay", Verdict.SKIP, "replay counter not reported", gpu=index)
    else:
        limit = floors.pcie_replays_max
        verdict = Verdict.FAIL if replays > limit else Verdict.PASS
        sign = ">" if replays > limit else "<="
        reason = f"{replays} PCIe replays during the run {sign} {limit}"
        replay = Check("pcie.replay", verdict, reason, gpu=index, value=replays, floor=limit)
    return [state, replay]


def nvlink(gpu: Gpu, expected: Expectation) -> list[Check]:
    """nvlink.links (all of the SKU's links up, NVSwitch profiles) and nvlink.errors."""
    fabric, index, want = gpu.nvlink, gpu.index, expected.nvlink_links
    if want is None:
        links = Check("nvlink.links", Verdict.SKIP, "no NVSwitch fabric in the profile", gpu=index)
    elif fabric.links_up is None:
        links = Check(
            "nvlink.links",
            Verdict.FAIL,
            f"NVLink state not reported (expected {want} links up)",
            gpu=index,
        )
    else:
        good = fabric.links_up >= want and not fabric.links_down
        reason = f"{fabric.links_up} of {want} links up"
        if fabric.links_down:
            reason += f" (down: {', '.join(map(str, fabric.links_down))})"
        links = Check(
            "nvlink.links",
            Verdict.PASS if good else Verdict.FAIL,
            reason,
            gpu=index,
            value=fabric.links_up,
            floor=want,
        )
    if fabric.error_delta is None:
        errors = Check(
            "nvlink.errors", Verdict.SKIP, "NVLink error counters not reported", gpu=index
        )
    else:
        verdict = Verdict.WARN if fabric.error_delta else Verdict.PASS
        reason = f"{fabric.error_delta} NVLink errors during the run"
        errors = Check("nvlink.errors", verdict, reason, gpu=index, value=fabric.error_delta)
    return [links, errors]


def thermal(gpu: Gpu, floors: Floors) -> list[Check]:
    """thermal.clock_events and thermal.temperature (against the ceiling)."""
    index, heat = gpu.index, gpu.thermal
    bad = [event for event in heat.clock_events if event in FAILING_CLOCK_EVENTS]
    info = [event for event in heat.clock_events if event not in FAILING_CLOCK_EVENTS]
    if bad:
        reason = f"clocks held back by {', '.join(bad)}"
        events = Check("thermal.clock_events", Verdict.FAIL, reason, gpu=index, value=bad[0])
    else:
        shown = f"informational: {', '.join(info)}" if info else "no clock events"
        events = Check("thermal.clock_events", Verdict.PASS, shown, gpu=index)
    ceiling, hottest = floors.max_temperature_c, heat.max_temperature_c
    if hottest is None:
        temperature = Check(
            "thermal.temperature",
            Verdict.SKIP,
            "temperature not reported",
            gpu=index,
            unit="°C",
            floor=ceiling,
        )
    elif ceiling is None:
        temperature = Check(
            "thermal.temperature",
            Verdict.PASS,
            f"max {number(hottest)} °C",
            gpu=index,
            value=hottest,
            unit="°C",
        )
    else:
        hot = hottest > ceiling
        reason = f"max {number(hottest)} °C {'>' if hot else '<='} ceiling {number(ceiling)} °C"
        temperature = Check(
            "thermal.temperature",
            Verdict.FAIL if hot else Verdict.PASS,
            reason,
            gpu=index,
            value=hottest,
            floor=ceiling,
            unit="°C",
        )
    return [events, temperature]


def xid(document: AgentDocument) -> Check:
    """xid: a fatal Xid in the kernel log fails the node; others (63 included) warn."""
    log: Xid = document.xid
    if log.source is None:
        return absent("xid", document)
    fatal = [event for event in log.events if event.xid in FATAL_XIDS]
    other = [event for event in log.events if event.xid not in FATAL_XIDS]
    if fatal:
        return Check("xid", Verdict.FAIL, _xids(fatal), value=fatal[0].xid)
    if other:
        return Check("xid", Verdict.WARN, _xids(other), value=other[0].xid)
    return Check("xid", Verdict.PASS, f"no Xid events ({log.source})")


def _xids(events: list[XidEvent]) -> str:
    shown = []
    for event in events[:5]:
        where = event.pci + (f" (GPU {event.gpu})" if event.gpu is not None else "")
        name = XID_NAMES.get(event.xid, "see NVIDIA's Xid catalog")
        shown.append(f"Xid {event.xid} on {where}: {name}")
    more = f" (and {len(events) - 5} more)" if len(events) > 5 else ""
    return "; ".join(shown) + more
