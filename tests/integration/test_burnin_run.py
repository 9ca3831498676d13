"""``provisioner burnin run`` through playbooks/burnin.yml for real, on this machine: Ansible's
local connection stands in for SSH (ANSIBLE_TRANSPORT=local, become through su as root),
the real agent measures the lab's simulated GPUs (its lab backend, PROVISIONER_LAB_GPUS),
the playbook copies it, runs it, fetches its document and cleans up, and the controller
judges the document against the spec. Not the lab end to end (no machines, no SSH): the
play, the agent's contract and the judgement together, in a few seconds. Root only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provisioner.lab.gpus import gpu_document
from provisioner.spec import load_fleet
from tests.conftest import LAB_SPEC

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="become through su needs root"),
    pytest.mark.skipif(shutil.which("su") is None, reason="su missing"),
]

FAKE_SMI = """#!/bin/sh
# nvidia-smi of a lab node with the stack's driver (the agent's lab backend asks it)
case "$1" in
  --query-gpu=driver_version) echo 570.133.20 ;;
  *) echo "| NVIDIA-SMI 570.133.20   Driver Version: 570.133.20   CUDA Version: 12.8 |" ;;
esac
"""


def _burnin(tmp_path: Path, node: str, *args: str, gpus: Path | None = None) -> dict[str, Any]:
    """Run ``burnin run`` on ``node`` of the lab spec; returns rc, the JSON summary, stderr."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    (tools / "nvidia-smi").write_text(FAKE_SMI, encoding="utf-8")
    (tools / "nvidia-smi").chmod(0o755)
    spec = tmp_path / "fleet.yaml"
    if not spec.exists():
        shutil.copy(LAB_SPEC, spec)
    if gpus is None:
        fleet = load_fleet(spec)
        gpus = tmp_path / f"{node}-gpus.json"
        gpus.write_text(json.dumps(gpu_document(fleet, fleet.by_name[node])), encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}",
        "ANSIBLE_TRANSPORT": "local",
        "ANSIBLE_BECOME_METHOD": "su",
        "PROVISIONER_LAB_GPUS": str(gpus),
    }
    results = tmp_path / f"results-{node}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "provisioner",
            "burnin",
            "run",
            str(spec),
            "--nodes",
            node,
            "--results",
            str(results),
            "-o",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines and "summary" in lines[-1], done.stdout + done.stderr
    return {
        "rc": done.returncode,
        "summary": lines[-1]["summary"],
        "results": results,
        "events": [line["event"] for line in lines[:-1]],
        "stderr": done.stderr,
    }


def _leftovers() -> set[str]:
    return {path.name for path in Path("/tmp").glob("provisioner-burnin.*")}


def test_a_healthy_node_is_ready(tmp_path: Path) -> None:
    before = _leftovers()
    run = _burnin(tmp_path, "gpu-lab-01", "--level", "quick")
    assert run["rc"] == 0, run["summary"]
    summary = run["summary"]
    assert summary["ok"] is True
    assert summary["nodes"] == [
        {"node": "gpu-lab-01", "verdict": "ready", "failing": [], "warnings": 0}
    ]
    document = json.loads((run["results"] / "gpu-lab-01.json").read_text(encoding="utf-8"))
    assert (document["node"], document["backend"], document["level"]) == (
        "gpu-lab-01",
        "lab",
        "quick",
    )
    report = json.loads((run["results"] / "report.json").read_text(encoding="utf-8"))
    assert report["summary"] == {"nodes": 1, "ready": 1, "quarantined": 0, "missing": 0}
    assert {event["task"] for event in run["events"]} >= {
        "Copy the burn-in agent",
        "Run the burn-in agent",
        "Fetch the agent's document",
        "Remove the agent's temporary folder",
    }
    assert _leftovers() <= before  # the agent's folder is gone from the node


def test_a_gpu_off_the_bus_quarantines_the_node(tmp_path: Path) -> None:
    run = _burnin(tmp_path, "gpu-lab-04")  # the lab spec's xid_79 fault on GPU 5
    assert run["rc"] == 1
    (node,) = run["summary"]["nodes"]
    assert node["verdict"] == "quarantined"
    assert set(node["failing"]) == {"inventory.gpu_count", "xid"}


def test_a_node_without_gpus_still_gives_a_judged_document(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-gpus.json"  # no backend can run: the agent exits 3
    run = _burnin(tmp_path, "gpu-lab-02", gpus=missing)
    assert run["rc"] == 1
    (node,) = run["summary"]["nodes"]
    assert node["verdict"] == "quarantined"
    assert "inventory.gpu_count" in node["failing"]
    assert run["summary"]["missing"] == []


def test_results_must_go_to_a_new_folder(tmp_path: Path) -> None:
    spec = tmp_path / "fleet.yaml"
    shutil.copy(LAB_SPEC, spec)
    used = tmp_path / "used"
    used.mkdir()
    (used / "old.json").write_text("{}", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "provisioner", "burnin", "run", str(spec), "--results", str(used)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "not a new or empty folder" in done.stderr
