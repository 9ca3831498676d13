"""``validate()`` of the IPMI and Redfish clients: the offline checks, each with its BmcError,
run with every way of opening a socket made to fail (so a check that reached for the network
would show as that failure, not pass)."""

from __future__ import annotations

import socket

import pytest

from provisioner.bmc import ipmi
from provisioner.bmc.base import BmcClient
from provisioner.bmc.ipmi import IpmiClient
from provisioner.bmc.redfish import RedfishClient
from provisioner.errors import BmcError
from provisioner.spec.types import parse_bmc_url

IPMI = parse_bmc_url("ipmi://192.0.2.10")
REDFISH = parse_bmc_url("redfish+https://192.0.2.11/redfish/v1/Systems/1")


class NetworkUsed(BaseException):
    """Not an Exception: no ``except Exception`` on the way can swallow it."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket, connection or name lookup raises NetworkUsed (pyghmi and ssl make theirs
    through ``socket.socket``)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise NetworkUsed("validate() touched the network")

    monkeypatch.setattr(socket.socket, "__init__", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_guard_catches_a_client_that_reaches_out(no_network: None) -> None:
    with pytest.raises(NetworkUsed):
        ipmi.probe("127.0.0.1", 623, 1.0)
    with pytest.raises(NetworkUsed):
        RedfishClient(REDFISH, "admin", "pw", 5, verify_tls=True).get_power_state()


@pytest.mark.parametrize(
    ("client", "reason", "words"),
    [
        (IpmiClient(IPMI, "", "pw-1", 5), "auth", "no user name"),
        (IpmiClient(IPMI, "admin", "", 5), "auth", "password for ipmi://192.0.2.10 is empty"),
        (IpmiClient(IPMI, "admin", "p" * 21, 5), "auth", "at most 20 bytes"),
        # 11 characters, 22 bytes in UTF-8: the limit is in bytes.
        (IpmiClient(IPMI, "admin", "ü" * 11, 5), "auth", "at most 20 bytes"),
        (IpmiClient(REDFISH, "admin", "pw-1", 5), "unsupported", "not an IPMI endpoint"),
        (RedfishClient(REDFISH, "", "pw-1", 5), "auth", "no user name"),
        (RedfishClient(REDFISH, "admin", "", 5), "auth", "is empty"),
        (RedfishClient(IPMI, "admin", "pw-1", 5), "unsupported", "not a Redfish endpoint"),
    ],
    ids=[
        "ipmi-no-user",
        "ipmi-no-password",
        "ipmi-password-21-bytes",
        "ipmi-password-22-bytes-11-chars",
        "ipmi-client-redfish-url",
        "redfish-no-user",
        "redfish-no-password",
        "redfish-client-ipmi-url",
    ],
)
def test_validate_refuses_offline(
    client: BmcClient, reason: str, words: str, no_network: None
) -> None:
    with pytest.raises(BmcError) as caught:
        client.validate()
    assert caught.value.reason == reason
    assert words in caught.value.message
    assert client._password == "" or client._password not in str(caught.value)


@pytest.mark.parametrize(
    "client",
    [
        IpmiClient(IPMI, "admin", "p" * 20, 5),
        IpmiClient(IPMI, "admin", "ü" * 10, 5),
        # Redfish has no 20-byte limit, and TLS verification waits for the first command.
        RedfishClient(REDFISH, "admin", "p" * 64, 5, verify_tls=True, ca_bundle="/nonexistent"),
    ],
    ids=["ipmi-20-bytes", "ipmi-20-bytes-10-chars", "redfish-long-password-verify-tls"],
)
def test_validate_accepts_offline(client: BmcClient, no_network: None) -> None:
    client.validate()
