"""IPMI 2.0 (RMCP+) BMC client on pyghmi.ipmi.command; one of the two modules importing pyghmi.

pyghmi keeps one session per (host, user, password) for the whole process and answers
synchronously; the fan-out gives each BMC its own client and runs one command at a time on it.
pyghmi's errors are sorted into :class:`BmcError` reasons by :func:`classify`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pyghmi import exceptions as pyghmi_errors
from pyghmi.ipmi import command as ipmi_command
from pyghmi.ipmi.private import session as ipmi_session

from provisioner.bmc.base import (
    CommandClient,
    Fru,
    PowerAction,
    PowerState,
    SelEntry,
    SensorReading,
    severity,
    text_or_none,
)
from provisioner.errors import BmcError

T = TypeVar("T")

_AUTH = (
    "incorrect password",
    "unauthorized name",
    "unauthorized role",
    "invalid rakp4 integrity",
    "invalid integrity check",
    "insufficient privilege",
    "invalid username",
)
_UNSUPPORTED = (
    "invalid command",
    "requested sensor, data, or record not present",
    "not supported in present state",
    "subfunction disabled or unavailable",
    "command illegal for specified sensor",
)
_TIMEOUT = ("timeout", "session no longer connected", "session disconnected")

_POWER = {
    PowerAction.ON: "on",
    PowerAction.OFF: "off",
    PowerAction.SOFT_OFF: "shutdown",
    PowerAction.RESET: "reset",
}
_CHASSIS_CYCLE = 2  # IPMI chassis control: power cycle


def classify(error: BaseException, connected: bool) -> BmcError:
    """Sort a pyghmi/transport failure into a BmcError reason. ``connected``: whether a
    session was up, which separates a dead BMC (unreachable) from a slow one (timeout)."""
    if isinstance(error, BmcError):
        return error
    if isinstance(error, socket.gaierror):
        return BmcError("unreachable", f"cannot resolve the BMC's name: {error.strerror}")
    if isinstance(error, OSError) and not isinstance(error, pyghmi_errors.PyghmiException):
        return BmcError("unreachable", error.strerror or str(error))
    if isinstance(error, pyghmi_errors.UnsupportedFunctionality):
        return BmcError("unsupported", str(error) or "not supported by this BMC")
    text = str(error.args[0]) if error.args and error.args[0] is not None else ""
    lowered = text.lower()
    silent = (
        not text
        or "failed to initialize" in lowered
        or any(marker in lowered for marker in _TIMEOUT)
    )
    if silent:
        if connected:
            return BmcError("timeout", "the BMC stopped answering")
        return BmcError("unreachable", "no answer from the BMC (no IPMI session could start)")
    if any(marker in lowered for marker in _AUTH):
        return BmcError("auth", text)
    if any(marker in lowered for marker in _UNSUPPORTED):
        return BmcError("unsupported", text)
    if isinstance(error, pyghmi_errors.PyghmiException):
        return BmcError("bmc-error", text)
    return BmcError("bmc-error", f"{type(error).__name__}: {text}")


# Get Channel Authentication Capabilities, outside any session (IPMI v2.0 section 22.13):
# RMCP header, IPMI 1.5 session header (no auth, session 0), then the message to the BMC
# (responder 0x20, NetFn App) from remote console 0x81: channel "this one" with the v2.0
# bit, administrator level. Every IPMI BMC answers it; it is how a login starts.
_AUTH_CAPS = bytes.fromhex("0600ff07000000000000000000092018c88100388e04b5")


def _forget_initting(host: str, username: str, password: str, port: int) -> None:
    """Work around pyghmi 1.6.19: it files each new session in ``initting_sessions`` under a
    str key and removes it under a bytes key, so the entry stays. The next login with the
    same credentials then hangs (if the first session lives), returns a dead session (after
    a logout) or hides an auth failure. Dropping the entry after every login avoids all three.
    """
    initting = getattr(ipmi_session.Session, "initting_sessions", None)
    if isinstance(initting, dict):
        initting.pop((host, username, password, port, None), None)


def probe(host: str, port: int, timeout: float) -> None:
    """Fail fast and precisely before a login: ``unreachable`` when the port is closed
    (ICMP port unreachable) or the host has no route, ``timeout`` when nothing answers."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise BmcError("unreachable", f"cannot resolve the BMC's name: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            sock.send(_AUTH_CAPS)
            sock.recv(512)
        except ConnectionRefusedError:
            raise BmcError(
                "unreachable", f"nothing listens on {host}:{port} (port closed)"
            ) from None
        except TimeoutError:  # silence: a hung or overloaded BMC, or a dropped network
            raise BmcError(
                "timeout", f"no answer from {host}:{port} within {timeout:g} s"
            ) from None
        except OSError as exc:
            raise BmcError("unreachable", exc.strerror or str(exc)) from None


class IpmiClient(CommandClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._command: Any = None
        self._answered = False  # has this BMC ever answered us? (dead vs slow)

    def validate(self) -> None:
        super().validate()
        if self.endpoint.protocol != "ipmi":
            raise BmcError("unsupported", f"{self.endpoint} is not an IPMI endpoint")
        if len(self._password.encode()) > 20:
            raise BmcError("auth", "IPMI passwords are at most 20 bytes")

    # ------------------------------------------------------------------ session

    def _session(self) -> Any:
        if self._command is None:
            probe(self.endpoint.host, self.endpoint.port, min(self.timeout, 5.0))
            try:
                self._command = ipmi_command.Command(
                    bmc=self.endpoint.host,
                    userid=self.username,
                    password=self._password,
                    port=self.endpoint.port,
                )
            except Exception as exc:  # pyghmi raises bare Exception subclasses
                raise classify(exc, connected=False) from None
            finally:
                _forget_initting(
                    self.endpoint.host, self.username, self._password, self.endpoint.port
                )
        return self._command

    def _call(self, action: Callable[[Any], T]) -> T:
        self.before_command()
        session = self._session()
        try:
            result = action(session)
        except BmcError:
            raise
        except Exception as exc:
            if "no longer connected" in str(exc).lower():
                self._command = None  # the next call logs in again
            raise classify(exc, connected=self._answered) from None
        self._answered = True
        return result

    def close(self) -> None:
        session, self._command = self._command, None
        if session is not None:
            with contextlib.suppress(Exception):  # a BMC that is gone needs no logout
                session.ipmi_session.logout()

    # ------------------------------------------------------------------ power

    def set_power(self, action: PowerAction) -> None:
        if action is PowerAction.CYCLE:
            if self.get_power_state() is PowerState.OFF:
                self._call(lambda c: c.set_power("on"))
                return
            response = self._call(
                lambda c: c.raw_command(netfn=0, command=2, data=[_CHASSIS_CYCLE])
            )
            if "error" in response:
                raise classify(pyghmi_errors.IpmiException(response["error"]), connected=True)
            return
        self._call(lambda c: c.set_power(_POWER[action]))

    # ------------------------------------------------------------------ inventory

    def get_fru(self) -> Fru:
        data: dict[str, Any] = self._call(lambda c: c.get_inventory_of_component("System")) or {}
        return Fru(
            serial=text_or_none(data.get("Serial Number") or data.get("Chassis serial number")),
            product=text_or_none(data.get("Product name") or data.get("Model")),
            manufacturer=text_or_none(data.get("Manufacturer") or data.get("Board manufacturer")),
            board_serial=text_or_none(data.get("Board serial number")),
            part_number=text_or_none(data.get("Model") or data.get("Board model")),
            uuid=text_or_none(data.get("UUID")),
        )

    def get_sel(self) -> list[SelEntry]:
        return _sel(self._call(lambda c: list(c.get_event_log(clear=False))))

    def clear_sel(self) -> list[SelEntry]:
        return _sel(self._call(lambda c: list(c.get_event_log(clear=True))))

    def get_sensors(self) -> list[SensorReading]:
        readings = self._call(lambda c: list(c.get_sensor_data()))
        return [
            SensorReading(
                name=str(reading.name),
                kind=_kind(str(getattr(reading, "type", ""))),
                value=float(reading.value) if reading.value is not None else None,
                units=str(reading.units or ""),
                health=severity(reading.health),
                states=tuple(str(state) for state in reading.states or ()),
            )
            for reading in readings
        ]


def _sel(events: Iterable[dict[str, Any]]) -> list[SelEntry]:
    out = []
    for number, event in enumerate(events):
        out.append(
            SelEntry(
                id=str(event.get("record_id", number)),
                timestamp=text_or_none(event.get("timestamp")),
                component=str(event.get("component") or event.get("component_type") or ""),
                event=str(event.get("event") or event.get("event_data") or ""),
                severity=severity(event.get("severity")),
            )
        )
    return out


def _kind(sensor_type: str) -> str:
    lowered = sensor_type.lower()
    for marker, kind in (
        ("temperature", "temperature"),
        ("fan", "fan"),
        ("power supply", "power_supply"),
        ("voltage", "voltage"),
        ("current", "power"),
    ):
        if marker in lowered:
            return kind
    return "other"
