"""The node lifecycle: state names and the one table of legal moves.

A node is always in exactly one :class:`State`. :data:`TRANSITIONS` lists every legal move as
one flat row ``(source, target, reason)``, the way Ironic keeps its state machine; nothing
else decides whether a node may move, and only :meth:`provisioner.state.store.Store.move`
changes a node (it asks :func:`check_move` first, inside its transaction)::

    enrolled -> powering_on -> pxe_booting -> installing -> configuring -> burning_in -> ready
    ready -> draining -> upgrading -> burning_in -> ready          (rolling upgrade)
    draining -> burning_in                                         (re-burn-in, drained)
    draining -> enrolled                                           (reimage, by a plan)
    any step -> failed (last_error kept)   burning_in | upgrading -> quarantined
    * -> retired

Resuming. A run that stops (crash, kill -9, Ctrl-C) leaves each node in the step it was in;
the next run carries on with that step, so no move is needed to resume. A node that *failed*
remembers the step it failed in (``failed_in``) and leaves ``failed`` only

* for that same step (retry where it stopped: the rows marked :attr:`Retry.same_step`), or
* for ``enrolled`` (start the bring-up over, power-on and PXE included), and only when it
  failed before its OS was installed, i.e. in powering_on, pxe_booting or installing
  (:attr:`Retry.before_install`), or
* for ``retired``.

So once a node has passed ``installing`` no failure or re-run leads back to ``pxe_booting``:
a re-run can never PXE-boot (and so reinstall) a node whose OS is in place. The one way back
is on purpose: a reimage that a reviewed plan names (its image changed) drains the node and
moves it ``draining -> enrolled``, and its bring-up starts over from there.

A failed upgrade rolls the node back to its previous stack and keeps it out of use:
``upgrading -> quarantined`` (or ``burning_in -> quarantined`` when its burn-in failed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from provisioner.errors import ProvisionerError


class StateError(ProvisionerError):
    """Something about recorded state: a refused move, a lock, a database we cannot use."""


class IllegalTransition(StateError):
    """A move that the transition table does not allow. Nothing was written."""


class State(StrEnum):
    enrolled = "enrolled"
    powering_on = "powering_on"
    pxe_booting = "pxe_booting"
    installing = "installing"
    configuring = "configuring"
    burning_in = "burning_in"
    ready = "ready"
    draining = "draining"
    upgrading = "upgrading"
    failed = "failed"
    quarantined = "quarantined"
    retired = "retired"


class Retry(StrEnum):
    """The condition on a row that leaves ``failed``."""

    same_step = "same-step"  # only to the step the node failed in
    before_install = "before-install"  # only when it failed before its OS was installed


@dataclass(frozen=True, slots=True)
class Transition:
    source: State
    target: State
    reason: str
    retry: Retry | None = None


S = State

#: The bring-up path, in order.
BRING_UP: tuple[State, ...] = (
    S.enrolled,
    S.powering_on,
    S.pxe_booting,
    S.installing,
    S.configuring,
    S.burning_in,
    S.ready,
)

#: Steps where work happens; a node can fail in each, and is retried there.
STEPS: tuple[State, ...] = (
    S.powering_on,
    S.pxe_booting,
    S.installing,
    S.configuring,
    S.burning_in,
    S.draining,
    S.upgrading,
)

#: Steps before the OS is installed: a node that failed in one may start over from enrolled.
BEFORE_INSTALL: frozenset[State] = frozenset({S.powering_on, S.pxe_booting, S.installing})


def _rows() -> Iterator[Transition]:
    yield Transition(S.enrolled, S.powering_on, "bring-up: power the node on")
    yield Transition(S.powering_on, S.pxe_booting, "bring-up: network boot")
    yield Transition(S.pxe_booting, S.installing, "bring-up: the OS installer started")
    yield Transition(S.installing, S.configuring, "bring-up: the install called back")
    yield Transition(S.configuring, S.burning_in, "the NVIDIA stack is configured: burn in")
    yield Transition(S.burning_in, S.ready, "burn-in passed")
    yield Transition(S.burning_in, S.quarantined, "burn-in failed: keep the node out of use")
    yield Transition(S.ready, S.draining, "rolling upgrade: drain the node's jobs")
    yield Transition(S.draining, S.upgrading, "rolling upgrade: the node is idle")
    yield Transition(S.draining, S.ready, "rolling upgrade called off: resume the node")
    yield Transition(S.upgrading, S.burning_in, "upgraded: burn in again")
    yield Transition(S.upgrading, S.quarantined, "upgrade failed: rolled back, kept out of use")
    yield Transition(S.draining, S.burning_in, "re-burn-in: the node is drained and idle")
    yield Transition(S.draining, S.enrolled, "reimage: the node is drained; bring it up anew")
    yield Transition(S.ready, S.burning_in, "re-burn a ready node")
    yield Transition(S.quarantined, S.burning_in, "re-test a quarantined node")
    yield Transition(S.quarantined, S.configuring, "re-configure a quarantined node")
    for step in STEPS:
        yield Transition(step, S.failed, f"{step} failed (the error is kept)")
        yield Transition(S.failed, step, f"retry {step}, where it failed", Retry.same_step)
    yield Transition(
        S.failed,
        S.enrolled,
        "start the bring-up over (failed before install)",
        Retry.before_install,
    )
    for state in State:
        if state is not S.retired:
            yield Transition(state, S.retired, "taken out of the fleet for good")


#: Every legal move, one row each.
TRANSITIONS: tuple[Transition, ...] = tuple(_rows())
_TABLE: dict[tuple[State, State], Transition] = {(t.source, t.target): t for t in TRANSITIONS}


def _allowed(row: Transition, failed_in: State | None) -> bool:
    if row.retry is Retry.same_step:
        return row.target == failed_in
    if row.retry is Retry.before_install:
        return failed_in is None or failed_in in BEFORE_INSTALL
    return True


def can_move(source: State, target: State, failed_in: State | None = None) -> bool:
    """Whether the table allows ``source -> target``; ``failed_in`` is the step a failed node
    failed in (it decides where a failed node may be retried)."""
    row = _TABLE.get((State(source), State(target)))
    return row is not None and _allowed(row, failed_in)


def targets(source: State, failed_in: State | None = None) -> list[State]:
    """The states a node in ``source`` may move to."""
    return [t.target for t in TRANSITIONS if t.source == source and _allowed(t, failed_in)]


def check_move(
    source: State, target: State, *, failed_in: State | None = None, node: str = "node"
) -> Transition:
    """The table's row for ``source -> target``, or :class:`IllegalTransition` saying why
    not and where the node may go instead."""
    source, target = State(source), State(target)
    row = _TABLE.get((source, target))
    if row is not None and _allowed(row, failed_in):
        return row
    allowed = ", ".join(targets(source, failed_in)) or "nowhere"
    why = f"{node}: cannot move {source} -> {target}"
    if row is not None and row.retry is Retry.same_step:
        why += f": it failed in {failed_in}, so it is retried there"
    elif row is not None and row.retry is Retry.before_install:
        why += (
            f": it failed in {failed_in}, after its OS was installed; starting over would"
            " PXE-boot and reinstall it"
        )
    raise IllegalTransition(f"{why} (allowed from {source}: {allowed})")
