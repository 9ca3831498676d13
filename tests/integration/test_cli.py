"""The command line as a user runs it: ``python -m provisioner ...`` in a real subprocess.

Every failure is exit code 1 with ``file[:line]: [field: ]message`` lines on stderr and never a
Python traceback; ``render`` writes only what changed and removes only what it wrote.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import pytest

import provisioner
from provisioner.spec import load_fleet
from tests.conftest import LAB_SPEC, POD_SPEC, RunCli


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    text = f"{result.stdout}\n{result.stderr}"
    assert "Traceback" not in text, text


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too), by relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _lab_copy(folder: Path, text: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "fleet.yaml"
    spec.write_text(LAB_SPEC.read_text(encoding="utf-8") if text is None else text, "utf-8")
    return spec


def _pod_copy(folder: Path) -> Path:
    """The pod spec with its vendor manifests (the spec names them relative to itself)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(POD_SPEC.parent / "vendor", folder / "vendor")
    spec = folder / "fleet.yaml"
    shutil.copyfile(POD_SPEC, spec)
    return spec


# --------------------------------------------------------------------------- validate


@pytest.mark.parametrize(
    ("spec", "summary"),
    [
        (LAB_SPEC, r"ok: site lab, 1 racks?, 4 nodes, 32 GPUs"),
        (POD_SPEC, r"ok: site pod-a, 4 racks, 128 nodes, 1024 GPUs"),
    ],
    ids=["lab", "pod"],
)
def test_validate_accepts_the_example_specs(run_cli: RunCli, spec: Path, summary: str) -> None:
    result = run_cli("validate", spec)
    assert result.returncode == 0, result.stderr
    assert re.search(summary, result.stdout), result.stdout
    _no_traceback(result)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (LAB_SPEC, {"site": "lab", "racks": 1, "nodes": 4, "gpus": 32}),
        (POD_SPEC, {"site": "pod-a", "racks": 4, "nodes": 128, "gpus": 1024}),
    ],
    ids=["lab", "pod"],
)
def test_validate_json_reports_ok_problems_and_summary(
    run_cli: RunCli, spec: Path, expected: dict[str, object]
) -> None:
    result = run_cli("validate", spec, "--output", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["problems"] == []
    assert {key: report["summary"][key] for key in expected} == expected


def _broken_lab(folder: Path) -> tuple[Path, dict[str, int]]:
    """The lab spec with a bad CIDR and too many GPUs; returns it and each error's line."""
    text = LAB_SPEC.read_text(encoding="utf-8")
    text = text.replace("cidr: 10.200.0.0/24", "cidr: 10.200.0.0/33", 1)
    text = text.replace("gpus: 8", "gpus: 99", 1)
    lines = text.splitlines()
    where = {
        "networks.provisioning.cidr": next(
            i for i, line in enumerate(lines, 1) if "10.200.0.0/33" in line
        ),
        "profiles.hgx-h100.gpus": next(i for i, line in enumerate(lines, 1) if "gpus: 99" in line),
    }
    return _lab_copy(folder, text), where


def test_validate_reports_each_problem_at_file_line_and_field(
    run_cli: RunCli, tmp_path: Path
) -> None:
    spec, where = _broken_lab(tmp_path)
    result = run_cli("validate", spec.name, cwd=tmp_path)
    assert result.returncode == 1
    _no_traceback(result)
    lines = result.stderr.splitlines()
    found = {}
    for line in lines[:-1]:
        match = re.fullmatch(r"fleet\.yaml:(\d+): (\S+): (.+)", line)
        assert match, f"not file:line: field: message: {line!r}"
        found[match.group(2)] = int(match.group(1))
    assert found == where
    assert lines[-1] == "fleet.yaml: 2 errors"


def test_validate_json_lists_the_problems(run_cli: RunCli, tmp_path: Path) -> None:
    spec, where = _broken_lab(tmp_path)
    result = run_cli("validate", spec.name, "--output", "json", cwd=tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert {p["path"]: p["line"] for p in report["problems"]} == where
    for problem in report["problems"]:
        assert problem["file"] == "fleet.yaml"
        assert problem["severity"] == "error"
        assert problem["message"]


def _unreadable(kind: str, folder: Path) -> str:
    """Make the bad input ``kind`` in ``folder``; return the name to pass to the CLI."""
    if kind == "missing":
        return "absent.yaml"
    if kind == "directory":
        (folder / "specs").mkdir()
        return "specs"
    if kind == "binary":
        (folder / "image.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
        return "image.yaml"
    if kind == "empty":
        (folder / "empty.yaml").write_bytes(b"")
        return "empty.yaml"
    if kind == "nul":
        (folder / "nul.yaml").write_text("version: 1\nmetadata: {site: \x00}\n", "utf-8")
        return "nul.yaml"
    if kind == "not-a-mapping":
        (folder / "list.yaml").write_text("- version: 1\n", "utf-8")
        return "list.yaml"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("binary", "not UTF-8 text"),
        ("empty", "a fleet spec is a YAML mapping"),
        ("nul", "YAML:"),
        ("not-a-mapping", "a fleet spec is a YAML mapping"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "render", "inventory"])
def test_unreadable_spec_is_one_clean_error(
    run_cli: RunCli, tmp_path: Path, kind: str, message: str, command: str
) -> None:
    name = _unreadable(kind, tmp_path)
    extra = {"validate": [], "render": ["--out", "out"], "inventory": ["--list"]}[command]
    result = run_cli(command, name, *extra, cwd=tmp_path)
    assert result.returncode == 1
    _no_traceback(result)
    first = result.stderr.splitlines()[0]
    assert re.fullmatch(rf"{re.escape(name)}(:\d+)?: .+", first), first
    assert message in first
    if command == "validate":
        assert result.stderr.splitlines()[-1] == f"{name}: 1 error"
    assert not (tmp_path / "out").exists(), "a failed render must not create its folder"


def test_impossible_date_in_a_spec_is_a_clean_error(run_cli: RunCli, tmp_path: Path) -> None:
    text = LAB_SPEC.read_text(encoding="utf-8")
    text = text.replace("  site: lab\n", "  site: lab\n  built: 2024-02-30\n", 1)
    assert "built: 2024-02-30" in text
    spec = _lab_copy(tmp_path, text)
    result = run_cli("validate", spec.name, cwd=tmp_path)
    _no_traceback(result)
    assert result.returncode == 1
    line = text.splitlines().index("  built: 2024-02-30") + 1
    assert re.search(rf"^fleet\.yaml:{line}: ", result.stderr, re.MULTILINE), result.stderr


def test_absurdly_deep_nesting_is_a_clean_error(run_cli: RunCli, tmp_path: Path) -> None:
    (tmp_path / "deep.yaml").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    result = run_cli("validate", "deep.yaml", cwd=tmp_path)
    assert result.returncode == 1, f"exit status {result.returncode}"
    _no_traceback(result)
    assert result.stderr.startswith("deep.yaml")


def test_empty_repo_placeholder_is_refused_by_validate(run_cli: RunCli, tmp_path: Path) -> None:
    text = LAB_SPEC.read_text(encoding="utf-8").replace("/cuda/{distro}/", "/cuda/{}/")
    spec = _lab_copy(tmp_path, text)
    for args in (["inventory", spec.name, "--list"], ["render", spec.name, "--out", "out"]):
        _no_traceback(run_cli(*args, cwd=tmp_path))
    result = run_cli("validate", spec.name, cwd=tmp_path)
    assert result.returncode == 1
    assert ".repos.cuda: " in result.stderr


# --------------------------------------------------------------------------- render


def _render(
    run_cli: RunCli, spec: Path, out: Path, *, env: dict[str, str] | None = None
) -> dict[str, Any]:
    result = run_cli("render", spec, "--out", out, "--output", "json", env=env)
    assert result.returncode == 0, result.stderr
    _no_traceback(result)
    return json.loads(result.stdout)


def test_second_render_changes_nothing(run_cli: RunCli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_cli("render", LAB_SPEC, "--out", out)
    assert first.returncode == 0, first.stderr
    assert re.search(r"rendered 4 nodes: (\d+) files in .*: \1 new, 0 changed", first.stdout)
    files = _tree(out)
    second = run_cli("render", LAB_SPEC, "--out", out)
    assert second.returncode == 0, second.stderr
    assert re.search(r": 0 new, 0 changed, \d+ unchanged, 0 removed", second.stdout), second.stdout
    assert _tree(out) == files


def test_second_render_json_counts_everything_unchanged(run_cli: RunCli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _render(run_cli, POD_SPEC, out)
    assert len(first["new"]) == first["files"] > 128
    second = _render(run_cli, POD_SPEC, out)
    assert (second["new"], second["changed"], second["removed"]) == ([], [], [])
    assert second["unchanged"] == second["files"] == first["files"]


def test_render_refuses_a_folder_it_did_not_write(run_cli: RunCli, tmp_path: Path) -> None:
    out = tmp_path / "someone-elses"
    (out / "nested").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me\n", encoding="utf-8")
    (out / "nested" / "inventory.yml").write_text("all: {}\n", encoding="utf-8")
    (out / ".hidden").write_text("x", encoding="utf-8")
    before = _tree(out)
    stats = {path: (out / path).stat().st_mtime_ns for path in before}
    result = run_cli("render", LAB_SPEC, "--out", out)
    assert result.returncode == 1
    _no_traceback(result)
    assert "not empty and was not written by provisioner" in result.stderr
    assert _tree(out) == before
    assert {path: (out / path).stat().st_mtime_ns for path in before} == stats
    assert sorted(p.name for p in out.iterdir()) == [".hidden", "nested", "notes.txt"]


def test_render_refuses_a_file_as_its_folder(run_cli: RunCli, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("not a folder\n", encoding="utf-8")
    result = run_cli("render", LAB_SPEC, "--out", target)
    assert result.returncode == 1
    _no_traceback(result)
    assert "is not a folder" in result.stderr
    assert target.read_text(encoding="utf-8") == "not a folder\n"


def test_removing_a_lab_node_removes_exactly_its_files(run_cli: RunCli, tmp_path: Path) -> None:
    spec = _lab_copy(tmp_path / "spec")
    out = tmp_path / "out"
    _render(run_cli, spec, out)
    before = set(_tree(out))
    node_files = {
        "boot/autoinstall/gpu-lab-03/meta-data",
        "boot/autoinstall/gpu-lab-03/user-data",
        "boot/ipxe/02-00-0a-c8-00-0d.ipxe",
    }
    assert node_files <= before

    lines = spec.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if "name: gpu-lab-03," not in line]
    assert len(kept) == len(lines) - 1
    spec.write_text("".join(kept), encoding="utf-8")
    report = _render(run_cli, spec, out)

    assert sorted(report["removed"]) == sorted(node_files)
    assert report["new"] == []
    assert before - set(_tree(out)) == node_files
    assert set(_tree(out)) - before == set()
    assert not (out / "boot" / "autoinstall" / "gpu-lab-03").exists()
    for other in ("gpu-lab-01", "gpu-lab-02", "gpu-lab-04"):
        assert (out / "boot" / "autoinstall" / other / "user-data").is_file()


def test_removing_a_pod_node_removes_exactly_its_files(run_cli: RunCli, tmp_path: Path) -> None:
    spec = _pod_copy(tmp_path / "spec")
    out = tmp_path / "out"
    _render(run_cli, spec, out)
    before = set(_tree(out))

    manifest = spec.parent / "vendor" / "rack-r01.csv"
    rows = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    last = next(csv.DictReader(rows[:1] + rows[-1:]))
    pxe_mac = last["NIC1 MAC (PXE)"].lower().replace(":", "-")
    node_files = {
        "boot/autoinstall/h100-r01-n32/meta-data",
        "boot/autoinstall/h100-r01-n32/user-data",
        f"boot/ipxe/{pxe_mac}.ipxe",
    }
    assert node_files <= before
    manifest.write_text("".join(rows[:-1]), encoding="utf-8")
    text = spec.read_text(encoding="utf-8")
    assert text.count("count: 32") == 4
    spec.write_text(text.replace("count: 32", "count: 31", 1), encoding="utf-8")
    report = _render(run_cli, spec, out)

    assert sorted(report["removed"]) == sorted(node_files)
    assert report["new"] == []
    assert before - set(_tree(out)) == node_files
    assert not (out / "boot" / "autoinstall" / "h100-r01-n32").exists()
    assert (out / "boot" / "autoinstall" / "h100-r01-n31" / "user-data").is_file()


# --------------------------------------------------------------------------- inventory


@pytest.mark.parametrize("spec", [LAB_SPEC, POD_SPEC], ids=["lab", "pod"])
def test_inventory_list_holds_every_node_with_its_address(run_cli: RunCli, spec: Path) -> None:
    result = run_cli("inventory", spec, "--list")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    hostvars = listed["_meta"]["hostvars"]
    fleet = load_fleet(spec)
    assert {name: hostvars[name]["ansible_host"] for name in hostvars} == {
        node.name: str(node.ip) for node in fleet.nodes
    }
    grouped = {
        host for name, group in listed.items() if name != "_meta" for host in group.get("hosts", [])
    }
    assert grouped == set(hostvars), "every host is in some group and no group names a stranger"


def test_inventory_host_prints_that_hosts_variables(run_cli: RunCli) -> None:
    result = run_cli("inventory", LAB_SPEC, "--host", "gpu-lab-02")
    assert result.returncode == 0, result.stderr
    variables = json.loads(result.stdout)
    assert variables["ansible_host"] == "10.200.0.12"
    assert variables["provisioner_mac"] == "02:00:0a:c8:00:0c"
    assert variables["provisioner_bmc"] == "ipmi://127.0.0.1:9002"
    assert variables["ansible_user"] == "root"


def test_inventory_unknown_host_is_an_error(run_cli: RunCli) -> None:
    result = run_cli("inventory", LAB_SPEC, "--host", "gpu-lab-99")
    assert result.returncode == 1
    _no_traceback(result)
    assert result.stdout == ""
    assert "gpu-lab-99" in result.stderr


@pytest.mark.parametrize("args", [[], ["--list", "--host", "gpu-lab-01"]], ids=["neither", "both"])
def test_inventory_needs_exactly_one_of_list_or_host(run_cli: RunCli, args: list[str]) -> None:
    result = run_cli("inventory", LAB_SPEC, *args)
    assert result.returncode == 1
    _no_traceback(result)
    assert result.stdout == ""
    assert "exactly one of --list or --host" in result.stderr


# --------------------------------------------------------------------------- help and version


def test_help_lists_the_commands(run_cli: RunCli) -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("validate", "render", "inventory", "version"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), result.stdout


def test_no_arguments_shows_help_and_fails(run_cli: RunCli) -> None:
    result = run_cli()
    assert result.returncode != 0
    _no_traceback(result)
    assert "validate" in result.stdout + result.stderr


def test_version_prints_the_package_version(run_cli: RunCli) -> None:
    result = run_cli("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == provisioner.__version__ == installed_version("provisioner")
