"""Reading ``scontrol show node`` (recorded outputs in tests/data/slurm/, see its README), the
Slurm adapter's checks that need no Slurm, and :class:`NoScheduler`."""

from __future__ import annotations

import json
import stat
from dataclasses import asdict
from pathlib import Path

import pytest

from provisioner.scheduler.base import NodeStatus, NoScheduler, Scheduler, SchedulerError
from provisioner.scheduler.slurm import Slurm, parse_node
from tests.conftest import DATA

CASES = sorted((DATA / "slurm").glob("*.txt"))


def test_every_recorded_output_has_its_expected_answer() -> None:
    assert len(CASES) >= 8
    assert all(case.with_suffix(".json").is_file() for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.stem)
def test_parse_node_reads_the_recorded_output(case: Path) -> None:
    expected = json.loads(case.with_suffix(".json").read_text(encoding="utf-8"))
    assert asdict(parse_node(case.read_text(encoding="utf-8"))) == expected


@pytest.mark.parametrize(
    "text",
    ["", "Node gpu-lab-09 not found\n", "NodeName=a Arch=x86_64 CPUAlloc=0\n"],
    ids=["empty", "not-found", "no-state"],
)
def test_parse_node_refuses_what_is_not_one_node(text: str) -> None:
    with pytest.raises(SchedulerError):
        parse_node(text)


def test_parse_node_refuses_two_nodes() -> None:
    one = (DATA / "slurm" / "idle.txt").read_text(encoding="utf-8")
    with pytest.raises(SchedulerError, match="not one node"):
        parse_node(one + one.replace("gpu-lab-01", "gpu-lab-02"))


def test_missing_client_tools_are_named(tmp_path: Path) -> None:
    slurm = Slurm(bin_dir=str(tmp_path))
    with pytest.raises(SchedulerError, match="client tools are not installed: no scontrol"):
        slurm.status("gpu-lab-01")
    with pytest.raises(SchedulerError, match="not installed: no squeue"):
        slurm.is_idle("gpu-lab-01")


def test_a_missing_slurm_conf_fails_at_once(tmp_path: Path) -> None:
    _fake_tool(tmp_path, "scontrol", "exit 0")
    missing = tmp_path / "nowhere" / "slurm.conf"
    with pytest.raises(SchedulerError, match=f"no Slurm configuration at {missing}"):
        Slurm(conf=str(missing), bin_dir=str(tmp_path)).drain("gpu-lab-01", "r")


@pytest.mark.parametrize("node", ["gpu-lab-[01-04]", "gpu-lab-01,gpu-lab-02", "", "-x"])
def test_only_one_node_name_is_accepted(tmp_path: Path, node: str) -> None:
    _fake_tool(tmp_path, "scontrol", "exit 0")
    with pytest.raises(SchedulerError, match="not one Slurm node name"):
        Slurm(bin_dir=str(tmp_path)).drain(node, "r")


def test_an_empty_reason_is_refused_before_slurm_is_asked(tmp_path: Path) -> None:
    _fake_tool(tmp_path, "scontrol", "exit 0")
    with pytest.raises(SchedulerError, match="needs a reason"):
        Slurm(bin_dir=str(tmp_path)).drain("gpu-lab-01", "  ")


def test_a_tool_that_does_not_answer_times_out(tmp_path: Path) -> None:
    _fake_tool(tmp_path, "squeue", "exec sleep 30")
    with pytest.raises(SchedulerError, match=r"gpu-lab-01: no answer within 0\.5 s"):
        Slurm(bin_dir=str(tmp_path), timeout=0.5).is_idle("gpu-lab-01")


def test_the_tools_message_is_in_the_error(tmp_path: Path) -> None:
    _fake_tool(
        tmp_path, "scontrol", "echo 'slurm_update error: Access/permission denied' >&2\nexit 1"
    )
    with pytest.raises(SchedulerError) as raised:
        Slurm(bin_dir=str(tmp_path)).drain("gpu-lab-01", "r")
    assert str(raised.value) == (
        "cannot drain Slurm node gpu-lab-01: scontrol: slurm_update error: Access/permission denied"
    )


def test_no_scheduler_has_every_node_idle_and_in_service() -> None:
    scheduler: Scheduler = NoScheduler()
    scheduler.drain("n1", "upgrade")
    assert scheduler.is_idle("n1")
    scheduler.resume("n1")
    assert scheduler.name == "none"
    assert scheduler.status("n1") == NodeStatus(
        name="n1", drained=False, idle=True, state="unmanaged"
    )


def test_slurm_is_a_scheduler() -> None:
    scheduler: Scheduler = Slurm()
    assert scheduler.name == "slurm"


def _fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
