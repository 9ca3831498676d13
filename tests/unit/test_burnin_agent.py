"""The burn-in agent run as it runs on a node: ``python3 -I agent.py ...`` in a subprocess.

The lab backend is driven by GPU documents that ``provisioner.lab.gpus.gpu_document`` makes
from the lab fleet spec with one injected fault each, with the lab's own nvidia-smi and dcgmi
stand-ins on PATH; the smi backend by a fake nvidia-smi (tests/fake_nvidia_smi.py) replaying
recorded outputs. Every run uses ``-I -S`` from a scratch directory: no provisioner, no
site-packages, so the agent shows it needs the standard library only. The GPU code paths
(torch, cupy, NVML) cannot run here; their pure parts are tested at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from provisioner.burnin import agent
from provisioner.burnin.document import parse_document
from provisioner.burnin.floors import expectation_for
from provisioner.burnin.judge import judge
from provisioner.lab.gpus import gpu_document
from provisioner.spec import load_fleet
from tests.conftest import DATA, LAB_SPEC, REPO

AGENT = REPO / "provisioner" / "burnin" / "agent.py"
LABBIN = REPO / "provisioner" / "lab" / "labbin"
FAKE_SMI = REPO / "tests" / "fake_nvidia_smi.py"
BURNIN = DATA / "burnin"
NODE = "gpu-lab-01"
FAULTY_GPU = 3
PLACEHOLDERS = {
    "@DRIVER_VERSION@": "570.133.20",
    "@CUDA_VERSION@": "12.8",
    "@DCGM_VERSION@": "4.1.1",
}
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_agent(tmp_path: Path) -> Run:
    """Run the agent isolated (``-I -S``) in a scratch directory with PATH set to ``path``."""

    def run(
        *args: str, path: list[Path] | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        scratch = tmp_path / "cwd"
        scratch.mkdir(exist_ok=True)
        environ = {"PATH": os.pathsep.join(map(str, path or [])), **(env or {})}
        return subprocess.run(
            [sys.executable, "-I", "-S", str(AGENT), *args],
            capture_output=True,
            text=True,
            cwd=scratch,
            env=environ,
            timeout=120,
            check=False,
        )

    return run


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def labbin(tmp_path: Path) -> Path:
    """The lab's nvidia-smi and dcgmi stand-ins as a lab node has them (placeholders filled)."""
    folder = tmp_path / "labbin"
    folder.mkdir()
    for tool, source in (("nvidia-smi", "nvidia_smi.py"), ("dcgmi", "dcgmi.py")):
        text = (LABBIN / source).read_text()
        for placeholder, value in PLACEHOLDERS.items():
            text = text.replace(placeholder, value)
        _script(folder / tool, f"#!{sys.executable}\n" + text.split("\n", 1)[1])
    return folder


def _lab_gpus(tmp_path: Path, kind: str | None) -> Path:
    """The lab GPU document of gpu-lab-01 with one fault (or none) on GPU 3."""
    spec = LAB_SPEC.read_text()
    faults = f"    {NODE}:\n      - {{kind: {kind}, gpu: {FAULTY_GPU}}}\n" if kind else ""
    spec = spec[: spec.index("\nlab:\n")] + "\nlab:\n  faults:\n" + (faults or "    {}\n")
    (tmp_path / "fleet.yaml").write_text(spec)
    fleet = load_fleet(tmp_path / "fleet.yaml")
    target = tmp_path / "gpus.json"
    target.write_text(json.dumps(gpu_document(fleet, fleet.by_name[NODE])))
    return target


def _document(done: subprocess.CompletedProcess[str], code: int = 0) -> dict[str, Any]:
    assert done.returncode == code, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


# --------------------------------------------------------------------------- lab backend

SLOW = 0.9  # below this share of the node's median a figure is "slow" for these tests
HELD_BACK = {"hw_slowdown", "hw_thermal", "sw_thermal", "power_brake"}


def _slow(gpus: list[dict[str, Any]], read: Callable[[dict[str, Any]], float]) -> set[int]:
    median = statistics.median(read(gpu) for gpu in gpus)
    return {gpu["index"] for gpu in gpus if read(gpu) < SLOW * median}


def signs(document: dict[str, Any]) -> set[tuple[object, str]]:
    """Every sign of trouble the document shows, as (GPU index or "node", what)."""
    gpus = document["gpus"]
    found: set[tuple[object, str]] = set()
    for gpu in gpus:
        index, ecc, pcie = gpu["index"], gpu["ecc"], gpu["pcie"]
        if ecc["volatile_uncorrectable"] or ecc["aggregate_uncorrectable"]:
            found.add((index, "ecc_uncorrectable"))
        if gpu["row_remap"]["pending"] or gpu["row_remap"]["failure"]:
            found.add((index, "row_remap"))
        if (pcie["gen"], pcie["width"]) < (pcie["max_gen"], pcie["max_width"]):
            found.add((index, "pcie_downshift"))
        if gpu["nvlink"]["links_down"] or gpu["nvlink"]["error_delta"]:
            found.add((index, "nvlink"))
        if HELD_BACK & set(gpu["thermal"]["clock_events"]):
            found.add((index, "clock_events"))
        if gpu["gemm"]["sdc_mismatches"]:
            found.add((index, "sdc"))
    figures = {
        "slow_gemm": lambda gpu: gpu["gemm"]["tflops"],
        "slow_hbm": lambda gpu: gpu["hbm"]["gbps"],
        "slow_h2d": lambda gpu: gpu["h2d"]["gbps"],
        "slow_d2h": lambda gpu: gpu["d2h"]["gbps"],
    }
    for name, read in figures.items():
        found |= {(index, name) for index in _slow(gpus, read)}
    if len(gpus) != 8:
        found.add(("node", "missing_gpus"))
    found |= {("node", f"xid{event['xid']}@{event['gpu']}") for event in document["xid"]["events"]}
    if document["nccl"]["busbw_gbps"] < SLOW * agent.LAB_ALLREDUCE_BUSBW_GBPS:
        found.add(("node", "slow_allreduce"))
    if any(result["status"] != "pass" for result in document["dcgm"]["results"]):
        found.add(("node", "dcgm"))
    return found


FAULTS: dict[str | None, set[tuple[object, str]]] = {
    None: set(),
    "missing_gpu": {("node", "missing_gpus")},
    "xid_79": {("node", "missing_gpus"), ("node", "xid79@None")},
    "ecc_uncorrectable": {(3, "ecc_uncorrectable"), ("node", "xid48@3")},
    "row_remap_pending": {(3, "row_remap")},
    "pcie_gen3": {(3, "pcie_downshift"), (3, "slow_h2d"), (3, "slow_d2h")},
    "slow_gpu": {(3, "slow_gemm"), (3, "slow_hbm"), (3, "clock_events")},
    "nvlink_down": {(3, "nvlink"), ("node", "slow_allreduce")},
    "silent_data_corruption": {(3, "sdc")},
}


@pytest.mark.parametrize("kind", list(FAULTS), ids=lambda kind: kind or "healthy")
def test_lab_fault_shows_where_it_should_and_nowhere_else(
    kind: str | None, tmp_path: Path, labbin: Path, run_agent: Run
) -> None:
    gpus_file = _lab_gpus(tmp_path, kind)
    args = ("--backend", "lab", "--gpus-file", str(gpus_file), "--level", "quick")
    document = _document(run_agent(*args, path=[labbin]))
    assert signs(document) == FAULTS[kind]
    assert (document["backend"], document["errors"], document["skipped"]) == ("lab", [], [])
    parse_document(document, "lab agent document")  # the controller's reader accepts it


# What the controller makes of each lab fault on GPU 3 of gpu-lab-01: exactly these checks
# fail, (check id, GPU index or None for a node check), and every other check passes.
JUDGED: dict[str | None, set[tuple[str, int | None]]] = {
    None: set(),
    "missing_gpu": {("inventory.gpu_count", None)},
    "xid_79": {("inventory.gpu_count", None), ("xid", None)},
    "ecc_uncorrectable": {("ecc.uncorrectable", 3), ("xid", None)},
    "row_remap_pending": {("memory.row_remap", 3)},
    "pcie_gen3": {("pcie.link", 3), ("bandwidth.h2d", 3), ("bandwidth.d2h", 3)},
    # the lab models a throttled GPU: compute and memory clocks held back together
    "slow_gpu": {
        ("compute.gemm", 3),
        ("compute.straggler", 3),
        ("thermal.clock_events", 3),
        ("bandwidth.hbm", 3),
    },
    "nvlink_down": {("nvlink.links", 3), ("collectives.allreduce", None)},
    "silent_data_corruption": {("compute.sdc", 3)},
}


@pytest.mark.parametrize("kind", list(JUDGED), ids=lambda kind: kind or "healthy")
def test_each_lab_fault_fails_exactly_its_checks_once_judged_against_the_spec(
    kind: str | None, tmp_path: Path, labbin: Path, run_agent: Run
) -> None:
    """The lab's path end to end short of SSH: the fault in the spec, the node's GPU document,
    the agent on the node's tools, the controller's floors and expectations from the spec."""
    gpus_file = _lab_gpus(tmp_path, kind)
    args = ("--backend", "lab", "--gpus-file", str(gpus_file), "--level", "quick")
    document = _document(run_agent(*args, "--node", NODE, path=[labbin]))
    fleet = load_fleet(tmp_path / "fleet.yaml")
    verdict = judge(document, expectation_for(fleet, fleet.by_name[NODE]))
    assert {(check.id, check.gpu) for check in verdict.failing} == JUDGED[kind]
    assert verdict.verdict == ("ready" if kind is None else "quarantined")
    assert all(check.reason for check in verdict.failing)
    assert not verdict.warnings, [check.as_dict() for check in verdict.warnings]


def test_lab_document_fields(tmp_path: Path, labbin: Path, run_agent: Run) -> None:
    gpus_file = _lab_gpus(tmp_path, "missing_gpu")
    args = ("--backend", "lab", "--gpus-file", str(gpus_file), "--level", "quick")
    document = _document(run_agent(*args, "--node", "n1", "--expected-gpus", "8", path=[labbin]))
    assert document["schema"] == "provisioner-burnin/1"
    assert (document["node"], document["expected_gpus"], document["level"]) == ("n1", 8, "quick")
    assert document["host"]["driver_version"] == "570.133.20"  # from the lab's nvidia-smi
    assert document["host"]["cuda_driver_version"] == "12.8"
    assert document["host"]["tools"]["dcgmi"] == "4.1.1"
    assert [gpu["index"] for gpu in document["gpus"]] == [0, 1, 2, 4, 5, 6, 7]
    gpu = document["gpus"][0]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["memory_mib"] == 81559
    assert gpu["gemm"]["tflops"] == pytest.approx(989 * 0.80, rel=0.01)
    assert gpu["hbm"]["gbps"] == pytest.approx(3350 * 0.89, rel=0.01)
    assert gpu["h2d"]["gbps"] == pytest.approx(53, rel=0.01)
    assert gpu["pcie"]["under_load"] is True and gpu["retired_pages"] is None
    assert document["nccl"] == {
        "tool": "lab",
        "gpus": 7,
        "busbw_gbps": 370.0,
        "bytes": agent.GIB,
        "max_busbw_gbps": None,
        "wrong": None,
    }
    dcgm = document["dcgm"]
    assert (dcgm["version"], dcgm["level"], dcgm["exit_code"]) == ("4.1.1", 1, 0)
    assert {result["gpu"] for result in dcgm["results"]} == {0, 1, 2, 4, 5, 6, 7}


def test_lab_gen3_link_gives_a_quarter_of_gen5_bandwidth(
    tmp_path: Path, labbin: Path, run_agent: Run
) -> None:
    gpus_file = _lab_gpus(tmp_path, "pcie_gen3")
    document = _document(run_agent("--backend", "lab", "--gpus-file", str(gpus_file), path=[]))
    h2d = {gpu["index"]: gpu["h2d"]["gbps"] for gpu in document["gpus"]}
    assert h2d[FAULTY_GPU] == pytest.approx(h2d[0] / 4, rel=0.02)
    assert document["dcgm"] is None
    assert document["skipped"] == [{"check": "dcgm", "reason": agent.NO_DCGMI}]
    assert document["host"]["driver_version"] is None  # no nvidia-smi on PATH


def test_level_scales_the_stress_and_dcgm(tmp_path: Path, labbin: Path, run_agent: Run) -> None:
    gpus_file = str(_lab_gpus(tmp_path, None))
    runs = {
        level: _document(
            run_agent("--backend", "lab", "--gpus-file", gpus_file, "--level", level, path=[labbin])
        )
        for level in ("quick", "standard")
    }
    quick, standard = (runs[level]["gpus"][0]["gemm"]["iterations"] for level in runs)
    assert standard / quick == pytest.approx(300 / 15, rel=0.01)
    assert [runs[level]["dcgm"]["level"] for level in runs] == [1, 2]
    tests = {result["test"] for result in runs["standard"]["dcgm"]["results"]}
    assert tests == {"software", "pcie", "memory"}


def test_auto_finds_the_lab_file_through_the_environment(tmp_path: Path, run_agent: Run) -> None:
    gpus_file = _lab_gpus(tmp_path, None)
    document = _document(
        run_agent("--level", "quick", env={"PROVISIONER_LAB_GPUS": str(gpus_file)})
    )
    assert document["backend"] == "lab" and len(document["gpus"]) == 8


def test_runs_from_a_copy_with_no_provisioner_anywhere(tmp_path: Path, run_agent: Run) -> None:
    copy = tmp_path / "elsewhere" / "agent.py"
    copy.parent.mkdir()
    shutil.copy(AGENT, copy)
    gpus_file = _lab_gpus(tmp_path, None)
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(copy), "--backend", "lab", "--gpus-file", str(gpus_file)],
        capture_output=True,
        text=True,
        cwd=copy.parent,
        env={"PATH": ""},
        timeout=120,
        check=False,
    )
    assert _document(done)["backend"] == "lab"


def test_out_is_written_whole_and_stdout_stays_empty(tmp_path: Path, run_agent: Run) -> None:
    gpus_file = _lab_gpus(tmp_path, None)
    out = tmp_path / "result" / "burnin.json"
    out.parent.mkdir()
    done = run_agent("--backend", "lab", "--gpus-file", str(gpus_file), "--out", str(out))
    assert (done.returncode, done.stdout) == (0, "")
    assert json.loads(out.read_text())["backend"] == "lab"
    assert [path.name for path in out.parent.iterdir()] == ["burnin.json"]  # no temp file left
    assert out.stat().st_mode & 0o777 == 0o644


def test_out_that_cannot_be_written_exits_1(tmp_path: Path, run_agent: Run) -> None:
    gpus_file = _lab_gpus(tmp_path, None)
    done = run_agent(
        "--backend",
        "lab",
        "--gpus-file",
        str(gpus_file),
        "--out",
        str(tmp_path / "no" / "such" / "dir" / "x.json"),
    )
    assert done.returncode == 1 and "cannot write" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--level", "forever"],
        ["--backend", "rocm"],
        ["--expected-gpus", "-1"],
        ["--expected-gpus", "eight"],
        ["--gemm-n", "0"],
        ["--gemm-seconds", "-5"],
        ["--verbose"],
    ],
)
def test_bad_arguments_exit_2_without_a_document(args: list[str], run_agent: Run) -> None:
    done = run_agent(*args)
    assert done.returncode == 2 and done.stdout == ""
    assert "usage: agent.py" in done.stderr


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--backend", "lab", "--gpus-file", "/nonexistent/gpus.json"], "lab: no lab GPU file"),
        (["--backend", "smi"], "smi: nvidia-smi is not on PATH"),
        (["--backend", "nvml"], "nvml: pynvml (nvidia-ml-py) is not installed"),
        (["--backend", "auto"], "smi: nvidia-smi is not on PATH"),
    ],
)
def test_no_backend_exits_3_with_a_document_saying_why(
    args: list[str], reason: str, tmp_path: Path, run_agent: Run
) -> None:
    env = {"PROVISIONER_LAB_GPUS": str(tmp_path / "none.json")}
    document = _document(run_agent(*args, env=env), code=3)
    assert (document["backend"], document["gpus"], document["nccl"]) == (None, [], None)
    messages = [error["message"] for error in document["errors"] if error["check"] == "backend"]
    assert any(message.startswith(reason) for message in messages), messages
    if args[1] == "auto":
        assert [message.split(":")[0] for message in messages] == ["nvml", "lab", "smi"]
    parse_document(document, "no-backend document")


# --------------------------------------------------------------------------- smi backend


@pytest.fixture
def fakebin(tmp_path: Path) -> Path:
    """A FAKE nvidia-smi, journalctl and dcgmi replaying recorded outputs."""
    folder = tmp_path / "fakebin"
    folder.mkdir()
    _script(folder / "nvidia-smi", f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SMI}" "$@"\n')
    log = BURNIN / "xid" / "journal_h100_r570" / "input.log"
    _script(folder / "journalctl", f'#!/bin/sh\nexec /bin/cat "{log}"\n')
    diag = BURNIN / "dcgm" / "dcgm3_fail_level2" / "input.json"
    _script(
        folder / "dcgmi",
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "dcgmi  version: 3.3.5"; exit 0; fi\n'
        f'/bin/cat "{diag}"\nexit 226\n',
    )
    return folder


def _smi_env(case: str, nvlink: str = "h100_all_up") -> dict[str, str]:
    return {
        "FAKE_NVIDIA_SMI_QUERY": str(BURNIN / "smi" / case),
        "FAKE_NVIDIA_SMI_BANNER": str(BURNIN / "banner" / "h100_r570" / "input.txt"),
        "FAKE_NVIDIA_SMI_NVLINK": str(BURNIN / "nvlink" / nvlink / "input.txt"),
    }


def test_smi_backend_reports_the_recorded_faults(fakebin: Path, run_agent: Run) -> None:
    env = _smi_env("h100_faulty_under_load", "h100_gpu3_link17_down")
    document = _document(run_agent("--backend", "smi", "--level", "quick", path=[fakebin], env=env))
    gpus = {gpu["index"]: gpu for gpu in document["gpus"]}
    assert document["backend"] == "smi" and sorted(gpus) == list(range(7))
    assert document["host"]["driver_version"] == "570.133.20"
    assert document["host"]["cuda_driver_version"] == "12.8"
    assert gpus[2]["ecc"]["volatile_uncorrectable"] == 2 and gpus[2]["row_remap"]["pending"]
    assert (gpus[5]["pcie"]["gen"], gpus[5]["pcie"]["under_load"]) == (3, False)
    assert gpus[6]["thermal"]["clock_events"] == ["hw_slowdown"]
    assert gpus[6]["thermal"]["max_temperature_c"] == 84.0
    assert gpus[3]["thermal"]["max_power_w"] is None and gpus[3]["serial"] is None
    assert (gpus[3]["nvlink"]["links_up"], gpus[3]["nvlink"]["links_down"]) == (17, [17])
    assert all(gpus[i][check] is None for i in gpus for check in ("gemm", "hbm", "h2d", "d2h"))
    assert document["skipped"] == [
        *({"check": check, "reason": agent.NO_ENGINE} for check in ("gemm", "hbm", "h2d", "d2h")),
        {"check": "nccl", "reason": agent.NO_COLLECTIVE_TOOL},
    ]
    assert {
        "check": "smi",
        "message": "nvidia-smi: Unable to determine the device handle for "
        "GPU0000:DB:00.0: Unknown Error",
    } in document["errors"]
    xids = [(event["xid"], event["gpu"]) for event in document["xid"]["events"]]
    assert document["xid"]["source"] == "journalctl"
    assert xids == [(63, 2), (48, 2), (94, 6), (119, 3), (79, None), (79, None)]
    dcgm = document["dcgm"]
    assert (dcgm["version"], dcgm["level"], dcgm["exit_code"]) == ("3.3.5", 1, 226)
    assert [(r["test"], r["gpu"]) for r in dcgm["results"] if r["status"] == "fail"] == [
        ("GPU Memory", 3)
    ]
    parse_document(document, "smi agent document")


def test_smi_backend_at_idle_says_the_link_was_not_under_load(
    fakebin: Path, run_agent: Run
) -> None:
    env = _smi_env("h100_healthy_idle")
    document = _document(run_agent("--backend", "smi", path=[fakebin], env=env))
    assert len(document["gpus"]) == 8
    for gpu in document["gpus"]:
        assert (gpu["pcie"]["gen"], gpu["pcie"]["max_gen"], gpu["pcie"]["under_load"]) == (
            1,
            5,
            False,
        )
        assert gpu["thermal"]["clock_events"] == ["gpu_idle"]
        assert gpu["nvlink"] == {"links_up": 18, "links_down": [], "error_delta": None}
        assert gpu["pcie"]["replay_delta"] is None  # nvidia-smi has no replay counter here
    assert [e for e in document["errors"] if e["check"] != "xid"] == []


def test_smi_backend_uses_the_old_field_name_of_an_older_driver(
    fakebin: Path, run_agent: Run
) -> None:
    document = _document(
        run_agent("--backend", "smi", path=[fakebin], env=_smi_env("v100_retired_pages_r470"))
    )
    assert document["errors"] == []  # clocks_event_reasons.active became the throttle name
    first, second = document["gpus"]
    assert first["thermal"]["clock_events"] == ["gpu_idle"]
    assert second["row_remap"] is None
    assert second["retired_pages"] == {"single_bit": 2, "double_bit": 1, "pending": True}
    assert document["nccl"] is None


def test_smi_backend_drops_a_field_the_driver_does_not_know(
    tmp_path: Path, fakebin: Path, run_agent: Run
) -> None:
    recorded = BURNIN / "smi" / "h100_healthy_idle"
    fields = (recorded / "query.txt").read_text().strip().split(",")
    gone = fields.index("persistence_mode")
    case = tmp_path / "older"
    case.mkdir()
    (case / "query.txt").write_text(",".join(fields[:gone] + fields[gone + 1 :]))
    rows = [line.split(", ") for line in (recorded / "output.csv").read_text().splitlines()]
    (case / "output.csv").write_text("\n".join(", ".join(r[:gone] + r[gone + 1 :]) for r in rows))
    env = {**_smi_env("h100_healthy_idle"), "FAKE_NVIDIA_SMI_QUERY": str(case)}
    document = _document(run_agent("--backend", "smi", path=[fakebin], env=env))
    assert {
        "check": "smi",
        "message": "this nvidia-smi does not know the field 'persistence_mode'",
    } in document["errors"]
    assert {gpu["persistence_mode"] for gpu in document["gpus"]} == {None}
    assert {gpu["ecc"]["mode"] for gpu in document["gpus"]} == {True}


# --------------------------------------------------------------------------- pure helpers


def test_tflops_of_a_square_gemm() -> None:
    # 2 * 8192^3 = 1.0995e12 flop per product; 100 products in 0.139 s ~ 791 TFLOPS.
    assert agent.tflops(8192, 100, 0.139) == pytest.approx(791.0, rel=1e-3)
    assert agent.tflops(1000, 1, 1.0) == pytest.approx(0.002)
    with pytest.raises(ValueError):
        agent.tflops(8192, 1, 0.0)


def test_bandwidth_counts_bytes_per_second_in_gb() -> None:
    assert agent.gbps(2 * agent.GIB, 10, 1.0) == pytest.approx(21.474836, rel=1e-6)
    with pytest.raises(ValueError):
        agent.gbps(1, 1, -1.0)


@pytest.mark.parametrize(
    ("algbw", "ranks", "bus"),
    [(211.7, 8, 370.475), (100.0, 2, 100.0), (100.0, 4, 150.0), (50.0, 1, 0.0)],
)
def test_busbw_is_nccl_tests_formula(algbw: float, ranks: int, bus: float) -> None:
    assert agent.busbw(algbw, ranks) == pytest.approx(bus)


def test_sdc_tally_counts_repeats_beyond_relative_tolerance() -> None:
    reference = [12.5, -40.0, 3.25]
    repeats = [[12.5, -40.0, 3.25], [12.5, -40.02, 3.25], [12.5, -40.05, 3.25], [math.nan] * 3]
    tally = agent.SdcTally(scale=max(abs(value) for value in reference))
    for result in repeats:
        tally.add(max(abs(a - b) for a, b in zip(result, reference, strict=True)))
    # tolerance 1e-3 x 40 = 0.04: 0.02 passes, 0.05 and NaN do not.
    assert (tally.repeats, tally.mismatches) == (4, 2)
    assert tally.max_abs_diff == pytest.approx(0.05)
    assert agent.is_mismatch(0.0, 0.0) is False
    assert agent.is_mismatch(1e-9, 0.0) is True


@pytest.mark.parametrize(
    ("mask", "names"),
    [
        (0, []),
        (0x1, ["gpu_idle"]),
        (0x8, ["hw_slowdown"]),
        (0x20 | 0x40 | 0x80, ["sw_thermal", "hw_thermal", "power_brake"]),
        (0x4 | 0x8, ["sw_power_cap", "hw_slowdown"]),
    ],
)
def test_clock_event_decoding(mask: int, names: list[str]) -> None:
    assert agent.decode_clock_events(mask) == names


def test_load_samples_keep_the_best_link_and_the_worst_heat() -> None:
    samples = agent.LoadSamples()
    for sample in (
        {"gen": 1, "width": 16, "temperature": 40, "power": 100.0, "mask": 0x1},
        {"gen": 5, "width": 16, "temperature": 71, "power": 690.5, "mask": 0x8},
        {"gen": 5, "width": 8, "temperature": None, "power": None, "mask": None},
    ):
        samples.add(sample)
    gpu = agent.new_gpu(0, "g", "u", "00000000:18:00.0")
    samples.apply(gpu, under_load=True)
    assert gpu["pcie"] == {**gpu["pcie"], "gen": 5, "width": 16, "under_load": True}
    assert gpu["thermal"] == {
        "max_temperature_c": 71.0,
        "max_power_w": 690.5,
        "clock_events": ["gpu_idle", "hw_slowdown"],
    }


@pytest.mark.parametrize(
    ("gen", "width", "share"),
    [(5, 16, 1.0), (3, 16, 0.25), (4, 16, 0.5), (5, 8, 0.5), (None, 16, 0.0), (7, 16, 0.0)],
)
def test_pcie_share_of_gen5_x16(gen: int | None, width: int, share: float) -> None:
    assert agent.pcie_share(gen, width) == pytest.approx(share)


def test_lab_jitter_stays_within_its_bound_and_is_stable() -> None:
    factors = [agent.lab_jitter(f"GPU-{n}") for n in range(200)]
    assert all(abs(factor - 1.0) <= agent.LAB_JITTER for factor in factors)
    assert agent.lab_jitter("GPU-7") == agent.lab_jitter("GPU-7")
    assert len(set(factors)) > 150


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("00000000:9A:00.0", (0, 0x9A, 0)),
        ("PCI:0000:9a:00", (0, 0x9A, 0)),
        ("9a:00.0", (0, 0x9A, 0)),
        ("0001:1b:02.1", (1, 0x1B, 2)),
        ("nonsense", None),
    ],
)
def test_pci_key(text: str, key: tuple[int, int, int] | None) -> None:
    assert agent.pci_key(text) == key


def test_delta_needs_both_readings() -> None:
    assert (agent.delta(3, 10), agent.delta(None, 10), agent.delta(3, None)) == (7, None, None)


# --------------------------------------------------------------------------- NVML and stress
# pynvml, torch and cupy cannot run here: a fake pynvml and a fake engine drive the backend's
# logic (guarded calls, pre-Ampere fallback, NVLink states, counters, sampling under load).


class FakeNvmlError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakePynvml:
    """Two GPUs: an H100 (row remapper, link 5 down) and a V100 (retired pages, 6 links)."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_NVLINK_MAX_LINKS = 18

    def __init__(self) -> None:
        self.replays = {"h0": 0, "h1": 0}

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"h{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"NVIDIA H100 80GB HBM3" if handle == "h0" else b"Tesla V100-SXM2-32GB"

    def nvmlDeviceGetUUID(self, handle: str) -> str:
        return f"GPU-{handle}"

    def nvmlDeviceGetSerial(self, handle: str) -> str:
        if handle == "h1":
            raise FakeNvmlError(999)  # an unknown error: recorded, the run goes on
        return "1652922038145"

    def nvmlDeviceGetPciInfo(self, handle: str) -> Any:
        return type(
            "Pci", (), {"busId": "00000000:18:00.0" if handle == "h0" else "00000000:1A:00.0"}
        )

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return type("Memory", (), {"total": 81559 * agent.MIB})

    def nvmlDeviceGetPersistenceMode(self, handle: str) -> int:
        return 1

    def nvmlDeviceGetEccMode(self, handle: str) -> list[int]:
        return [1, 1]

    def nvmlDeviceGetTotalEccErrors(self, handle: str, kind: int, counter: int) -> int:
        return 2 if (handle, kind) == ("h0", 1) else 0

    def nvmlDeviceGetRemappedRows(self, handle: str) -> tuple[int, int, bool, bool]:
        if handle == "h1":
            raise FakeNvmlError(self.NVML_ERROR_NOT_SUPPORTED)
        return 0, 1, True, False

    def nvmlDeviceGetRetiredPages(self, handle: str, cause: int) -> list[int]:
        return [0x1000, 0x2000] if cause == 0 else [0x3000]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: str) -> int:
        return 1

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: str) -> int:
        return 5

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: str) -> int:
        return 16

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: str) -> int:
        return 1 if self.replays[handle] == 0 else 5  # downshifted until the stress starts

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: str) -> int:
        return 16

    def nvmlDeviceGetPcieReplayCounter(self, handle: str) -> int:
        return self.replays[handle]

    def nvmlDeviceGetNvLinkState(self, handle: str, link: int) -> int:
        if handle == "h1" and link >= 6:
            raise FakeNvmlError(self.NVML_ERROR_NOT_SUPPORTED)
        return 0 if (handle, link) == ("h0", 5) else 1

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: str, link: int, counter: int) -> int:
        return self.replays[handle] if counter == 1 and link == 0 else 0

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: str) -> int:  # old name only
        return 0x8 if handle == "h1" else 0x0

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 71

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 690_500

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.133.20"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12080


def test_nvml_backend_reads_health_and_falls_back_before_ampere() -> None:
    report = agent.Report()
    backend = agent.NvmlBackend(FakePynvml(), report)
    hopper, volta = backend.inventory(report)
    assert (hopper["name"], hopper["memory_mib"], hopper["persistence_mode"]) == (
        "NVIDIA H100 80GB HBM3",
        81559,
        True,
    )
    assert hopper["ecc"]["volatile_uncorrectable"] == 2 and hopper["ecc"]["mode"] is True
    assert hopper["row_remap"] == {
        "correctable": 0,
        "uncorrectable": 1,
        "pending": True,
        "failure": False,
    }
    assert hopper["retired_pages"] is None
    assert volta["row_remap"] is None
    assert volta["retired_pages"] == {"single_bit": 2, "double_bit": 1, "pending": True}
    assert (hopper["nvlink"]["links_up"], hopper["nvlink"]["links_down"]) == (17, [5])
    assert (volta["nvlink"]["links_up"], volta["nvlink"]["links_down"]) == (6, [])
    assert volta["serial"] is None
    assert report.errors == [
        {"check": "gpu1.serial", "message": "nvmlDeviceGetSerial: NVML error 999"}
    ]
    assert backend.versions(report) == ("570.133.20", "12.8")


class FakeEngine:
    name = "fake"

    def __init__(self, nv: FakePynvml) -> None:
        self.nv = nv

    def count(self) -> int:
        return 2

    def gemm(self, device: int, plan: agent.Plan) -> dict[str, Any]:
        if device == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self.nv.replays["h0"] += 4  # the stress makes the link replay
        time.sleep(0.2)  # long enough for the sampler to see the GPU under load
        tally = agent.SdcTally(scale=40.0)
        tally.add(0.0)
        return agent.gemm_result("bf16", plan.gemm_n, 100, 0.139, tally)

    def bandwidth(self, device: int, kind: str, nbytes: int, iterations: int) -> float:
        return {"hbm": 2990.0, "h2d": 53.1, "d2h": 52.9}[kind]


def test_stress_runs_under_sampling_and_records_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = FakePynvml()
    monkeypatch.setattr(agent, "find_engine", lambda report: FakeEngine(nv))
    report = agent.Report()
    backend = agent.NvmlBackend(nv, report)
    gpus = backend.inventory(report)
    plan = dataclasses.replace(agent.PLANS["quick"], gemm_seconds=0.01, sample_interval=0.005)
    backend.measure(gpus, plan, report)
    hopper, volta = gpus
    assert hopper["gemm"]["tflops"] == pytest.approx(791.0, abs=0.1)
    assert volta["gemm"] is None
    assert {
        "check": "gemm",
        "message": "RuntimeError: CUDA error: an illegal memory access was encountered",
    } in report.errors
    assert (hopper["hbm"], hopper["h2d"], volta["d2h"]) == (
        {"gbps": 2990.0},
        {"gbps": 53.1},
        {"gbps": 52.9},
    )
    assert (hopper["pcie"]["gen"], hopper["pcie"]["under_load"]) == (5, True)
    assert (hopper["pcie"]["replay_delta"], volta["pcie"]["replay_delta"]) == (4, 0)
    assert (hopper["nvlink"]["error_delta"], volta["nvlink"]["error_delta"]) == (4, 0)
    assert volta["thermal"] == {
        "max_temperature_c": 71.0,
        "max_power_w": 690.5,
        "clock_events": ["hw_slowdown"],
    }
    assert report.skipped == []
