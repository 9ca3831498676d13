"""The boot server: the HTTP half of network boot, serving what ``render`` wrote.

Routes, under the path of the spec's ``boot.url``:

* ``GET ipxe/<file>``: the chain script (``boot.ipxe``) and each node's script, named by MAC;
* ``GET autoinstall/<node>/<file>`` and ``GET kickstart/<file>``: the installer's answers;
* ``GET images/<path>``: OS kernels and initrds from an images folder, streamed;
* ``POST callback/<node>``: the installer's "done". The ``X-Provisioner-Token`` header must
  be the node's HMAC token (see :func:`provisioner.render.boot.callback_token`); a wrong or
  missing one is refused with 403 and logged, and nothing is recorded as done.

Files are read at each request, so a new render is served at once. Every request becomes a
:class:`BootEvent`: kept in memory, handed to ``on_event``, and appended as a JSON line to the
events file when one is given. A thread per connection (HTTP/1.1 keep-alive) and a deep listen
backlog carry a thousand nodes booting at once (see ``benchmarks/``).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from provisioner.errors import ProvisionerError
from provisioner.render.boot import callback_token, mac_file

log = logging.getLogger("provisioner.boot")

TOKEN_HEADER = "X-Provisioner-Token"  # noqa: S105 - a header name, not a secret
MAX_CALLBACK_BODY = 64 * 1024
_DRAIN_BYTES = 16 * 1024 * 1024  # read (and drop) this much of a refused body before closing
_DRAIN_SECONDS = 2.0
_ROUTES = {"ipxe": "boot/ipxe", "autoinstall": "boot/autoinstall", "kickstart": "boot/kickstart"}
_TYPES = {".ipxe": "text/plain", ".ks": "text/plain", ".json": "application/json"}


class BootServerError(ProvisionerError):
    """The boot server could not start (address in use, missing render folder)."""


@dataclass(frozen=True, slots=True)
class BootEvent:
    """One request the boot server answered. ``kind`` is ``callback`` (a POST to a callback
    path) or ``fetch`` (any other request); ``accepted`` is whether it was served (fetch) or
    believed (callback)."""

    kind: str
    client: str
    path: str
    status: int
    accepted: bool
    node: str | None = None
    reason: str | None = None
    body: dict[str, Any] | None = None
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class BootServer:
    """Serve a render folder to booting nodes; see the module docstring.

    ``nodes`` maps the name of each node callbacks may name to its provisioning MAC; ``key``
    is the site's callback key. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(
        self,
        render_dir: Path,
        key: bytes,
        nodes: Mapping[str, str],
        *,
        base_path: str = "/",
        images: Path | None = None,
        host: str = "0.0.0.0",  # noqa: S104 - nodes reach it over the provisioning network
        port: int = 8080,
        events: Path | None = None,
        on_event: Callable[[BootEvent], None] | None = None,
    ) -> None:
        if not (render_dir / "boot").is_dir():
            raise BootServerError(f"{render_dir} holds no rendered boot files (run render first)")
        self.render_dir = render_dir.resolve()
        self.images = images.resolve() if images is not None else None
        self.base_path = "/" + base_path.strip("/") + ("/" if base_path.strip("/") else "")
        self._key = key
        self._nodes = frozenset(nodes)
        self._by_mac_file = {f"{mac_file(mac)}.ipxe": name for name, mac in nodes.items()}
        self._host, self._port = host, port
        self._on_event = on_event
        self._events_path = events
        self._events_file: IO[str] | None = None
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self.events: list[BootEvent] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        return self._httpd.server_address[1] if self._httpd is not None else self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host  # noqa: S104
        return f"http://{host}:{self.port}{self.base_path}"

    def start(self) -> BootServer:
        handler = type("Handler", (_Handler,), {"boot": self})
        if self._events_path is not None:
            try:
                self._events_path.parent.mkdir(parents=True, exist_ok=True)
                self._events_file = self._events_path.open("a", encoding="utf-8", buffering=1)
            except OSError as exc:
                raise BootServerError(
                    f"cannot open the events file {self._events_path}: {exc.strerror or exc}"
                ) from exc
        try:
            httpd = _Server((self._host, self._port), handler)
        except OSError as exc:
            self._close_events()
            raise BootServerError(
                f"cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from exc
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.name = "boot-server"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and end every open connection (an idle keep-alive one included)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_connections()
            self._httpd = None
        self._close_events()

    def _close_events(self) -> None:
        with self._lock:
            if self._events_file is not None:
                self._events_file.close()
                self._events_file = None

    def __enter__(self) -> BootServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ queries

    def installed(self) -> dict[str, BootEvent]:
        """The last accepted callback of each node that has called back."""
        with self._lock:
            return {
                e.node: e for e in self.events if e.kind == "callback" and e.accepted and e.node
            }

    def wait_for_callback(self, node: str, after: float, timeout: float) -> BootEvent | None:
        """The first accepted callback from ``node`` at or after time ``after``, waiting up to
        ``timeout`` seconds for it; None when none came."""
        deadline = time.monotonic() + timeout
        with self._done:
            while True:
                for event in self.events:
                    if event.node == node and _accepted_callback(event) and event.time >= after:
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._done.wait(left)

    # ------------------------------------------------------------------ used by the handler

    def record(self, event: BootEvent) -> None:
        with self._done:
            self.events.append(event)
            if self._events_file is not None:
                self._events_file.write(json.dumps(event.as_dict(), sort_keys=True) + "\n")
            self._done.notify_all()
        if event.kind == "callback":
            if event.accepted:
                log.info("install callback from %s (%s) accepted", event.node, event.client)
            else:
                log.warning(
                    "install callback for %s from %s refused: %s",
                    event.node,
                    event.client,
                    event.reason,
                )
        if self._on_event is not None:
            self._on_event(event)

    def resolve(self, route: str, rest: str) -> Path | None:
        """The file a GET names, or None. Never outside the route's folder."""
        if route == "images":
            root = self.images
        elif route in _ROUTES:
            root = self.render_dir / _ROUTES[route]
        else:
            return None
        if root is None or not rest or "\0" in rest:
            return None
        try:
            candidate = (root / rest).resolve()
            if not candidate.is_relative_to(root.resolve()) or not candidate.is_file():
                return None
        except (OSError, RuntimeError):  # a name too long, a symlink loop (RuntimeError)
            return None
        return candidate

    def node_of(self, route: str, rest: str) -> str | None:
        """The node a served file belongs to, for the event log."""
        if route == "ipxe":
            return self._by_mac_file.get(rest)
        if route == "autoinstall":
            return rest.partition("/")[0] or None
        if route == "kickstart" and rest.endswith(".ks"):
            return rest[: -len(".ks")]
        return None

    def check_callback(self, node: str, token: str | None) -> str | None:
        """Why a callback is refused, or None when it is good."""
        if node not in self._nodes:
            return "unknown node"
        if not token:
            return f"no {TOKEN_HEADER} header"
        if not hmac.compare_digest(token.encode(), callback_token(self._key, node).encode()):
            return "wrong token"
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4096  # a rack powering on at once; the kernel caps it at somaxconn
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End the connections still open: their handler threads see EOF and return."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    boot: BootServer
    protocol_version = "HTTP/1.1"
    server_version = "provisioner-boot"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection is closed after this

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def _route(self) -> tuple[str, str] | None:
        path = unquote(urlsplit(self.path).path)
        base = self.boot.base_path
        if not path.startswith(base):
            return None
        route, _, rest = path[len(base) :].partition("/")
        return route, rest

    def do_HEAD(self) -> None:
        self._get(body=False)

    def do_GET(self) -> None:
        self._get(body=True)

    def _get(self, body: bool) -> None:
        routed = self._route()
        target = self.boot.resolve(*routed) if routed is not None else None
        client = self.client_address[0]
        if target is None:
            self._reply(HTTPStatus.NOT_FOUND, b"not found\n", body=body)
            self.boot.record(BootEvent("fetch", client, self.path, 404, accepted=False))
            return
        node = self.boot.node_of(*routed) if routed is not None else None
        try:
            with target.open("rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(0)
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", _TYPES.get(target.suffix, "text/plain"))
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if body:
                    self.wfile.flush()
                    self.connection.sendfile(handle)
        except OSError as exc:
            log.warning("serving %s to %s failed: %s", self.path, client, exc)
            self.close_connection = True
            return
        self.boot.record(BootEvent("fetch", client, self.path, 200, accepted=True, node=node))

    def do_POST(self) -> None:
        # Each callback is recorded before it is answered: a node told 200 is installed().
        routed = self._route()
        client = self.client_address[0]
        length = self._length()
        if routed is None or routed[0] != "callback" or not routed[1] or "/" in routed[1]:
            self.boot.record(BootEvent("fetch", client, self.path, 404, accepted=False))
            if length is None or length > MAX_CALLBACK_BODY:
                self._refuse_body(HTTPStatus.NOT_FOUND, b"not found\n")
            else:
                self.rfile.read(length)
                self._reply(HTTPStatus.NOT_FOUND, b"not found\n")
            return
        node = _printable(routed[1])  # it lands in logs: no control characters
        if length is None:
            self._callback_event(client, node, 411, "no Content-Length")
            self._refuse_body(HTTPStatus.LENGTH_REQUIRED, b"give the body's Content-Length\n")
            return
        if length > MAX_CALLBACK_BODY:
            self._callback_event(client, node, 413, f"body too large ({length} bytes)")
            self._refuse_body(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"body too large\n")
            return
        raw = self.rfile.read(length)
        reason = self.boot.check_callback(node, self.headers.get(TOKEN_HEADER))
        if reason is not None:
            self._callback_event(client, node, 403, reason)
            self._reply(HTTPStatus.FORBIDDEN, f"refused: {reason}\n".encode())
            return
        try:
            payload = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            payload = None
        if not isinstance(payload, dict):
            self._callback_event(client, node, 400, "the body is not a JSON object")
            self._reply(HTTPStatus.BAD_REQUEST, b"the body must be a JSON object\n")
            return
        self.boot.record(
            BootEvent("callback", client, self.path, 200, accepted=True, node=node, body=payload)
        )
        self._reply(HTTPStatus.OK, b'{"ok": true}\n', content_type="application/json")

    def _callback_event(self, client: str, node: str, status: int, reason: str) -> None:
        self.boot.record(
            BootEvent("callback", client, self.path, status, False, node=node, reason=reason)
        )

    def _length(self) -> int | None:
        """The body's size; None when it is not given as a plain Content-Length (chunked)."""
        if "Transfer-Encoding" in self.headers:
            return None
        with contextlib.suppress(TypeError, ValueError):
            length = int(self.headers.get("Content-Length", "0"))
            return length if length >= 0 else None
        return None

    def _refuse_body(self, status: HTTPStatus, data: bytes) -> None:
        """Answer without taking the body, then close the connection. Before closing, up to
        16 MiB of the body is read and dropped (for 2 s at most): a socket closed with unread
        data resets the connection, and a client still sending would never see the answer."""
        self._reply(status, data, close=True)
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _DRAIN_SECONDS
            left = _DRAIN_BYTES
            while left > 0 and (timeout := deadline - time.monotonic()) > 0:
                self.connection.settimeout(timeout)
                chunk = self.rfile.read1(min(left, 256 * 1024))
                if not chunk:
                    break
                left -= len(chunk)

    def _reply(
        self,
        status: HTTPStatus,
        data: bytes,
        *,
        body: bool = True,
        content_type: str = "text/plain",
        close: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")  # also makes the handler close it
        self.end_headers()
        if body:
            self.wfile.write(data)


def _accepted_callback(event: BootEvent) -> bool:
    return event.kind == "callback" and event.accepted


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so a node name from a URL cannot forge a log
    line; a name the fleet knows is unchanged."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
