"""pytest fixtures for the real BMC peers; import them into a conftest::

    from tests.peers.fixtures import (  # noqa: F401
        dead_tcp_port, dead_udp_port, ipmi_sim, ipmi_sims, sushy, sushy_factory,
        udp_proxy_factory,
    )

or name this module in ``pytest_plugins`` (as tests/integration/test_peers.py does).
Every fixture is function-scoped and stops what it started, test failed or not. For wider
scopes, build on ``IpmiSimFactory``, ``start_sushy``/``stop_sushy`` and ``UdpFaultProxy``.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.peers import dead_tcp_port as _dead_tcp_port
from tests.peers import dead_udp_port as _dead_udp_port
from tests.peers.ipmi_sim import IpmiSim, IpmiSimFactory
from tests.peers.sushy import SushyEmulator, SushyFactory, start_sushy, stop_sushy
from tests.peers.udp_proxy import ProxyFactory, UdpFaultProxy


def _require(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed (scripts/bootstrap installs them)")


@pytest.fixture
def ipmi_sims() -> Iterator[IpmiSimFactory]:
    """A factory: ``ipmi_sims.start(count, username=, password=, serials=, fru_layout=,
    power_on=) -> list[IpmiSim]``; all are stopped at teardown."""
    _require("ipmi_sim", "ipmitool", "timeout")
    factory = IpmiSimFactory()
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def ipmi_sim(ipmi_sims: IpmiSimFactory) -> IpmiSim:
    """One ipmi_sim BMC, admin/secret, powered off, boot device ``default``."""
    return ipmi_sims.start(1)[0]


@pytest.fixture
def sushy_factory() -> Iterator[SushyFactory]:
    """``sushy_factory(count=2, names=, username=, password=, auth=, power_delay=)`` starts
    a Redfish emulator (``start_sushy``'s arguments); all are stopped at teardown."""
    _require("timeout")
    started: list[SushyEmulator] = []

    def start(*args: Any, **kwargs: Any) -> SushyEmulator:
        emulator = start_sushy(*args, **kwargs)
        started.append(emulator)
        return emulator

    try:
        yield start
    finally:
        for emulator in started:
            stop_sushy(emulator)


@pytest.fixture
def sushy(sushy_factory: SushyFactory) -> SushyEmulator:
    """A Redfish emulator with 2 systems (node-01, node-02), off, admin/secret enforced,
    power changes applied within 1 s."""
    return sushy_factory()


@pytest.fixture
def udp_proxy_factory() -> Iterator[ProxyFactory]:
    """``udp_proxy_factory(target_port, drop_rate=, seed=, request_delay=, reply_delay=,
    blackhole=, drop_direction=, lifetime=)`` -> a started ``UdpFaultProxy``; all stopped
    at teardown."""
    started: list[UdpFaultProxy] = []

    def start(target_port: int, **kwargs: Any) -> UdpFaultProxy:
        proxy = UdpFaultProxy(target_port, **kwargs).start()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


@pytest.fixture
def dead_udp_port() -> Iterator[int]:
    """A loopback UDP port held with no BMC behind it (ICMP port unreachable)."""
    with _dead_udp_port() as port:
        yield port


@pytest.fixture
def dead_tcp_port() -> Iterator[int]:
    """A loopback TCP port held but not listening (connection refused)."""
    with _dead_tcp_port() as port:
        yield port
