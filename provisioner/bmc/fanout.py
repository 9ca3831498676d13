"""Run one BMC operation across many nodes: bounded, paced, retried, and never all-or-nothing.

* a bounded thread pool (pyghmi is synchronous; one process manages ~1000 sessions at most);
* one client (session) per BMC, reused by every command of a :class:`FanOut`;
* at most one command in flight per BMC (host:port) that the fan-out waits on (a command
  given up on at its deadline is left to the transport's own timeouts: see ``_attempt``);
* ``min_interval`` seconds between the start of two commands to the same BMC, counted per
  command a client sends (a Redfish cycle is three requests), not per operation: old BMCs
  fall over when hurried;
* a deadline per attempt, enforced here whatever the transport does; retries with
  exponential backoff and jitter for ``unreachable``, ``timeout`` and ``bmc-error`` (never
  for ``auth``: repeated bad logins lock accounts on many BMCs). A :class:`Step` narrows
  that: a power cycle that may have reached the BMC is never sent twice;
* power-on stagger: at most ``stagger_count`` power-ons per ``stagger_interval`` per rack
  in any window (sliding), against inrush current; a retried power-on waits its turn again;
* a result per node, in the order given: one bad BMC fails that node, never the rack.

Passwords are resolved from their references once per fan-out, in memory, and handed only
to the client objects.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from provisioner.bmc.base import BmcClient
from provisioner.errors import BmcError, SecretError
from provisioner.spec.models import Bmc
from provisioner.spec.types import BmcEndpoint, SecretRef

T = TypeVar("T")

RETRYABLE = frozenset({"unreachable", "timeout", "bmc-error"})
# What may be retried for an operation that must not happen twice (a cycle, a reset): only a
# failure to reach the BMC at all, when the command cannot have been carried out.
NOT_SENT = frozenset({"unreachable"})


@dataclass(frozen=True, slots=True)
class Target:
    """One node's BMC as the fan-out needs it; the password is a reference, never a value."""

    node: str
    rack: str
    endpoint: BmcEndpoint
    username: str
    password: SecretRef | str  # a reference, or (ad-hoc CLI use) a value read in memory
    uefi: bool = True
    expected_serial: str | None = None

    def __repr__(self) -> str:
        return f"Target({self.node}, {self.endpoint.url})"


@dataclass(frozen=True, slots=True)
class Policy:
    concurrency: int = 64
    min_interval: float = 0.0
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5  # seconds before the first retry; doubles, with jitter
    backoff_cap: float = 30.0
    stagger_count: int = 4
    stagger_interval: float = 5.0
    verify_tls: bool = True
    ca_bundle: str | None = None
    secrets_dir: Path | None = None  # where file: references are relative to

    @classmethod
    def from_spec(cls, bmc: Bmc, base_dir: Path | None = None, **overrides: Any) -> Policy:
        policy = cls(
            concurrency=bmc.concurrency,
            min_interval=bmc.min_interval,
            timeout=bmc.timeout,
            retries=bmc.retries,
            stagger_count=bmc.power_on_stagger.count,
            stagger_interval=bmc.power_on_stagger.interval,
            verify_tls=bmc.verify_tls,
            ca_bundle=str(base_dir / bmc.ca_bundle)
            if bmc.ca_bundle and base_dir
            else bmc.ca_bundle,
            secrets_dir=base_dir,
        )
        return replace(policy, **overrides)


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    node: str
    rack: str
    endpoint: str
    value: T | None = None
    reason: str | None = None  # BmcError reason when it failed
    message: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    # The reason of each failed attempt, in order: "timeout, timeout, auth" tells a flaky
    # BMC from a plain bad password.
    history: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.reason is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "rack": self.rack,
            "bmc": self.endpoint,
            "ok": self.ok,
            "value": self.value,
            "reason": self.reason,
            "message": self.message,
            "attempts": self.attempts,
            "seconds": round(self.seconds, 3),
            "history": list(self.history),
        }


ClientFactory = Callable[[Target, Policy, str], BmcClient]
Operation = Callable[[BmcClient, Target], T]


@dataclass(frozen=True, slots=True)
class Step(Generic[T]):
    """An operation with what the fan-out must know to run it safely.

    ``retry_on``: which failures may be retried (``NOT_SENT`` for one that must not happen
    twice). ``until``: once the operation succeeded, polled every ``POLL`` seconds (each
    poll a command of its own, so the BMC is free in between) until it returns a value,
    which becomes the result, for at most ``until_timeout`` seconds; then the node fails as
    ``timeout`` with ``until_what`` ("power did not reach on"), and the operation is not
    repeated: the BMC accepted it. A plain callable is a Step with the defaults."""

    call: Callable[[BmcClient, Target], T]
    retry_on: frozenset[str] = RETRYABLE
    until: Callable[[BmcClient, Target], T | None] | None = None
    until_timeout: float = 0.0
    until_what: str = "the BMC did not get there"

    def __call__(self, client: BmcClient, target: Target) -> T:
        return self.call(client, target)


POLL = 1.0  # seconds between the polls of a Step's ``until``


def default_client(target: Target, policy: Policy, password: str) -> BmcClient:
    if target.endpoint.protocol == "ipmi":
        from provisioner.bmc.ipmi import IpmiClient

        return IpmiClient(target.endpoint, target.username, password, policy.timeout)
    from provisioner.bmc.redfish import RedfishClient

    return RedfishClient(
        target.endpoint,
        target.username,
        password,
        policy.timeout,
        verify_tls=policy.verify_tls,
        ca_bundle=policy.ca_bundle,
    )


@dataclass
class _BmcSlot:
    """Per-BMC state: the lock that keeps one command in flight, the pacing clock, and one
    client per endpoint served by this BMC (a Redfish service may front several systems).
    Only the holder of ``lock`` sends commands, so ``pace`` needs no lock of its own."""

    min_interval: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_start: float = float("-inf")
    clients: dict[tuple[object, ...], BmcClient] = field(default_factory=dict)

    def pace(self) -> None:
        """Called by a client before each command it sends to this BMC."""
        wait = self.last_start + self.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.last_start = time.monotonic()


class Stagger:
    """Power-on pacing per rack (inrush current): no more than ``count`` power-ons of one
    rack in any ``interval`` seconds. A sliding window, so that nodes that reach power-on
    late (a slow BMC, a retry) wait only as long as the window needs, and a burst of them
    after a quiet spell is still paced."""

    def __init__(self, count: int, interval: float) -> None:
        self.count = max(1, count)
        self.interval = interval
        self._lock = threading.Lock()
        self._racks: dict[str, deque[float]] = {}

    def wait(self, rack: str) -> None:
        """Block until this rack may power one more node on, and count it."""
        with self._lock:  # slots are handed out in order; each sleeps outside the lock
            times = self._racks.setdefault(rack, deque(maxlen=self.count))
            now = time.monotonic()
            slot = now if len(times) < self.count else max(now, times[0] + self.interval)
            times.append(slot)
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class FanOut:
    """Runs operations over many BMCs. Use as a context manager so sessions are closed."""

    def __init__(
        self,
        policy: Policy,
        factory: ClientFactory = default_client,
        *,
        seed: int | None = None,
    ) -> None:
        self.policy = policy
        self.factory = factory
        self._slots: dict[tuple[str, int], _BmcSlot] = {}
        self._slots_lock = threading.Lock()
        self._secrets: dict[SecretRef, str | SecretError] = {}
        self._secrets_lock = threading.Lock()
        self._random = random.Random(seed)  # noqa: S311 - jitter, not cryptography

    def __enter__(self) -> FanOut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for slot in self._slots.values():
            for client in slot.clients.values():
                client.close()
            slot.clients.clear()

    # ------------------------------------------------------------------ running

    def run(
        self,
        targets: Sequence[Target],
        operation: Operation[T],
        *,
        stagger: bool = False,
        on_result: Callable[[Result[T]], None] | None = None,
    ) -> list[Result[T]]:
        """``operation(client, target)`` on every target; one result per target, in order.

        With ``stagger``, every attempt (a retry too) first waits for its rack's power-on
        turn; targets are started in the order their turns come, rack by rack, so that the
        pool's threads are not all held by one rack's queue."""
        gate = (
            Stagger(self.policy.stagger_count, self.policy.stagger_interval)
            if stagger and self.policy.stagger_interval > 0
            else None
        )
        order = sorted(range(len(targets)), key=_turns(targets).__getitem__) if gate else None
        results: list[Result[T] | None] = [None] * len(targets)

        def work(index: int) -> None:
            result = self._one(targets[index], operation, gate)
            results[index] = result
            if on_result is not None:
                on_result(result)

        workers = max(1, min(self.policy.concurrency, len(targets)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bmc") as pool:
            for future in [pool.submit(work, i) for i in order or range(len(targets))]:
                future.result()
        return [r for r in results if r is not None]

    def _one(self, target: Target, operation: Operation[T], gate: Stagger | None) -> Result[T]:
        policy = self.policy
        retry_on = operation.retry_on if isinstance(operation, Step) else RETRYABLE
        begin = time.monotonic()
        attempt = 0
        history: list[str] = []

        def result(value: T | None = None, error: BmcError | None = None) -> Result[T]:
            return Result(
                target.node,
                target.rack,
                target.endpoint.url,
                value=value,
                reason=error.reason if error else None,
                message=error.message if error else None,
                attempts=attempt,
                seconds=time.monotonic() - begin,
                history=tuple(history),
            )

        while True:
            attempt += 1
            try:
                if gate is not None:
                    gate.wait(target.rack)
                value = self._attempt(target, operation)
            except BmcError as error:
                history.append(error.reason)
                if error.reason not in retry_on or attempt > policy.retries:
                    return result(error=error)
                self._forget(target)  # log in again on the next attempt
                pause = min(policy.backoff_cap, policy.backoff * 2 ** (attempt - 1))
                time.sleep(pause * self._random.uniform(0.5, 1.0))
                continue
            if isinstance(operation, Step) and operation.until is not None:
                try:
                    value = self._until(target, operation.until, operation)
                except BmcError as error:
                    history.append(error.reason)
                    return result(error=error)
            return result(value)

    def _until(
        self, target: Target, check: Callable[[BmcClient, Target], T | None], step: Step[T]
    ) -> T:
        """Poll ``check`` until it gives a value or the step's time is up. A poll that fails
        for a passing reason (a BMC busy while the host powers on) is polled again; a
        refusal ends the wait at once."""
        deadline = time.monotonic() + step.until_timeout
        last = ""
        while True:
            try:
                found = self._attempt(target, check)
            except BmcError as error:
                if error.reason not in RETRYABLE:
                    raise
                self._forget(target)
                found, last = None, f" (last poll: {error.reason}: {error.message})"
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise BmcError(
                    "timeout", f"{step.until_what} within {step.until_timeout:g} s{last}"
                )
            time.sleep(min(POLL, left))

    def _attempt(self, target: Target, operation: Operation[T]) -> T:
        """One try within the policy's deadline, holding the BMC's lock.

        The command runs in its own thread so that the deadline holds whatever the transport
        does. A command past its deadline is abandoned: its client is dropped (never reused)
        and the BMC is free for the retry, which logs in afresh. The abandoned thread is left
        to the transport's own timeouts: pyghmi gives no way to cancel a command, and one
        stuck in a lossy network's login retries outlives any wait worth making (measured:
        past 15 s against a BMC losing 20 % of its packets, whose fresh logins get through)."""
        slot = self._slot(target.endpoint)
        if not slot.lock.acquire(timeout=self.policy.timeout):
            raise BmcError("timeout", "an earlier command to this BMC is still running")
        try:
            client = self._client(slot, target)
            box: dict[str, Any] = {}
            done = threading.Event()

            def call() -> None:
                try:
                    box["value"] = operation(client, target)
                except BaseException as exc:  # carried back to the waiting thread
                    box["error"] = exc
                finally:
                    done.set()

            threading.Thread(target=call, daemon=True, name=f"bmc-{target.node}").start()
            if not done.wait(self.policy.timeout):
                slot.clients.pop(_client_key(target), None)  # never reuse a stuck session
                raise BmcError("timeout", f"no answer within {self.policy.timeout:g} s")
        finally:
            slot.lock.release()
        error = box.get("error")
        if error is not None:
            if isinstance(error, BmcError):
                raise error
            raise BmcError("bmc-error", f"{type(error).__name__}: {error}") from None
        value: T = box["value"]
        return value

    # ------------------------------------------------------------------ state

    def _slot(self, endpoint: BmcEndpoint) -> _BmcSlot:
        key = (endpoint.host.lower(), endpoint.port)
        with self._slots_lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _BmcSlot(self.policy.min_interval)
            return slot

    def _client(self, slot: _BmcSlot, target: Target) -> BmcClient:
        key = _client_key(target)
        client = slot.clients.get(key)
        if client is None:
            client = self.factory(target, self.policy, self._password(target))
            client.validate()
            client.before_command = slot.pace
            slot.clients[key] = client
        return client

    def _forget(self, target: Target) -> None:
        # Dropped, not logged out: a logout to a BMC that just failed would only wait.
        self._slot(target.endpoint).clients.pop(_client_key(target), None)

    def _password(self, target: Target) -> str:
        ref = target.password
        if isinstance(ref, str):
            return ref
        with self._secrets_lock:
            if ref not in self._secrets:
                try:
                    self._secrets[ref] = ref.resolve(self.policy.secrets_dir)
                except SecretError as exc:
                    self._secrets[ref] = exc
            found = self._secrets[ref]
        if isinstance(found, SecretError):
            raise BmcError("auth", f"password not available: {found}")
        return found


def _client_key(target: Target) -> tuple[object, ...]:
    """A session serves one endpoint with one set of credentials."""
    password = target.password
    credential = password if isinstance(password, SecretRef) else hash(password)
    return (target.endpoint.key, target.username, credential)


def _turns(targets: Sequence[Target]) -> list[int]:
    """Each target's place in its rack's power-on queue (0, 1, 2, ... per rack)."""
    seen: dict[str, int] = {}
    turns = []
    for target in targets:
        turns.append(seen.get(target.rack, 0))
        seen[target.rack] = turns[-1] + 1
    return turns


def failed(results: Iterable[Result[Any]]) -> list[Result[Any]]:
    return [result for result in results if not result.ok]
