"""``provisioner lab``'s refusals, which need no lab: without root it says so and exits 1."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import LAB_SPEC, REPO


def _as_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh user namespace with no ID map: the process's effective user
    is the overflow user (65534) there, as for an ordinary user, while it can still read
    this checkout."""
    return subprocess.run(
        ["unshare", "--user", sys.executable, "-m", "provisioner", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
@pytest.mark.parametrize("command", [["lab", "up", str(LAB_SPEC)], ["lab", "down"]])
def test_lab_commands_refuse_to_run_without_root(command: list[str]) -> None:
    probe = subprocess.run(["unshare", "--user", "id", "-u"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() == "0":
        pytest.skip("user namespaces are not available here")
    result = _as_unprivileged(*command)
    assert result.returncode == 1
    assert "needs root" in result.stderr
    assert "Traceback" not in result.stderr
