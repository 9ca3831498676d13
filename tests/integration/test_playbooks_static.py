"""The playbooks and roles as files, checked by Ansible's own tools (no hosts needed): every
shipped playbook and every test playbook passes ``ansible-playbook --syntax-check``, so do each
role's task files of each OS family on their own (the RHEL ones included, which no host here
runs for real), ansible-lint's ``production`` profile passes on ``playbooks/`` with no skips and
no ``ignore_errors`` anywhere, and every role variable is documented in its argument specs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, REPO

pytestmark = pytest.mark.integration

PLAYBOOKS = REPO / "playbooks"
ROLES = PLAYBOOKS / "roles"
ROLE_NAMES = sorted(path.name for path in ROLES.iterdir() if (path / "tasks").is_dir())
ANSIBLE_PLAYBOOK = REPO / ".venv" / "bin" / "ansible-playbook"
ANSIBLE_LINT = REPO / ".venv" / "bin" / "ansible-lint"


def _syntax_check(playbook: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "--syntax-check", "-i", "localhost,", str(playbook)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


def test_the_roles_are_the_seven_of_the_stack() -> None:
    assert sorted([
        "cuda_toolkit", "dcgm", "fabric_manager", "nvidia_container_toolkit",
        "nvidia_driver", "nvidia_repo", "preflight",
    ]) == ROLE_NAMES  # fmt: skip


@pytest.mark.parametrize(
    "playbook",
    sorted(PLAYBOOKS.glob("*.yml")) + sorted((DATA / "playbooks").glob("*.yml")),
    ids=lambda path: f"{path.parent.name}/{path.name}",
)
def test_each_playbook_passes_the_syntax_check(playbook: Path) -> None:
    done = _syntax_check(playbook)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("family", ["debian", "redhat"])
@pytest.mark.parametrize("role", ROLE_NAMES)
def test_each_os_familys_tasks_pass_the_syntax_check(
    role: str, family: str, tmp_path: Path
) -> None:
    playbook = tmp_path / f"{family}.yml"
    playbook.write_text(
        f"- name: Syntax of the {role} role's tasks for one OS family\n"
        "  hosts: all\n  gather_facts: false\n  tasks:\n"
        f"    - name: Import the {family} tasks\n"
        "      ansible.builtin.import_role:\n"
        f"        name: {role}\n        tasks_from: {family}\n"
    )
    done = _syntax_check(playbook)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_task_ignores_errors() -> None:
    # STYLE.md: a check that ignores its errors can never fail.
    for path in PLAYBOOKS.rglob("*.yml"):
        assert "ignore_errors" not in path.read_text(), path


def test_ansible_lint_production_passes_on_the_playbooks() -> None:
    env = {**os.environ, "PATH": f"{ANSIBLE_LINT.parent}:{os.environ['PATH']}", "NO_COLOR": "1"}
    done = subprocess.run(
        [str(ANSIBLE_LINT), "--profile", "production", "--offline", "playbooks/"],
        capture_output=True, text=True, env=env, timeout=600, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_every_role_variable_is_documented_in_its_argument_specs(role: str) -> None:
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    assert set(defaults) <= set(options), set(defaults) - set(options)
    # and nothing more, but nvidia_repo_keyring_url, which only the render sets
    assert set(options) - set(defaults) <= {"nvidia_repo_keyring_url"}
    assert all(name.startswith(f"{role}_") for name in options)
    assert all(option.get("description") for option in options.values())
