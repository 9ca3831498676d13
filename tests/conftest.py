"""Shared test helpers: paths of the example specs and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
LAB_SPEC = REPO / "inventories" / "lab" / "fleet.yaml"
POD_SPEC = REPO / "inventories" / "example-h100-pod" / "fleet.yaml"
DATA = Path(__file__).resolve().parent / "data"

RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(autouse=True, scope="session")
def _own_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """What provisioner keeps per site (the callback key it makes) goes to a state folder of
    the session's own, which every CLI and lab process started from here inherits."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))
    yield
    patch.undo()


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


# Modules that bring a lab rack up run for minutes; the suite runs in xdist workers that each
# take whole files in collection order, so these go first, longest first (as measured in a
# full run): started late, one of them is the tail of the whole run (seen: test_configure
# starting at 12 of 24 minutes).
SLOW_FIRST = (
    "tests/integration/test_bring_up.py",
    "tests/integration/test_configure.py",
    "tests/integration/test_role_driver.py",
    "tests/integration/test_roles_redhat_check.py",
    "tests/integration/test_role_toolkits.py",
    "tests/integration/test_bmc_peers.py",
    "tests/integration/test_role_preflight.py",
    "tests/e2e/test_lab_redfish.py",
    "tests/e2e/test_lab.py",
    "tests/e2e/test_qemu_pxe.py",
    "tests/integration/test_burnin_run.py",
    "tests/integration/test_runner.py",
    "tests/integration/test_bring_up_postgres.py",
    "tests/integration/test_lab_cli.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: position for position, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadfile``, except that a worker is sent its next file only when the last
    test of its current one starts, not when two are left. xdist's rule of two had the
    worker on test_bring_up.py take a further file while the module's two rollouts (over
    15 minutes) were still to run: that file waited behind them, the other workers ran dry,
    and it became the tail of the run. A worker needs the next file by the last test (it
    runs a test only once it knows the one after), so one is the least to keep."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LastTestLoadFile(LoadFileScheduling):
        def _reschedule(self, node: Any) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    return LastTestLoadFile(config, log)  # type: ignore[arg-type]
