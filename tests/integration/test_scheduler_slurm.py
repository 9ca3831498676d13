"""The Slurm adapter against a real slurmctld and slurmd on loopback (tests.peers.slurm).

The cluster is shared by the session; each test works on a node of its own and leaves it in
service with no job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from provisioner.scheduler.base import SchedulerError
from provisioner.scheduler.slurm import Slurm
from tests.peers import dead_tcp_port, wait_until
from tests.peers.slurm import SlurmCluster

REASON = "provisioner upgrade r-20261206-1: driver 550 -> 560 (rack 7)"


@pytest.fixture
def scheduler(slurm: SlurmCluster) -> Slurm:
    return Slurm(conf=str(slurm.conf), timeout=20)


@pytest.fixture
def jobs(slurm: SlurmCluster) -> Iterator[list[str]]:
    """Job ids a test submitted; cancelled after it."""
    submitted: list[str] = []
    yield submitted
    for job in submitted:
        slurm.run("scancel", job, check=False)


def _in_service(slurm: SlurmCluster, node: str) -> Iterator[str]:
    try:
        yield node
    finally:
        slurm.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)


@pytest.fixture
def node1(slurm: SlurmCluster) -> Iterator[str]:
    yield from _in_service(slurm, "gpu-lab-01")


@pytest.fixture
def node2(slurm: SlurmCluster) -> Iterator[str]:
    yield from _in_service(slurm, "gpu-lab-02")


@pytest.fixture
def node3(slurm: SlurmCluster) -> Iterator[str]:
    yield from _in_service(slurm, "gpu-lab-03")


def test_a_drained_node_with_a_job_is_busy_until_the_job_ends(
    slurm: SlurmCluster, scheduler: Slurm, node1: str, jobs: list[str]
) -> None:
    jobs.append(job := slurm.submit(node1, 120))
    slurm.wait_job(job, ["RUNNING"])
    assert not scheduler.is_idle(node1)

    scheduler.drain(node1, REASON)

    status = scheduler.status(node1)
    assert (status.drained, status.idle, status.reason) == (True, False, REASON)
    assert status.state == "MIXED+DRAIN"
    assert not scheduler.is_idle(node1)
    assert slurm.job_state(job) == "RUNNING"  # drained, not killed
    raw = slurm.run("scontrol", "show", "node", node1).stdout
    assert f"Reason={REASON} [root@" in raw

    slurm.cancel(job)
    wait_until(lambda: scheduler.is_idle(node1), timeout=20, what=f"{node1} idle")
    status = scheduler.status(node1)
    assert (status.drained, status.idle, status.reason) == (True, True, REASON)
    assert status.state == "IDLE+DRAIN"


def test_resume_lets_new_work_land_again(
    slurm: SlurmCluster, scheduler: Slurm, node2: str, jobs: list[str]
) -> None:
    scheduler.drain(node2, REASON)
    jobs.append(job := slurm.submit(node2, 60))

    def judged() -> bool:  # the scheduler has looked at the job and said why it waits
        done = slurm.run("squeue", "--noheader", f"--jobs={job}", "--format=%T %r")
        return done.stdout.split()[1:2] != ["None"]

    wait_until(judged, timeout=20, what=f"job {job} considered")
    assert slurm.job_state(job) == "PENDING"  # no new work lands on a drained node

    scheduler.resume(node2)

    status = scheduler.status(node2)
    assert (status.drained, status.reason) == (False, None)
    slurm.wait_job(job, ["RUNNING"], timeout=30)
    assert not scheduler.is_idle(node2)


def test_drain_and_resume_twice_are_fine(scheduler: Slurm, node3: str) -> None:
    scheduler.drain(node3, "first reason")
    scheduler.drain(node3, REASON)
    assert scheduler.status(node3).reason == REASON  # the reason is replaced
    scheduler.resume(node3)
    # Slurm marks a resumed node NOT_RESPONDING until it next pings it, about a second:
    # a second resume meanwhile is "Invalid node state specified" from=IDLE*.
    scheduler.resume(node3)
    status = scheduler.status(node3)
    assert (status.drained, status.idle, status.reason) == (False, True, None)
    assert status.state in ("IDLE", "IDLE+NOT_RESPONDING")


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda s: s.drain("gpu-lab-99", REASON), "Invalid node name specified"),
        (lambda s: s.resume("gpu-lab-99"), "Invalid node name specified"),
        (lambda s: s.status("gpu-lab-99"), "Node gpu-lab-99 not found"),
        (lambda s: s.is_idle("gpu-lab-99"), "Invalid node name"),
    ],
    ids=["drain", "resume", "status", "is_idle"],
)
def test_an_unknown_node_is_named_in_the_error(
    scheduler: Slurm, call: Callable[[Slurm], object], said: str
) -> None:
    with pytest.raises(SchedulerError, match="gpu-lab-99") as raised:
        call(scheduler)
    assert said in str(raised.value)


def test_a_controller_that_does_not_answer_is_an_error_not_a_hang(slurm: SlurmCluster) -> None:
    with dead_tcp_port() as port:
        scheduler = Slurm(conf=str(slurm.conf_with(SlurmctldPort=port)), timeout=2)
        started = time.monotonic()
        with pytest.raises(SchedulerError, match="gpu-lab-04: no answer within 2 s"):
            scheduler.status("gpu-lab-04")
        assert time.monotonic() - started < 6


def test_a_refused_connection_carries_slurms_message(slurm: SlurmCluster) -> None:
    with dead_tcp_port() as port:
        conf = slurm.conf_with(SlurmctldPort=port, MessageTimeout=2)
        scheduler = Slurm(conf=str(conf), timeout=20)
        with pytest.raises(SchedulerError, match="Unable to contact slurm controller"):
            scheduler.drain("gpu-lab-04", REASON)


def test_a_missing_slurm_conf_is_an_error_at_once(slurm: SlurmCluster) -> None:
    started = time.monotonic()
    with pytest.raises(SchedulerError, match="no Slurm configuration at"):
        Slurm(conf=str(slurm.root / "absent.conf")).is_idle("gpu-lab-04")
    assert time.monotonic() - started < 1
