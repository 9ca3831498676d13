"""What provisioner asks of a BMC, as three small interfaces and the values they return.

A BMC client (IPMI in ``ipmi.py``, Redfish in ``redfish.py``) implements all three:

* :class:`PowerInterface`: read the power state, change it (waiting for a state is the
  fan-out's, polling with the BMC free between polls: ``operations.power(wait=)``);
* :class:`BootInterface`: the next boot from the network (once) or from disk;
* :class:`InventoryInterface`: FRU identity, the system event log, sensors.

``validate()`` checks what can be checked without the network (never touches the BMC). Every
failure is a :class:`~provisioner.errors.BmcError` with a reason; no method logs or returns
the password it was given.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from provisioner.errors import BmcError
from provisioner.spec.types import BmcEndpoint

T = TypeVar("T")


class PowerState(StrEnum):
    ON = "on"
    OFF = "off"


class PowerAction(StrEnum):
    ON = "on"
    OFF = "off"  # hard: the BMC cuts power
    SOFT_OFF = "soft-off"  # ACPI shutdown request to the OS
    CYCLE = "cycle"  # off, then on (on if it was off)
    RESET = "reset"  # hard reset, power stays on


class BootDevice(StrEnum):
    NETWORK = "network"
    DISK = "disk"


@dataclass(frozen=True, slots=True)
class Fru:
    """A system's identity as its BMC reports it (FRU 0 / the Redfish System)."""

    serial: str | None
    product: str | None
    manufacturer: str | None
    board_serial: str | None = None
    part_number: str | None = None
    uuid: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "serial": self.serial,
            "product": self.product,
            "manufacturer": self.manufacturer,
            "board_serial": self.board_serial,
            "part_number": self.part_number,
            "uuid": self.uuid,
        }


@dataclass(frozen=True, slots=True)
class SelEntry:
    """One system event log record."""

    id: str
    timestamp: str | None
    component: str
    event: str
    severity: str  # "ok", "warning", "critical", "unknown"

    def as_dict(self) -> dict[str, str | None]:
        return {
            "id": self.id,
            "timestamp": self.timestamp,
            "component": self.component,
            "event": self.event,
            "severity": self.severity,
        }


@dataclass(frozen=True, slots=True)
class SensorReading:
    name: str
    kind: str  # "temperature", "fan", "power_supply", "voltage", "power", "other"
    value: float | None
    units: str
    health: str  # "ok", "warning", "critical", "unknown"
    states: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "value": self.value,
            "units": self.units,
            "health": self.health,
            "states": list(self.states),
        }


class PowerInterface(ABC):
    @abstractmethod
    def get_power_state(self) -> PowerState: ...

    @abstractmethod
    def set_power(self, action: PowerAction) -> None:
        """Ask for a power change and return once the BMC accepted it."""


class BootInterface(ABC):
    @abstractmethod
    def set_boot_device(
        self, device: BootDevice, *, persistent: bool = False, uefi: bool = True
    ) -> None:
        """Boot from ``device`` next time (every time when ``persistent``)."""


class InventoryInterface(ABC):
    @abstractmethod
    def get_fru(self) -> Fru: ...

    @abstractmethod
    def get_sel(self) -> list[SelEntry]: ...

    @abstractmethod
    def clear_sel(self) -> list[SelEntry]:
        """Clear the event log; returns what it held (fetched and cleared in one go)."""

    @abstractmethod
    def get_sensors(self) -> list[SensorReading]: ...


class BmcClient(PowerInterface, BootInterface, InventoryInterface):
    """A connection to one BMC. Not shared between threads: the fan-out keeps one per BMC
    and runs at most one command on it at a time."""

    def __init__(self, endpoint: BmcEndpoint, username: str, password: str, timeout: float):
        self.endpoint = endpoint
        self.username = username
        self._password = password
        self.timeout = timeout
        # Called before every command sent to the BMC: the fan-out paces each BMC with it.
        self.before_command: Callable[[], None] = _nothing

    def validate(self) -> None:
        """Offline checks only: credentials present, endpoint usable by this client."""
        if not self.username:
            raise BmcError("auth", f"no user name for {self.endpoint}")
        if not self._password:
            raise BmcError("auth", f"the password for {self.endpoint} is empty")

    def close(self) -> None:
        """Release the session, if the client keeps one."""

    def __repr__(self) -> str:  # never shows the password
        return f"{type(self).__name__}({self.endpoint.url}, user={self.username!r})"


class CommandClient(BmcClient):
    """What the IPMI and Redfish clients share: pyghmi gives both transports the same
    ``Command`` API for power state and boot device, reached through ``_call``."""

    @abstractmethod
    def _call(self, action: Callable[[Any], T]) -> T:
        """Run ``action(command)`` on the logged-in pyghmi command, errors as BmcError."""

    def get_power_state(self) -> PowerState:
        state = self._call(lambda c: c.get_power())["powerstate"]
        return PowerState.ON if state == "on" else PowerState.OFF

    def set_boot_device(
        self, device: BootDevice, *, persistent: bool = False, uefi: bool = True
    ) -> None:
        target = "network" if device is BootDevice.NETWORK else "hd"
        self._call(lambda c: c.set_bootdev(target, persist=persistent, uefiboot=uefi))


def _nothing() -> None:
    return None


def text_or_none(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def severity(value: object) -> str:
    """pyghmi's health codes (Ok 0, Warning 1, Critical 2, Failed 4) or words -> our words."""
    if isinstance(value, int) and not isinstance(value, bool):
        return {0: "ok", 1: "warning", 2: "critical", 4: "critical"}.get(value, "unknown")
    return health_of(str(value) if value is not None else None)


def health_of(text: str | None) -> str:
    value = (text or "").lower()
    if value in ("ok", "normal"):
        return "ok"
    if value in ("warning", "noncritical", "non-critical"):
        return "warning"
    if value in ("critical", "failed", "nonrecoverable", "non-recoverable"):
        return "critical"
    return "unknown"
