"""A check whose measurement is absent from the agent's document, and why.

Rules (a node must not pass a stress gate silently, without stress):

* the agent listed an ``errors`` entry for it: the measurement was attempted and broke.
  For a stress measurement (GEMM, bandwidth, all-reduce, DCGM) that is a **fail** with the
  agent's message: a CUDA error or a hang under load is how a bad GPU often shows. For a
  read (kernel log) it is a **warn**.
* the agent listed a ``skipped`` entry (no torch/cupy, no dcgmi, a single GPU): **warn** with
  the agent's reason, unless the level leaves the check out (:data:`OPTIONAL`: DCGM's
  diagnostic at ``quick``), or the spec does not call for it (no DCGM in the stack): then
  **skip** with the reason.
* neither: **warn**, "not measured" (the agent gave no reason).

The agent names checks in its own words; :data:`AGENT_NAMES` lists the names that refer to
each of ours (our own check id is always accepted, and so is its first part: ``compute``).
"""

from __future__ import annotations

from provisioner.burnin.document import AgentDocument
from provisioner.burnin.verdict import Check, Verdict

AGENT_NAMES: dict[str, frozenset[str]] = {
    "compute.gemm": frozenset({"gemm", "stress"}),
    "compute.sdc": frozenset({"gemm", "sdc", "stress"}),
    "compute.straggler": frozenset({"gemm", "stress"}),
    "bandwidth.hbm": frozenset({"hbm", "stress"}),
    "bandwidth.h2d": frozenset({"h2d", "stress"}),
    "bandwidth.d2h": frozenset({"d2h", "stress"}),
    "collectives.allreduce": frozenset({"nccl", "allreduce", "all_reduce", "all_reduce_perf"}),
    "dcgm.diag": frozenset({"dcgm", "dcgmi", "diag"}),
    "xid": frozenset({"xid", "kernel_log", "journalctl", "dmesg"}),
}
# Measurements under load: an agent error while taking one fails the check.
STRESS = frozenset(
    {
        "compute.gemm",
        "compute.sdc",
        "compute.straggler",
        "bandwidth.hbm",
        "bandwidth.h2d",
        "bandwidth.d2h",
        "collectives.allreduce",
        "dcgm.diag",
    }
)
# Checks a level may leave out: skipping them there is expected.
OPTIONAL: dict[str, frozenset[str]] = {
    "quick": frozenset({"dcgm.diag"}),
    "standard": frozenset(),
    "extended": frozenset(),
}


def refers_to(agent_name: str, check_id: str) -> bool:
    """Whether the agent's check name ``agent_name`` refers to our ``check_id``."""
    name = agent_name.strip().lower()
    base = name.split(".")[0].split(":")[0].split("[")[0]
    ours = {check_id, check_id.split(".")[0]}
    names = AGENT_NAMES.get(check_id, frozenset()) | ours
    return name in names or base in names


def absent(
    check_id: str,
    document: AgentDocument,
    *,
    gpu: int | None = None,
    expected: bool = True,
    unit: str = "",
    floor: float | None = None,
) -> Check:
    """The check ``check_id`` whose measurement the document lacks (see the module's rules);
    ``expected`` False: the spec does not call for it (a skip is fine)."""
    for error in document.errors:
        if refers_to(error.check, check_id):
            verdict = Verdict.FAIL if check_id in STRESS else Verdict.WARN
            reason = f"the agent failed to measure it ({error.check}): {error.message}"
            return Check(check_id, verdict, reason, gpu=gpu, unit=unit, floor=floor)
    optional = not expected or check_id in OPTIONAL.get(document.level, frozenset())
    soft = Verdict.SKIP if optional else Verdict.WARN
    for skipped in document.skipped:
        if refers_to(skipped.check, check_id):
            reason = f"not measured ({skipped.check} skipped by the agent: {skipped.reason})"
            if not optional:
                reason += f"; the {document.level} level expects it"
            return Check(check_id, soft, reason, gpu=gpu, unit=unit, floor=floor)
    return Check(
        check_id, soft, "not measured (the agent gave no reason)", gpu=gpu, unit=unit, floor=floor
    )


def unmatched_errors(document: AgentDocument, checks: list[Check]) -> Check:
    """``agent.errors``: the agent's errors that no check took up (warn), else pass."""
    reasons = [check.reason for check in checks]
    left = [
        error
        for error in document.errors
        if not any(_taken(error.check, error.message, reason) for reason in reasons)
    ]
    if not left:
        return Check("agent.errors", Verdict.PASS, "no other agent errors")
    listed = "; ".join(f"{error.check}: {error.message}" for error in left)
    return Check("agent.errors", Verdict.WARN, f"the agent reported: {listed}")


def _taken(name: str, message: str, reason: str) -> bool:
    return f"({name}): {message}" in reason
