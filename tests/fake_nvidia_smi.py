"""A FAKE nvidia-smi for the burn-in agent's tests: it replays recorded outputs, nothing more.

Not NVIDIA software and not the lab's build (``provisioner/lab/labbin/nvidia_smi.py``): this
one answers from files under tests/data/burnin/ named by environment variables, so that the
agent's smi backend can be run end to end on a machine without GPUs:

- ``FAKE_NVIDIA_SMI_QUERY``: a ``smi/<case>/`` folder. ``--query-gpu=FIELDS`` prints the
  recorded ``output.csv`` (recorded for the fields of ``query.txt``) limited to FIELDS, in
  their order; lines that are not rows (a lost GPU's error) are printed as recorded. A field
  the recording lacks is refused as nvidia-smi refuses an unknown field (exit 2).
- ``FAKE_NVIDIA_SMI_BANNER``: the file printed without arguments.
- ``FAKE_NVIDIA_SMI_NVLINK``: the file printed for ``nvlink -s``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def query(folder: Path, fields: list[str]) -> tuple[int, str]:
    recorded = (folder / "query.txt").read_text().strip().split(",")
    for name in fields:
        if name not in recorded:
            return 2, f'Field "{name}" is not a valid field to query.\n'
    lines = []
    for line in (folder / "output.csv").read_text().splitlines():
        cells = line.split(", ")
        if len(cells) != len(recorded):
            lines.append(line)
            continue
        row = dict(zip(recorded, cells, strict=True))
        lines.append(", ".join(row[name] for name in fields))
    return 0, "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(Path(os.environ["FAKE_NVIDIA_SMI_BANNER"]).read_text())
        return 0
    if argv[:2] == ["nvlink", "-s"]:
        sys.stdout.write(Path(os.environ["FAKE_NVIDIA_SMI_NVLINK"]).read_text())
        return 0
    fields = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--query-gpu=")]
    if not fields or "--format=csv,noheader,nounits" not in argv:
        sys.stdout.write("fake nvidia-smi: only the agent's queries are recorded\n")
        return 2
    code, text = query(Path(os.environ["FAKE_NVIDIA_SMI_QUERY"]), fields[0].split(","))
    sys.stdout.write(text)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
