"""``provisioner status`` and ``provisioner history`` as a user runs them (a real subprocess),
over a state database the store API filled in as a bring-up would.

Looking never creates a database: without one both commands exit 1 saying where it was
looked for. Markup-looking text (``compute.gemm[gpu 3]``) is printed as written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from provisioner.spec import load_fleet
from provisioner.state.lifecycle import State
from provisioner.state.store import open_store
from tests.conftest import LAB_SPEC, RunCli

S = State
GEMM = "compute.gemm[gpu 3]: 610 TFLOPS < floor 700"


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    copy = tmp_path / "site" / "fleet.yaml"
    copy.parent.mkdir()
    shutil.copyfile(LAB_SPEC, copy)
    return copy


@pytest.fixture(autouse=True)
def _no_state_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROVISIONER_STATE", raising=False)


def _record(spec: Path, url: str | None = None) -> str:
    """gpu-lab-01 quarantined after a burn-in, gpu-lab-02 failed at power-on, gpu-lab-03
    enrolled, gpu-lab-04 not enrolled. Returns the run id."""
    fleet = load_fleet(spec)
    names = [node.name for node in fleet.nodes]
    with open_store(url, spec) as store:
        run = store.start_run("bring-up", "lab")
        store.enroll(fleet.nodes[:3], site="lab", run_id=run)
        for step in (S.powering_on, S.pxe_booting, S.installing, S.configuring, S.burning_in):
            store.move(names[0], step, run_id=run)
        checks = [{"id": "compute.gemm", "gpu": 3, "verdict": "fail"}]
        store.save_burnin(names[0], run, "quarantined", "quick", {"node": names[0]}, checks)
        store.move(names[0], S.quarantined, run_id=run, error=GEMM)
        store.move(names[1], S.powering_on, run_id=run)
        store.move(names[1], S.failed, run_id=run, error="BMC unreachable: timeout")
    return run


def _lines(text: str) -> dict[str, str]:
    """Table rows by their first word."""
    return {line.split()[0]: " ".join(line.split()) for line in text.splitlines() if line.strip()}


def test_looking_at_a_spec_without_state_exits_1_and_creates_nothing(
    spec: Path, run_cli: RunCli
) -> None:
    for args in (("status", spec), ("history", "gpu-lab-01", "--spec", spec)):
        result = run_cli(*args)
        assert result.returncode == 1
        assert f"no state database at {spec.with_name('fleet.state.db')} yet" in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in spec.parent.iterdir()) == ["fleet.yaml"]


def test_history_needs_a_spec_or_a_state_url(run_cli: RunCli) -> None:
    result = run_cli("history", "gpu-lab-01")
    assert result.returncode == 1
    assert "--state URL" in result.stderr and "Traceback" not in result.stderr


def test_status_shows_each_node_and_counts_per_state(spec: Path, run_cli: RunCli) -> None:
    _record(spec)
    result = run_cli("status", spec)
    assert result.returncode == 0, result.stderr
    rows = _lines(result.stdout)
    assert rows["gpu-lab-01"].startswith("gpu-lab-01 lab1 quarantined 20")
    assert rows["gpu-lab-01"].endswith(GEMM)
    assert rows["gpu-lab-02"].startswith("gpu-lab-02 lab1 failed in powering_on 20")
    assert rows["gpu-lab-02"].endswith("BMC unreachable: timeout")
    assert rows["gpu-lab-03"].startswith("gpu-lab-03 lab1 enrolled 20")
    assert rows["gpu-lab-04"] == "gpu-lab-04 lab1 not enrolled"
    assert "4 nodes: 1 enrolled, 1 failed, 1 quarantined, 1 not enrolled" in result.stdout


def test_status_json_and_selection(spec: Path, run_cli: RunCli) -> None:
    _record(spec)
    result = run_cli("status", spec, "--nodes", "gpu-lab-0[12]", "-o", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert [(n["node"], n["state"]) for n in body["nodes"]] == [
        ("gpu-lab-01", "quarantined"),
        ("gpu-lab-02", "failed"),
    ]
    assert body["nodes"][1]["failed_in"] == "powering_on"
    assert body["counts"] == {"failed": 1, "quarantined": 1}
    result = run_cli("status", spec, "--rack", "no-such-rack")
    assert result.returncode == 1 and "no nodes match" in result.stderr


def test_history_shows_the_moves_and_burnin_results(spec: Path, run_cli: RunCli) -> None:
    run = _record(spec)
    result = run_cli("history", "gpu-lab-01", "--spec", spec)
    assert result.returncode == 0, result.stderr
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert lines[0].startswith("gpu-lab-01: quarantined since 20")
    assert lines[0].endswith(f"last error: {GEMM}")
    moves = [line.split(" ", 2)[2] for line in lines if " -> " in line]
    assert [m.split(f" {run}")[0] for m in moves] == [
        "- -> enrolled",
        "enrolled -> powering_on",
        "powering_on -> pxe_booting",
        "pxe_booting -> installing",
        "installing -> configuring",
        "configuring -> burning_in",
        "burning_in -> quarantined",
    ]
    assert moves[-1].endswith(GEMM)
    assert lines[-1].endswith(f"{run} quarantined quick compute.gemm[gpu 3]")


def test_history_json_reads_the_state_named_by_the_environment(
    spec: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    run = _record(spec, url)
    result = run_cli("history", "gpu-lab-02", "-o", "json", env={"PROVISIONER_STATE": url})
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["state"], body["failed_in"], body["last_error"]) == (
        "failed",
        "powering_on",
        "BMC unreachable: timeout",
    )
    assert [(m["from"], m["to"], m["run"]) for m in body["transitions"]] == [
        (None, "enrolled", run),
        ("enrolled", "powering_on", run),
        ("powering_on", "failed", run),
    ]
    assert body["burnin"] == []
    unknown = run_cli("history", "gpu-lab-99", "--state", url)
    assert unknown.returncode == 1
    assert "gpu-lab-99: no such node in the state database" in unknown.stderr
