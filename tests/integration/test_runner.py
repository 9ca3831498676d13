"""``run_playbook`` against real ansible-playbook on this machine (hosts with the local
connection, and one whose SSH port refuses): events, recap, failures, limits, rollout batches,
check mode, secrets, cancel. No root and no lab needed; test_configure.py runs the lab.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from provisioner.errors import PlaybookFailed
from provisioner.render import render_fleet, write_tree
from provisioner.runner.ansible import (
    HostEvent,
    HostStatus,
    RunnerError,
    run_playbook,
)
from provisioner.runner.inventory import InventoryError
from provisioner.spec import load_fleet
from tests.conftest import LAB_SPEC, RunCli

pytestmark = pytest.mark.integration

LOCAL = {
    "ansible_connection": "local",
    "ansible_python_interpreter": "{{ ansible_playbook_python }}",
}


def _inventory(folder: Path, hosts: dict[str, dict[str, object]], **all_vars: object) -> Path:
    """A hand-written YAML inventory (not the rendered layout) with group_vars/all.yml."""
    inventory = folder / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    document = {"all": {"children": {"nodes": {"hosts": hosts}}}}
    (inventory / "inventory.yml").write_text(yaml.safe_dump(document))
    (inventory / "group_vars" / "all.yml").write_text(yaml.safe_dump({**LOCAL, **all_vars}))
    return inventory


def _playbook(folder: Path, text: str) -> str:
    path = folder / "play.yml"
    path.write_text(text)
    return str(path)


PLAY = """\
- name: Exercise every task status
  hosts: all
  gather_facts: false
  tasks:
    - name: Probe
      ansible.builtin.command: "true"
      changed_when: false
    - name: Make a file
      ansible.builtin.copy:
        content: "{{ inventory_hostname }}\\n"
        dest: "{{ out }}/{{ inventory_hostname }}"
        mode: "0644"
    - name: Never
      ansible.builtin.command: "false"
      when: false
    - name: Fail on b
      ansible.builtin.command: sh -c "echo b is broken >&2; exit 3"
      changed_when: false
      when: inventory_hostname == 'b'
    - name: Last
      ansible.builtin.command: "true"
      changed_when: false
"""


def test_events_and_recap_report_each_host_and_a_failure_stops_only_its_host(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inventory = _inventory(tmp_path, {"a": {}, "b": {}, "c": {}}, out=str(out))
    events: list[HostEvent] = []
    result = run_playbook(_playbook(tmp_path, PLAY), inventory, on_event=events.append)

    assert not result.ok and result.status == "failed" and result.rc != 0
    assert [r.host for r in result.failed] == ["b"]
    b = result.host("b")
    assert (b.failed, b.failed_task, b.status) == (1, "Fail on b", HostStatus.FAILED)
    assert b.message is not None and "b is broken" in b.message and "rc 3" in b.message
    for host in ("a", "c"):
        recap = result.host(host)
        assert (recap.ok, recap.changed, recap.skipped, recap.failed) == (3, 1, 2, 0)
        assert recap.status is HostStatus.CHANGED
    seen = {(e.host, e.task): e.status for e in events}
    assert seen[("a", "Probe")] is HostStatus.OK
    assert seen[("a", "Make a file")] is HostStatus.CHANGED
    assert seen[("a", "Never")] is HostStatus.SKIPPED
    assert seen[("b", "Fail on b")] is HostStatus.FAILED
    assert ("b", "Last") not in seen and seen[("c", "Last")] is HostStatus.OK
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c"]

    # The run folder is kept, under the inventory folder, with what happened in it.
    assert result.run_dir.parent == inventory / "runs"
    logged = (result.run_dir / "events.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in logged] == [e.as_dict() for e in events]
    assert json.loads((result.run_dir / "result.json").read_text()) == result.as_dict()
    assert "Fail on b" in (result.run_dir / "artifacts" / "stdout").read_text()
    with pytest.raises(PlaybookFailed, match=r"b failed at 'Fail on b'"):
        result.raise_for_failure()

    again = run_playbook(_playbook(tmp_path, PLAY), inventory, limit=["a", "c"])
    assert again.ok and [r.changed for r in again.hosts] == [0, 0]
    again.raise_for_failure()
    assert again.run_dir != result.run_dir


def test_limit_hands_ansible_only_the_targeted_hosts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inventory = _inventory(tmp_path, {"a": {}, "b": {}, "c": {}}, out=str(out))
    play = _playbook(tmp_path, PLAY)
    result = run_playbook(play, inventory, limit=["c", "a"])
    assert result.ok and [r.host for r in result.hosts] == ["c", "a"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "c"]
    handed = yaml.safe_load((result.run_dir / "inventory" / "inventory.yml").read_text())
    assert set(handed["all"]["children"]["nodes"]["hosts"]) == {"a", "c"}
    assert (result.run_dir / "limit").read_text().split() == ["c", "a"]

    with pytest.raises(InventoryError, match="no host zz"):
        run_playbook(play, inventory, limit=["a", "zz"])
    with pytest.raises(RunnerError, match="no hosts"):
        run_playbook(play, inventory, limit=[])
    with pytest.raises(RunnerError, match="no playbook"):
        run_playbook("no-such-playbook.yml", inventory)


def test_rendered_inventory_subset_runs_with_its_group_vars(tmp_path: Path) -> None:
    out = tmp_path / "render"
    fleet = load_fleet(LAB_SPEC)
    write_tree(render_fleet(fleet, b"runner-test-callback-key-0123456789"), out)
    all_vars = out / "ansible" / "group_vars" / "all.yml"
    all_vars.write_text(all_vars.read_text() + yaml.safe_dump(LOCAL))
    play = _playbook(
        tmp_path,
        """\
- name: Read the rendered variables
  hosts: all
  gather_facts: false
  tasks:
    - name: Stack pins and profile reach the host
      ansible.builtin.assert:
        that:
          - nvidia_driver_deb_packages | length > 0
          - provisioner_gpu_count == 8
          - provisioner_rack == 'lab1'
""",
    )
    result = run_playbook(play, out / "ansible", limit=["gpu-lab-02"])
    assert result.ok, result.summary()
    assert [r.host for r in result.hosts] == ["gpu-lab-02"]
    handed = (result.run_dir / "inventory" / "inventory.yml").read_text()
    assert "gpu-lab-02" in handed and "gpu-lab-01" not in handed


def test_rollout_policy_from_group_vars_sets_the_batches(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    hosts = {name: {} for name in ("a", "b", "c", "d")}
    inventory = _inventory(
        tmp_path,
        hosts,
        out=str(out),
        provisioner_rollout_serial=[1, 2],
        provisioner_rollout_max_fail_percentage=0,
    )
    play = _playbook(
        tmp_path,
        """\
- name: Rolling
  hosts: all
  gather_facts: false
  serial: "{{ provisioner_rollout_serial }}"
  max_fail_percentage: "{{ provisioner_rollout_max_fail_percentage }}"
  tasks:
    - name: Record the batch
      ansible.builtin.copy:
        content: "{{ ansible_play_batch | join(',') }}"
        dest: "{{ out }}/{{ inventory_hostname }}"
        mode: "0644"
    - name: Fail on b
      ansible.builtin.fail:
        msg: b is broken
      when: inventory_hostname == 'b'
""",
    )
    result = run_playbook(play, inventory)
    batches = {p.name: p.read_text() for p in out.iterdir()}
    assert batches == {"a": "a", "b": "b,c", "c": "b,c"}  # canary 1, then 2; stop after b
    assert result.not_run == () and [r.host for r in result.failed] == ["b"]
    assert "d" not in {r.host for r in result.hosts}

    limited = run_playbook(play, inventory, limit=["a", "b", "c", "d"])
    assert limited.not_run == ("d",)  # targeted, never reached: the rollout stopped


def test_check_mode_changes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    inventory = _inventory(tmp_path, {"a": {}}, out=str(out))
    play = _playbook(
        tmp_path,
        """\
- name: Would change
  hosts: all
  gather_facts: false
  tasks:
    - name: Make a file
      ansible.builtin.copy:
        content: x
        dest: "{{ out }}/made"
        mode: "0644"
""",
    )
    result = run_playbook(play, inventory, check=True)
    assert result.ok and result.host("a").changed == 1
    assert not (out / "made").exists()


def test_unreachable_host_is_reported_with_why(tmp_path: Path) -> None:
    inventory = _inventory(
        tmp_path,
        {
            "a": {},
            "gone": {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": 9},
        },
    )
    play = _playbook(
        tmp_path,
        """\
- name: Reach
  hosts: all
  gather_facts: false
  tasks:
    - name: Ping
      ansible.builtin.ping:
""",
    )
    events: list[HostEvent] = []
    result = run_playbook(play, inventory, on_event=events.append)
    gone = result.host("gone")
    assert gone.status is HostStatus.UNREACHABLE and gone.failed_task == "Ping"
    # ssh's own word ("Connection refused"), or, when Ansible was still writing the module to
    # ssh as it died (a loaded host), Ansible's "Data could not be sent to remote host".
    assert gone.message is not None
    assert "refused" in gone.message or "could not be sent to remote host" in gone.message
    assert result.host("a").status is HostStatus.OK
    assert [e.status for e in events if e.host == "gone"] == [HostStatus.UNREACHABLE]


def test_a_run_that_fails_before_any_host_says_why(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path, {"a": {}})
    play = _playbook(
        tmp_path,
        "- name: Broken\n  hosts: all\n  serial: '{{ undefined_thing }}'\n  tasks: []\n",
    )
    result = run_playbook(play, inventory)
    assert not result.ok and result.hosts == () and result.failed == ()
    assert result.error is not None and "undefined_thing" in result.error
    assert "undefined_thing" in result.summary()


def test_secrets_stay_off_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("ssh-agent") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs ssh-agent and ssh-keygen")
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    monkeypatch.setenv("SOME_BMC_PASSWORD", "hunter2-not-on-disk")
    monkeypatch.setenv("SOME_PASSWORD_FILE", "/etc/some-password")  # a path: kept
    inventory = _inventory(tmp_path, {"a": {}})
    play = _playbook(
        tmp_path,
        """\
- name: Agent holds the key
  hosts: all
  gather_facts: false
  tasks:
    - name: The key is in the run's ssh-agent
      ansible.builtin.command: ssh-add -l
      changed_when: false
""",
    )
    result = run_playbook(play, inventory, private_key=key)
    assert result.ok, result.summary()
    secret = key.read_text().split("\n")[1]  # a line of the private key's base64
    for path in result.run_dir.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert secret not in text, path
            assert "hunter2-not-on-disk" not in text, path
    recorded = json.loads((result.run_dir / "artifacts" / "command").read_text())
    assert recorded["env"]["SOME_BMC_PASSWORD"] == ""
    assert recorded["env"]["SOME_PASSWORD_FILE"] == "/etc/some-password"
    assert not (result.run_dir / "artifacts" / "ssh_key_data").exists()


def test_sigint_cancels_the_run_and_restores_the_handler(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path, {"a": {}})
    play = _playbook(
        tmp_path,
        """\
- name: Slow
  hosts: all
  gather_facts: false
  tasks:
    - name: Sleep
      ansible.builtin.command: sleep 60
""",
    )
    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(3, os.kill, (os.getpid(), signal.SIGINT))
    started = time.monotonic()
    timer.start()
    try:
        result = run_playbook(play, inventory)
    finally:
        timer.cancel()
    assert result.status == "canceled" and not result.ok
    assert time.monotonic() - started < 20
    assert signal.getsignal(signal.SIGINT) is before


def test_configure_refuses_an_empty_selection_and_a_missing_key(
    run_cli: RunCli, tmp_path: Path
) -> None:
    spec = tmp_path / "fleet.yaml"
    spec.write_text(LAB_SPEC.read_text())
    none = run_cli("configure", spec, "--nodes", "no-such-node*")
    assert none.returncode == 1 and "no nodes match" in none.stderr
    keyless = run_cli("configure", spec, "--key", tmp_path / "missing")
    assert keyless.returncode == 1 and "no such file" in keyless.stderr
    assert not (tmp_path / "build").exists()  # refused before rendering anything
