"""Fixtures of the integration tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.peers.postgres import PostgresServer, PostgresUnavailable, start_postgres


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
