"""The node lifecycle's one transition table: the documented paths are legal, everything else
is refused with an error that says where the node may go, and once a node's OS is installed
no sequence of legal moves can PXE-boot it again."""

from __future__ import annotations

import itertools

import pytest

from provisioner.errors import ProvisionerError
from provisioner.state.lifecycle import (
    BRING_UP,
    STEPS,
    TRANSITIONS,
    IllegalTransition,
    State,
    StateError,
    can_move,
    check_move,
    targets,
)

S = State


def _walk(path: list[State]) -> None:
    for source, target in itertools.pairwise(path):
        assert can_move(source, target), f"{source} -> {target} should be legal"


def test_the_bring_up_path_is_legal() -> None:
    _walk(list(BRING_UP))
    assert BRING_UP[0] is S.enrolled and BRING_UP[-1] is S.ready


def test_the_rolling_upgrade_path_is_legal() -> None:
    _walk([S.ready, S.draining, S.upgrading, S.burning_in, S.ready])


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (S.burning_in, S.quarantined),
        (S.quarantined, S.burning_in),  # re-test
        (S.quarantined, S.retired),
        (S.quarantined, S.configuring),  # re-configure after a fix
        (S.ready, S.burning_in),  # re-burn
        (S.draining, S.ready),  # upgrade called off
    ],
)
def test_documented_side_paths_are_legal(source: State, target: State) -> None:
    assert can_move(source, target)
    assert check_move(source, target).reason


@pytest.mark.parametrize("step", STEPS)
def test_every_step_can_fail_and_be_retried_where_it_failed(step: State) -> None:
    assert can_move(step, S.failed)
    assert can_move(S.failed, step, failed_in=step)
    others = [s for s in STEPS if s is not step]
    assert not any(can_move(S.failed, other, failed_in=step) for other in others)


@pytest.mark.parametrize("state", [s for s in State if s is not S.retired])
def test_every_state_can_be_retired_and_retired_is_final(state: State) -> None:
    assert can_move(state, S.retired)
    assert targets(S.retired) == []


@pytest.mark.parametrize("step", [S.powering_on, S.pxe_booting, S.installing])
def test_a_node_that_failed_before_install_may_start_over(step: State) -> None:
    assert can_move(S.failed, S.enrolled, failed_in=step)


@pytest.mark.parametrize("step", [S.configuring, S.burning_in, S.draining, S.upgrading])
def test_a_node_that_failed_after_install_may_not_start_over(step: State) -> None:
    assert not can_move(S.failed, S.enrolled, failed_in=step)
    with pytest.raises(IllegalTransition, match=r"reinstall"):
        check_move(S.failed, S.enrolled, failed_in=step, node="gpu-01")


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (S.enrolled, S.ready),
        (S.enrolled, S.installing),
        (S.configuring, S.pxe_booting),
        (S.ready, S.powering_on),
        (S.ready, S.upgrading),  # must drain first
        (S.quarantined, S.ready),  # only a passed burn-in makes a node ready
        (S.enrolled, S.failed),  # nothing was tried yet
        (S.retired, S.enrolled),
        (S.ready, S.ready),
        (S.failed, S.ready),
    ],
)
def test_illegal_moves_are_refused_with_where_the_node_may_go(source: State, target: State) -> None:
    assert not can_move(source, target, failed_in=S.configuring)
    with pytest.raises(IllegalTransition) as caught:
        check_move(source, target, failed_in=S.configuring, node="gpu-07")
    message = str(caught.value)
    assert f"gpu-07: cannot move {source} -> {target}" in message
    for allowed in targets(source, S.configuring):
        assert allowed in message


def test_illegal_transition_is_a_provisioner_error() -> None:
    assert issubclass(IllegalTransition, StateError)
    assert issubclass(StateError, ProvisionerError)


def test_every_state_is_reachable_from_enrolled() -> None:
    seen = {(S.enrolled, None)}
    frontier: list[tuple[State, State | None]] = [(S.enrolled, None)]
    while frontier:
        state, failed_in = frontier.pop()
        for target in targets(state, failed_in):
            key = (target, state if target is S.failed else None)
            if key not in seen:
                seen.add(key)
                frontier.append(key)
    assert {state for state, _ in seen} == set(State)


def test_no_legal_path_leads_an_installed_node_back_to_pxe_boot_but_a_reimage() -> None:
    """From every state a node reaches after ``installing -> configuring``, including failing
    in any later step and retrying, ``pxe_booting`` is unreachable; the one way back is the
    reimage row (``draining -> enrolled``), which only a reviewed plan takes."""
    start = (S.configuring, None)
    seen: set[tuple[State, State | None]] = {start}
    frontier = [start]
    ways_back = set()
    while frontier:
        state, failed_in = frontier.pop()
        for target in targets(state, failed_in):
            if target in (S.pxe_booting, S.powering_on, S.enrolled):
                ways_back.add((state, target))
                continue
            key = (target, state if target is S.failed else None)
            if key not in seen:
                seen.add(key)
                frontier.append(key)
    assert S.ready in {state for state, _ in seen}
    assert ways_back == {(S.draining, S.enrolled)}


def test_the_table_has_one_row_per_move() -> None:
    pairs = [(row.source, row.target) for row in TRANSITIONS]
    assert len(pairs) == len(set(pairs))
    assert all(row.reason for row in TRANSITIONS)
