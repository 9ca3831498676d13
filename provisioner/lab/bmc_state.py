"""What a simulated lab BMC knows about its machine, and that knowledge as IPMI bytes.

This is part of a FAKE BMC (the lab has no hardware): :class:`MachineState` holds power, the
boot override, FRU fields, a SEL and a few sensors; the functions below encode them as a real
BMC would put them on the wire (IPMI 2.0 and the Platform Management FRU Information Storage
Definition 1.0): the FRU 0 image, type-1 (full) sensor data records, sensor readings and
16-byte SEL records. Pure data and pure functions; no sockets, no pyghmi.
"""

from __future__ import annotations

import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

PowerAction = Literal["on", "off", "soft", "cycle", "reset", "diag"]
PowerCallback = Callable[["MachineState", PowerAction], None]

# Boot device selector (Set System Boot Options, parameter 5, data 2 bits 5:2) -> name.
BOOT_DEVICES: dict[int, str] = {
    0x0: "default",
    0x1: "network",
    0x2: "hd",
    0x3: "safe",
    0x4: "diag",
    0x5: "optical",
    0x6: "setup",
    0x7: "remote-floppy",
    0x8: "remote-media",
    0x9: "remote-optical",
    0xB: "remote-hd",
    0xF: "floppy",
}
BOOT_SELECTORS: dict[str, int] = {name: number for number, name in BOOT_DEVICES.items()}

SENSOR_OWNER = 0x20  # the BMC's IPMB slave address: SDR owner and SEL generator id
SDR_VERSION = 0x51
TEMPERATURE, FAN, POWER_SUPPLY = 0x01, 0x04, 0x08  # IPMI sensor type codes (table 42-3)
CELSIUS, RPM = 1, 18  # IPMI unit codes (table 43-15)
THRESHOLD_READING, SENSOR_SPECIFIC = 0x01, 0x6F  # event/reading type codes (table 42-1)
PSU_PRESENT, PSU_FAILED = 0x01, 0x02  # power-supply offsets 0 and 1 as state bits
_FRU_EPOCH = 820454400  # 1996-01-01T00:00Z: FRU dates count minutes from here


@dataclass
class Sensor:
    """One sensor: a threshold sensor (``value`` in its unit) or a discrete one (``states``)."""

    number: int
    name: str  # at most 16 characters on the wire
    sensor_type: int
    entity: int
    unit: int = 0
    scale: int = 1  # the record's M factor: a raw byte means ``raw * scale`` units
    value: float = 0.0
    states: int = 0  # discrete sensors: bit n set = offset n asserted
    upper_critical: float | None = None
    upper_noncritical: float | None = None
    lower_critical: float | None = None

    @property
    def discrete(self) -> bool:
        return self.unit == 0


def default_sensors() -> list[Sensor]:
    """A small GPU node's sensors: inlet/CPU/GPU temperatures, two fans, two PSUs."""
    return [
        Sensor(1, "Inlet Temp", TEMPERATURE, 0x37, CELSIUS, 1, 24.0, 0, 45.0, 40.0),
        Sensor(2, "CPU1 Temp", TEMPERATURE, 0x03, CELSIUS, 1, 46.0, 0, 95.0, 85.0),
        Sensor(3, "GPU1 Temp", TEMPERATURE, 0x0B, CELSIUS, 1, 38.0, 0, 90.0, 83.0),
        Sensor(4, "FAN1", FAN, 0x1D, RPM, 100, 8400.0, lower_critical=1000.0),
        Sensor(5, "FAN2", FAN, 0x1D, RPM, 100, 8300.0, lower_critical=1000.0),
        Sensor(6, "PSU1 Status", POWER_SUPPLY, 0x0A, states=PSU_PRESENT),
        Sensor(7, "PSU2 Status", POWER_SUPPLY, 0x0A, states=PSU_PRESENT),
    ]


@dataclass(frozen=True)
class SelEntry:
    """One system event record (type 02h) as the BMC logged it."""

    record_id: int
    timestamp: int  # seconds since 1970 (the SEL's clock)
    sensor_type: int
    sensor_number: int
    event_type: int  # event/reading type code, e.g. 0x6F sensor-specific, 0x01 threshold
    event_data: tuple[int, int, int]
    deassertion: bool = False


@dataclass
class MachineState:
    """The machine behind one fake BMC. Safe to read and change from any thread.

    ``on_power(state, action)`` is called after every power change that happened (not for a
    power-on of a running machine); it runs on the BMC server's loop thread, so it must hand
    long work (starting a container) to another thread. If it raises, the error is logged and
    the client gets completion code FFh; the state change stands. On a power-on, cycle or
    reset the boot override in force is copied to ``last_boot_device``/``last_boot_uefi``
    before the callback runs, and a one-time (non-persistent) override is then cleared, as
    real BMCs do. Sensor values and states may be changed at any time; readings follow.
    """

    power: Literal["on", "off"] = "off"
    boot_device: str = "default"
    boot_persistent: bool = False
    boot_uefi: bool = False
    manufacturer: str = "Provisioner Lab"
    product_name: str = "Lab GPU Node"
    product_serial: str = "LAB-0000"
    board_serial: str = "LAB-BOARD-0000"
    board_part_number: str = "LAB-MB-1"
    chassis_serial: str = "LAB-CHASSIS-0000"
    system_guid: uuid.UUID = field(default_factory=uuid.uuid4)
    sensors: list[Sensor] = field(default_factory=default_sensors)
    sel: list[SelEntry] = field(default_factory=list)
    on_power: PowerCallback | None = None
    last_boot_device: str | None = None
    last_boot_uefi: bool = False
    power_changes: int = 0
    sel_erased_at: int = 0
    _next_record_id: int = field(default=1, init=False, repr=False)
    lock: threading.RLock = field(
        default_factory=threading.RLock, init=False, repr=False, compare=False
    )

    def set_boot(self, device: str, *, persistent: bool = False, uefi: bool = False) -> None:
        """Set (or with ``"default"`` clear) the boot override, as Set Boot Options param 5."""
        if device not in BOOT_SELECTORS:
            raise ValueError(f"unknown boot device {device!r}")
        with self.lock:
            self.boot_device = device
            override = device != "default"
            self.boot_persistent = persistent and override
            self.boot_uefi = uefi and override

    def power_control(self, action: PowerAction) -> bool:
        """Carry out a chassis control action; False when the action makes no sense now.

        ``cycle``, ``reset`` and ``diag`` need a running machine (a real BMC answers D5h,
        "not supported in present state"); ``on`` of a running or ``off`` of a stopped
        machine succeeds and changes nothing.
        """
        with self.lock:
            running = self.power == "on"
            if action in ("cycle", "reset", "diag") and not running:
                return False
            if action == "diag" or (action == "on") == running:
                return True
            if action in ("off", "soft"):
                self.power = "off"
            else:
                self.power = "on"
                self.last_boot_device = self.boot_device
                self.last_boot_uefi = self.boot_uefi
                if not self.boot_persistent:
                    self.boot_device, self.boot_uefi = "default", False
            self.power_changes += 1
            callback = self.on_power
        if callback is not None:
            callback(self, action)
        return True

    def add_sel_event(
        self,
        sensor_type: int,
        sensor_number: int,
        offset: int = 0,
        *,
        event_type: int = SENSOR_SPECIFIC,
        deassertion: bool = False,
        event_data: tuple[int, int, int] | None = None,
        timestamp: float | None = None,
    ) -> SelEntry:
        """Log a system event; ``event_data`` overrides the default ``(offset, FFh, FFh)``."""
        data = event_data if event_data is not None else (offset & 0x0F, 0xFF, 0xFF)
        with self.lock:
            entry = SelEntry(
                record_id=self._next_record_id,
                timestamp=int(time.time() if timestamp is None else timestamp),
                sensor_type=sensor_type,
                sensor_number=sensor_number,
                event_type=event_type,
                event_data=data,
                deassertion=deassertion,
            )
            self._next_record_id = self._next_record_id % 0xFFFE + 1
            self.sel.append(entry)
        return entry

    def clear_sel(self) -> None:
        with self.lock:
            self.sel.clear()
            self.sel_erased_at = int(time.time())

    def sensor(self, name: str) -> Sensor:
        for sensor in self.sensors:
            if sensor.name == name:
                return sensor
        raise KeyError(name)


# --- FRU 0 -------------------------------------------------------------------------------


def _fru_field(text: str) -> bytes:
    """A type/length byte (8-bit ASCII + Latin-1) and the text; C1h alone means 'end'."""
    raw = text.encode("latin-1", "replace")[:63]
    if len(raw) == 1:
        raw += b" "  # a one-byte field would read as the end-of-fields marker
    return bytes([0xC0 | len(raw)]) + raw


def _fru_area(body: bytes) -> bytes:
    """Close an area: end marker, zero pad to 8-byte multiple, zero checksum."""
    data = bytearray(body) + b"\xc1"
    data += bytes(-(len(data) + 1) % 8)
    data[1] = (len(data) + 1) // 8
    return bytes(data) + bytes([-sum(data) & 0xFF])


def fru_image(state: MachineState) -> bytes:
    """FRU 0 of the machine: common header, chassis, board and product info areas."""
    minutes = (1704067200 - _FRU_EPOCH) // 60  # board made 2024-01-01
    chassis = _fru_area(bytes([1, 0, 0x17]) + _fru_field("") + _fru_field(state.chassis_serial))
    board = _fru_area(
        bytes([1, 0, 0])
        + minutes.to_bytes(3, "little")
        + _fru_field(state.manufacturer)
        + _fru_field(state.product_name)
        + _fru_field(state.board_serial)
        + _fru_field(state.board_part_number)
        + _fru_field("")
    )
    product = _fru_area(
        bytes([1, 0, 0])
        + _fru_field(state.manufacturer)
        + _fru_field(state.product_name)
        + _fru_field(state.product_name)
        + _fru_field("1.0")
        + _fru_field(state.product_serial)
        + _fru_field("")
        + _fru_field("")
    )
    offsets = [1, 1 + len(chassis) // 8, 1 + (len(chassis) + len(board)) // 8]
    header = bytearray([1, 0, *offsets, 0, 0])
    header.append(-sum(header) & 0xFF)
    return bytes(header) + chassis + board + product


# --- SDR repository and sensor readings ---------------------------------------------------


def _raw(sensor: Sensor, value: float | None) -> int:
    if value is None:
        return 0
    return max(0, min(255, round(value / sensor.scale)))


def sdr_record(record_id: int, sensor: Sensor) -> bytes:
    """A type-1 (full) sensor record, IPMI 2.0 table 43-1."""
    name = sensor.name.encode("latin-1", "replace")[:16]
    if sensor.discrete:
        capabilities, reading_type, units1 = 0x40, SENSOR_SPECIFIC, 0xC0  # no analog reading
        masks = struct.pack("<HHH", 0x000F, 0x000F, 0x000F)
        thresholds = bytes(6)
    else:
        capabilities, reading_type, units1 = 0x44, THRESHOLD_READING, 0x00  # readable thresholds
        readable = (0x02 if sensor.lower_critical is not None else 0) | (
            (0x08 if sensor.upper_noncritical is not None else 0)
            | (0x10 if sensor.upper_critical is not None else 0)
        )
        lower = 0x2000 if sensor.lower_critical is not None else 0
        upper = (0x1000 if sensor.upper_noncritical is not None else 0) | (
            0x2000 if sensor.upper_critical is not None else 0
        )
        masks = struct.pack("<HHH", lower, upper, readable)
        thresholds = bytes(
            [
                0,
                _raw(sensor, sensor.upper_critical),
                _raw(sensor, sensor.upper_noncritical),
                0,
                _raw(sensor, sensor.lower_critical),
                0,
            ]
        )
    body = (
        bytes([SENSOR_OWNER, 0, sensor.number, sensor.entity, 1, 0x7F, capabilities])
        + bytes([sensor.sensor_type, reading_type])
        + masks
        + bytes([units1, sensor.unit, 0, 0])  # units 1-3, linear
        + bytes([sensor.scale & 0xFF, (sensor.scale >> 8 & 0x03) << 6, 0, 0, 0, 0])  # M, B
        + bytes([0, 0, 0, 0, 0xFF, 0])  # analog flags, nominal, normal max/min, max, min
        + thresholds
        + bytes([0, 0, 0, 0, 0])  # hysteresis +/-, reserved x2, OEM
        + bytes([0xC0 | len(name)])
        + name
    )
    return struct.pack("<HBBB", record_id, SDR_VERSION, 0x01, len(body)) + body


def sdr_repository(state: MachineState) -> list[bytes]:
    """All sensor records, record ids 1..n in order."""
    with state.lock:
        return [sdr_record(index, sensor) for index, sensor in enumerate(state.sensors, 1)]


def sdr_timestamp(records: list[bytes]) -> int:
    """A 'most recent addition' time that changes whenever the records do.

    pyghmi caches a parsed SDR per process under (device id, firmware, this timestamp):
    BMCs whose sensor lists differ must not share one.
    """
    return zlib.crc32(b"".join(records)) | 0x40000000


def sensor_reading(sensor: Sensor) -> bytes:
    """Get Sensor Reading response data: reading, scanning enabled, state bits."""
    if sensor.discrete:
        return bytes([0, 0xC0, sensor.states & 0xFF, 0x80 | (sensor.states >> 8 & 0x7F)])
    raw = _raw(sensor, sensor.value)
    status = 0
    if sensor.lower_critical is not None and raw <= _raw(sensor, sensor.lower_critical):
        status |= 0x02  # at or below lower critical
    if sensor.upper_noncritical is not None and raw >= _raw(sensor, sensor.upper_noncritical):
        status |= 0x08
    if sensor.upper_critical is not None and raw >= _raw(sensor, sensor.upper_critical):
        status |= 0x18  # at or above upper critical, so also above non-critical
    return bytes([raw, 0xC0, status])


# --- SEL ----------------------------------------------------------------------------------


def sel_record(entry: SelEntry) -> bytes:
    """A 16-byte system event record (type 02h), generator = the BMC, event message rev 04h."""
    return struct.pack(
        "<HBIBBBBBB3B",
        entry.record_id,
        0x02,
        entry.timestamp & 0xFFFFFFFF,
        SENSOR_OWNER,
        0x00,
        0x04,
        entry.sensor_type,
        entry.sensor_number,
        (0x80 if entry.deassertion else 0) | (entry.event_type & 0x7F),
        *entry.event_data,
    )
