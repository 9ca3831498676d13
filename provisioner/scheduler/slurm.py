"""Slurm, driven through its client tools: ``scontrol`` and ``squeue``.

:class:`Slurm` drains a node with ``scontrol update nodename=N state=drain reason=...`` (jobs
running there go on; no new job lands), asks ``squeue`` whether a job still runs there, reads
``scontrol show node N --oneliner`` for :meth:`Slurm.status` (parsed by the pure
:func:`parse_node`) and resumes with ``state=resume``. The tools run without a shell, with
``SLURM_CONF`` from ``conf`` and a bounded time each; whatever goes wrong is a
:class:`SchedulerError` that names the node and carries the tool's own message.

What Slurm 22.05 prints, as seen: ``State=`` is a base state and ``+`` flags (``IDLE``,
``MIXED+DRAIN``, ``ALLOCATED+DRAIN``, ``IDLE+COMPLETING+DRAIN``, ``DOWN+DRAIN``); ``Reason=``
runs to the end of the record but for ``" [user@time]"`` and, when set, ``Comment=`` and
``Extra=`` after it; an unknown node is ``Node N not found`` (show) or ``slurm_update error:
Invalid node name specified`` (update); resuming a node in service is ``slurm_update error:
Invalid node state specified``; an empty drain reason is refused. A resumed node shows
``IDLE+NOT_RESPONDING`` until slurmctld next pings it (about a second).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from provisioner.scheduler.base import NodeStatus, SchedulerError

# A single node: a hostlist expression ("gpu[01-04]") or a list would act on many nodes.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_NODE = re.compile(r"^NodeName=(\S+)")
_STATE = re.compile(r"(?:^|\s)State=(\S+)")
_CPU_ALLOC = re.compile(r"(?:^|\s)CPUAlloc=(\d+)")
# The reason ends at the " [user@time]" Slurm adds (its time in the standard form), which
# is followed by the end, the fields 22.05 prints after it (Comment=, Extra=) or a
# continuation line of a reason of several lines; with no time, at the first of those.
_AFTER_REASON = r"(?=\s*$|\s+Comment=|\s+Extra=|\s{8})"
_REASONS = (
    re.compile(
        r"(?:^|\s)Reason=(.*?)\s\[[^\[\]\s@]+@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\]" + _AFTER_REASON
    ),
    re.compile(r"(?:^|\s)Reason=(.*?)" + _AFTER_REASON),
)
_BUSY = frozenset({"ALLOCATED", "MIXED", "COMPLETING", "DRAINING"})
# Job states that hold a node: a job there is starting, running, suspended or ending.
_ACTIVE_JOBS = "CONFIGURING,RUNNING,COMPLETING,SUSPENDED"
_NOT_DRAINED = "Invalid node state specified"


def parse_node(text: str) -> NodeStatus:
    """One node's record from ``scontrol show node N`` (``--oneliner`` or not)."""
    records = re.split(r"\n(?=NodeName=)", text.strip())
    if len(records) != 1 or not (node := _NODE.match(records[0])):
        raise SchedulerError(f"not one node's record from scontrol show node: {text[:200]!r}")
    record = " ".join(records[0].splitlines())
    state_match = _STATE.search(record)
    if state_match is None:
        raise SchedulerError(f"no State= for node {node[1]} in: {text[:200]!r}")
    state = state_match[1]
    words = state.upper().rstrip("*").split("+")
    base, flags = words[0], set(words[1:])
    drained = "DRAIN" in flags or base.startswith("DRAIN")
    cpus = _CPU_ALLOC.search(record)
    idle = base not in _BUSY and "COMPLETING" not in flags and (cpus is None or cpus[1] == "0")
    found = (match[1] for pattern in _REASONS if (match := pattern.search(record)))
    reason = next(found, "").strip()
    return NodeStatus(name=node[1], drained=drained, idle=idle, reason=reason or None, state=state)


class Slurm:
    """``scheduler: {type: slurm}``: Slurm's client tools, run on this machine.

    ``conf`` is the ``slurm.conf`` the tools read (``SLURM_CONF``; default: theirs),
    ``bin_dir`` where ``scontrol`` and ``squeue`` are (default: ``PATH``), ``timeout`` the
    seconds one call may take, ``env`` variables added to this process's environment for them.
    """

    name = "slurm"

    def __init__(
        self,
        *,
        conf: str | None = None,
        bin_dir: str | None = None,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._bin_dir = bin_dir
        self._timeout = timeout
        # Times in the standard form whatever the caller's SLURM_TIME_FORMAT: parse_node
        # recognises the " [user@time]" after a reason by it.
        self._env = {**os.environ, **(env or {}), "SLURM_TIME_FORMAT": "standard"}
        if conf is not None:
            self._env["SLURM_CONF"] = conf

    def drain(self, node: str, reason: str) -> None:
        if not reason.strip():
            raise SchedulerError(f"draining Slurm node {node} needs a reason")
        update = ("update", f"nodename={node}", "state=drain", f"reason={reason}")
        done = self._run(node, "scontrol", *update)
        if done.returncode != 0:
            raise self._failed("drain", node, done)

    def is_idle(self, node: str) -> bool:
        query = ("--noheader", f"--nodelist={node}", f"--states={_ACTIVE_JOBS}", "--format=%i")
        done = self._run(node, "squeue", *query)
        if done.returncode != 0:
            raise self._failed("list the jobs on", node, done)
        return not done.stdout.strip()

    def resume(self, node: str) -> None:
        done = self._run(node, "scontrol", "update", f"nodename={node}", "state=resume")
        if done.returncode == 0:
            return
        if _NOT_DRAINED in done.stderr:  # in service already, unless it is down or failed
            status = self.status(node)
            if not status.drained and not status.state.upper().startswith(("DOWN", "FAIL")):
                return
        raise self._failed("resume", node, done)

    def status(self, node: str) -> NodeStatus:
        done = self._run(node, "scontrol", "show", "node", node, "--oneliner")
        if done.returncode != 0:
            raise self._failed("read the state of", node, done)
        status = parse_node(done.stdout)
        if status.name != node:
            raise SchedulerError(f"scontrol show node {node} answered for {status.name}")
        return status

    def _run(self, node: str, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        if not _NODE_NAME.match(node):
            raise SchedulerError(f"{node!r} is not one Slurm node name")
        search = self._bin_dir if self._bin_dir is not None else self._env.get("PATH")
        path = shutil.which(tool, path=search)
        if path is None:
            where = self._bin_dir or "PATH"
            raise SchedulerError(
                f"Slurm's client tools are not installed: no {tool} in {where}"
                " (Debian/Ubuntu: the slurm-client package)"
            )
        conf = self._env.get("SLURM_CONF")
        if conf and not Path(conf).is_file():  # the tools would retry for 60 s
            raise SchedulerError(f"no Slurm configuration at {conf} (SLURM_CONF)")
        try:
            return subprocess.run(
                [path, *args],
                env=self._env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self._timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SchedulerError(
                f"{tool} about Slurm node {node}: no answer within {self._timeout:g} s"
                " (is slurmctld running and reachable?)"
            ) from exc
        except OSError as exc:
            raise SchedulerError(f"cannot run {path} for Slurm node {node}: {exc}") from exc

    @staticmethod
    def _failed(action: str, node: str, done: subprocess.CompletedProcess[str]) -> SchedulerError:
        said = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
        tool = Path(str(done.args[0])).name
        return SchedulerError(f"cannot {action} Slurm node {node}: {tool}: {said}")
