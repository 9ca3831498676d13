"""A UDP fault proxy on loopback: loss, delay and blackholing in front of one UDP port.

Clients send to ``127.0.0.1:proxy.port``; each client address gets its own upstream socket to
the target, so replies find their way back (like NAT). One thread moves every datagram; the
drop decisions come from a seeded RNG, one draw per datagram in arrival order, so a single
client's request/reply exchange drops the same datagrams on every run. All knobs
(``drop_rate``, ``request_delay``, ``reply_delay``, ``blackhole``) may be changed while it
runs. The thread ends by itself after ``lifetime`` seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import ipaddress
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from tests.peers import LOOPBACK

Direction = Literal["both", "requests", "replies"]
_MAX_DATAGRAM = 65535
_MAX_CLIENTS = 256


@dataclasses.dataclass
class ProxyStats:
    """Datagram counters; ``requests`` go client to target, ``replies`` come back."""

    requests: int = 0
    replies: int = 0
    forwarded_requests: int = 0
    forwarded_replies: int = 0
    dropped_requests: int = 0
    dropped_replies: int = 0
    blackholed: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_requests + self.dropped_replies


class UdpFaultProxy:
    """Forwards ``127.0.0.1:port`` to ``target_host:target_port`` (loopback only)."""

    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = LOOPBACK,
        drop_rate: float = 0.0,
        drop_direction: Direction = "both",
        seed: int = 0,
        request_delay: float = 0.0,
        reply_delay: float = 0.0,
        blackhole: bool = False,
        lifetime: float = 120.0,
    ) -> None:
        if not ipaddress.ip_address(target_host).is_loopback:
            raise ValueError(f"the proxy forwards to loopback only, not {target_host}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be within [0, 1]: {drop_rate}")
        self.target = (target_host, target_port)
        self.drop_rate = drop_rate
        self.drop_direction: Direction = drop_direction
        self.request_delay = request_delay
        self.reply_delay = reply_delay
        self.blackhole = blackhole
        self.lifetime = lifetime
        self._rng = random.Random(seed)
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._listen.bind((LOOPBACK, 0))
        self.port = int(self._listen.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._upstreams: dict[tuple[str, int], socket.socket] = {}
        self._queue: list[tuple[float, int, socket.socket, bytes, tuple[str, int] | None]] = []
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name=f"udp-proxy-{self.port}")
        self._thread.daemon = True

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    def start(self) -> UdpFaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop forwarding and close every socket; datagrams still delayed are lost."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        else:
            self._close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    def __enter__(self) -> UdpFaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close()  # after its lifetime the port refuses (ICMP) rather than swallow

    def _loop(self) -> None:
        deadline = time.monotonic() + self.lifetime
        with selectors.DefaultSelector() as selector:
            selector.register(self._listen, selectors.EVENT_READ, None)
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= deadline:
                    break
                self._flush(now)
                timeout = deadline - now
                if self._queue:
                    timeout = min(timeout, max(0.0, self._queue[0][0] - now))
                for key, _events in selector.select(timeout):
                    if key.data == "wake":
                        return
                    if key.fileobj is self._listen:
                        self._on_request(selector)
                    else:
                        assert isinstance(key.fileobj, socket.socket)
                        self._on_reply(key.fileobj, key.data)

    def _on_request(self, selector: selectors.BaseSelector) -> None:
        try:
            data, client = self._listen.recvfrom(_MAX_DATAGRAM)
        except OSError:
            return
        if not self._pass("requests"):
            return
        upstream = self._upstreams.get(client)
        if upstream is None:
            if len(self._upstreams) >= _MAX_CLIENTS:
                return
            upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            upstream.bind((LOOPBACK, 0))
            upstream.connect(self.target)
            self._upstreams[client] = upstream
            selector.register(upstream, selectors.EVENT_READ, client)
        self._schedule(self.request_delay, upstream, data, None)

    def _on_reply(self, upstream: socket.socket, client: tuple[str, int]) -> None:
        try:
            data = upstream.recv(_MAX_DATAGRAM)
        except OSError:  # ICMP port unreachable from a dead target
            return
        if self._pass("replies"):
            self._schedule(self.reply_delay, self._listen, data, client)

    def _pass(self, direction: Literal["requests", "replies"]) -> bool:
        """Count one datagram and decide whether it goes on."""
        draw = self._rng.random()
        with self._lock:
            setattr(self._stats, direction, getattr(self._stats, direction) + 1)
            if self.blackhole:
                self._stats.blackholed += 1
                return False
            if draw < self.drop_rate and self.drop_direction in ("both", direction):
                field = f"dropped_{direction}"
                setattr(self._stats, field, getattr(self._stats, field) + 1)
                return False
        return True

    def _schedule(
        self, delay: float, sock: socket.socket, data: bytes, dest: tuple[str, int] | None
    ) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (time.monotonic() + delay, self._seq, sock, data, dest))
        self._flush(time.monotonic())

    def _flush(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            _due, _seq, sock, data, dest = heapq.heappop(self._queue)
            # Counted under the lock with the send: whoever got the datagram sees the count.
            with self._lock, contextlib.suppress(OSError):
                if dest is None:
                    sock.send(data)
                    self._stats.forwarded_requests += 1
                else:
                    sock.sendto(data, dest)
                    self._stats.forwarded_replies += 1

    def _close(self) -> None:
        for sock in [self._listen, self._wake_r, self._wake_w, *self._upstreams.values()]:
            sock.close()


ProxyFactory = Callable[..., UdpFaultProxy]
"""What the ``udp_proxy_factory`` fixture yields: ``UdpFaultProxy(target_port, **knobs)``,
started."""
