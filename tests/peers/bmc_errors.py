"""Record what pyghmi really raises against the BMC peers: the data of
tests/data/bmc/errors.json, which tests/unit/test_bmc_classify.py replays into ``classify``.

Each case provokes one failure on a real peer (ipmi_sim, the sushy-tools emulator, the UDP
fault proxy, a dead port) through pyghmi's own client, the way ``IpmiClient`` and
``RedfishClient`` call it, and keeps the exception as ``type`` (module.qualname), ``args`` and
the attributes pyghmi or ssl set on it. ``connected`` says whether a session was up when it
was raised (what the clients pass to ``classify``). The expected reasons are not recorded:
they are written by hand into the data file.

    python -m tests.peers.bmc_errors [--fast] > recorded.json

``--fast`` leaves out the cases that wait out a timeout (2-30 s each).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyghmi.ipmi import command as ipmi_command
from pyghmi.redfish import command as redfish_command
from pyghmi.util import webclient

from provisioner.bmc.ipmi import _forget_initting
from tests.peers import LOOPBACK, dead_tcp_port, dead_udp_port
from tests.peers.ipmi_sim import IpmiSim, IpmiSimFactory
from tests.peers.sushy import SushyEmulator, start_sushy, stop_sushy
from tests.peers.udp_proxy import UdpFaultProxy

# Attributes worth keeping beside ``args``: IPMI completion code, Redfish message id, the
# ssl library's reason and library names.
ATTRIBUTES = ("ipmicode", "msgid", "reason", "library")
# A system name with digits that once read as an HTTP status: pyghmi puts the URL in errors.
SYSTEM_NAME = "gpu-r2-401"
HTTPS_TIMEOUT = 2.0  # pyghmi's HTTPS timeout is 60 s; the silent-server cases lower it


@dataclass(frozen=True)
class Case:
    name: str
    client: str  # "ipmi" or "redfish"
    how: str
    connected: bool
    provoke: Callable[[], object]
    slow: bool = False


def exception_record(error: BaseException) -> dict[str, Any]:
    kind = type(error)
    attrs = {
        name: getattr(error, name)
        for name in ATTRIBUTES
        if isinstance(getattr(error, name, None), (int, str))
    }
    return {
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "args": list(error.args),
        "attrs": attrs,
    }


def rebuild(record: dict[str, Any]) -> BaseException:
    """The recorded exception again: its type called with its args, its attributes set."""
    module, _, name = record["type"].rpartition(".")
    kind = getattr(importlib.import_module(module), name)
    error: BaseException = kind(*record["args"])
    for attribute, value in record["attrs"].items():
        setattr(error, attribute, value)
    return error


def _ipmi(sim: IpmiSim, *, port: int | None = None, **overrides: str) -> Any:
    args = {"bmc": sim.host, "userid": sim.username, "password": sim.password}
    args.update(overrides)
    try:
        return ipmi_command.Command(port=port or sim.port, **args)
    finally:  # as IpmiClient does: pyghmi 1.6.19 would reuse a half-made session
        _forget_initting(args["bmc"], args["userid"], args["password"], port or sim.port)


@contextlib.contextmanager
def _short_https_timeout() -> Iterator[None]:
    original = webclient.SecureHTTPConnection.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["timeout"] = HTTPS_TIMEOUT
        original(self, *args, **kwargs)

    webclient.SecureHTTPConnection.__init__ = init
    try:
        yield
    finally:
        webclient.SecureHTTPConnection.__init__ = original


def _silent_tls_server() -> Any:
    """Accepts TCP connections (the kernel's backlog) and never answers: a hung web server."""
    with socket.socket() as server, _short_https_timeout():
        server.bind((LOOPBACK, 0))
        server.listen(4)
        return redfish_command.Command(
            bmc=LOOPBACK,
            port=server.getsockname()[1],
            userid="a",
            password="b",
            verifycallback=lambda cert: True,
        )


def _stopped_emulator(emulator: SushyEmulator) -> Any:
    """A session that worked, then the emulator's process hangs (SIGSTOP)."""
    with _short_https_timeout():
        bmc = redfish_command.Command(**emulator.pyghmi_args(0))
        bmc.get_power()
        os.killpg(emulator.process.pid, signal.SIGSTOP)
        try:
            return bmc._do_web_request(bmc.sysurl, cache=False)
        finally:
            os.killpg(emulator.process.pid, signal.SIGCONT)


def _blackholed_session(sim: IpmiSim) -> Any:
    proxy = UdpFaultProxy(sim.port).start()
    try:
        bmc = _ipmi(sim, port=proxy.port)
        bmc.get_power()
        proxy.blackhole = True
        return bmc.get_power()
    finally:
        proxy.stop()


def _blackholed_login(sim: IpmiSim) -> Any:
    proxy = UdpFaultProxy(sim.port, blackhole=True).start()
    try:
        return _ipmi(sim, port=proxy.port)
    finally:
        proxy.stop()


def _dead_ipmi(sim: IpmiSim) -> Any:
    with dead_udp_port() as port:
        return _ipmi(sim, port=port)


def _dead_https(emulator: SushyEmulator) -> Any:
    with dead_tcp_port() as port:
        return redfish_command.Command(**{**emulator.pyghmi_args(0), "port": port})


def cases(sim: IpmiSim, emulator: SushyEmulator) -> list[Case]:
    def session() -> Any:
        return _ipmi(sim)

    def redfish(**overrides: Any) -> Any:
        return redfish_command.Command(**{**emulator.pyghmi_args(0), **overrides})

    missing = "/redfish/v1/Systems/no-such-system"
    renamed = f"/redfish/v1/Systems/{emulator.systems[0].name}"
    return [
        Case(
            "ipmi-wrong-password",
            "ipmi",
            "login, wrong password",
            False,
            lambda: _ipmi(sim, password="wrong-pw"),
        ),
        Case(
            "ipmi-unknown-user",
            "ipmi",
            "login, a user the BMC does not have",
            False,
            lambda: _ipmi(sim, userid="nobody"),
        ),
        Case(
            "ipmi-no-such-host",
            "ipmi",
            "login to a name that does not resolve",
            False,
            lambda: _ipmi(sim, bmc="no-such-bmc.invalid"),
        ),
        Case(
            "ipmi-dead-port",
            "ipmi",
            "login to a UDP port nobody serves",
            False,
            lambda: _dead_ipmi(sim),
            slow=True,
        ),
        Case(
            "ipmi-login-blackholed",
            "ipmi",
            "login through a proxy that drops everything",
            False,
            lambda: _blackholed_login(sim),
            slow=True,
        ),
        Case(
            "ipmi-session-blackholed",
            "ipmi",
            "get_power after the proxy began dropping",
            True,
            lambda: _blackholed_session(sim),
            slow=True,
        ),
        Case(
            "ipmi-invalid-command",
            "ipmi",
            "raw netfn 30h command 99h (OEM, not there)",
            True,
            lambda: session().xraw_command(netfn=0x30, command=0x99),
        ),
        Case(
            "ipmi-record-not-present",
            "ipmi",
            "Get SEL Entry 9999h",
            True,
            lambda: session().xraw_command(
                netfn=0x0A, command=0x43, data=[0, 0, 0x99, 0x99, 0, 0xFF]
            ),
        ),
        Case(
            "ipmi-invalid-data-field",
            "ipmi",
            "Read FRU Data of FRU 5 (none there)",
            True,
            lambda: session().xraw_command(netfn=0x0A, command=0x10, data=[5]),
        ),
        Case(
            "ipmi-request-length",
            "ipmi",
            "Chassis Control without its data byte",
            True,
            lambda: session().xraw_command(netfn=0, command=2, data=[]),
        ),
        Case(
            "ipmi-parameter-unsupported",
            "ipmi",
            "Get LAN Configuration parameter C0h",
            True,
            lambda: session().xraw_command(netfn=0x0C, command=2, data=[1, 0xC0, 0, 0]),
        ),
        Case(
            "ipmi-sensor-not-found",
            "ipmi",
            "get_sensor_reading of a name not in the SDR",
            True,
            lambda: session().get_sensor_reading("no such sensor"),
        ),
        Case(
            "redfish-wrong-password",
            "redfish",
            "login, wrong password",
            False,
            lambda: redfish(password="wrong-pw"),
        ),
        Case(
            "redfish-no-such-host",
            "redfish",
            "login to a name that does not resolve",
            False,
            lambda: redfish(bmc="no-such-bmc.invalid"),
        ),
        Case(
            "redfish-dead-port",
            "redfish",
            "login to a TCP port nobody listens on",
            False,
            lambda: _dead_https(emulator),
        ),
        Case(
            "redfish-not-tls",
            "redfish",
            "HTTPS to ipmi_sim's telnet console port",
            False,
            lambda: redfish(port=sim.console_port),
        ),
        Case(
            "redfish-certificate-rejected",
            "redfish",
            "the certificate callback refuses (a pinned certificate changed)",
            False,
            lambda: redfish(verifycallback=lambda cert: False),
        ),
        Case(
            "redfish-silent-server",
            "redfish",
            f"TLS handshake with a server that never answers ({HTTPS_TIMEOUT:g} s)",
            False,
            _silent_tls_server,
            slow=True,
        ),
        Case(
            "redfish-emulator-hung",
            "redfish",
            f"GET after SIGSTOP of the emulator, in a session ({HTTPS_TIMEOUT:g} s)",
            True,
            lambda: _stopped_emulator(emulator),
            slow=True,
        ),
        Case(
            "redfish-no-such-system",
            "redfish",
            f"get_power on {missing} (HTTP 404)",
            True,
            lambda: redfish(sysurl=missing).get_power(),
        ),
        Case(
            "redfish-name-path",
            "redfish",
            f"get_power on {renamed} (HTTP 307 to the UUID path, not followed)",
            True,
            lambda: redfish(sysurl=renamed).get_power(),
        ),
        Case(
            "redfish-push-power-button",
            "redfish",
            "Reset PushPowerButton (HTTP 501)",
            True,
            lambda: _reset(redfish(), "PushPowerButton"),
        ),
        Case(
            "redfish-bad-patch",
            "redfish",
            "set_bootdev('default') (HTTP 400)",
            True,
            lambda: redfish().set_bootdev("default"),
        ),
    ]


def _reset(bmc: Any, reset_type: str) -> Any:
    return bmc._do_web_request(bmc.powerurl, {"ResetType": reset_type})


def record(fast: bool = False) -> list[dict[str, Any]]:
    """Run every case against fresh peers; one record per case, in order."""
    factory = IpmiSimFactory()
    emulator = start_sushy(1, names=[SYSTEM_NAME])
    try:
        (sim,) = factory.start(1)
        out = []
        for case in cases(sim, emulator):
            if fast and case.slow:
                continue
            try:
                case.provoke()
            except Exception as exc:  # what is recorded
                error: BaseException = exc
            else:
                raise RuntimeError(f"{case.name}: no error raised")
            out.append(
                {
                    "case": case.name,
                    "client": case.client,
                    "how": case.how,
                    "connected": case.connected,
                    **exception_record(error),
                }
            )
        return out
    finally:
        stop_sushy(emulator)
        factory.stop_all()


def main() -> None:
    json.dump(record(fast="--fast" in sys.argv[1:]), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
