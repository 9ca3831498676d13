"""The controller's judgement of agent documents (tests/data/burnin/documents, hand-made to
the agent's contract): a healthy node passes every check, each fault fails exactly its
checks with reasons that name the figure and the floor, floors and expectations change the
outcome, and a document off contract is refused with a clear error."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from provisioner.burnin.document import BurninDocumentError, load_document, parse_document
from provisioner.burnin.floors import Expectation, Floors, catalog_floors, with_overrides
from provisioner.burnin.judge import judge
from provisioner.burnin.verdict import CHECK_IDS, Check, NodeVerdict, Verdict
from provisioner.errors import BurninFailed, ProvisionerError
from provisioner.spec.models import BurninFloors
from tests.conftest import DATA

DOCUMENTS = DATA / "burnin" / "documents"
H100 = Expectation(
    gpu_count=8,
    nvml_names=("NVIDIA H100 80GB HBM3",),
    driver_version="570.133.20",
    nvlink_links=18,
    pcie_gen=5,
    floors=catalog_floors("H100-SXM5-80GB"),
    dcgm=True,
    level="standard",
)
PER_GPU = {
    "inventory.gpu_model",
    "ecc.mode",
    "ecc.uncorrectable",
    "memory.row_remap",
    "pcie.link",
    "pcie.replay",
    "nvlink.links",
    "nvlink.errors",
    "thermal.clock_events",
    "thermal.temperature",
    "compute.gemm",
    "compute.sdc",
    "compute.straggler",
    "bandwidth.hbm",
    "bandwidth.h2d",
    "bandwidth.d2h",
    "dcgm.diag",
}
PER_NODE = {
    "inventory.gpu_count",
    "inventory.driver_version",
    "xid",
    "collectives.allreduce",
    "dcgm.diag",
    "agent.errors",
}

# Each fault document's failing checks, as (check id, GPU index or None for the node).
FAULTS: dict[str, set[tuple[str, int | None]]] = {
    "missing_gpu": {("inventory.gpu_count", None)},
    "xid_79": {("inventory.gpu_count", None), ("xid", None)},
    "ecc_uncorrectable": {("ecc.uncorrectable", 2), ("xid", None)},
    "row_remap_pending": {("memory.row_remap", 1)},
    "pcie_gen3": {("pcie.link", 4), ("bandwidth.h2d", 4), ("bandwidth.d2h", 4)},
    "slow_gpu": {("compute.gemm", 6), ("compute.straggler", 6), ("thermal.clock_events", 6)},
    "nvlink_down": {("nvlink.links", 0), ("collectives.allreduce", None)},
    "silent_data_corruption": {("compute.sdc", 7)},
    "dcgm_fail": {("dcgm.diag", 3)},
}


def _raw(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DOCUMENTS / f"{name}.json").read_text("utf-8"))
    return data


def _judge(name: str, expected: Expectation = H100) -> NodeVerdict:
    return judge(load_document(DOCUMENTS / f"{name}.json"), expected)


def _failing(verdict: NodeVerdict) -> set[tuple[str, int | None]]:
    return {(check.id, check.gpu) for check in verdict.failing}


def _check(verdict: NodeVerdict, check_id: str, gpu: int | None = None) -> Check:
    (found,) = [c for c in verdict.checks if c.id == check_id and c.gpu == gpu]
    return found


def test_healthy_node_passes_every_check() -> None:
    verdict = _judge("healthy")
    assert verdict.verdict == "ready"
    assert {c.name: c.verdict for c in verdict.checks if c.verdict is not Verdict.PASS} == {}
    found = {(c.id, c.gpu) for c in verdict.checks}
    expected = {(check, gpu) for check in PER_GPU for gpu in range(8)}
    expected |= {(check, None) for check in PER_NODE}
    assert found == expected
    assert {c.id for c in verdict.checks} <= set(CHECK_IDS)


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_fault_fails_exactly_its_checks(name: str) -> None:
    verdict = _judge(name)
    assert verdict.verdict == "quarantined"
    assert _failing(verdict) == FAULTS[name]


@pytest.mark.parametrize(
    ("name", "check_id", "gpu", "words"),
    [
        ("slow_gpu", "compute.gemm", 6, ["474.6 TFLOPS", "floor 600 TFLOPS"]),
        ("slow_gpu", "compute.straggler", 6, ["474.6", "0.60", "median", "0.9"]),
        ("slow_gpu", "thermal.clock_events", 6, ["hw_slowdown"]),
        ("pcie_gen3", "bandwidth.h2d", 4, ["13.1 GB/s", "floor 48 GB/s"]),
        ("pcie_gen3", "bandwidth.d2h", 4, ["13.3 GB/s", "floor 48 GB/s"]),
        ("pcie_gen3", "pcie.link", 4, ["gen 3 x16", "gen 5 x16", "under load"]),
        ("nvlink_down", "collectives.allreduce", None, ["349.4 GB/s", "floor 355 GB/s"]),
        ("nvlink_down", "nvlink.links", 0, ["17 of 18", "down: 17"]),
        ("missing_gpu", "inventory.gpu_count", None, ["7 of 8", "GPU 3"]),
        ("xid_79", "xid", None, ["Xid 79", "0000:AB:00", "fallen off the bus"]),
        ("ecc_uncorrectable", "ecc.uncorrectable", 2, ["2 uncorrectable", "floor 0"]),
        ("ecc_uncorrectable", "xid", None, ["Xid 48", "GPU 2"]),
        ("row_remap_pending", "memory.row_remap", 1, ["pending", "1 uncorrectable"]),
        ("silent_data_corruption", "compute.sdc", 7, ["3 of 10", "floor 0"]),
        ("dcgm_fail", "dcgm.diag", 3, ["Hardware/memory fail", "illegal memory access"]),
    ],
)
def test_failure_reasons_name_the_figure_and_the_floor(
    name: str, check_id: str, gpu: int | None, words: list[str]
) -> None:
    check = _check(_judge(name), check_id, gpu)
    assert check.verdict is Verdict.FAIL
    for word in words:
        assert word in check.reason, (word, check.reason)


def test_failing_figures_carry_value_and_floor() -> None:
    check = _check(_judge("slow_gpu"), "compute.gemm", 6)
    assert (check.value, check.floor, check.unit) == (474.6, 600.0, "TFLOPS")


def test_profile_floor_overrides_win_over_the_catalog() -> None:
    floors = with_overrides(catalog_floors("H100-SXM5-80GB"), BurninFloors(gemm_tflops=792.0))
    assert floors.hbm_gbps == catalog_floors("H100-SXM5-80GB").hbm_gbps
    verdict = _judge("healthy", replace(H100, floors=floors))
    slow = {c.gpu for c in verdict.failing if c.id == "compute.gemm"}
    healthy = load_document(DOCUMENTS / "healthy.json")
    assert slow == {g.index for g in healthy.gpus if g.gemm and g.gemm.tflops < 792.0}
    assert slow and len(slow) < 8
    assert all("floor 792 TFLOPS" in c.reason for c in verdict.failing)
    lenient = with_overrides(H100.floors, BurninFloors(h2d_gbps=12.0, d2h_gbps=12.0))
    assert _failing(_judge("pcie_gen3", replace(H100, floors=lenient))) == {("pcie.link", 4)}


def test_driver_mismatch_fails() -> None:
    verdict = _judge("healthy", replace(H100, driver_version="580.65.06"))
    assert _failing(verdict) == {("inventory.driver_version", None)}
    reason = _check(verdict, "inventory.driver_version").reason
    assert "570.133.20" in reason and "580.65.06" in reason


def test_no_driver_loaded_fails() -> None:
    data = _raw("healthy")
    data["host"]["driver_version"] = None
    assert _failing(judge(data, H100)) == {("inventory.driver_version", None)}


def test_wrong_gpu_model_fails_per_gpu() -> None:
    verdict = _judge("healthy", replace(H100, nvml_names=("NVIDIA H200",)))
    assert _failing(verdict) == {("inventory.gpu_model", gpu) for gpu in range(8)}


def test_pre_ampere_gpus_are_judged_by_retired_pages() -> None:
    v100 = Expectation(
        gpu_count=8,
        nvml_names=("Tesla V100-SXM2-32GB",),
        driver_version="535.216.03",
        nvlink_links=6,
        pcie_gen=3,
        floors=Floors(90.0, 600.0, 10.0, 10.0, 120.0, 85.0),
        dcgm=False,
        level="quick",
    )
    verdict = _judge("pre_ampere", v100)
    assert _failing(verdict) == {("memory.retired_pages", 3)}
    assert "pending" in _check(verdict, "memory.retired_pages", 3).reason
    assert _check(verdict, "memory.retired_pages", 5).verdict is Verdict.PASS
    assert not [c for c in verdict.checks if c.id == "memory.row_remap"]
    assert _check(verdict, "dcgm.diag").verdict is Verdict.SKIP  # no DCGM in that stack


def test_skipped_stress_warns_with_the_agents_reason() -> None:
    verdict = _judge("skipped_stress")
    assert verdict.verdict == "ready"  # nothing failed, but nothing passes silently either
    warned = {(c.id, c.gpu) for c in verdict.warnings}
    stress = (
        "compute.gemm",
        "compute.sdc",
        "compute.straggler",
        "bandwidth.hbm",
        "bandwidth.h2d",
        "bandwidth.d2h",
    )
    expected = {(check, gpu) for check in stress for gpu in range(8)}
    expected |= {("collectives.allreduce", None), ("dcgm.diag", None)}
    assert warned == expected
    gemm = _check(verdict, "compute.gemm", 0)
    assert "neither torch nor cupy is installed" in gemm.reason
    assert "all_reduce_perf not found" in _check(verdict, "collectives.allreduce").reason


def test_dcgm_skipped_at_quick_is_a_skip_not_a_warning() -> None:
    data = _raw("skipped_stress")
    data["level"] = "quick"
    check = _check(judge(data, H100), "dcgm.diag")
    assert check.verdict is Verdict.SKIP
    assert "dcgmi not found" in check.reason


def test_an_agent_error_in_a_stress_measurement_fails_it() -> None:
    data = _raw("healthy")
    data["gpus"][3]["gemm"] = None
    data["errors"] = [{"check": "gemm", "message": "CUDA error: an illegal memory access"}]
    verdict = judge(data, H100)
    assert _failing(verdict) == {
        ("compute.gemm", 3),
        ("compute.sdc", 3),
        ("compute.straggler", 3),
    }
    assert "illegal memory access" in _check(verdict, "compute.gemm", 3).reason
    assert _check(verdict, "agent.errors").verdict is Verdict.PASS  # taken up by the checks


def test_an_agent_error_no_check_takes_up_warns() -> None:
    data = _raw("healthy")
    data["errors"] = [{"check": "engine", "message": "torch sees 7 GPUs, the backend 8"}]
    verdict = judge(data, H100)
    assert verdict.ready
    check = _check(verdict, "agent.errors")
    assert check.verdict is Verdict.WARN and "torch sees 7 GPUs" in check.reason


def test_an_unreadable_kernel_log_warns() -> None:
    data = _raw("healthy")
    data["xid"] = {"source": None, "events": []}
    data["errors"] = [{"check": "xid", "message": "cannot read the kernel log"}]
    check = _check(judge(data, H100), "xid")
    assert check.verdict is Verdict.WARN and "cannot read the kernel log" in check.reason


@pytest.mark.parametrize(
    ("xid", "verdict"), [(63, Verdict.WARN), (13, Verdict.WARN), (94, Verdict.FAIL)]
)
def test_only_fatal_xids_fail(xid: int, verdict: Verdict) -> None:
    data = _raw("healthy")
    line = f"NVRM: Xid (PCI:0000:18:00): {xid}, pid=1, name=python3, test"
    data["xid"]["events"] = [{"xid": xid, "pci": "0000:18:00", "gpu": 0, "line": line}]
    assert _check(judge(data, H100), "xid").verdict is verdict


def test_sw_power_cap_is_informational() -> None:
    check = _check(_judge("healthy"), "thermal.clock_events", 2)
    assert check.verdict is Verdict.PASS and "sw_power_cap" in check.reason


def test_a_link_read_at_idle_below_its_best_warns() -> None:
    data = _raw("healthy")
    data["gpus"][1]["pcie"].update(gen=1, under_load=False)
    check = _check(judge(data, H100), "pcie.link", 1)
    assert check.verdict is Verdict.WARN and "idle" in check.reason


def test_too_hot_fails_against_the_ceiling() -> None:
    data = _raw("healthy")
    data["gpus"][5]["thermal"]["max_temperature_c"] = 91.5
    verdict = judge(data, H100)
    assert _failing(verdict) == {("thermal.temperature", 5)}
    assert "91.5 °C > ceiling 85 °C" in _check(verdict, "thermal.temperature", 5).reason


def test_a_verdict_survives_its_dict_form() -> None:
    verdict = _judge("slow_gpu")
    again = NodeVerdict.from_dict(json.loads(json.dumps(verdict.as_dict())))
    assert again == verdict
    assert again.verdict == "quarantined"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(schema="provisioner-burnin/2"), ["schema", "provisioner-burnin/2"]),
        (lambda d: d.pop("gpus"), ["gpus", "required"]),
        (lambda d: d["gpus"][0].pop("pcie"), ["gpus.0.pcie"]),
        (lambda d: d["gpus"][2]["gemm"].update(tflops="fast"), ["gpus.2.gemm.tflops"]),
        (lambda d: d.update(level="turbo"), ["level"]),
    ],
    ids=["schema", "no-gpus", "no-pcie", "tflops-text", "level"],
)
def test_a_document_off_contract_is_refused(change: Any, words: list[str]) -> None:
    data = copy.deepcopy(_raw("healthy"))
    change(data)
    with pytest.raises(BurninDocumentError) as caught:
        parse_document(data, "gpu-healthy.json")
    message = str(caught.value)
    assert message.startswith("gpu-healthy.json: ")
    for word in words:
        assert word in message, message
    assert isinstance(caught.value, BurninFailed) and isinstance(caught.value, ProvisionerError)


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(BurninDocumentError, match="not JSON"):
        load_document(path)
