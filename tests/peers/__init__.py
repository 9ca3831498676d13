"""Real BMC peers on loopback for the BMC client's integration tests.

- ``ipmi_sim``: OpenIPMI's ``ipmi_sim`` (an independent IPMI BMC), one process per BMC, with
  chassis state kept in files, FRU data, a SEL and two temperature sensors; ``ipmitool``.
- ``ipmi_records``: FRU image and SDR encoders, a one-datagram IPMI probe.
- ``sushy``: the sushy-tools Redfish emulator (fake driver) over HTTPS, with basic auth.
- ``udp_proxy``: a UDP fault proxy (loss, delay, blackhole) in front of one UDP port.
- this module: free ports, dead ports (nothing answers), and stopping process groups.
- ``fixtures``: the pytest fixtures; import them into a conftest.

Everything binds 127.0.0.1 only, and every process is bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (the caller binds it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller binds it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def dead_udp_port() -> Iterator[int]:
    """A UDP port where no BMC listens, held so that nothing else takes it meanwhile.

    The port is bound by a socket connected to another address, so the kernel delivers
    nothing to it and answers every datagram with ICMP port-unreachable, as for a closed
    port: a connected client sees ``ConnectionRefusedError``, an unconnected one a timeout.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.connect((LOOPBACK, 9))
        yield int(sock.getsockname()[1])


@contextlib.contextmanager
def dead_tcp_port() -> Iterator[int]:
    """A TCP port bound but not listening: connections are refused at once (RST)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.1, what: str = ""
) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not ready after {timeout:.0f} s: {what}")
        time.sleep(interval)


def bounded_command(argv: list[str], lifetime: float) -> list[str]:
    """``argv`` under coreutils ``timeout``: a peer left behind by a killed test run dies."""
    return ["timeout", "--kill-after=5", f"{lifetime:.0f}", *argv]


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group led by ``process``, SIGKILL it after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        break
    # Children that outlived their leader (a chassis_control script) go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def log_tail(path: os.PathLike[str] | str, limit: int = 2000) -> str:
    """The last ``limit`` characters of a log file, or a note that there is none."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"(no log: {exc})"
    return data[-limit:].decode(errors="replace")
