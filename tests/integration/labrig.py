"""The lab racks of the playbook tests: the embedded lab's spec moved to a site of its own.

Test module ``n`` (1: preflight, 2: driver, 3: toolkits, 4: configure, 5: bring-up) gets site
``lp<n>`` with its own bridge (``prov-lp<n>``), subnet (``10.21<n>.0.0/24``), BMC ports
(``192<n>1``-``192<n>3`` IPMI, ``192<n>5`` Redfish) and boot and repository ports
(``182<n>1``, ``182<n>2``), so the modules never touch each other's lab or one a developer
has up. :func:`running_lab` brings it up with ``provisioner lab up`` and always takes it down.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import LAB_SPEC, REPO

ROLES = REPO / "playbooks" / "roles"
ANSIBLE_PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"
LAB_KEY = REPO / "inventories" / "lab" / "ssh" / "lab_ed25519"
LAB_FAULTS = "    gpu-lab-04:\n      - {kind: xid_79, gpu: 5}\n"  # the lab spec's own
_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")
# How a test drives Ansible by hand (the configure tests leave this to provisioner's runner).
PLAYBOOK_ENV = {
    "ANSIBLE_ROLES_PATH": str(ROLES),
    "ANSIBLE_HOST_KEY_CHECKING": "False",
    "ANSIBLE_SSH_COMMON_ARGS": "-o UserKnownHostsFile=/dev/null",
    "ANSIBLE_PIPELINING": "True",
    "ANSIBLE_FORCE_COLOR": "0",
}


def lab_spec(n: int, *, nodes: int = 4, stack: str = "h100-570", faults: str = LAB_FAULTS) -> str:
    """The embedded lab's spec as site ``lp<n>``: its first ``nodes`` nodes (2 or 4), the rack
    on ``stack``, and ``faults`` (lines under ``lab.faults``; empty: no ``lab`` section)."""
    text = LAB_SPEC.read_text()
    for old, new in (
        ("site: lab\n", f"site: lp{n}\n"),
        ("10.200.0.", f"10.21{n}.0."),
        ("prov-lab0", f"prov-lp{n}"),
        ("127.0.0.1:900", f"127.0.0.1:192{n}"),
        ("127.0.0.1:9443", f"127.0.0.1:192{n}5"),
        (":8080/", f":182{n}1/"),
        (":8081/", f":182{n}2/"),
        ("    stack: h100-570\n", f"    stack: {stack}\n"),
        (LAB_FAULTS, faults),
    ):
        assert old in text, old
        text = text.replace(old, new)
    if nodes == 2:
        head, tail = text.split("      - {name: gpu-lab-03,", 1)
        text = head + "\n" + tail.split("\n\n", 1)[1]
    if not faults:
        text = text.split("\nlab:\n", 1)[0] + "\n"
    return text


def address(n: int, node: str) -> str:
    """gpu-lab-0K's address in lab ``n``."""
    return f"10.21{n}.0.{10 + int(node.rsplit('-', 1)[1])}"


@dataclass
class Play:
    """One ansible-playbook run: its exit status and what it printed."""

    rc: int
    output: str
    seconds: float = 0.0

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counts per host: ok, changed, unreachable, failed."""
        found = {}
        for line in self.output.split("PLAY RECAP", 1)[-1].splitlines():
            match = _RECAP.match(line)
            if match:
                ok, changed, unreachable, failed = map(int, match.groups()[1:])
                found[match.group(1)] = {
                    "ok": ok, "changed": changed, "unreachable": unreachable, "failed": failed
                }  # fmt: skip
        return found

    def assert_changed_nothing(self, hosts: Sequence[str]) -> None:
        assert self.rc == 0, self.output
        recap = self.recap()
        assert set(recap) == set(hosts), self.output
        assert all(counts["changed"] == 0 for counts in recap.values()), self.output


@dataclass
class Lab:
    n: int
    root: Path
    spec: Path
    key: Path
    env: dict[str, str]

    @property
    def site(self) -> str:
        return f"lp{self.n}"

    @property
    def render(self) -> Path:
        """The render ``lab up`` made of the spec."""
        return self.root / "state" / self.site / "render"

    def ssh(self, node: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        options = ["BatchMode=yes", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
                   "ConnectTimeout=5", "LogLevel=ERROR"]  # fmt: skip
        return subprocess.run(
            ["ssh", "-i", str(self.key), *[f"-o{o}" for o in options],
             f"root@{address(self.n, node)}", command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``provisioner ARGS`` run from the lab's folder, with the lab's environment."""
        return subprocess.run(
            [str(REPO / ".venv/bin/provisioner"), *args],
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
            cwd=self.root,
        )  # fmt: skip

    def render_copy(self, name: str, spec_text: str) -> Path:
        """``spec_text`` saved as ``<name>.yaml`` beside the lab's spec and rendered into
        ``render-<name>/`` (e.g. the same rack on another stack); the render folder."""
        spec = self.root / f"{name}.yaml"
        spec.write_text(spec_text)
        out = self.root / f"render-{name}"
        done = self.cli("render", str(spec), "--out", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        return out

    def play(self, playbook: Path, *args: str, timeout: float = 900) -> Play:
        """``ansible-playbook ARGS PLAYBOOK`` with the lab's key, from the lab's folder."""
        started = time.monotonic()
        done = subprocess.run(
            [str(ANSIBLE_PLAYBOOK), "--private-key", str(self.key), *args, str(playbook)],
            capture_output=True, text=True, env=self.env, timeout=timeout, check=False,
            cwd=self.root,
        )  # fmt: skip
        play = Play(done.returncode, done.stdout + done.stderr, time.monotonic() - started)
        print(f"ansible-playbook {' '.join(args)}: rc {play.rc} in {play.seconds:.0f} s")
        return play


@contextmanager
def running_lab(
    root: Path,
    n: int,
    spec_text: str,
    env: Mapping[str, str] | None = None,
    *,
    blank: bool = False,
) -> Iterator[Lab]:
    """Lab ``n`` of ``spec_text`` up under ``root`` (state, key, Ansible's temp folders),
    taken down again whatever happens; ``blank``: its nodes off with empty disks."""
    spec = root / "fleet.yaml"
    spec.write_text(spec_text)
    key = root / "lab_ed25519"
    shutil.copy(LAB_KEY, key)
    key.chmod(0o600)
    lab_env = {
        **os.environ,
        "PROVISIONER_LAB_DIR": str(root / "state"),
        "PROVISIONER_LAB_BMC_PASSWORD": f"lp{n}-test-bmc-pw",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(root / "cp"),
        "ANSIBLE_LOCAL_TEMP": str(root / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        **(env or {}),
    }
    lab = Lab(n, root, spec, key, lab_env)
    try:
        up = lab.cli("lab", "up", str(spec), *(["--blank"] if blank else []), timeout=1200)
        assert up.returncode == 0, up.stdout + up.stderr
        yield lab
    finally:
        down = lab.cli("lab", "down", lab.site, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
