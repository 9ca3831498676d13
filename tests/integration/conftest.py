"""Fixtures of the integration tests."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def lab_host() -> None:
    """Skips a test that brings up a lab where this host cannot: the lab needs root and
    debootstrap (scripts/bootstrap installs it)."""
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.skip("the lab needs root and debootstrap")
