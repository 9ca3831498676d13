#!/usr/bin/python3
"""nvidia-ctk - LAB BUILD (provisioner lab), not NVIDIA software.

A stand-in for the NVIDIA Container Toolkit CLI: ``--version`` and
``runtime configure --runtime=containerd|docker [--config=PATH] [--set-as-default]
[--dry-run]``. Configuring records what was asked in
``/var/lib/provisioner-lab/nvidia-ctk/runtime-<runtime>.json`` (``$PROVISIONER_LAB_STATE``
replaces ``/var/lib/provisioner-lab``) and, as the real tool does, adds an ``nvidia`` runtime to
the runtime's configuration file (made if missing) unless it has one: a containerd
``[plugins."<cri plugin>".containerd.runtimes.nvidia]`` table, a Docker ``runtimes.nvidia``
entry (``--set-as-default`` is only recorded). With the state moved elsewhere (tests), that
file is written under ``<state>/root`` instead, never the host's. Messages are shaped like the
real tool's.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

TOOLKIT_VERSION = "@TOOLKIT_VERSION@"
STATE_DIR = "/var/lib/provisioner-lab"
LAB_LINE = "LAB BUILD of nvidia-ctk (provisioner lab) - not NVIDIA software"
RUNTIME_CONFIGS = {"containerd": "/etc/containerd/config.toml", "docker": "/etc/docker/daemon.json"}
RUNTIME_BINARY = "/usr/bin/nvidia-container-runtime"
CONTAINERD_NVIDIA = re.compile(
    r"""^\s*\[plugins\.(["'])[^"']+\1\.containerd\.runtimes\.nvidia\]""", re.M
)
CRI_PLUGINS = {2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}


class CtkError(Exception):
    """Ends the run with an ``ERRO`` line and exit code 1."""


def configure(args: Sequence[str], state_dir: str) -> list[str]:
    """``runtime configure``: record the request; the lines to print."""
    found: dict[str, str] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, eq, value = arg.partition("=")
        if name in ("--runtime", "--config"):
            if not eq:
                if not rest:
                    raise CtkError(f"flag needs an argument: {name}")
                value = rest.pop(0)
            found[name[2:]] = value
        elif arg in ("--set-as-default", "--dry-run"):
            found[arg[2:]] = "true"
        else:
            raise CtkError(f"flag provided but not simulated by this lab build: {arg}")
    runtime = found.get("runtime", "docker")
    if runtime not in RUNTIME_CONFIGS:
        raise CtkError(f"unrecognized runtime '{runtime}'")
    config = found.get("config", RUNTIME_CONFIGS[runtime])
    record = {
        "lab_build": True,
        "runtime": runtime,
        "config": config,
        "set_as_default": "set-as-default" in found,
        "toolkit_version": TOOLKIT_VERSION,
    }
    if "dry-run" in found:
        return [json.dumps(record, indent=2)]
    marker = Path(state_dir, "nvidia-ctk", f"runtime-{runtime}.json")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    path = Path(config) if state_dir == STATE_DIR else Path(state_dir, "root", config.lstrip("/"))
    add_nvidia_runtime(runtime, path)
    return [
        f"INFO[0000] {LAB_LINE}: recorded the {runtime} configuration in {marker}",
        f"INFO[0000] Wrote updated config to {path}",
        f"INFO[0000] It is recommended that {runtime} daemon be restarted.",
    ]


def add_nvidia_runtime(runtime: str, path: Path) -> bool:
    """Add the ``nvidia`` runtime to a containerd or Docker configuration; False if it had one."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if runtime == "docker":
        document = json.loads(text) if text.strip() else {}
        if "nvidia" in document.get("runtimes", {}):
            return False
        document.setdefault("runtimes", {})["nvidia"] = {"args": [], "path": RUNTIME_BINARY}
        text = json.dumps(document, indent=4) + "\n"
    else:
        if CONTAINERD_NVIDIA.search(text):
            return False
        version = 3 if re.search(r"^version\s*=\s*3", text, re.M) else 2
        table = f'plugins."{CRI_PLUGINS[version]}"'
        text = (text or "version = 2\n") + (
            f'\n[{table}.containerd.runtimes.nvidia]\n  runtime_type = "io.containerd.runc.v2"\n'
            f'\n[{table}.containerd.runtimes.nvidia.options]\n  BinaryName = "{RUNTIME_BINARY}"\n'
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def run(argv: Sequence[str], state_dir: str) -> list[str]:
    """What nvidia-ctk prints for ``argv``; raises CtkError to fail."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        return [LAB_LINE, "Usage: nvidia-ctk --version | runtime configure --runtime=RUNTIME"]
    if argv[0] in ("-v", "--version", "version"):
        return [f"NVIDIA Container Toolkit CLI version {TOOLKIT_VERSION}", f"commit: {LAB_LINE}"]
    if list(argv[:2]) == ["runtime", "configure"]:
        return configure(argv[2:], state_dir)
    raise CtkError(f"'{' '.join(argv)}' is not simulated by this lab build")


def main(argv: Sequence[str] | None = None) -> int:
    state_dir = os.environ.get("PROVISIONER_LAB_STATE") or STATE_DIR
    try:
        lines = run(sys.argv[1:] if argv is None else argv, state_dir)
    except CtkError as exc:
        print(f"ERRO[0000] {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
