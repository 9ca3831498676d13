"""Reading the boot server's events file from another process.

The boot server appends one JSON line per request it answered (``--events FILE``; the lab
keeps ``boot-events.jsonl`` in its site folder). A bring-up learns from that file when a node
started its installer (the boot server served it a file of its own: its iPXE script, its
autoinstall answers or its kickstart) and when the installer called back, accepted. Reading
a file rather than asking a server keeps the record across crashes of either side: a
bring-up started after a node called back still finds the callback.

:class:`EventLog` reads incrementally (only what was appended since the last look), skips a
partly written last line until it is whole, and is safe to share between threads.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class _Seen:
    fetched: list[float] = field(default_factory=list)  # times of files served to the node
    called_back: list[float] = field(default_factory=list)  # accepted callbacks
    refused: list[tuple[float, str]] = field(default_factory=list)  # refused callbacks


class EventLog:
    """What a boot server's events file says about each node; see the module docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._nodes: dict[str, _Seen] = {}
        self._lock = threading.Lock()

    def _read(self) -> None:
        try:
            with self.path.open("rb") as stream:
                size = stream.seek(0, 2)
                if size < self._offset:  # the file was replaced: read it afresh
                    self._offset, self._partial, self._nodes = 0, b"", {}
                stream.seek(self._offset)
                data = stream.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        node = event.get("node") if isinstance(event, dict) else None
        if not isinstance(node, str) or not isinstance(event.get("time"), int | float):
            return
        seen = self._nodes.setdefault(node, _Seen())
        at = float(event["time"])
        if event.get("kind") == "callback":
            if event.get("accepted"):
                seen.called_back.append(at)
            else:
                seen.refused.append((at, str(event.get("reason") or "refused")))
        elif event.get("accepted"):
            seen.fetched.append(at)

    def booted(self, node: str, since: float) -> bool:
        """Whether the boot server served ``node`` one of its own files at or after ``since``
        (Unix time): its firmware network-booted and its installer is under way."""
        with self._lock:
            self._read()
            seen = self._nodes.get(node)
            return seen is not None and any(at >= since for at in seen.fetched)

    def installed(self, node: str, since: float) -> bool:
        """Whether ``node``'s installer called back (and was believed) at or after ``since``."""
        with self._lock:
            self._read()
            seen = self._nodes.get(node)
            return seen is not None and any(at >= since for at in seen.called_back)

    def refusals(self, node: str, since: float) -> list[str]:
        """Why callbacks naming ``node`` since ``since`` were refused (a wrong token: a node
        installed from another render folder, or someone else)."""
        with self._lock:
            self._read()
            seen = self._nodes.get(node)
            return [why for at, why in seen.refused if at >= since] if seen else []
