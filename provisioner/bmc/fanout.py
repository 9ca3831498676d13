"""Run one BMC operation across many nodes: bounded, paced, retried, and never all-or-nothing.

* a bounded thread pool (pyghmi is synchronous; one process manages ~1000 sessions at most);
* one client (session) per BMC, reused by every command of a :class:`FanOut`;
* at most one command in flight per BMC (host:port), and ``min_interval`` seconds between
  the start of two commands to the same BMC (old BMCs fall over when hurried);
* a deadline per attempt, enforced here whatever the transport does; retries with
  exponential backoff and jitter for ``unreachable``, ``timeout`` and ``bmc-error`` (never
  for ``auth``: repeated bad logins lock accounts on many BMCs);
* power-on stagger: at most ``stagger_count`` power-ons per ``stagger_interval`` per rack,
  against inrush current;
* a result per node, in the order given: one bad BMC fails that node, never the rack.

Passwords are resolved from their references once per fan-out, in memory, and handed only
to the client objects.
"""

from __future__ import annotations

import random
import threading
import time
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
    client per endpoint served by this BMC (a Redfish service may front several systems)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    last_start: float = float("-inf")
    clients: dict[tuple[object, ...], BmcClient] = field(default_factory=dict)


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
        """``operation(client, target)`` on every target; one result per target, in order."""
        started = time.monotonic()
        offsets = _stagger_offsets(targets, self.policy) if stagger else [0.0] * len(targets)
        order = sorted(range(len(targets)), key=lambda i: offsets[i])
        results: list[Result[T] | None] = [None] * len(targets)

        def work(index: int) -> None:
            delay = started + offsets[index] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            result = self._one(targets[index], operation)
            results[index] = result
            if on_result is not None:
                on_result(result)

        workers = max(1, min(self.policy.concurrency, len(targets)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bmc") as pool:
            for future in [pool.submit(work, i) for i in order]:
                future.result()
        return [r for r in results if r is not None]

    def _one(self, target: Target, operation: Operation[T]) -> Result[T]:
        policy = self.policy
        begin = time.monotonic()
        attempt = 0
        history: list[str] = []
        while True:
            attempt += 1
            try:
                value = self._attempt(target, operation)
            except BmcError as error:
                history.append(error.reason)
                if error.reason not in RETRYABLE or attempt > policy.retries:
                    return Result(
                        target.node,
                        target.rack,
                        target.endpoint.url,
                        reason=error.reason,
                        message=error.message,
                        attempts=attempt,
                        seconds=time.monotonic() - begin,
                        history=tuple(history),
                    )
                self._forget(target)  # log in again on the next attempt
                pause = min(policy.backoff_cap, policy.backoff * 2 ** (attempt - 1))
                time.sleep(pause * self._random.uniform(0.5, 1.0))
                continue
            return Result(
                target.node,
                target.rack,
                target.endpoint.url,
                value=value,
                attempts=attempt,
                seconds=time.monotonic() - begin,
                history=tuple(history),
            )

    def _attempt(self, target: Target, operation: Operation[T]) -> T:
        """One try within the policy's deadline, holding the BMC's lock.

        The command runs in its own thread so that the deadline holds whatever the transport
        does. A command past its deadline is abandoned: its session is dropped (never reused)
        and the BMC is free for the retry, which logs in afresh."""
        slot = self._slot(target.endpoint)
        if not slot.lock.acquire(timeout=self.policy.timeout):
            raise BmcError("timeout", "an earlier command to this BMC is still running")
        try:
            wait = slot.last_start + self.policy.min_interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            slot.last_start = time.monotonic()
            deadline = slot.last_start + self.policy.timeout
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
            if not done.wait(max(0.0, deadline - time.monotonic())):
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
                slot = self._slots[key] = _BmcSlot()
            return slot

    def _client(self, slot: _BmcSlot, target: Target) -> BmcClient:
        key = _client_key(target)
        client = slot.clients.get(key)
        if client is None:
            client = self.factory(target, self.policy, self._password(target))
            client.validate()
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


def _stagger_offsets(targets: Sequence[Target], policy: Policy) -> list[float]:
    """Start offset of each target: the k-th power-on of a rack waits
    ``(k // stagger_count) * stagger_interval`` seconds."""
    seen: dict[str, int] = {}
    offsets = []
    for target in targets:
        k = seen.get(target.rack, 0)
        seen[target.rack] = k + 1
        offsets.append((k // max(1, policy.stagger_count)) * policy.stagger_interval)
    return offsets


def failed(results: Iterable[Result[Any]]) -> list[Result[Any]]:
    return [result for result in results if not result.ok]
