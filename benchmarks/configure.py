"""Orchestrator overhead: one playbook on the lab rack's four nodes through
``provisioner.runner.ansible.run_playbook`` (ansible-runner, the per-run inventory, ssh-agent,
event stream) and through plain ``ansible-playbook``, alternately, median of N each.

Both runs use the same rendered inventory, playbook, SSH key, forks and Ansible settings
(pipelining, SSH keepalives, no host key checking), so the difference is what provisioner
adds. Needs the lab (root): either a lab that is up (``--configure-spec`` and
``--configure-key``) or one brought up here at LAB_ADDRESSES and taken down after.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from provisioner.render import render_fleet, write_tree
from provisioner.runner.ansible import SSH_ARGS, run_playbook
from provisioner.spec import load_fleet

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "bench-lab-bmc-pw"  # noqa: S105 - the lab BMCs' own, made up here
# The benchmark's own lab: site, bridge, subnet and ports no developer's lab uses.
LAB_ADDRESSES = {
    "site: lab\n": "site: bench\n",
    "10.200.0.": "10.230.0.",
    "prov-lab0": "prov-bench0",
    "127.0.0.1:900": "127.0.0.1:1930",
    "127.0.0.1:9443": "127.0.0.1:19305",
    ":8080/": ":18301/",
    ":8081/": ":18302/",
}
PLAYBOOK = """\
- name: Orchestrator overhead
  hosts: all
  gather_facts: true
  tasks:
    - name: Ping
      ansible.builtin.ping:
    - name: Read the kernel release
      ansible.builtin.command: uname -r
      changed_when: false
    - name: Look at the apt sources
      ansible.builtin.stat:
        path: /etc/apt/sources.list.d
"""


@dataclass
class Figure:
    hosts: int
    runner: list[float]
    plain: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.runner) / statistics.median(self.plain)


@contextmanager
def own_lab(work: Path) -> Iterator[tuple[Path, Path]]:
    """Bring up the benchmark's lab rack; yields (spec, key)."""
    text = (REPO / "inventories" / "lab" / "fleet.yaml").read_text()
    for old, new in LAB_ADDRESSES.items():
        text = text.replace(old, new)
    spec = work / "lab" / "fleet.yaml"
    spec.parent.mkdir(parents=True)
    spec.write_text(text)
    key = _key(work)
    env = {
        **os.environ,
        "PROVISIONER_LAB_DIR": str(work / "lab" / "state"),
        "PROVISIONER_LAB_BMC_PASSWORD": PASSWORD,
    }
    site = LAB_ADDRESSES["site: lab\n"].split()[1]
    cli = [sys.executable, "-m", "provisioner", "lab"]
    try:
        subprocess.run(
            [*cli, "up", str(spec)], check=True, env=env, capture_output=True, timeout=1200
        )
        yield spec, key
    finally:
        subprocess.run([*cli, "down", site], env=env, capture_output=True, timeout=300)


def _key(work: Path) -> Path:
    key = work / "lab_ed25519"
    shutil.copy(REPO / "inventories" / "lab" / "ssh" / "lab_ed25519", key)
    key.chmod(0o600)
    return key


def run(work: Path, spec: Path, key: Path, repeat: int) -> Figure:
    fleet = load_fleet(spec)
    render = work / "configure-render"
    write_tree(render_fleet(fleet, b"benchmark-callback-key-0123456789"), render)
    inventory_dir = render / "ansible"
    hosts = [node.name for node in fleet.nodes]
    play = work / "overhead.yml"
    play.write_text(PLAYBOOK)
    env = {
        **os.environ,
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_SSH_ARGS": SSH_ARGS,
    }
    ansible_playbook = Path(sys.executable).parent / "ansible-playbook"
    plain_command = [
        str(ansible_playbook),
        "-i",
        str(inventory_dir / "inventory.yml"),
        "--private-key",
        str(key),
        "--forks",
        str(len(hosts)),
        str(play),
    ]

    def plain() -> None:
        done = subprocess.run(plain_command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ansible-playbook failed: {done.stdout[-2000:]}")

    def runner() -> None:
        result = run_playbook(str(play), inventory_dir, limit=hosts, private_key=key)
        if not result.ok:
            raise RuntimeError(result.summary())

    plain()  # warm-up: SSH master connections, page cache
    runner()
    figure = Figure(len(hosts), [], [])
    for _ in range(repeat):  # alternately, so drift in machine speed hits both alike
        figure.plain.append(_timed(plain))
        figure.runner.append(_timed(runner))
    return figure


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start
