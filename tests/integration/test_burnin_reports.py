"""Burn-in reports as their readers take them: ``provisioner burnin report`` (a real
subprocess) on the hand-made agent documents writes JUnit XML that a JUnit library parses,
a Prometheus textfile that prometheus_client's parser reads, and an HTML page that headless
Chromium renders into a screenshot that is not blank; JSON lists every node's verdict, and
a results folder's saved report.json makes reports again without the spec."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from junitparser import Error, Failure, JUnitXml, Skipped
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DATA, LAB_SPEC, REPO

pytestmark = pytest.mark.integration

DOCUMENTS = DATA / "burnin" / "documents"
SIZE = (1280, 2000)
# Failing test cases per node (JUnit names: check, or check[gpu N]).
FAILING = {
    "gpu-healthy": set(),
    "gpu-skipped-stress": set(),
    "gpu-missing-gpu": {"inventory.gpu_count"},
    "gpu-xid-79": {"inventory.gpu_count", "xid"},
    "gpu-ecc-uncorrectable": {"ecc.uncorrectable[gpu 2]", "xid"},
    "gpu-row-remap-pending": {"memory.row_remap[gpu 1]"},
    "gpu-pcie-gen3": {"pcie.link[gpu 4]", "bandwidth.h2d[gpu 4]", "bandwidth.d2h[gpu 4]"},
    "gpu-slow-gpu": {
        "compute.gemm[gpu 6]",
        "compute.straggler[gpu 6]",
        "thermal.clock_events[gpu 6]",
    },
    "gpu-nvlink-down": {"nvlink.links[gpu 0]", "collectives.allreduce"},
    "gpu-sdc": {"compute.sdc[gpu 7]"},
    "gpu-dcgm-fail": {"dcgm.diag[gpu 3]"},
}
NOT_IN_SPEC = "gpu-v100"  # pre_ampere.json: its node is not in the spec below


def _cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "provisioner", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    return done


def _spec(folder: Path, nodes: list[str]) -> Path:
    """The lab spec with one rack of ``nodes`` (the documents' node names), no lab faults."""
    text = LAB_SPEC.read_text(encoding="utf-8")
    head, _, rest = text.partition("racks:\n")
    tail = rest[rest.index("rollout:") :].split("\nlab:")[0] + "\n"
    lines = [
        "racks:",
        "  - name: burnin1",
        "    profile: hgx-h100",
        "    stack: h100-570",
        "    image: ubuntu-2404",
        "    nodes:",
    ]
    for number, node in enumerate(nodes, start=21):
        lines.append(
            f'      - {{name: {node}, ip: 10.200.0.{number}, mac: "02:00:0a:c8:00:{number:02x}", '
            f'bmc: "ipmi://127.0.0.1:{9000 + number}"}}'
        )
    spec = folder / "fleet.yaml"
    spec.write_text(head + "\n".join(lines) + "\n\n" + tail, encoding="utf-8")
    return spec


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A results folder holding every document, and a spec naming the H100 nodes."""
    root = tmp_path_factory.mktemp("burnin")
    results = root / "results"
    results.mkdir()
    for document in DOCUMENTS.glob("*.json"):
        shutil.copy(document, results / document.name)
    return {"root": root, "results": results, "spec": _spec(root, sorted(FAILING))}


@pytest.fixture(scope="module")
def reports(site: dict[str, Path]) -> dict[str, Path]:
    made = {}
    for fmt in ("json", "junit", "prometheus", "html"):
        out = site["root"] / "reports" / f"burnin.{fmt}"
        done = _cli(
            "burnin",
            "report",
            site["results"],
            "--format",
            fmt,
            "--out",
            out,
            "--spec",
            site["spec"],
        )
        assert done.returncode == 0, done.stderr
        assert f"wrote {out}: 12 nodes, 2 ready, 9 quarantined, 1 without result" in done.stdout
        made[fmt] = out
    return made


def test_json_report_lists_every_node(reports: dict[str, Path]) -> None:
    report = json.loads(reports["json"].read_text(encoding="utf-8"))
    assert report["schema"] == "provisioner-burnin-report/1"
    assert report["summary"] == {"nodes": 12, "ready": 2, "quarantined": 9, "missing": 1}
    verdicts = {node["node"]: node for node in report["nodes"]}
    assert {name: set(node["failing"]) for name, node in verdicts.items()} == FAILING
    assert [m["node"] for m in report["missing"]] == [NOT_IN_SPEC]
    assert "not in the spec" in report["missing"][0]["reason"]
    slow = verdicts["gpu-slow-gpu"]
    assert slow["verdict"] == "quarantined"
    assert slow["floors"]["gemm_tflops"] == 600
    assert slow["gpus"][6]["gemm_tflops"] == 474.6


def test_junit_has_a_suite_per_node_and_a_case_per_check(reports: dict[str, Path]) -> None:
    xml = JUnitXml.fromfile(str(reports["junit"]))
    suites = {suite.name: suite for suite in xml}
    assert set(suites) == set(FAILING) | {NOT_IN_SPEC}
    for node, failing in FAILING.items():
        suite = suites[node]
        cases = list(suite)
        assert suite.tests == len(cases)
        assert suite.failures == len(failing), node
        failed = {case.name: case for case in cases if _results(case, Failure)}
        assert set(failed) == failing, node
        for case in failed.values():
            assert case.classname == f"burnin.{node}"
    healthy = list(suites["gpu-healthy"])
    assert len(healthy) == 17 * 8 + 6  # per-GPU checks x 8 GPUs, and the node's
    slow = {case.name: case for case in suites["gpu-slow-gpu"]}
    (failure,) = _results(slow["compute.gemm[gpu 6]"], Failure)
    assert failure.message == "474.6 TFLOPS < floor 600 TFLOPS (bf16, n=8192)"
    skipped = {case.name: case for case in suites["gpu-skipped-stress"]}
    assert "WARN: not measured" in (skipped["compute.gemm[gpu 0]"].system_out or "")
    assert not _results(skipped["compute.gemm[gpu 0]"], Failure)
    (error,) = _results(next(iter(suites[NOT_IN_SPEC])), Error)
    assert "not in the spec" in (error.message or "")
    assert xml.failures == sum(len(f) for f in FAILING.values())


def _results(case: Any, kind: type) -> list[Any]:
    return [result for result in case.result if isinstance(result, kind)]


def test_junit_marks_a_skipped_check_skipped(tmp_path: Path, site: dict[str, Path]) -> None:
    document = json.loads((DOCUMENTS / "skipped_stress.json").read_text(encoding="utf-8"))
    document["level"] = "quick"  # DCGM's diagnostic is optional at quick: a skip
    (tmp_path / "quick.json").write_text(json.dumps(document), encoding="utf-8")
    out = tmp_path / "quick.xml"
    done = _cli(
        "burnin",
        "report",
        tmp_path / "quick.json",
        "--format",
        "junit",
        "--out",
        out,
        "--spec",
        site["spec"],
    )
    assert done.returncode == 0, done.stderr
    (suite,) = JUnitXml.fromfile(str(out))
    skips = [case.name for case in suite if _results(case, Skipped)]
    assert skips == ["dcgm.diag"]
    assert suite.skipped == 1


def test_prometheus_textfile_parses_with_its_values(reports: dict[str, Path]) -> None:
    text = reports["prometheus"].read_text(encoding="utf-8")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert all(family.type == "gauge" for family in families.values())
    assert all(name.startswith("provisioner_burnin_") for name in families)
    assert all(family.documentation for family in families.values())

    def value(family: str, **labels: str) -> float:
        found = [
            s.value
            for s in families[family].samples
            if all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) == 1, (family, labels, found)
        return float(found[0])

    ready = {s.labels["node"]: s.value for s in families["provisioner_burnin_node_ready"].samples}
    assert ready == {node: float(not failing) for node, failing in FAILING.items()}
    assert value("provisioner_burnin_gemm_tflops", node="gpu-slow-gpu", gpu="6") == 474.6
    assert value("provisioner_burnin_h2d_gbps", node="gpu-pcie-gen3", gpu="4") == 13.1
    assert value("provisioner_burnin_allreduce_busbw_gbps", node="gpu-nvlink-down") == 349.4
    status = "provisioner_burnin_check_status"
    assert value(status, node="gpu-slow-gpu", check="compute.gemm", gpu="6") == 3  # fail
    assert value(status, node="gpu-slow-gpu", check="compute.gemm", gpu="5") == 0  # pass
    assert value(status, node="gpu-missing-gpu", check="inventory.gpu_count", gpu="") == 3
    assert value(status, node="gpu-skipped-stress", check="bandwidth.hbm", gpu="1") == 2
    assert value("provisioner_burnin_floor", node="gpu-healthy", figure="gemm_tflops") == 600
    assert value("provisioner_burnin_checks", node="gpu-pcie-gen3", verdict="fail") == 3
    assert value("provisioner_burnin_result_missing", node=NOT_IN_SPEC) == 1
    gpus = {
        s.labels["gpu"]
        for s in families["provisioner_burnin_hbm_gbps"].samples
        if s.labels["node"] == "gpu-missing-gpu"
    }
    assert gpus == {"0", "1", "2", "4", "5", "6", "7"}
    assert text.endswith("\n")
    helps = re.findall(r"^# HELP (\S+) ", text, flags=re.M)
    assert len(helps) == len(set(helps)) == len(families)  # one family each, once


def test_html_report_renders_in_headless_chromium(reports: dict[str, Path], tmp_path: Path) -> None:
    page = reports["html"].read_text(encoding="utf-8")
    assert "<script" not in page
    assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", page)  # self-contained
    assert "474.6 TFLOPS &lt; floor 600 TFLOPS" in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is not installed: run scripts/bootstrap --dev (Debian's chromium)")
    shot = tmp_path / "burnin-report.png"
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            f"--window-size={SIZE[0]},{SIZE[1]}",
            reports["html"].as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    width, height, colours = _png_colours(shot)
    assert (width, height) == SIZE
    assert len(colours) > 200, "the screenshot is (nearly) blank"
    assert _near(colours, (0x2F, 0x9E, 0x66)), "no green (ready tile, passing bars)"
    assert _near(colours, (0xD6, 0x45, 0x45)), "no red (quarantined tile, failing checks)"


def _near(colours: set[bytes], target: tuple[int, int, int], slack: int = 6) -> bool:
    return any(all(abs(c[i] - target[i]) <= slack for i in range(3)) for c in colours)


def _png_colours(path: Path) -> tuple[int, int, set[bytes]]:
    """Width, height and the set of RGB colours of an 8-bit RGB(A) PNG (a tiny decoder)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    position, chunks, header = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, (depth, colour_type)
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    previous = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(height):
        start = y * (stride + 1)
        row = _unfilter(
            raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, channels
        )
        colours.update(bytes(row[i : i + 3]) for i in range(0, stride, channels))
        previous = row
    return width, height, colours


def _unfilter(kind: int, row: bytearray, above: bytearray, channels: int) -> bytearray:
    if kind == 0:
        return row
    if kind == 2:
        return bytearray((a + b) & 255 for a, b in zip(row, above, strict=True))
    for i in range(len(row)):
        left = row[i - channels] if i >= channels else 0
        up = above[i]
        if kind == 1:
            row[i] = (row[i] + left) & 255
        elif kind == 3:
            row[i] = (row[i] + ((left + up) >> 1)) & 255
        else:
            corner = above[i - channels] if i >= channels else 0
            guess = left + up - corner
            a, b, c = abs(guess - left), abs(guess - up), abs(guess - corner)
            row[i] = (row[i] + (left if a <= b and a <= c else up if b <= c else corner)) & 255
    return row


def test_reports_again_from_a_results_folder_without_the_spec(
    site: dict[str, Path], reports: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "results"
    shutil.copytree(site["results"], folder)
    shutil.copy(reports["json"], folder / "report.json")  # what `burnin run` saves there
    out = tmp_path / "again.xml"
    done = _cli("burnin", "report", folder, "--format", "junit", "--out", out)
    assert done.returncode == 0, done.stderr
    again = {suite.name: suite.failures for suite in JUnitXml.fromfile(str(out))}
    before = {suite.name: suite.failures for suite in JUnitXml.fromfile(str(reports["junit"]))}
    assert again == before


def test_a_document_without_spec_or_saved_verdict_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = _cli("burnin", "report", DOCUMENTS / "healthy.json", "--format", "html", "--out", out)
    assert done.returncode == 1
    assert "--spec" in done.stderr and "healthy.json" in done.stderr
    assert not out.exists()


def test_a_document_off_contract_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else/1"}), encoding="utf-8")
    done = _cli(
        "burnin",
        "report",
        bad,
        "--format",
        "json",
        "--out",
        tmp_path / "r.json",
        "--spec",
        REPO / "inventories" / "lab" / "fleet.yaml",
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {bad}: schema 'something-else/1'")
