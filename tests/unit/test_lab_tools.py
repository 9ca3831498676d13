"""The lab stand-ins' tools (nvidia-smi, dcgmi, nvidia-ctk) and what each package contains.

The tools are run in-process against ``tests/data/lab/gpus.json`` (GPU 2 has fallen off the
bus); the package contents are checked for the lab note and for filled-in placeholders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioner.lab.debcontents import DebFile, package_files
from provisioner.lab.labbin import dcgmi, nvidia_ctk, nvidia_smi
from provisioner.spec import load_fleet
from provisioner.spec.packages import stack_packages
from tests.conftest import DATA, LAB_SPEC

GPUS = DATA / "lab" / "gpus.json"
UUID0 = "GPU-8c1f5a9e-3b1d-4c35-9d2e-0f6a1b2c3d40"


@pytest.fixture(autouse=True)
def _versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvidia_smi, "DRIVER_VERSION", "570.133.20")
    monkeypatch.setattr(nvidia_smi, "CUDA_VERSION", "12.8")
    monkeypatch.setattr(dcgmi, "DCGM_VERSION", "4.1.1")
    monkeypatch.setattr(nvidia_ctk, "TOOLKIT_VERSION", "1.17.5")


def _smi(*args: str, gpus: Path = GPUS) -> list[str]:
    return nvidia_smi.run(args, str(gpus), now=0.0)


# --------------------------------------------------------------------------- nvidia-smi


def test_nvidia_smi_lists_the_gpus_still_on_the_bus() -> None:
    assert _smi("-L") == [
        f"GPU 0: NVIDIA H100 80GB HBM3 (UUID: {UUID0})",
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-8c1f5a9e-3b1d-4c35-9d2e-0f6a1b2c3d41)",
        "GPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-8c1f5a9e-3b1d-4c35-9d2e-0f6a1b2c3d43)",
    ]


def test_nvidia_smi_query_prints_csv_with_header_and_units() -> None:
    fields = "index,name,uuid,serial,driver_version,memory.total,pci.bus_id"
    lines = _smi(f"--query-gpu={fields}", "--format=csv")
    assert lines[0] == ("index, name, uuid, serial, driver_version, memory.total [MiB], pci.bus_id")
    assert lines[1] == (
        f"0, NVIDIA H100 80GB HBM3, {UUID0}, 1650742311001, 570.133.20, 81559 MiB, 00000000:18:00.0"
    )
    assert len(lines) == 4


def test_nvidia_smi_query_noheader_nounits_and_id() -> None:
    lines = _smi(
        "--query-gpu", "index,memory.total,count", "--format=csv,noheader,nounits", "-i", "3"
    )
    assert lines == ["3, 81559, 1"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--query-gpu=index,bogus", "--format=csv"), 2, 'Field "bogus" is not a valid field'),
        (("--query-gpu=index", "--format=json"), 2, '"json" is not a valid format.'),
        (("--query-gpu=index",), 2, "Invalid combination of input arguments"),
        (("-q",), 2, "Invalid combination of input arguments"),
        (("-i", "2"), 6, "No devices were found"),
    ],
)
def test_nvidia_smi_refuses_as_nvidia_smi_does(
    args: tuple[str, ...], code: int, message: str
) -> None:
    with pytest.raises(nvidia_smi.SmiError) as caught:
        _smi(*args)
    assert caught.value.code == code
    assert message in caught.value.message


def test_nvidia_smi_without_the_gpu_file_fails_like_without_a_driver(tmp_path: Path) -> None:
    with pytest.raises(nvidia_smi.SmiError) as caught:
        _smi("-L", gpus=tmp_path / "missing.json")
    assert caught.value.code == 9
    assert caught.value.message.startswith("NVIDIA-SMI has failed because it couldn't communicate")


def test_nvidia_smi_refuses_a_file_of_another_schema(tmp_path: Path) -> None:
    other = tmp_path / "gpus.json"
    other.write_text(json.dumps({"schema": "something-else/1", "gpus": []}))
    with pytest.raises(nvidia_smi.SmiError) as caught:
        _smi(gpus=other)
    assert caught.value.code == 255


def test_nvidia_smi_table_is_nvidias_width_and_says_lab_build() -> None:
    lines = _smi()
    assert lines[0].startswith("LAB BUILD of nvidia-smi")
    table = [line for line in lines[2:] if line]
    assert {len(line) for line in table} == {91}
    assert "Driver Version: 570.133.20" in lines[3]
    assert "CUDA Version: 12.8" in lines[3]
    bus_rows = [line for line in lines if "00000000:" in line]
    assert [row.split("|")[2].split()[0] for row in bus_rows] == [
        "00000000:18:00.0",
        "00000000:2A:00.0",
        "00000000:5D:00.0",
    ]


def test_nvidia_smi_main_prints_and_exits_with_the_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("PROVISIONER_LAB_GPUS", str(tmp_path / "none.json"))
    assert nvidia_smi.main(["-L"]) == 9
    assert "NVIDIA-SMI has failed" in capsys.readouterr().out
    monkeypatch.setenv("PROVISIONER_LAB_GPUS", str(GPUS))
    assert nvidia_smi.main(["-L"]) == 0
    assert capsys.readouterr().out.count("GPU ") == 3


# --------------------------------------------------------------------------- dcgmi


def test_dcgmi_diag_json_passes_every_test_on_every_present_gpu() -> None:
    result = json.loads("\n".join(dcgmi.run(["diag", "-r", "2", "-j"], str(GPUS))))
    categories = result["DCGM Diagnostic"]["test_categories"]
    assert [c["category"] for c in categories] == ["Deployment", "Integration", "Hardware"]
    for category in categories:
        for test in category["tests"]:
            assert test["test_summary"]["status"] == "Pass"
            assert [(r["entity_id"], r["status"]) for r in test["results"]] == [
                (0, "Pass"),
                (1, "Pass"),
                (3, "Pass"),
            ]
    assert result["metadata"]["DCGM version"] == "4.1.1"
    assert result["metadata"]["lab_build"] is True


def test_dcgmi_level_one_runs_only_the_deployment_tests() -> None:
    result = json.loads("\n".join(dcgmi.run(["diag", "--run=1", "--json"], str(GPUS))))
    tests = [t["name"] for c in result["DCGM Diagnostic"]["test_categories"] for t in c["tests"]]
    assert tests == ["software"]


def test_dcgmi_without_gpus_cannot_reach_a_host_engine(tmp_path: Path) -> None:
    with pytest.raises(dcgmi.DcgmiError, match="Unable to connect to host engine"):
        dcgmi.run(["diag", "-r", "1", "-j"], str(tmp_path / "none.json"))


def test_dcgmi_reports_its_version_and_refuses_a_bad_level() -> None:
    assert dcgmi.run(["--version"], str(GPUS))[0] == "dcgmi  version: 4.1.1"
    with pytest.raises(dcgmi.DcgmiError, match="invalid run level"):
        dcgmi.run(["diag", "-r", "9"], str(GPUS))


# --------------------------------------------------------------------------- nvidia-ctk


def test_nvidia_ctk_records_the_runtime_it_was_asked_to_configure(tmp_path: Path) -> None:
    lines = nvidia_ctk.run(["runtime", "configure", "--runtime=containerd"], str(tmp_path))
    record = json.loads((tmp_path / "nvidia-ctk" / "runtime-containerd.json").read_text())
    assert record["runtime"] == "containerd"
    assert record["config"] == "/etc/containerd/config.toml"
    assert record["toolkit_version"] == "1.17.5"
    assert "restarted" in lines[-1]


def test_nvidia_ctk_refuses_an_unknown_runtime(tmp_path: Path) -> None:
    with pytest.raises(nvidia_ctk.CtkError, match="unrecognized runtime 'podman'"):
        nvidia_ctk.run(["runtime", "configure", "--runtime", "podman"], str(tmp_path))
    assert not (tmp_path / "nvidia-ctk").exists()


# --------------------------------------------------------------------------- package contents


def _lab_packages() -> dict[str, list[DebFile]]:
    stacks = load_fleet(LAB_SPEC).document.stacks.values()
    return {p.name: package_files(p) for s in stacks for p in stack_packages(s)}


def test_every_package_says_it_is_a_lab_build() -> None:
    for name, files in _lab_packages().items():
        notes = [f for f in files if f.path == f"/usr/share/doc/{name}/LAB-BUILD"]
        assert notes, name
        assert notes[0].data.startswith(b"LAB BUILD - not NVIDIA software.")


def test_tools_carry_their_package_versions_and_no_placeholders() -> None:
    files = {f.path: f for fs in _lab_packages().values() for f in fs}
    for file in files.values():
        assert b"@DRIVER_VERSION@" not in file.data and b"@DCGM_VERSION@" not in file.data
    smi = _lab_packages()["nvidia-utils-580"]
    script = next(f for f in smi if f.path == "/usr/bin/nvidia-smi")
    assert b'DRIVER_VERSION = "580.65.06"' in script.data
    assert b'CUDA_VERSION = "13.0"' in script.data
    assert script.mode == 0o755
    version = json.loads(files["/usr/local/cuda-12.8/version.json"].data)
    assert version["cuda"] == {"name": "CUDA SDK", "version": "12.8.0"}
    unit = files["/lib/systemd/system/nvidia-fabricmanager.service"].data.decode()
    assert "Type=simple" in unit and "ExecStart=/usr/bin/nv-fabricmanager" in unit
