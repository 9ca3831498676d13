"""Shared test helpers: paths of the example specs and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAB_SPEC = REPO / "inventories" / "lab" / "fleet.yaml"
POD_SPEC = REPO / "inventories" / "example-h100-pod" / "fleet.yaml"
DATA = Path(__file__).resolve().parent / "data"

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli() -> RunCli:
    """Run ``python -m provisioner ARGS`` as a user would; returns the finished process."""

    def run(
        *args: str | os.PathLike[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        merged = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "provisioner", *map(str, args)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=merged,
            timeout=timeout,
            check=False,
        )

    return run
