"""What a rolling upgrade needs from the workload scheduler, and nothing more.

A :class:`Scheduler` takes a node out of service (:meth:`~Scheduler.drain`: no new work lands
on it, with a reason that names the run), says whether work is still running there
(:meth:`~Scheduler.is_idle`), and puts it back (:meth:`~Scheduler.resume`). Node names are the
fleet spec's: a Slurm ``NodeName`` or a Kubernetes node name is the spec's node name.

:class:`NoScheduler` (``scheduler: {type: none}``) is for fleets with no scheduler: every node
counts as idle at once and nothing is told. Each call raises :class:`SchedulerError` with a
message a person can act on; a call never blocks for long (waiting for jobs to end is the
workflow's loop, with its own timeout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from provisioner.errors import ProvisionerError


class SchedulerError(ProvisionerError):
    """The scheduler refused or failed a request (unknown node, no controller, ...)."""


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What the scheduler says of one node."""

    name: str
    drained: bool  # no new work lands on it (Slurm DRAIN/DRAINED, Kubernetes cordoned)
    idle: bool  # no job or workload pod runs on it
    reason: str | None = None  # the drain reason, when drained
    state: str = ""  # the scheduler's own words (Slurm "IDLE+DRAIN", Kubernetes "Ready")


class Scheduler(Protocol):
    """Drain, wait and resume; one implementation per scheduler type."""

    name: str  # "none", "slurm", "kubernetes"

    def drain(self, node: str, reason: str) -> None:
        """Stop new work landing on ``node``; running work is left to finish (Slurm) or
        evicted politely (Kubernetes, honouring PodDisruptionBudgets). Draining a drained
        node again is fine (the reason is replaced)."""

    def is_idle(self, node: str) -> bool:
        """Whether no job (Slurm) or workload pod (Kubernetes: DaemonSet and mirror pods
        do not count) runs on ``node``."""

    def resume(self, node: str) -> None:
        """Put ``node`` back in service. Resuming a node in service is fine."""

    def status(self, node: str) -> NodeStatus:
        """What the scheduler says of ``node`` now."""


class NoScheduler:
    """``scheduler: {type: none}``: nothing to drain; every node is idle."""

    name = "none"

    def drain(self, node: str, reason: str) -> None:
        return None

    def is_idle(self, node: str) -> bool:
        return True

    def resume(self, node: str) -> None:
        return None

    def status(self, node: str) -> NodeStatus:
        return NodeStatus(name=node, drained=False, idle=True, state="unmanaged")
