"""Fixtures of the integration tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.peers.postgres import PostgresServer, PostgresUnavailable, start_postgres
from tests.peers.slurm import SlurmCluster, SlurmUnavailable, start_slurm


@pytest.fixture(scope="session")
def lab_host() -> None:
    """Skips a test that brings up a lab where this host cannot: the lab needs root and
    debootstrap (scripts/bootstrap installs it)."""
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the lab needs root and debootstrap")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests.peers.postgres); each test makes a
    database of its own with ``create_database()``. Root only: it runs as the postgres user."""
    if os.geteuid() != 0:
        pytest.skip("PostgreSQL runs as the postgres user: starting it needs root")
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A real Slurm cluster for the session (tests.peers.slurm): munged, slurmctld and a slurmd
    for each of gpu-lab-01..04 on loopback. Root only: slurmd runs jobs as their user."""
    try:
        cluster = start_slurm()
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()
