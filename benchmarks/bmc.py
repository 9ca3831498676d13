"""BMC fan-out benchmark: `bmc power status` against 1,000 lab BMCs whose every reply is
delayed 50 ms, served by several processes of provisioner.lab.ipmi_bmc (the lab's IPMI BMC).

The ideal is N / concurrency x the time one status takes on its own (measured in the same
run, so it includes the login, the reachability probe and the 50 ms per exchange).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from provisioner.bmc import operations as ops
from provisioner.bmc.fanout import FanOut, Policy, Target
from provisioner.spec.types import parse_bmc_url

PASSWORD = "bench-bmc-pw"  # noqa: S105 - the lab BMCs' own, made up here


@dataclass
class Figure:
    name: str
    seconds: float
    ideal: float
    failures: int

    @property
    def ratio(self) -> float:
        return self.seconds / self.ideal


@contextmanager
def lab_bmcs(count: int, first_port: int, processes: int, delay: float) -> Iterator[list[int]]:
    """``count`` lab BMCs on loopback, sharded over ``processes`` server processes."""
    ports = list(range(first_port, first_port + count))
    share = -(-count // processes)
    env = {**os.environ, "BENCH_BMC_PASSWORD": PASSWORD}
    servers = []
    try:
        for i in range(processes):
            chunk = ports[i * share : (i + 1) * share]
            if not chunk:
                continue
            servers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "provisioner.lab.ipmi_bmc",
                        "--ports",
                        f"{chunk[0]}-{chunk[-1]}",
                        "--password-env",
                        "BENCH_BMC_PASSWORD",
                        "--delay",
                        str(delay),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
        for server in servers:
            assert server.stdout is not None
            line = server.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"lab BMC server did not start: {line!r}")
        yield ports
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)


def _targets(ports: list[int]) -> list[Target]:
    return [
        Target(
            f"n{i:04d}", f"r{i // 32}", parse_bmc_url(f"ipmi://127.0.0.1:{port}"), "admin", PASSWORD
        )
        for i, port in enumerate(ports)
    ]


def power_status(ports: list[int], concurrency: int) -> tuple[float, int]:
    with FanOut(Policy(concurrency=concurrency, timeout=10, retries=2)) as fan:
        started = time.perf_counter()
        results = fan.run(_targets(ports), ops.power_status)
        seconds = time.perf_counter() - started
    return seconds, sum(not r.ok for r in results)


def single_status_seconds(ports: list[int]) -> float:
    """Median time of one status on its own (fresh session each), in this process."""
    samples = []
    for port in ports:
        with FanOut(Policy(concurrency=1, timeout=10)) as fan:
            started = time.perf_counter()
            (result,) = fan.run(_targets([port]), ops.power_status)
            samples.append(time.perf_counter() - started)
            assert result.ok, result.as_dict()
    return statistics.median(samples)


def run(count: int = 1000, delay: float = 0.05, processes: int = 4) -> list[Figure]:
    figures = []
    with lab_bmcs(count, 20001, processes, delay) as ports:
        one = single_status_seconds(ports[:10])
        # Each fan-out logs out when it ends, so every status below includes a fresh login.
        for concurrency in (64, 8):
            seconds, failures = power_status(ports, concurrency)
            figures.append(
                Figure(
                    f"bmc power status {count} BMCs, {concurrency} workers, "
                    f"{delay * 1000:g} ms replies",
                    seconds,
                    count / concurrency * one,
                    failures,
                )
            )
    return figures
