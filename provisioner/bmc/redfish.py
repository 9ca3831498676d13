"""Redfish BMC client on pyghmi.redfish.command; one of the two modules importing pyghmi.

TLS: pyghmi checks a BMC's certificate through a callback. With ``verify_tls`` the client
first makes its own TLS handshake with full chain and host-name verification (Python's ssl,
against ``ca_bundle`` or the system's CAs), then pins pyghmi to exactly the certificate that
passed. Without it (labs, factory certificates) any certificate is accepted.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

from pyghmi import exceptions as pyghmi_errors
from pyghmi.redfish import command as redfish_command

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

_POWER = {
    PowerAction.ON: "On",
    PowerAction.OFF: "ForceOff",
    PowerAction.SOFT_OFF: "GracefulShutdown",
    PowerAction.RESET: "ForceRestart",
}


def classify(error: BaseException, connected: bool) -> BmcError:
    """Sort a pyghmi/HTTPS failure into a BmcError reason. pyghmi keeps no HTTP status in
    what it raises (the Redfish message, or the URL and the body), so words decide: a bare
    "401" or "404" would match a URL or UUID in the message (``/Systems/gpu-r2-401``)."""
    if isinstance(error, BmcError):
        return error
    if isinstance(error, socket.gaierror):
        return BmcError("unreachable", f"cannot resolve the BMC's name: {error.strerror}")
    if isinstance(error, (TimeoutError, socket.timeout)):
        return BmcError("timeout" if connected else "unreachable", "no answer in time")
    if isinstance(error, ssl.SSLError):
        return BmcError("unreachable", f"TLS: {error.reason or error}")
    if isinstance(error, OSError):
        return BmcError("unreachable", error.strerror or str(error))
    if isinstance(error, pyghmi_errors.UnrecognizedCertificate):  # the pin did not match
        return BmcError(
            "unreachable", "TLS: the BMC's certificate is not the one verified before the login"
        )
    if isinstance(error, pyghmi_errors.UnsupportedFunctionality):
        return BmcError("unsupported", str(error) or "not supported by this BMC")
    text = str(error)
    lowered = text.lower()
    if any(word in lowered for word in ("unauthorized", "authentication", "access denied")):
        return BmcError("auth", "the BMC refused the user name or password (HTTP 401)")
    if "redfish not ready" in lowered:
        return BmcError("unreachable", "no Redfish service answered")
    if "not found" in lowered or "notsupported" in lowered.replace(" ", ""):
        return BmcError("unsupported", text)
    return BmcError("bmc-error", text or type(error).__name__)


def verified_fingerprint(host: str, port: int, ca_bundle: str | None, timeout: float) -> str:
    """SHA-256 of the BMC's certificate after a fully verified TLS handshake."""
    context = ssl.create_default_context(cafile=ca_bundle)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise BmcError(
            "unreachable",
            f"TLS certificate of {host}:{port} not trusted ({exc.verify_message}); "
            "set bmc.ca_bundle, or bmc.verify_tls: false for lab BMCs",
        ) from None
    except OSError as exc:
        raise classify(exc, connected=False) from None
    if not der:
        raise BmcError("unreachable", f"{host}:{port} sent no certificate")
    return hashlib.sha256(der).hexdigest()


class RedfishClient(CommandClient):
    def __init__(
        self,
        *args: Any,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.verify_tls = verify_tls
        self.ca_bundle = ca_bundle
        self._command: Any = None

    def validate(self) -> None:
        super().validate()
        if self.endpoint.protocol != "redfish":
            raise BmcError("unsupported", f"{self.endpoint} is not a Redfish endpoint")

    def _checker(self) -> Callable[[bytes], bool]:
        if not self.verify_tls:
            return lambda certificate: True
        pinned = verified_fingerprint(
            self.endpoint.host, self.endpoint.port, self.ca_bundle, self.timeout
        )
        return lambda certificate: hashlib.sha256(certificate).hexdigest() == pinned

    def _session(self) -> Any:
        if self._command is None:
            # pyghmi's HTTPS connections carry their own 60 s socket timeout; the fan-out's
            # deadline bounds how long anyone waits for them.
            try:
                self._command = redfish_command.Command(
                    bmc=self.endpoint.host,
                    userid=self.username,
                    password=self._password,
                    verifycallback=self._checker(),
                    sysurl=self.endpoint.system,
                    port=self.endpoint.port,
                )
            except Exception as exc:
                raise classify(exc, connected=False) from None
        return self._command

    def _call(self, action: Callable[[Any], T]) -> T:
        self.before_command()
        session = self._session()
        try:
            return action(session)
        except BmcError:
            raise
        except Exception as exc:
            raise classify(exc, connected=True) from None

    # ------------------------------------------------------------------ power

    def set_power(self, action: PowerAction) -> None:
        if action is PowerAction.CYCLE:
            if self.get_power_state() is PowerState.OFF:
                self._reset("On")
            else:
                self._reset("PowerCycle" if "PowerCycle" in self._allowed() else "ForceRestart")
            return
        if action is PowerAction.ON and self.get_power_state() is PowerState.ON:
            return
        if action is PowerAction.OFF and self.get_power_state() is PowerState.OFF:
            return
        self._reset(_POWER[action])

    def _reset(self, reset_type: str) -> None:
        self._call(lambda c: c._do_web_request(c.powerurl, {"ResetType": reset_type}))

    def _allowed(self) -> list[str]:
        info = self._call(lambda c: c._do_web_request(c.sysurl, cache=False))
        action = info.get("Actions", {}).get("#ComputerSystem.Reset", {})
        return list(action.get("ResetType@Redfish.AllowableValues", []))

    # ------------------------------------------------------------------ inventory

    def get_fru(self) -> Fru:
        info = self._call(lambda c: c._do_web_request(c.sysurl, cache=False))
        return Fru(
            serial=text_or_none(info.get("SerialNumber")),
            product=text_or_none(info.get("Model")),
            manufacturer=text_or_none(info.get("Manufacturer")),
            board_serial=self._board_serial(info),
            part_number=text_or_none(info.get("PartNumber") or info.get("SKU")),
            uuid=text_or_none(info.get("UUID")),
        )

    def _board_serial(self, system: dict[str, Any]) -> str | None:
        """A Redfish System has no board FRU: the board's serial is that of the Chassis the
        System links to (the first, as pyghmi's own inventory takes it), when it has one."""
        links = system.get("Links", {}).get("Chassis") or [{}]
        url = links[0].get("@odata.id") if isinstance(links[0], dict) else None
        if not url:
            return None
        try:
            chassis = self._call(lambda c: c._do_web_request(url))
        except BmcError as exc:
            if exc.reason == "unsupported":  # the link leads nowhere: no board serial known
                return None
            raise
        return text_or_none(chassis.get("SerialNumber"))

    def get_sel(self) -> list[SelEntry]:
        return self._events(clear=False)

    def clear_sel(self) -> list[SelEntry]:
        return self._events(clear=True)

    def _events(self, clear: bool) -> list[SelEntry]:
        # pyghmi reads the manager's LogServices and, without them, quietly returns nothing:
        # an empty log, "cleared", from a BMC that has no log at all.
        manager = self._call(lambda c: c._do_web_request(c._bmcurl) if c._bmcurl else {})
        if not manager.get("LogServices"):
            raise BmcError("unsupported", "no event log: the BMC's manager has no LogServices")
        events = self._call(lambda c: list(c.get_event_log(clear=clear)))
        return [
            SelEntry(
                id=str(event.get("id", number)),
                timestamp=text_or_none(event.get("timestamp")),
                component=str(event.get("component") or ""),
                event=str(event.get("event") or event.get("message") or ""),
                severity=severity(event.get("severity")),  # pyghmi's health codes
            )
            for number, event in enumerate(events)
        ]

    def get_sensors(self) -> list[SensorReading]:
        readings = self._call(lambda c: list(c.get_sensor_data()))
        out = []
        for reading in readings:
            name = str(reading.name)
            units = str(reading.units or "")
            lowered = f"{name} {units}".lower()
            kind = (
                "temperature"
                if "°c" in lowered or "temp" in lowered
                else "fan"
                if "rpm" in lowered or "fan" in lowered
                else "power_supply"
                if "psu" in lowered or "power supply" in lowered
                else "other"
            )
            out.append(
                SensorReading(
                    name=name,
                    kind=kind,
                    value=float(reading.value) if reading.value is not None else None,
                    units=units,
                    health=severity(getattr(reading, "health", None)),
                    states=tuple(str(state) for state in reading.states or ()),
                )
            )
        return out
