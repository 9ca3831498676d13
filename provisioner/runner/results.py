"""What a playbook run reports: a :class:`HostEvent` per task result on a host as it happens,
and the :class:`PlaybookResult` at the end, built from ansible-runner's event dicts by
:class:`Tally`. Pure data and translation; :mod:`provisioner.runner.ansible` runs Ansible.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from provisioner.errors import PlaybookFailed

MESSAGE_LIMIT = 2000  # characters of a failure message


class HostStatus(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class HostEvent:
    """One task's result on one host, as it happens."""

    host: str
    task: str  # "role : task name", as Ansible prints it
    status: HostStatus
    message: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "host": self.host,
            "task": self.task,
            "status": str(self.status),
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class HostRecap:
    """One host's counts, as in Ansible's PLAY RECAP (``ok`` includes ``changed``), and for a
    failed or unreachable host the task that failed and why."""

    host: str
    ok: int = 0
    changed: int = 0
    failed: int = 0
    unreachable: int = 0
    skipped: int = 0
    rescued: int = 0
    failed_task: str | None = None
    message: str | None = None

    @property
    def status(self) -> HostStatus:
        if self.unreachable:
            return HostStatus.UNREACHABLE
        if self.failed:
            return HostStatus.FAILED
        return HostStatus.CHANGED if self.changed else HostStatus.OK

    @property
    def succeeded(self) -> bool:
        return not (self.unreachable or self.failed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "status": str(self.status),
            "ok": self.ok,
            "changed": self.changed,
            "failed": self.failed,
            "unreachable": self.unreachable,
            "skipped": self.skipped,
            "rescued": self.rescued,
            "failed_task": self.failed_task,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class PlaybookResult:
    """How a run ended: ansible-runner's status (``successful``, ``failed``, ``timeout``,
    ``canceled``) and rc, one recap per host that ran, the targeted hosts that never ran
    (a rollout stopped before their batch), and why the run failed when no host did
    (``error``: a syntax error, an undefined play variable, an SSH key that needs a
    passphrase)."""

    playbook: str
    status: str
    rc: int
    hosts: tuple[HostRecap, ...]
    run_dir: Path
    seconds: float
    not_run: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "successful" and self.rc == 0 and not self.failed

    @property
    def failed(self) -> tuple[HostRecap, ...]:
        return tuple(recap for recap in self.hosts if not recap.succeeded)

    def host(self, name: str) -> HostRecap:
        for recap in self.hosts:
            if recap.host == name:
                return recap
        raise KeyError(name)

    def summary(self) -> str:
        """One line: what ran, what failed and where."""
        bad = self.failed
        line = (
            f"{self.playbook}: {len(self.hosts) - len(bad)} of {len(self.hosts)} hosts ok, "
            f"{sum(r.changed for r in self.hosts)} changes, {len(bad)} failed"
        )
        if bad:
            line += ": " + "; ".join(
                f"{r.host} {r.status} at {r.failed_task!r}: {r.message}" for r in bad
            )
        if self.not_run:
            line += f"; not run: {', '.join(self.not_run)}"
        if not self.ok and not bad:
            line += f" ({self.status}, rc {self.rc}: {self.error or 'see ' + str(self.run_dir)})"
        return line

    def raise_for_failure(self) -> None:
        """Raise :class:`PlaybookFailed` unless every host succeeded; for callers that want
        an exception rather than a result."""
        if not self.ok:
            raise PlaybookFailed(self.summary())

    def as_dict(self) -> dict[str, Any]:
        return {
            "playbook": self.playbook,
            "ok": self.ok,
            "status": self.status,
            "rc": self.rc,
            "seconds": round(self.seconds, 3),
            "run_dir": str(self.run_dir),
            "hosts": [recap.as_dict() for recap in self.hosts],
            "not_run": list(self.not_run),
            "error": self.error,
        }


@dataclass
class Tally:
    """Turns ansible-runner's events into HostEvents, per-host counts and last failures."""

    log_path: Path
    on_event: Callable[[HostEvent], None] | None
    stats: dict[str, dict[str, int]] | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: dict[str, HostEvent] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._log = self.log_path.open("a", encoding="utf-8")

    def handle(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        if kind == "playbook_on_stats":
            self.stats = {
                name: dict(data.get(name) or {})
                for name in ("ok", "changed", "failures", "dark", "skipped", "rescued")
            }
            return False
        status = _STATUS.get(kind)
        if status is None or "host" not in data:
            return False  # not a per-host task result (item results come in the task's)
        res = data.get("res") if isinstance(data.get("res"), dict) else {}
        assert isinstance(res, dict)
        message = ""
        if status is HostStatus.OK and res.get("changed"):
            status = HostStatus.CHANGED
        elif status is HostStatus.FAILED and data.get("ignore_errors"):
            status, message = HostStatus.OK, "ignored: " + _failure_message(res)
        elif status in (HostStatus.FAILED, HostStatus.UNREACHABLE):
            message = _failure_message(res)
        elif status is HostStatus.SKIPPED:
            message = str(res.get("skip_reason") or res.get("skipped_reason") or "")
        host = str(data["host"])
        role = data.get("role")
        task = str(data.get("task") or data.get("task_action") or "")
        host_event = HostEvent(host, f"{role} : {task}" if role else task, status, message)
        self.seen.add(host)
        counts = self.counts.setdefault(host, dict.fromkeys(_COUNTS, 0))
        counts[status.value] += 1
        if status in (HostStatus.FAILED, HostStatus.UNREACHABLE):
            self.failures[host] = host_event
        self._log.write(json.dumps(host_event.as_dict()) + "\n")
        if self.on_event is not None:
            self.on_event(host_event)
        return False  # the events are in events.jsonl; no file per event under artifacts/

    def close(self) -> None:
        self._log.close()

    def recaps(self, order: Sequence[str] | None) -> tuple[HostRecap, ...]:
        names = [h for h in order if h in self.seen] if order is not None else sorted(self.seen)
        if self.stats is not None:
            names += sorted(set().union(*self.stats.values()) - set(names))
        out = []
        for host in names:
            if self.stats is not None:
                stat = {name: counts.get(host, 0) for name, counts in self.stats.items()}
                ok, changed, failed = stat["ok"], stat["changed"], stat["failures"]
                unreachable, skipped, rescued = stat["dark"], stat["skipped"], stat["rescued"]
            else:  # Ansible ended before its recap: count what was seen
                count = self.counts.get(host, dict.fromkeys(_COUNTS, 0))
                changed, failed = count["changed"], count["failed"]
                ok, unreachable, skipped, rescued = (
                    count["ok"] + changed,
                    count["unreachable"],
                    count["skipped"],
                    0,
                )
            failure = self.failures.get(host) if failed or unreachable else None
            out.append(
                HostRecap(
                    host,
                    ok,
                    changed,
                    failed,
                    unreachable,
                    skipped,
                    rescued,
                    failure.task if failure else None,
                    failure.message if failure else None,
                )
            )
        return tuple(out)


_STATUS = {
    "runner_on_ok": HostStatus.OK,
    "runner_on_failed": HostStatus.FAILED,
    "runner_on_unreachable": HostStatus.UNREACHABLE,
    "runner_on_skipped": HostStatus.SKIPPED,
}
_COUNTS = tuple(status.value for status in HostStatus)


def _failure_message(res: Mapping[str, Any]) -> str:
    """What a person needs from a failed task's result: its msg, the failed loop items' msgs,
    the end of stderr, a module's own output when it crashed."""
    parts: list[str] = []
    if res.get("msg"):
        parts.append(str(res["msg"]))
    if res.get("response") and str(res["response"]) not in " ".join(parts):
        parts.append(str(res["response"]))  # get_url, uri: "HTTP Error 404: Not Found"
    for stream in ("stderr", "module_stderr", "module_stdout"):
        text = str(res.get(stream) or "").strip()
        if text and text not in " ".join(parts):
            parts.append(" | ".join(text.splitlines()[-3:]))
    if "rc" in res and res.get("rc") not in (0, None):
        parts.append(f"rc {res['rc']}")
    message = ": ".join(parts) or "failed"
    items = [
        f"[{item.get('_ansible_item_label', item.get('item'))}] {_failure_message(item)}"
        for item in res.get("results") or []
        if isinstance(item, dict) and item.get("failed")
    ]
    if items:
        message += ": " + "; ".join(items)
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."
