"""Plans: what it takes to bring recorded state to the spec, as data (no I/O here).

:func:`make_plan` compares a fleet spec with a :class:`Snapshot` of the state store and gives
a :class:`Plan` of per-node actions; :mod:`~provisioner.plan.planfile` saves it with the
spec's hash and the state's fingerprint so that ``provisioner apply`` can refuse a plan that
went stale; :mod:`~provisioner.plan.show` prints it as text, markdown or JSON.
"""

from provisioner.plan.compute import make_plan, spec_hash, state_fingerprint
from provisioner.plan.desired import FACT_KINDS, Desired
from provisioner.plan.model import Action, ActionKind, NodeState, Note, Plan, Snapshot

__all__ = [
    "FACT_KINDS",
    "Action",
    "ActionKind",
    "Desired",
    "NodeState",
    "Note",
    "Plan",
    "Snapshot",
    "make_plan",
    "spec_hash",
    "state_fingerprint",
]
