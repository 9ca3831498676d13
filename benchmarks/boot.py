"""Boot-server benchmark: 1,000 nodes network-booting at once against one
`provisioner boot serve` on 127.0.0.1.

Each simulated node follows its rendered files as a real one does: it fetches its iPXE script
by MAC, the kernel from the images folder, then its installer answers where the script points
(autoinstall meta-data and user-data, or the kickstart), and posts the install callback with
the token it found in them. Every request opens a new connection (iPXE, the installer and its
curl do not share one). All nodes start together.

The server is the real command in its own process; the client is asyncio over raw sockets in
this one, so neither takes the other's GIL. Afterwards the server's events file must show every
node's callback accepted and nothing refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fleetgen import write_fleet
from provisioner.render import render_fleet, write_tree
from provisioner.render.boot import mac_file
from provisioner.render.writer import site_key
from provisioner.spec import load_fleet

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
TOKEN = re.compile(rb"X-Provisioner-Token: ([0-9a-f]+)")
REQUEST_TIMEOUT = 300.0  # seconds; a request slower than this counts as a failure


@dataclass
class Figure:
    name: str
    nodes: int
    called_back: int
    seconds: float
    requests: int
    p50: float
    p99: float
    p99_small: float  # scripts, answers and callbacks: everything but the kernel
    megabytes: float
    failures: list[str]
    server_accepted: int
    server_refused: int
    server_threads: int
    server_rss_mib: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def value(self) -> str:
        return (
            f"{self.called_back}/{self.nodes} called back in {self.seconds:.2f} s, "
            f"{len(self.failures)} failed"
        )

    def notes(self) -> str:
        text = (
            f"{self.requests} requests (a new connection each) = {self.rate:.0f} req/s, "
            f"{self.megabytes:.0f} MiB at {self.megabytes / self.seconds:.0f} MiB/s; latency "
            f"p50 {self.p50:.2f} s, p99 {self.p99:.2f} s (all but the kernel: p99 "
            f"{self.p99_small:.2f} s); server events: {self.server_accepted} callbacks accepted, "
            f"{self.server_refused} refused; server peak {self.server_threads} threads, "
            f"{self.server_rss_mib:.0f} MiB RSS"
        )
        if self.failures:
            text += f"; first failure: {self.failures[0]}"
        return text


@dataclass
class _Site:
    spec: Path
    render: Path
    boot_url: str
    nodes: list[tuple[str, str]]  # (name, MAC)


@dataclass
class _Client:
    port: int
    kernel_bytes: int
    latencies: list[tuple[str, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    received: int = 0


def prepare(work: Path, nodes: int) -> _Site:
    """A synthetic fleet of ``nodes`` nodes, rendered (its callback key made in the state
    folder, which run.py points at its work folder)."""
    spec = write_fleet(work / f"boot-fleet-{nodes}", nodes)
    fleet = load_fleet(spec)
    render = work / f"boot-render-{nodes}"
    write_tree(render_fleet(fleet, site_key(fleet, render), os.cpu_count() or 1), render)
    boot_url = str(fleet.document.boot.url)
    return _Site(spec, render, boot_url, [(node.name, node.mac) for node in fleet.nodes])


# --------------------------------------------------------------------------- the client


async def _request(
    client: _Client,
    kind: str,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    keep: bool = True,
) -> bytes:
    """One HTTP/1.1 request on a new connection; the body (or b"" when not ``keep``)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, client.port, limit=1 << 20)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{client.port}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if method == "POST":
            head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status = (await reader.readline()).split(b" ", 2)
        length = -1
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(status) < 2 or status[1] != b"200" or length < 0:
            raise RuntimeError(f"{method} {path}: {b' '.join(status).strip()!r}")
        if keep:
            data = await reader.readexactly(length)
        else:
            data, left = b"", length
            while left:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    raise RuntimeError(f"{path}: {length - left} of {length} bytes")
                left -= len(chunk)
        client.received += length
        client.latencies.append((kind, time.perf_counter() - started))
        return data
    finally:
        writer.close()


def _path(url: str, site: _Site) -> str:
    """The server path of a URL the rendered files give under the spec's boot.url."""
    if not url.startswith(site.boot_url):
        raise RuntimeError(f"{url} is not under {site.boot_url}")
    return "/" + url[len(site.boot_url) :]


async def _boot(client: _Client, site: _Site, name: str, mac: str) -> None:
    """One node's network boot, as its rendered files lead it."""
    script = (await _request(client, "script", "GET", f"/ipxe/{mac_file(mac)}.ipxe")).decode()
    await _request(client, "kernel", "GET", "/images/vmlinuz", keep=False)
    seed = re.search(r"ds=nocloud-net;s=(\S+)", script)
    kickstart = re.search(r"inst\.ks=(\S+)", script)
    if seed is not None:
        base = _path(seed.group(1), site)
        await _request(client, "answers", "GET", base + "meta-data")
        answers = await _request(client, "answers", "GET", base + "user-data")
    elif kickstart is not None:
        answers = await _request(client, "answers", "GET", _path(kickstart.group(1), site))
    else:
        raise RuntimeError(f"{name}: the iPXE script names no installer answers")
    token = TOKEN.search(answers)
    if token is None:
        raise RuntimeError(f"{name}: no callback token in the installer answers")
    body = json.dumps({"node": name, "event": "installed"}).encode()
    headers = {"X-Provisioner-Token": token.group(1).decode(), "Content-Type": "application/json"}
    await _request(client, "callback", "POST", f"/callback/{name}", body, headers)


async def _boot_all(client: _Client, site: _Site) -> int:
    async def one(name: str, mac: str) -> bool:
        try:
            await asyncio.wait_for(_boot(client, site, name, mac), REQUEST_TIMEOUT)
        except (
            OSError,
            RuntimeError,
            ValueError,
            TimeoutError,
            asyncio.IncompleteReadError,
        ) as exc:
            client.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            return False
        return True

    done = await asyncio.gather(*(one(name, mac) for name, mac in site.nodes))
    return sum(done)


# --------------------------------------------------------------------------- the server


@contextmanager
def _server(site: _Site, images: Path, events: Path, work: Path) -> Iterator[tuple[int, int]]:
    """`provisioner boot serve` in its own process; yields its port and process id."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = int(probe.getsockname()[1])
    log = work / "boot-serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "provisioner",
                "boot",
                "serve",
                str(site.spec),
                "--render",
                str(site.render),
                "--images",
                str(images),
                "--listen",
                f"{HOST}:{port}",
                "--events",
                str(events),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        deadline = time.monotonic() + 60
        while "ready http" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the boot server did not start: {log.read_text()}")
            time.sleep(0.05)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=60) != 0:
            raise RuntimeError(f"the boot server ended with {process.returncode}")


class _Sampler(threading.Thread):
    """The peak thread count and memory of a process, from /proc."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.status = Path(f"/proc/{pid}/status")
        self.threads = 0
        self.rss_kib = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            try:
                text = self.status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key == "Threads":
                    self.threads = max(self.threads, int(value))
                elif key == "VmRSS":
                    self.rss_kib = max(self.rss_kib, int(value.split()[0]))


def run_once(site: _Site, work: Path, kernel_bytes: int) -> Figure:
    images = work / f"boot-images-{kernel_bytes}"
    images.mkdir(parents=True, exist_ok=True)
    (images / "vmlinuz").write_bytes(os.urandom(kernel_bytes))
    events = work / f"boot-events-{kernel_bytes}.jsonl"
    events.unlink(missing_ok=True)
    client = _Client(0, kernel_bytes)
    with _server(site, images, events, work) as (port, pid):
        client.port = port
        sampler = _Sampler(pid)
        sampler.start()
        started = time.perf_counter()
        called_back = asyncio.run(_boot_all(client, site))
        seconds = time.perf_counter() - started
        sampler.stopping.set()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    callbacks = [r for r in records if r["kind"] == "callback"]
    everything = [seconds for _, seconds in client.latencies]
    small = [seconds for kind, seconds in client.latencies if kind != "kernel"]
    return Figure(
        name=f"boot {len(site.nodes)} nodes at once, {_size(kernel_bytes)} kernel",
        nodes=len(site.nodes),
        called_back=called_back,
        seconds=seconds,
        requests=len(client.latencies),
        p50=statistics.median(everything),
        p99=_p99(everything),
        p99_small=_p99(small),
        megabytes=client.received / 2**20,
        failures=client.failures,
        server_accepted=sum(r["accepted"] for r in callbacks),
        server_refused=sum(not r["accepted"] for r in records),
        server_threads=sampler.threads,
        server_rss_mib=sampler.rss_kib / 1024,
    )


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else samples[0]


def _size(count: int) -> str:
    return f"{count / 2**20:g} MiB" if count >= 2**20 else f"{count / 2**10:g} KiB"


def run(
    work: Path, nodes: int = 1000, kernel_sizes: tuple[int, ...] = (8 << 20, 64 << 10)
) -> list[Figure]:
    site = prepare(work, nodes)
    return [run_once(site, work, size) for size in kernel_sizes]


def main() -> None:
    """Only this benchmark: ``python -m benchmarks.boot [--nodes N] [--kernel-mib M]``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--kernel-mib", type=float, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="provisioner-boot-bench-") as folder:
        for figure in run(Path(folder), args.nodes, (int(args.kernel_mib * 2**20), 64 << 10)):
            print(f"{figure.name}: {figure.value()}\n    {figure.notes()}")


if __name__ == "__main__":
    main()
