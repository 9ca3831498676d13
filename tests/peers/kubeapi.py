"""A replayed Kubernetes API server: a fake, because no real API server can run here.

A Kubernetes API server needs etcd, certificates and usually a kubelet or two; none of that
runs on the test machines. So the scheduler adapter (provisioner/scheduler/kubernetes.py) is
tested against *scripted exchanges* instead: each scenario, ``tests/data/kubernetes/<name>.json``,
lists the requests the official ``kubernetes`` client is expected to send, in order, and the
answers a real API server gives to them (v1 Node, v1 PodList, policy/v1 Eviction, Status
objects for 404/403/429, as the apiserver writes them). The answers are written by hand from
the apiserver's behaviour; they were not captured from a live cluster.

A scenario file::

    {"description": "...",
     "exchanges": [
       {"note": "...",                                  # ignored, for the reader
        "request": {"method": "PATCH",
                    "path": "/api/v1/nodes/gpu-01",     # may carry ?query (compared decoded)
                    "content_type": "application/merge-patch+json",   # optional
                    "body": {...},                      # optional: compared as JSON
                    "ignore": ["metadata.resourceVersion"]},  # dotted paths left out of both
        "response": {"status": 200, "body": {...}}}]}

A request is matched against the next exchange only: method, path, decoded query, the
Content-Type when the exchange names one, and the JSON body (a request with no ``body`` in
the exchange must carry none). A request that does not match, or that comes after the last
exchange, is answered 500 with a Status naming the difference, and the difference is kept in
``mismatches``; the exchange stays next. Every request is kept in ``received``.
:meth:`ReplayApiServer.assert_complete` fails a test that saw a mismatch or left an
exchange unplayed.

The server listens on 127.0.0.1, on a free port of its own, in a thread; :func:`replay`
stops it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.peers import LOOPBACK

SCENARIOS = Path(__file__).resolve().parent.parent / "data" / "kubernetes"


@dataclass(frozen=True)
class Exchange:
    """One expected request and the answer to it."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    body: Any  # None: no body expected
    ignore: tuple[str, ...]
    status: int
    response: Any

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Exchange:
        request, response = data["request"], data["response"]
        url = urlsplit(request["path"])
        return cls(
            method=request["method"],
            path=url.path,
            query=parse_qs(url.query, keep_blank_values=True),
            content_type=request.get("content_type"),
            body=request.get("body"),
            ignore=tuple(request.get("ignore", ())),
            status=response["status"],
            response=response.get("body"),
        )

    def mismatch(self, got: Received) -> str | None:
        """What differs between this exchange's request and ``got``; None when they match."""
        if (got.method, got.path, got.query) != (self.method, self.path, self.query):
            return f"expected {self.method} {self.path} {self.query}, got {got.describe()}"
        if self.content_type is not None and got.content_type != self.content_type:
            return f"{got.describe()}: Content-Type {got.content_type!r}, not {self.content_type!r}"
        expected, actual = _without(self.body, self.ignore), _without(got.body, self.ignore)
        if expected != actual:
            return f"{got.describe()}: body {json.dumps(actual)}, not {json.dumps(expected)}"
        return None


@dataclass(frozen=True)
class Received:
    """One request as the server saw it (the body JSON-decoded, or the raw text)."""

    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    authorization: str | None
    body: Any

    def describe(self) -> str:
        return f"{self.method} {self.path} {self.query}"


def _without(body: Any, paths: tuple[str, ...]) -> Any:
    """``body`` with each dotted path removed (missing paths are fine)."""
    if not paths or not isinstance(body, dict):
        return body
    body = copy.deepcopy(body)
    for path in paths:
        *parents, last = path.split(".")
        node = body
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return body


def load_scenario(name: str) -> list[Exchange]:
    """The exchanges of ``tests/data/kubernetes/<name>.json``."""
    data = json.loads((SCENARIOS / f"{name}.json").read_text())
    return [Exchange.from_json(item) for item in data["exchanges"]]


class ReplayApiServer:
    """Plays one scenario's exchanges in order on ``url`` (http://127.0.0.1:PORT)."""

    def __init__(self, exchanges: list[Exchange]) -> None:
        self._pending = list(exchanges)
        self._lock = threading.Lock()
        self.received: list[Received] = []
        self.mismatches: list[str] = []
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def remaining(self) -> list[Exchange]:
        with self._lock:
            return list(self._pending)

    def assert_complete(self) -> None:
        """Fails unless every request matched and every exchange was played."""
        assert self.mismatches == [], "unexpected requests:\n" + "\n".join(self.mismatches)
        unplayed = [f"{item.method} {item.path} {item.query}" for item in self.remaining]
        assert unplayed == [], f"exchanges never requested: {unplayed}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def answer(self, got: Received) -> tuple[int, Any]:
        """The status and body for ``got``: the next exchange's answer, or a 500."""
        with self._lock:
            self.received.append(got)
            if self._pending:
                problem = self._pending[0].mismatch(got)
            else:
                problem = f"{got.describe()} after the last exchange"
            if problem is not None:
                self.mismatches.append(problem)
                return 500, {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": f"replay: {problem}",
                    "reason": "InternalError",
                    "code": 500,
                }
            exchange = self._pending.pop(0)
            return exchange.status, exchange.response

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        replay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the client's pool expects
            timeout = 10  # an idle kept-alive connection is dropped after this

            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode() if length else ""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                status, answer = replay.answer(
                    Received(
                        method=self.command,
                        path=url.path,
                        query=parse_qs(url.query, keep_blank_values=True),
                        content_type=self.headers.get("Content-Type"),
                        authorization=self.headers.get("Authorization"),
                        body=body,
                    )
                )
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return None  # the test asserts on ``received``

        return Handler


@contextlib.contextmanager
def replay(scenario: str) -> Iterator[ReplayApiServer]:
    """Serve ``tests/data/kubernetes/<scenario>.json`` for the duration of the block."""
    server = ReplayApiServer(load_scenario(scenario))
    try:
        yield server
    finally:
        server.close()
