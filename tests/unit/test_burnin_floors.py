"""Burn-in floors: the catalog's per SKU, a profile's burnin.floors field by field over them,
and what the spec promises about a node (GPU count, model, driver, NVLink links, level)."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.burnin.floors import Floors, catalog_floors, expectation_for, floors_for
from provisioner.spec import load_fleet
from provisioner.spec.catalog import load_catalog
from tests.conftest import LAB_SPEC


def _lab(tmp_path: Path, *replacements: tuple[str, str]) -> Path:
    text = LAB_SPEC.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    spec = tmp_path / "fleet.yaml"
    spec.write_text(text, encoding="utf-8")
    return spec


def test_h100_floors_come_from_the_catalog() -> None:
    floors = catalog_floors("H100-SXM5-80GB")
    assert floors == Floors(
        gemm_tflops=600.0,
        hbm_gbps=2250.0,
        h2d_gbps=48.0,
        d2h_gbps=48.0,
        allreduce_busbw_gbps=355.0,
        max_temperature_c=85.0,
        straggler_fraction=0.9,
        pcie_replays_max=80,
    )


@pytest.mark.parametrize("sku", sorted(load_catalog().gpus))
def test_every_floor_sits_below_what_the_sku_can_reach(sku: str) -> None:
    gpu = load_catalog().gpus[sku]
    floors = catalog_floors(sku)
    assert floors.gemm_tflops is not None and floors.hbm_gbps is not None
    assert 0.5 * gpu.bf16_dense_tflops < floors.gemm_tflops < 0.8 * gpu.bf16_dense_tflops
    assert 0.5 * gpu.hbm_tbps * 1000 < floors.hbm_gbps < 0.9 * gpu.hbm_tbps * 1000
    per_lane = {4: 21.0, 5: 48.0}[gpu.pcie_gen]  # Azure's floors per PCIe generation
    assert floors.h2d_gbps == floors.d2h_gbps == per_lane
    assert (floors.allreduce_busbw_gbps is None) == (gpu.nvlink_links == 0)


def test_an_unknown_sku_has_no_floors() -> None:
    with pytest.raises(KeyError, match="V100"):
        catalog_floors("V100-SXM2-32GB")


def test_profile_floors_override_the_catalog_field_by_field(tmp_path: Path) -> None:
    spec = _lab(
        tmp_path,
        (
            "      level: quick\n",
            "      level: quick\n      floors: {gemm_tflops: 700, h2d_gbps: 40}\n",
        ),
    )
    fleet = load_fleet(spec)
    floors = floors_for(fleet, fleet.by_name["gpu-lab-01"])
    catalog = catalog_floors("H100-SXM5-80GB")
    assert (floors.gemm_tflops, floors.h2d_gbps) == (700.0, 40.0)
    assert floors.hbm_gbps == catalog.hbm_gbps
    assert floors.d2h_gbps == catalog.d2h_gbps
    assert floors.allreduce_busbw_gbps == catalog.allreduce_busbw_gbps


def test_the_expectation_reads_the_spec() -> None:
    fleet = load_fleet(LAB_SPEC)
    expected = expectation_for(fleet, fleet.by_name["gpu-lab-02"])
    assert expected.gpu_count == 8
    assert expected.nvml_names == ("NVIDIA H100 80GB HBM3",)
    assert expected.driver_version == "570.133.20"
    assert expected.nvlink_links == 18
    assert expected.pcie_gen == 5
    assert expected.dcgm is True
    assert expected.level == "quick"  # the profile's
    assert expectation_for(fleet, fleet.by_name["gpu-lab-02"], "extended").level == "extended"


def test_without_nvswitch_nvlink_links_are_not_expected(tmp_path: Path) -> None:
    fleet = load_fleet(_lab(tmp_path, ("    nvswitch: true\n", "    nvswitch: false\n")))
    assert expectation_for(fleet, fleet.by_name["gpu-lab-01"]).nvlink_links is None


def test_a_node_on_another_stack_expects_that_stacks_driver(tmp_path: Path) -> None:
    node = '{name: gpu-lab-02, ip: 10.200.0.12, mac: "02:00:0a:c8:00:0c", '
    fleet = load_fleet(_lab(tmp_path, (node, node + "stack: h100-580, ")))
    assert expectation_for(fleet, fleet.by_name["gpu-lab-02"]).driver_version == "580.65.06"
    assert expectation_for(fleet, fleet.by_name["gpu-lab-01"]).driver_version == "570.133.20"


def test_floors_survive_their_dict_form() -> None:
    floors = catalog_floors("A100-SXM4-80GB")
    assert Floors.from_dict(floors.as_dict()) == floors
