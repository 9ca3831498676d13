"""What the store hands back: small frozen records, one per row kind."""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from provisioner.state.lifecycle import State

if TYPE_CHECKING:
    from sqlalchemy import Row


class Enrollable(Protocol):
    """What enrolling needs of a node (a spec :class:`~provisioner.spec.Node` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def rack(self) -> str: ...

    @property
    def serial(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Me:
    """Who this process is, as runs and locks record it."""

    user: str
    host: str
    pid: int

    def __str__(self) -> str:
        return f"{self.user}@{self.host} pid {self.pid}"


def me() -> Me:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid{os.getuid()}"
    return Me(user, socket.gethostname(), os.getpid())


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    site: str
    rack: str
    serial: str | None
    state: State
    since: datetime
    failed_in: State | None  # the step a failed node failed in
    last_error: str | None  # kept from a move to failed/quarantined until the node is ready
    retries: int  # moves out of failed so far
    last_run_id: str | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> NodeRecord:
        return cls(
            name=row.name,
            site=row.site,
            rack=row.rack,
            serial=row.serial,
            state=State(row.state),
            since=row.updated_at,
            failed_in=State(row.failed_in) if row.failed_in else None,
            last_error=row.last_error,
            retries=row.retries,
            last_run_id=row.last_run_id,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "site": self.site,
            "rack": self.rack,
            "serial": self.serial,
            "state": str(self.state),
            "since": self.since.isoformat(),
            "failed_in": None if self.failed_in is None else str(self.failed_in),
            "last_error": self.last_error,
            "retries": self.retries,
            "run": self.last_run_id,
        }


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    id: int
    node: str
    from_state: State | None  # None: the node was enrolled
    to_state: State
    run_id: str
    at: datetime
    detail: str | None
    error: str | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> TransitionRecord:
        return cls(
            id=row.id,
            node=row.node,
            from_state=State(row.from_state) if row.from_state else None,
            to_state=State(row.to_state),
            run_id=row.run_id,
            at=row.at,
            detail=row.detail,
            error=row.error,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "from": None if self.from_state is None else str(self.from_state),
            "to": str(self.to_state),
            "run": self.run_id,
            "detail": self.detail,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    kind: str
    site: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    spec_hash: str | None
    user: str
    host: str
    pid: int


@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    run_id: str
    node: str | None
    at: datetime
    kind: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BurninRecord:
    id: int
    node: str
    run_id: str
    at: datetime
    verdict: str
    level: str | None
    document: dict[str, Any]
    checks: list[Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "run": self.run_id,
            "verdict": self.verdict,
            "level": self.level,
            "checks": self.checks,
        }
