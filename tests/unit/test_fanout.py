"""The fan-out's scheduling guarantees, proven with a recording client.

``RecordingClient`` is a test double of a BMC client (a fake, allowed here: these tests are
about the scheduler, not a protocol): it records when each command ran and can be told to
fail, hang or be slow. The protocols themselves are tested against real BMCs in
tests/integration/test_bmc_peers.py.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest

from provisioner.bmc import operations as ops
from provisioner.bmc.base import (
    BmcClient,
    BootDevice,
    Fru,
    PowerAction,
    PowerState,
    SelEntry,
    SensorReading,
)
from provisioner.bmc.fanout import FanOut, Policy, Target
from provisioner.errors import BmcError
from provisioner.spec.types import SecretRef, parse_bmc_url


@dataclass
class Ledger:
    """What every RecordingClient did, shared by all of them."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    starts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_in_flight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    total: int = 0
    max_total: int = 0
    created: list[str] = field(default_factory=list)
    passwords: list[str] = field(default_factory=list)
    failures: dict[str, list[BmcError]] = field(default_factory=dict)  # node -> errors to raise
    duration: float = 0.0
    hang: set[str] = field(default_factory=set)
    power_on_after: float | None = None  # seconds after a power change until the state is on
    power_changes: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


class RecordingClient(BmcClient):
    def __init__(self, target: Target, ledger: Ledger, password: str) -> None:
        super().__init__(target.endpoint, target.username, password, 1.0)
        self.target = target
        self.ledger = ledger

    def _run(self) -> str:
        self.before_command()  # as the real clients do, once per command they send
        host = f"{self.endpoint.host}:{self.endpoint.port}"
        ledger = self.ledger
        with ledger.lock:
            ledger.starts[self.target.node].append(time.monotonic())
            ledger.in_flight[host] += 1
            ledger.max_in_flight[host] = max(ledger.max_in_flight[host], ledger.in_flight[host])
            ledger.total += 1
            ledger.max_total = max(ledger.max_total, ledger.total)
            pending = ledger.failures.get(self.target.node)
            error = pending.pop(0) if pending else None
        try:
            if self.target.node in ledger.hang:
                time.sleep(3)
            time.sleep(ledger.duration)
            if error is not None:
                raise error
            return "on"
        finally:
            with ledger.lock:
                ledger.in_flight[host] -= 1
                ledger.total -= 1

    def get_power_state(self) -> PowerState:
        state = PowerState(self._run())
        ledger = self.ledger
        if ledger.power_on_after is None:
            return state
        changes = ledger.power_changes[self.target.node]
        on = bool(changes) and time.monotonic() - changes[0] >= ledger.power_on_after
        return PowerState.ON if on else PowerState.OFF

    def set_power(self, action: PowerAction) -> None:
        self._run()
        with self.ledger.lock:
            self.ledger.power_changes[self.target.node].append(time.monotonic())

    def set_boot_device(
        self, device: BootDevice, *, persistent: bool = False, uefi: bool = True
    ) -> None:
        self._run()

    def get_fru(self) -> Fru:
        raise NotImplementedError

    def get_sel(self) -> list[SelEntry]:
        raise NotImplementedError

    def clear_sel(self) -> list[SelEntry]:
        raise NotImplementedError

    def get_sensors(self) -> list[SensorReading]:
        raise NotImplementedError


def _targets(count: int, racks: int = 1, shared_host: bool = False) -> list[Target]:
    out = []
    for i in range(count):
        if shared_host:  # one Redfish service fronting many systems: one BMC
            url = f"redfish+https://10.0.0.1/redfish/v1/Systems/{i}"
        else:
            url = f"ipmi://10.0.{i // 250}.{i % 250 + 1}"
        out.append(Target(f"n{i:03d}", f"r{i % racks}", parse_bmc_url(url), "admin", "pw"))
    return out


def _fan(policy: Policy, ledger: Ledger) -> FanOut:
    def factory(target: Target, _: Policy, password: str) -> BmcClient:
        with ledger.lock:
            ledger.created.append(target.node)
            ledger.passwords.append(password)
        return RecordingClient(target, ledger, password)

    return FanOut(policy, factory, seed=1)


def _status(client: BmcClient, target: Target) -> Any:
    return str(client.get_power_state())


def test_every_node_gets_a_result_in_order_and_one_failure_fails_one_node() -> None:
    ledger = Ledger(failures={"n003": [BmcError("auth", "Incorrect password provided")]})
    targets = _targets(10)
    with _fan(Policy(concurrency=4, retries=2, backoff=0.01), ledger) as fan:
        results = fan.run(targets, _status)
    assert [r.node for r in results] == [t.node for t in targets]
    assert [r.node for r in results if not r.ok] == ["n003"]
    bad = results[3]
    assert (bad.reason, bad.message, bad.attempts) == ("auth", "Incorrect password provided", 1)
    assert all(r.value == "on" for r in results if r.ok)


def test_concurrency_is_bounded() -> None:
    ledger = Ledger(duration=0.02)
    with _fan(Policy(concurrency=5), ledger) as fan:
        fan.run(_targets(40), _status)
    assert ledger.max_total == 5


def test_one_command_in_flight_per_bmc_even_for_many_systems() -> None:
    ledger = Ledger(duration=0.01)
    with _fan(Policy(concurrency=16), ledger) as fan:
        results = fan.run(_targets(20, shared_host=True), _status)
    assert all(r.ok for r in results)
    assert ledger.max_in_flight == {"10.0.0.1:443": 1}


def test_min_interval_spaces_commands_to_one_bmc() -> None:
    ledger = Ledger()
    targets = _targets(1) * 1
    with _fan(Policy(min_interval=0.15), ledger) as fan:
        for _ in range(3):
            fan.run(targets, _status)
    starts = ledger.starts["n000"]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 2 and all(gap >= 0.14 for gap in gaps), gaps


def test_min_interval_spaces_each_command_of_an_operation() -> None:
    """A Redfish cycle is several requests, and a wait polls: each command is paced, not
    just the first of an operation."""
    ledger = Ledger()

    def three(client: BmcClient, target: Target) -> None:
        client.get_power_state()
        client.get_power_state()
        client.set_power(PowerAction.ON)

    with _fan(Policy(min_interval=0.15), ledger) as fan:
        (result,) = fan.run(_targets(1), three)
    gaps = [b - a for a, b in itertools.pairwise(ledger.starts["n000"])]
    assert result.ok and len(gaps) == 2 and all(gap >= 0.14 for gap in gaps), gaps


def test_a_cycle_that_may_have_reached_the_bmc_is_not_sent_twice() -> None:
    for reason, attempts in (("timeout", 1), ("bmc-error", 1), ("unreachable", 2)):
        ledger = Ledger(failures={"n000": [BmcError(reason, "x")]})
        with _fan(Policy(retries=3, backoff=0.01), ledger) as fan:
            (result,) = fan.run(_targets(1), ops.power(PowerAction.CYCLE))
        assert result.attempts == attempts, (reason, result)
        assert result.ok is (attempts == 2)
    ledger = Ledger(failures={"n000": [BmcError("timeout", "x")]})
    with _fan(Policy(retries=3, backoff=0.01), ledger) as fan:
        (result,) = fan.run(_targets(1), ops.power(PowerAction.ON))
    assert result.ok and result.attempts == 2  # power on is safe to ask again


def test_a_wait_for_power_has_its_own_time_beyond_the_command_timeout() -> None:
    ledger = Ledger(power_on_after=0.7)
    with _fan(Policy(timeout=0.3, retries=3, backoff=0.01), ledger) as fan:
        (result,) = fan.run(_targets(1), ops.power(PowerAction.ON, wait=3.0))
    assert result.ok and result.value == "on" and result.attempts == 1, result
    assert len(ledger.power_changes["n000"]) == 1


def test_a_bmc_is_free_between_the_polls_of_a_wait() -> None:
    """Two systems behind one Redfish service wait side by side: the second's power-on is
    sent while the first is still being waited on, not after."""
    ledger = Ledger(power_on_after=1.5)
    targets = _targets(2, shared_host=True)
    with _fan(Policy(concurrency=2), ledger) as fan:
        results = fan.run(targets, ops.power(PowerAction.ON, wait=10))
    assert [r.value for r in results] == ["on", "on"], results
    assert ledger.max_in_flight == {"10.0.0.1:443": 1}
    first_polls, second_polls = ledger.starts["n000"], ledger.starts["n001"]
    assert min(second_polls) < max(first_polls) and min(first_polls) < max(second_polls)


def test_a_wait_in_vain_is_not_retried() -> None:
    ledger = Ledger(power_on_after=60)
    with _fan(Policy(timeout=0.3, retries=3, backoff=0.01), ledger) as fan:
        (result,) = fan.run(_targets(1), ops.power(PowerAction.ON, wait=0.4))
    assert (result.reason, result.attempts) == ("timeout", 1), result
    assert (result.message or "").startswith("power did not reach on within 0.4 s")
    assert len(ledger.power_changes["n000"]) == 1  # asked once, waited once


def test_sessions_are_reused_across_commands_of_a_fan_out() -> None:
    ledger = Ledger()
    targets = _targets(6)
    with _fan(Policy(), ledger) as fan:
        fan.run(targets, _status)
        fan.run(targets, lambda c, t: c.set_power(PowerAction.ON))
    assert sorted(ledger.created) == sorted(t.node for t in targets)


@pytest.mark.parametrize("reason", ["unreachable", "timeout", "bmc-error"])
def test_transient_failures_are_retried_with_backoff(reason: str) -> None:
    ledger = Ledger(failures={"n000": [BmcError(reason, "x"), BmcError(reason, "y")]})
    with _fan(Policy(retries=3, backoff=0.05), ledger) as fan:
        (result,) = fan.run(_targets(1), _status)
    assert result.ok and result.attempts == 3 and result.history == (reason, reason)
    starts = ledger.starts["n000"]
    assert starts[1] - starts[0] >= 0.05 * 0.5 and starts[2] - starts[1] >= 0.1 * 0.5
    assert ledger.created.count("n000") == 3  # a failed session is dropped, not reused


@pytest.mark.parametrize("reason", ["auth", "unsupported"])
def test_auth_and_unsupported_are_never_retried(reason: str) -> None:
    ledger = Ledger(failures={"n000": [BmcError(reason, "no")]})
    with _fan(Policy(retries=5, backoff=0.01), ledger) as fan:
        (result,) = fan.run(_targets(1), _status)
    assert (result.reason, result.attempts) == (reason, 1)


def test_retries_run_out_with_the_last_reason() -> None:
    ledger = Ledger(failures={"n000": [BmcError("unreachable", "no answer")] * 5})
    with _fan(Policy(retries=2, backoff=0.01), ledger) as fan:
        (result,) = fan.run(_targets(1), _status)
    assert (result.reason, result.attempts) == ("unreachable", 3)
    assert result.as_dict()["history"] == ["unreachable"] * 3


def test_a_refusal_after_a_timeout_stops_the_retries() -> None:
    ledger = Ledger(failures={"n000": [BmcError("timeout", "slow"), BmcError("auth", "no")]})
    with _fan(Policy(retries=5, backoff=0.01), ledger) as fan:
        (result,) = fan.run(_targets(1), _status)
    assert (result.reason, result.attempts, result.history) == ("auth", 2, ("timeout", "auth"))


def test_a_hung_bmc_times_out_while_the_others_finish() -> None:
    ledger = Ledger(hang={"n001"})
    started = time.monotonic()
    with _fan(Policy(timeout=0.3, retries=0), ledger) as fan:
        results = fan.run(_targets(4), _status)
    elapsed = time.monotonic() - started
    assert [r.node for r in results if not r.ok] == ["n001"]
    assert results[1].reason == "timeout"
    assert elapsed < 2.5  # not the 3 s the hung command takes


def test_power_on_is_staggered_per_rack() -> None:
    ledger = Ledger()
    targets = _targets(12, racks=2)  # 6 nodes per rack
    policy = Policy(concurrency=12, stagger_count=2, stagger_interval=0.2)
    started = time.monotonic()
    with _fan(policy, ledger) as fan:
        fan.run(targets, _status, stagger=True)
    for rack in ("r0", "r1"):
        nodes = [t.node for t in targets if t.rack == rack]
        offsets = sorted(ledger.starts[node][0] - started for node in nodes)
        # 2 power-ons per 0.2 s: batches start at 0, 0.2, 0.4
        for k, offset in enumerate(offsets):
            assert offset >= (k // 2) * 0.2 - 0.01, (rack, offsets)
        assert offsets[-1] < 0.4 + 0.5


def test_a_retried_power_on_waits_for_its_racks_turn_again() -> None:
    """One power-on per 0.3 s per rack: n000 fails at once and is retried; its retry must
    not land in n001's window."""
    ledger = Ledger(failures={"n000": [BmcError("unreachable", "x")]})
    targets = _targets(3)
    policy = Policy(concurrency=3, stagger_count=1, stagger_interval=0.3, backoff=0.01)
    with _fan(policy, ledger) as fan:
        results = fan.run(targets, ops.power(PowerAction.ON), stagger=True)
    assert all(r.ok for r in results) and results[0].attempts == 2
    starts = sorted(t for node in ("n000", "n001", "n002") for t in ledger.starts[node])
    assert len(starts) == 4
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.29 for gap in gaps), gaps


def test_password_is_resolved_once_in_memory_and_a_missing_one_fails_as_auth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FANOUT_TEST_PW", "s3cret-value")
    good = [
        Target(
            f"g{i}",
            "r",
            parse_bmc_url(f"ipmi://10.1.0.{i + 1}"),
            "u",
            SecretRef("env", "FANOUT_TEST_PW"),
        )
        for i in range(3)
    ]
    bad = Target("b0", "r", parse_bmc_url("ipmi://10.1.1.1"), "u", SecretRef("env", "NOT_SET_X"))
    ledger = Ledger()
    with _fan(Policy(retries=2), ledger) as fan:
        results = fan.run([*good, bad], _status)
    assert [r.ok for r in results] == [True, True, True, False]
    assert results[3].reason == "auth" and "NOT_SET_X" in (results[3].message or "")
    assert ledger.passwords == ["s3cret-value"] * 3
    assert all("s3cret-value" not in str(r.as_dict()) for r in results)
