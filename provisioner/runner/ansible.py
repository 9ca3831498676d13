"""Ansible through ansible-runner: one call, one result (the only module importing it).

:func:`run_playbook` runs one of provisioner's playbooks against a rendered inventory folder
(``provisioner render`` wrote ``inventory.yml`` + ``group_vars/``) and returns a frozen
:class:`PlaybookResult`; per-host task results stream to a callback as :class:`HostEvent`.

* Ansible sees only the targeted hosts: a per-run inventory holds just them (see
  :mod:`provisioner.runner.inventory`) and ``--limit`` names them too.
* Secrets never reach the disk: the SSH key goes through ansible-runner's ``ssh_key`` (a FIFO
  read by ``ssh-agent``) and a become password through ``passwords`` (answered on the pty);
  ansible-runner's own env files are suppressed; variables of this process whose names look
  like secrets are blanked in ansible-playbook's environment, which ansible-runner records in
  the run's ``artifacts/command``.
* Every run keeps its folder (default ``<inventory_dir>/runs/<UTC time>-<playbook>``):
  ``artifacts/stdout`` (Ansible's output), ``events.jsonl`` (one :class:`HostEvent` a line),
  ``result.json`` and the per-run inventory.
* Play keywords (``serial``, ``max_fail_percentage``) are templated before any host exists,
  so Ansible cannot read them from group_vars: the rendered rollout variables
  (``provisioner_rollout_*`` in ``group_vars/all.yml``) are handed to the play as extra vars.
* Ctrl-C (SIGINT) or SIGTERM during a run stops ansible-playbook; the result says
  ``canceled``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from provisioner.errors import ProvisionerError
from provisioner.resources import playbooks_dir
from provisioner.runner.inventory import run_inventory
from provisioner.runner.results import (
    MESSAGE_LIMIT,
    HostEvent,
    HostRecap,
    HostStatus,
    PlaybookResult,
    Tally,
)

__all__ = [
    "HostEvent",
    "HostRecap",
    "HostStatus",
    "PlaybookResult",
    "RunnerError",
    "end_orphaned_runs",
    "run_playbook",
]

DEFAULT_FORKS = 25  # hosts at once (Ansible's own default, 5, is for a laptop)
ROLLOUT_PREFIX = "provisioner_rollout_"
SSH_ARGS = (
    "-C -o ControlMaster=auto -o ControlPersist=60s -o ServerAliveInterval=10 "
    "-o ServerAliveCountMax=3"
)
# ansible-playbook's environment is recorded on disk by ansible-runner: these are blanked.
_SECRET_NAME = re.compile(r"PASSW|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY", re.I)
_PATH_NAME = re.compile(r"_(FILE|PATH|DIR)$", re.I)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunnerError(ProvisionerError):
    """A playbook run could not start (no such playbook, no rendered inventory, bad key)."""


def run_playbook(
    playbook: str,
    inventory_dir: Path,
    *,
    limit: Sequence[str] | None = None,
    extravars: Mapping[str, Any] | None = None,
    private_key: Path | None = None,
    check: bool = False,
    on_event: Callable[[HostEvent], None] | None = None,
    run_dir: Path | None = None,
    forks: int | None = None,
    timeout: float | None = None,
    become_password: str | None = None,
) -> PlaybookResult:
    """Run ``playbook`` (a file name in provisioner's playbooks/, or a path) on the hosts of
    the rendered inventory in ``inventory_dir`` (all of them, or ``limit``), and return the
    result. A failed run is a result, not an exception (``raise_for_failure`` turns it into
    one).
    """
    import ansible_runner  # type: ignore[import-untyped]  # only here: 0.15 s to import

    project, name = _playbook(playbook)
    inventory_dir = inventory_dir.absolute()
    if limit is not None and not limit:
        raise RunnerError("no hosts to run on")
    hosts = list(dict.fromkeys(limit)) if limit is not None else None
    key = _read_key(private_key) if private_key is not None else None
    environment = _environment()
    play_vars = {**_rollout_vars(inventory_dir), **(extravars or {})}
    folder = _new_run_dir(run_dir, inventory_dir, name)
    inventory = run_inventory(inventory_dir, hosts, folder / "inventory")
    cmdline = ["--check"] if check else []
    passwords = {r"Enter passphrase for [^\n]*:\s*$": ""}  # ssh-add gives up: no hang
    if become_password is not None:
        cmdline.append("--ask-become-pass")
        passwords[r"BECOME password[^\n]*:\s*$"] = become_password
    options: dict[str, Any] = {}
    if hosts is not None:
        (folder / "limit").write_text("".join(f"{h}\n" for h in hosts), encoding="utf-8")
        options["limit"] = f"@{folder / 'limit'}"
    tally = Tally(folder / "events.jsonl", on_event)
    started = time.monotonic()
    try:
        with _interruptible() as canceled:
            runner = ansible_runner.run(
                private_data_dir=str(folder),
                artifact_dir=str(folder),
                ident="artifacts",
                project_dir=str(project),
                playbook=name,
                inventory=str(inventory),
                extravars=play_vars,
                envvars=environment,
                cmdline=" ".join(cmdline) or None,
                forks=forks or min(DEFAULT_FORKS, len(hosts) if hosts else DEFAULT_FORKS),
                ssh_key=key,
                passwords=passwords,
                settings={"pexpect_timeout": 1, "suppress_ansible_output": True},
                suppress_env_files=True,
                fact_cache_type="memory",
                quiet=True,
                timeout=int(timeout) if timeout else None,
                event_handler=tally.handle,
                cancel_callback=canceled,
                **options,
            )
    finally:
        tally.close()
    result = PlaybookResult(
        playbook=name,
        status=str(runner.status),
        rc=int(runner.rc if runner.rc is not None else -1),
        hosts=tally.recaps(hosts),
        run_dir=folder,
        seconds=time.monotonic() - started,
        not_run=tuple(h for h in hosts or () if h not in tally.seen),
    )
    if not result.ok and not result.failed:
        result = _with_error(result, folder / "artifacts" / "stdout")
    (folder / "result.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    return result


def end_orphaned_runs(inventory_dir: Path) -> list[int]:
    """End the playbook runs under ``inventory_dir``'s run folders whose controller died
    (kill -9, a crash): ansible-runner starts each run as a session of its own, which
    outlives the process that started it and would go on changing the hosts next to a new
    run. A run's session leader that init (pid 1) has adopted is an orphan; its whole
    session is killed. Returns the sessions ended. Call it holding the nodes' locks, so that
    no live run can be taken for a dead one. Linux only (reads /proc)."""
    marker = str(inventory_dir.absolute() / "runs") + "/"
    ended = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        ppid, session = int(fields[1]), int(fields[3])
        if ppid != 1 or session != pid or marker not in command:
            continue
        try:
            os.killpg(session, signal.SIGKILL)
        except ProcessLookupError:
            continue
        ended.append(session)
    return ended


# ---------------------------------------------------------------------------- after a run


def _with_error(result: PlaybookResult, stdout: Path) -> PlaybookResult:
    try:
        text = _ANSI.sub("", stdout.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    error = " | ".join(lines[-6:]) if lines else f"ansible-playbook ended with rc {result.rc}"
    if any("Enter passphrase for" in line for line in lines):
        error = (
            "the SSH key needs a passphrase: load it into your ssh-agent and leave out the key "
            "option (ansible-playbook then uses the agent)"
        )
    return replace(result, error=error[:MESSAGE_LIMIT])


# ---------------------------------------------------------------------------- set-up


def _playbook(playbook: str) -> tuple[Path, str]:
    """(project folder, playbook file name) for a name in playbooks/ or a path."""
    path = Path(playbook)
    if len(path.parts) == 1:
        path = playbooks_dir() / playbook
    if not path.is_file():
        raise RunnerError(f"no playbook {path}")
    path = path.resolve()
    return path.parent, path.name


def _read_key(path: Path) -> str:
    try:
        key = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunnerError(f"cannot read the SSH key {path}: {exc}") from exc
    if "PRIVATE KEY" not in key:
        raise RunnerError(f"{path} is not an SSH private key")
    return key if key.endswith("\n") else key + "\n"


def _new_run_dir(run_dir: Path | None, inventory_dir: Path, playbook: str) -> Path:
    if run_dir is not None:
        run_dir = run_dir.absolute()
        try:
            run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            empty = not any(run_dir.iterdir())
        except OSError as exc:
            raise RunnerError(f"cannot use the run folder {run_dir}: {exc}") from exc
        if not empty:
            raise RunnerError(f"the run folder {run_dir} is not empty")
        return run_dir
    runs = inventory_dir / "runs"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stem = f"{stamp}-{Path(playbook).stem}"
    try:
        runs.mkdir(parents=True, exist_ok=True, mode=0o700)
        for attempt in range(1, 1000):
            folder = runs / (stem if attempt == 1 else f"{stem}-{attempt}")
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                continue
            return folder
    except OSError as exc:
        raise RunnerError(f"cannot make a run folder under {runs}: {exc}") from exc
    raise RunnerError(f"cannot make a new run folder under {runs}")


def _rollout_vars(inventory_dir: Path) -> dict[str, Any]:
    """The rendered ``provisioner_rollout_*`` variables (play keywords need them as extra
    vars, see the module's docstring)."""
    try:
        text = (inventory_dir / "group_vars" / "all.yml").read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RunnerError(f"{inventory_dir}/group_vars/all.yml: not YAML: {exc}") from exc
    if not isinstance(document, dict):
        return {}
    return {k: v for k, v in document.items() if str(k).startswith(ROLLOUT_PREFIX)}


def _environment() -> dict[str, str]:
    """Settings for ansible-playbook (the user's own ANSIBLE_* win) and blanked secrets."""
    env = {
        name: "" for name in os.environ if _SECRET_NAME.search(name) and not _PATH_NAME.search(name)
    }
    defaults = {
        # One SSH round trip per task instead of three (put, chmod, run).
        "ANSIBLE_PIPELINING": "True",
        # Nodes reinstalled over PXE come back with new host keys (ansible-runner's default).
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        # Ansible's SSH options, and keepalives: a node that dies mid-run (power loss, kernel
        # panic) is reported unreachable in 30 s instead of hanging its shared connection.
        "ANSIBLE_SSH_ARGS": SSH_ARGS,
    }
    env.update({name: value for name, value in defaults.items() if name not in os.environ})
    # The ansible-playbook installed with provisioner (its pinned ansible-core) comes first.
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", os.defpath)
    if (Path(scripts) / "ansible-playbook").is_file():
        path = f"{scripts}{os.pathsep}{path}"
    if shutil.which("ansible-playbook", path=path) is None:
        raise RunnerError("ansible-playbook is not installed (pip install ansible-core)")
    env["PATH"] = path
    return env


@contextmanager
def _interruptible() -> Iterator[Callable[[], bool]]:
    """A cancel check that SIGINT/SIGTERM set while a run lasts (the main thread only; the
    previous handlers come back after)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop.is_set
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}

    def handler(number: int, frame: FrameType | None) -> None:
        stop.set()

    for number in signals:
        signal.signal(number, handler)
    try:
        yield stop.is_set
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
