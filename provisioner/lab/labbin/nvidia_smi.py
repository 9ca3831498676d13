#!/usr/bin/python3
"""nvidia-smi - LAB BUILD (provisioner lab), not NVIDIA software.

Prints the simulated GPUs of ``/run/provisioner-lab/gpus.json`` (or ``$PROVISIONER_LAB_GPUS``)
the way NVIDIA's nvidia-smi prints real ones: the summary table (no arguments), ``-L``, and
``--query-gpu=FIELDS --format=csv[,noheader][,nounits]``, optionally limited by ``-i``. GPUs
marked ``"present": false`` have fallen off the bus and are not shown. Without the file it
fails as nvidia-smi does without a driver (exit 9). Exit codes follow nvidia-smi: 2 bad
arguments, 6 no devices, 9 no driver, 255 unknown error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DRIVER_VERSION = "@DRIVER_VERSION@"
CUDA_VERSION = "@CUDA_VERSION@"
GPUS_FILE = "/run/provisioner-lab/gpus.json"
SCHEMA = "provisioner-lab-gpus/1"
LAB_LINE = "LAB BUILD of nvidia-smi (provisioner lab) - not NVIDIA software"
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
BAD_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."
USAGE = f"""{LAB_LINE}

nvidia-smi [OPTION] ...
    -h, --help                 Print this help.
    -L, --list-gpus            List the GPUs.
    -i, --id=ID                Only the GPUs with these indexes or UUIDs (comma separated).
    --query-gpu=FIELDS         Print FIELDS of each GPU: index, name, uuid, serial,
                               driver_version, memory.total, pci.bus_id, count.
    --format=csv[,noheader][,nounits]
"""

EXIT_BAD_ARGS, EXIT_NO_DEVICES, EXIT_NO_DRIVER, EXIT_UNKNOWN = 2, 6, 9, 255
Gpu = dict[str, Any]
Field = tuple[str, Callable[[Gpu, int], str], str | None]  # header, value, unit

FIELDS: dict[str, Field] = {
    "index": ("index", lambda g, n: str(g["index"]), None),
    "name": ("name", lambda g, n: str(g["name"]), None),
    "uuid": ("uuid", lambda g, n: str(g["uuid"]), None),
    "serial": ("serial", lambda g, n: str(g.get("serial", "[N/A]")), None),
    "driver_version": ("driver_version", lambda g, n: DRIVER_VERSION, None),
    "memory.total": ("memory.total [MiB]", lambda g, n: str(g["memory_mib"]), "MiB"),
    "pci.bus_id": ("pci.bus_id", lambda g, n: str(g["pci_bus_id"]), None),
    "count": ("count", lambda g, n: str(n), None),
}
ALIASES = {
    "gpu_name": "name",
    "gpu_uuid": "uuid",
    "gpu_serial": "serial",
    "gpu_bus_id": "pci.bus_id",
}


class SmiError(Exception):
    """Ends the run with nvidia-smi's message (on stdout) and exit code."""

    def __init__(self, code: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.detail = code, message, detail


# --------------------------------------------------------------------------- reading


def load_gpus(path: str) -> list[Gpu]:
    """The GPUs still on the bus, by index; raises SmiError as nvidia-smi would fail."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmiError(EXIT_NO_DRIVER, NO_DRIVER) from None
    except (OSError, ValueError) as exc:
        raise SmiError(EXIT_UNKNOWN, "Unknown Error", f"lab: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise SmiError(EXIT_UNKNOWN, "Unknown Error", f"lab: {path} is not {SCHEMA}")
    gpus = [gpu for gpu in data.get("gpus", []) if gpu.get("present", True)]
    return sorted(gpus, key=lambda gpu: int(gpu["index"]))


def select(gpus: list[Gpu], ids: str | None) -> list[Gpu]:
    """Only the GPUs named by ``-i`` (indexes or UUIDs), in their order."""
    if ids is None:
        return gpus
    wanted = {part.strip() for part in ids.split(",") if part.strip()}
    return [gpu for gpu in gpus if str(gpu["index"]) in wanted or gpu.get("uuid") in wanted]


# --------------------------------------------------------------------------- output


def list_gpus(gpus: Sequence[Gpu]) -> list[str]:
    """``-L``: ``GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)``."""
    return [f"GPU {gpu['index']}: {gpu['name']} (UUID: {gpu['uuid']})" for gpu in gpus]


def query(gpus: Sequence[Gpu], fields_text: str, format_text: str) -> list[str]:
    """``--query-gpu`` in CSV, with nvidia-smi's header and units."""
    options = [part.strip() for part in format_text.split(",")]
    if not options or options[0] != "csv" or set(options[1:]) - {"noheader", "nounits"}:
        raise SmiError(EXIT_BAD_ARGS, f'"{format_text}" is not a valid format.')
    names = [ALIASES.get(n.strip(), n.strip()) for n in fields_text.split(",") if n.strip()]
    for name in names:
        if name not in FIELDS:
            raise SmiError(EXIT_BAD_ARGS, f'Field "{name}" is not a valid field to query.')
    units = "nounits" not in options
    lines = [] if "noheader" in options else [", ".join(FIELDS[n][0] for n in names)]
    for gpu in gpus:
        values = []
        for name in names:
            _, value, unit = FIELDS[name]
            text = value(gpu, len(gpus))
            values.append(f"{text} {unit}" if unit and units else text)
        lines.append(", ".join(values))
    return lines


def table(gpus: Sequence[Gpu], now: float) -> list[str]:
    """The summary table nvidia-smi prints without arguments, after a LAB BUILD line."""
    rule = "+" + "-" * 41 + "+" + "-" * 24 + "+" + "-" * 22 + "+"
    lines = [LAB_LINE, time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now)) + " " * 7]
    lines += [
        "+" + "-" * 89 + "+",
        f"| NVIDIA-SMI {DRIVER_VERSION:<22}Driver Version: {DRIVER_VERSION:<15}"
        f"CUDA Version: {CUDA_VERSION:<10}|",
        "|" + rule[1:-1] + "|",
        _row(" GPU  Name                 Persistence-M", " Bus-Id          Disp.A",
             " Volatile Uncorr. ECC"),
        _row(" Fan  Temp   Perf          Pwr:Usage/Cap", "           Memory-Usage",
             " GPU-Util  Compute M."),
        _row("", "", f"{'MIG M.':>21}"),
        "|" + "=" * 41 + "+" + "=" * 24 + "+" + "=" * 22 + "|",
    ]  # fmt: skip
    for gpu in gpus:
        lines += [*_gpu_rows(gpu), rule]
    lines += ["", *_processes()]
    return lines


def _gpu_rows(gpu: Gpu) -> list[str]:
    name = str(gpu["name"])[:29]
    power = int(gpu.get("power_w", 70))
    cap = int(gpu.get("power_limit_w", 700))
    temp = int(gpu.get("temperature_c", 30))
    memory = int(gpu["memory_mib"])
    return [
        _row(f"{gpu['index']:>4}  {name:<29}{'On':>4}", f"{gpu['pci_bus_id']:>19} Off", f"{0:>21}"),
        _row(f"{'N/A':>4}{temp:>5}C{'P0':>6}{power:>15}W / {cap:>4}W",
             f"{0:>8}MiB / {memory:>6}MiB", f"{0:>7}%{'Default':>13}"),
        _row("", "", f"{'Disabled':>21}"),
    ]  # fmt: skip


def _row(first: str, second: str, third: str) -> str:
    return f"|{first:<40} |{second:<23} |{third:<21} |"


def _processes() -> list[str]:
    texts = [
        " Processes:",
        "  GPU   GI   CI              PID   Type   Process name                        GPU Memory",
        "        ID   ID                                                               Usage",
    ]
    top = "+" + "-" * 89 + "+"
    body = [f"|{text:<89}|" for text in texts]
    return [top, *body, "|" + "=" * 89 + "|", f"|{'  No running processes found':<89}|", top]


# --------------------------------------------------------------------------- command line


def parse(argv: Sequence[str]) -> dict[str, str]:
    """Options as ``{"list": "", "query": FIELDS, "format": ..., "id": ...}``."""
    takes_value = {"--query-gpu": "query", "--format": "format", "-i": "id", "--id": "id"}
    flags = {"-L": "list", "--list-gpus": "list", "-h": "help", "--help": "help"}
    options: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in takes_value:
            if not eq:
                if not args:
                    raise SmiError(EXIT_BAD_ARGS, BAD_ARGS)
                value = args.pop(0)
            options[takes_value[name]] = value
        elif arg in flags:
            options[flags[arg]] = ""
        else:
            raise SmiError(EXIT_BAD_ARGS, BAD_ARGS, f"lab: {arg!r} is not simulated")
    return options


def run(argv: Sequence[str], gpus_file: str, now: float) -> list[str]:
    """What nvidia-smi prints for ``argv``; raises SmiError to fail."""
    options = parse(argv)
    if "help" in options:
        return USAGE.splitlines()
    if "format" in options and "query" not in options:
        raise SmiError(EXIT_BAD_ARGS, BAD_ARGS)
    gpus = select(load_gpus(gpus_file), options.get("id"))
    if not gpus:
        raise SmiError(EXIT_NO_DEVICES, "No devices were found")
    if "query" in options:
        if "format" not in options:
            raise SmiError(EXIT_BAD_ARGS, BAD_ARGS, "lab: --query-gpu needs --format=csv")
        return query(gpus, options["query"], options["format"])
    if "list" in options:
        return list_gpus(gpus)
    return table(gpus, now)


def main(argv: Sequence[str] | None = None) -> int:
    gpus_file = os.environ.get("PROVISIONER_LAB_GPUS") or GPUS_FILE
    try:
        lines = run(sys.argv[1:] if argv is None else argv, gpus_file, time.time())
    except SmiError as exc:
        print(exc.message)
        if exc.detail:
            print(exc.detail, file=sys.stderr)
        return exc.code
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
