"""Workload schedulers a rolling upgrade drains nodes through: Slurm and Kubernetes.

:func:`for_fleet` gives the spec's (``scheduler: {type: none|slurm|kubernetes}``): Slurm's
client tools read ``SLURM_CONF`` (or their default) as on any login node; Kubernetes reads
``kubeconfig`` (relative to the spec's folder) and ``context``, else in-cluster or the
default kubeconfig.
"""

from __future__ import annotations

from pathlib import Path

from provisioner.scheduler.base import NodeStatus, NoScheduler, Scheduler, SchedulerError
from provisioner.spec import Fleet

__all__ = ["NoScheduler", "NodeStatus", "Scheduler", "SchedulerError", "for_fleet"]


def for_fleet(fleet: Fleet) -> Scheduler:
    """The scheduler the spec names (its client modules load only when named)."""
    chosen = fleet.document.scheduler
    if chosen.type == "slurm":
        from provisioner.scheduler.slurm import Slurm

        return Slurm()
    if chosen.type == "kubernetes":
        from provisioner.scheduler.kubernetes import Kubernetes

        kubeconfig = None
        if chosen.kubeconfig is not None:
            path = Path(chosen.kubeconfig).expanduser()
            kubeconfig = str(path if path.is_absolute() else fleet.base_dir / path)
        return Kubernetes(kubeconfig=kubeconfig, context=chosen.context)
    return NoScheduler()
