#!/usr/bin/python3
"""dcgmi - LAB BUILD (provisioner lab), not NVIDIA software.

A stand-in for DCGM's command line over the simulated GPUs of
``/run/provisioner-lab/gpus.json`` (or ``$PROVISIONER_LAB_GPUS``): ``--version``,
``discovery -l`` and ``diag -r LEVEL [-j] [-i IDS]``. Every diagnostic test passes on every GPU
still on the bus; the lab's burn-in checks, not this, judge the injected faults. The JSON
follows DCGM 4's layout (``DCGM Diagnostic`` -> ``test_categories`` -> ``tests`` ->
``results`` per entity, plus ``entity_groups`` and ``metadata``) and says it is a lab build.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DCGM_VERSION = "@DCGM_VERSION@"
GPUS_FILE = "/run/provisioner-lab/gpus.json"
DRIVER_VERSION_FILE = "/usr/share/provisioner-lab/driver-version"
SCHEMA = "provisioner-lab-gpus/1"
LAB_LINE = "LAB BUILD of dcgmi (provisioner lab) - not NVIDIA software"
NO_HOST_ENGINE = (
    "Error: unable to establish a connection to the specified host: localhost\n"
    "Error: Unable to connect to host engine. Host engine connection invalid/disconnected."
)
EXIT_ERROR = 255
GPU_GROUP_ID = 1  # DCGM_FE_GPU

# Diagnostic level -> (category, test) run at that level and every level above it.
LEVEL_TESTS: tuple[tuple[int, str, str], ...] = (
    (1, "Deployment", "software"),
    (2, "Integration", "pcie"),
    (2, "Hardware", "memory"),
    (3, "Stress", "targeted_stress"),
    (3, "Stress", "targeted_power"),
    (3, "Stress", "memory_bandwidth"),
    (4, "Hardware", "diagnostic"),
    (4, "Stress", "pulse_test"),
)
LEVEL_NAMES = {"short": 1, "quick": 1, "medium": 2, "long": 3, "xlong": 4}
Gpu = dict[str, Any]


class DcgmiError(Exception):
    """Ends the run with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def load_gpus(path: str) -> list[Gpu]:
    """The GPUs still on the bus; no file means no driver, so no host engine either."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DcgmiError(f"{NO_HOST_ENGINE}\nlab: {path} is missing (no driver)") from None
    except (OSError, ValueError) as exc:
        raise DcgmiError(f"lab: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise DcgmiError(f"lab: {path} is not {SCHEMA}")
    gpus = [gpu for gpu in data.get("gpus", []) if gpu.get("present", True)]
    return sorted(gpus, key=lambda gpu: int(gpu["index"]))


def driver_version(path: str = DRIVER_VERSION_FILE) -> str:
    """The version the lab driver package recorded, or N/A without one."""
    try:
        return Path(path).read_text(encoding="utf-8").strip() or "N/A"
    except OSError:
        return "N/A"


def diag_level(text: str) -> int:
    level = LEVEL_NAMES.get(text)
    if level is None and text.isdigit() and 1 <= int(text) <= 4:
        level = int(text)
    if level is None:
        raise DcgmiError(f"Error: invalid run level {text!r}; use 1, 2, 3 or 4", 1)
    return level


def diag_result(gpus: Sequence[Gpu], level: int, driver: str) -> dict[str, Any]:
    """The ``dcgmi diag -j`` document: every test of the level passes on every GPU."""
    categories: dict[str, list[dict[str, Any]]] = {}
    for needed, category, test in LEVEL_TESTS:
        if needed > level:
            continue
        results = [
            {"entity_group": "GPU", "entity_group_id": GPU_GROUP_ID,
             "entity_id": int(gpu["index"]), "status": "Pass"}
            for gpu in gpus
        ]  # fmt: skip
        entry = {"name": test, "results": results, "test_summary": {"status": "Pass"}}
        categories.setdefault(category, []).append(entry)
    entities = [
        {"entity_id": int(gpu["index"]), "serial_num": str(gpu.get("serial", "")),
         "uuid": str(gpu.get("uuid", "")), "pci_bus_id": str(gpu.get("pci_bus_id", ""))}
        for gpu in gpus
    ]  # fmt: skip
    return {
        "DCGM Diagnostic": {
            "test_categories": [{"category": c, "tests": t} for c, t in categories.items()]
        },
        "entity_groups": [
            {"entity_group": "GPU", "entity_group_id": GPU_GROUP_ID, "entities": entities}
        ],
        "metadata": {
            "DCGM version": DCGM_VERSION,
            "Driver version detected": driver,
            "lab_build": True,
            "note": "LAB BUILD (provisioner lab) - not NVIDIA software",
        },
    }


def diag_text(result: dict[str, Any]) -> list[str]:
    """The human table ``dcgmi diag`` prints without ``-j``."""
    rule = "+" + "-" * 27 + "+" + "-" * 48 + "+"
    meta = result["metadata"]
    lines = ["Successfully ran diagnostic for group.", LAB_LINE, rule,
             _cells("Diagnostic", "Result"), rule.replace("-", "="),
             _heading("Metadata"), _cells("DCGM Version", meta["DCGM version"]),
             _cells("Driver Version Detected", meta["Driver version detected"])]  # fmt: skip
    for category in result["DCGM Diagnostic"]["test_categories"]:
        lines.append(_heading(category["category"]))
        for test in category["tests"]:
            lines.append(_cells(test["name"], test["test_summary"]["status"]))
            lines += [_cells(f"  GPU{r['entity_id']}", r["status"]) for r in test["results"]]
    return [*lines, rule]


def _cells(left: str, right: str) -> str:
    return f"| {left:<25} | {right:<46} |"


def _heading(title: str) -> str:
    return f"|-----  {title}  ".ljust(28, "-") + "+" + "-" * 48 + "|"


def discovery(gpus: Sequence[Gpu]) -> list[str]:
    """``dcgmi discovery -l``."""
    rule = "+--------+" + "-" * 70 + "+"
    lines = [f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} found.", rule,
             f"| GPU ID | {'Device Information':<68} |", rule]  # fmt: skip
    for gpu in gpus:
        lines += [
            f"| {gpu['index']:<6} | {'Name: ' + str(gpu['name']):<68} |",
            f"|        | {'PCI Bus ID: ' + str(gpu['pci_bus_id']):<68} |",
            f"|        | {'Device UUID: ' + str(gpu['uuid']):<68} |",
            rule,
        ]
    return lines


def options(args: Sequence[str], takes_value: dict[str, str]) -> dict[str, str]:
    """``-r 1``, ``--run=1``, ``-j``: options of a subcommand by their long name."""
    found: dict[str, str] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in takes_value:
            if not eq:
                if not rest:
                    raise DcgmiError(f"Error: {name} needs a value", 1)
                value = rest.pop(0)
            found[takes_value[name]] = value
        elif arg in ("-j", "--json"):
            found["json"] = ""
        elif arg in ("-l", "--list"):
            found["list"] = ""
        else:
            raise DcgmiError(f"Error: {arg!r} is not simulated by this lab build", 1)
    return found


def run(argv: Sequence[str], gpus_file: str) -> list[str]:
    """What dcgmi prints for ``argv``; raises DcgmiError to fail."""
    if not argv or argv[0] in ("-h", "--help"):
        return [LAB_LINE, "Usage: dcgmi --version | discovery -l | diag -r LEVEL [-j] [-i IDS]"]
    if argv[0] in ("-v", "--version"):
        return [f"dcgmi  version: {DCGM_VERSION}", LAB_LINE]
    command, args = argv[0], argv[1:]
    if command == "discovery":
        options(args, {})
        return discovery(load_gpus(gpus_file))
    if command != "diag":
        raise DcgmiError(f"Error: dcgmi {command} is not simulated by this lab build", 1)
    found = options(args, {"-r": "run", "--run": "run", "-i": "ids", "--gpuList": "ids"})
    gpus = load_gpus(gpus_file)
    if "ids" in found:
        wanted = {part.strip() for part in found["ids"].split(",")}
        gpus = [gpu for gpu in gpus if str(gpu["index"]) in wanted]
    result = diag_result(gpus, diag_level(found.get("run", "1")), driver_version())
    if "json" in found:
        return json.dumps(result, indent=4).splitlines()
    return diag_text(result)


def main(argv: Sequence[str] | None = None) -> int:
    gpus_file = os.environ.get("PROVISIONER_LAB_GPUS") or GPUS_FILE
    try:
        lines = run(sys.argv[1:] if argv is None else argv, gpus_file)
    except DcgmiError as exc:
        print(exc.message, file=sys.stderr)
        return exc.code
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
