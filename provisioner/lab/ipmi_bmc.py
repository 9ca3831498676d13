"""The lab's simulated IPMI BMCs: a FAKE of a real BMC, many of them served by one process.

The lab has no hardware, so each lab node's BMC is this program: pyghmi's own BMC server
(``pyghmi.ipmi.bmc.Bmc``, the one VirtualBMC uses) does the RMCP+ session work (RAKP,
HMAC-SHA1, AES-CBC-128) and :class:`LabBmc` answers the commands a provisioning client sends:
chassis power, boot options, Get Device ID / System GUID, FRU 0, the SDR repository and
sensor readings, and the SEL, all from a :class:`~provisioner.lab.bmc_state.MachineState`.
Real clients work against it unchanged: pyghmi's ``Command`` and ``ipmitool -I lanplus -C 3``.

Three bugs of pyghmi 1.6.19's *server* side are fixed here, never in site-packages:

1. It always answers an Open Session request with cipher suite 3 whatever was proposed, and
   pyghmi's client, which proposes SHA-256 first, then crashes. :class:`LabBmc` refuses any
   proposal but HMAC-SHA1 / HMAC-SHA1-96 / AES-CBC-128 with status 11h ("no cipher suite
   match"), so the client falls back to SHA-1.
2. ``Bmc.listen(None)`` never polls. Here no pyghmi loop is used at all: :class:`BmcFarm` runs
   its own loop, which always wakes within a second.
3. Under load a session's packets could reach ``ServerSession.sessionless_data``, which does
   not exist (AttributeError). Packets are routed by the farm itself, a new Open Session
   request always makes a new session, and the session class delegates that method anyway.

One process, one thread: a :class:`BmcFarm` binds one UDP socket per BMC and serves them all
from a single event loop (``selectors``, so epoll on Linux). pyghmi's server state is not
thread-safe and is only touched from that loop. The farm never registers its sockets or
sessions in pyghmi's process-wide client tables, so a pyghmi client may run in the same
process (tests do). pyghmi's own loop, and every pyghmi client, use select() and fail past
~1000 descriptors per process; this loop does not, but it is one core: shard a large lab
across processes (about 250 BMCs each; the command below takes a port range).

An optional reply delay (``BmcFarm(reply_delay=...)``, or ``LabBmc.reply_delay`` per BMC at
any time) imitates a slow BMC without blocking the others: a reply is encoded at once
(sequence number, session keys, the request's netfn/command/sequence fields) and only its
transmission is deferred, through a queue of due packets that the loop sends when their time
comes. No per-request session field has to be kept and restored, because the bytes are final
before the next request can overwrite those fields. Sessions idle for 60 s are dropped.

Command line (serves until SIGTERM or SIGINT; prints one ``ready`` line once listening)::

    python -m provisioner.lab.ipmi_bmc --address 127.0.0.1 --ports 9001-9250 \\
        --user admin --password-env LAB_BMC_PASSWORD [--delay 0.05]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import pyghmi.ipmi.bmc as pyghmi_bmc
import pyghmi.ipmi.private.serversession as serversession
from pyghmi.ipmi.private import constants

from provisioner.lab import bmc_state
from provisioner.lab.bmc_state import BOOT_DEVICES, BOOT_SELECTORS, MachineState, PowerAction

__all__ = ["BmcFarm", "LabBmc", "MachineState", "main", "parse_ports"]

log = logging.getLogger(__name__)

Address = tuple[Any, ...]
Reply = tuple[int, bytes]  # completion code, response data
Schedule = Callable[[float, socket.socket, bytes, Address], None]

SESSION_IDLE_S = 60.0  # the IPMI default session inactivity timeout
_LOOP_WAKE_S = 1.0
_PAYLOAD = constants.payload_types
_CONTROL: dict[int, PowerAction] = {0: "off", 1: "on", 2: "cycle", 3: "reset", 4: "diag", 5: "soft"}
_OK, _NOT_PRESENT, _RESERVATION, _BAD_FIELD, _BAD_PARAM, _NOT_NOW = 0, 0xCB, 0xC5, 0xCC, 0x80, 0xD5


class _ReplySocket:
    """What pyghmi's session code sees as its socket: sends now, or after the BMC's delay."""

    def __init__(self, sock: socket.socket, bmc: LabBmc) -> None:
        self._sock, self._bmc = sock, bmc

    def setblocking(self, flag: bool) -> None:
        """pyghmi makes its socket blocking before each send; the farm's stays non-blocking."""

    def sendto(self, packet: bytes, address: Address) -> int:
        delay, schedule = self._bmc.reply_delay, self._bmc.schedule
        if delay > 0 and schedule is not None:
            schedule(time.monotonic() + delay, self._sock, bytes(packet), address)
            return len(packet)
        return self._sock.sendto(packet, address)


class _LabSession(serversession.ServerSession):  # type: ignore[misc]
    """One client's RMCP+ session with a LabBmc; kept in ``bmc.sessions``, not in pyghmi's."""

    def __new__(cls, *args: object, **kwargs: object) -> _LabSession:
        return object.__new__(cls)

    def __init__(self, bmc: LabBmc, clientaddr: Address, request: bytes) -> None:
        # ServerSession.__init__ minus its registration in pyghmi's global routing table.
        self.bmc, self.uuid, self.authdata, self.kg = bmc, bmc.uuid, bmc.authdata, bmc.kg
        self.currhashlib, self.currhashlen = hashlib.sha1, 12
        self.rqaddr, self.servermode, self.ipmiversion = constants.IPMI_BMC_ADDRESS, True, 2.0
        self.sequencenumber = self.sessionid = self.integrityalgo = self.confalgo = 0
        self.lastpayload = self.rqlun = self.k1 = self.ipmicallback = None
        self.broken, self.authtype, self.clientpriv = False, 6, 2
        self.socket, self.sockaddr = bmc.serversocket, clientaddr
        self.pendingpayloads: deque[Any] = deque()
        self.pktqueue: deque[Any] = deque()
        self.last_seen = time.monotonic()
        response = self.create_open_session_response(bytearray(request))
        self.send_payload(response, _PAYLOAD["rmcpplusopenresponse"], retry=False)

    def create_open_session_response(self, request: bytearray) -> bytearray:
        """Accept only cipher suite 3 (pyghmi bug 1); anything else gets status 11h."""
        suite = (request[12], request[20], request[28]) if len(request) >= 32 else None
        if suite != (1, 1, 1):
            self.clientsessionid = request[4:8]
            return bytearray([request[0], 0x11, 0, 0]) + self.clientsessionid
        response: bytearray = super().create_open_session_response(request)
        return response

    def _got_rakp1(self, data: bytearray) -> None:
        """As pyghmi, but an unknown user gets RAKP2 status 0Dh instead of silence."""
        if len(data) < 28 or not hasattr(self, "managedsessionid"):
            return  # malformed, or the open request was refused
        if self.authdata.get(bytes(data[28:]).decode("utf-8", "replace")) is None:
            reply = bytearray([data[0], 0x0D, 0, 0]) + self.clientsessionid
            self.send_payload(reply, _PAYLOAD["rakp2"], retry=False)
            return
        super()._got_rakp1(data)

    def _got_rakp3(self, data: bytearray) -> None:
        if hasattr(self, "kuid"):  # else RAKP1 was refused: nothing to check against
            super()._got_rakp3(data)

    def close_server_session(self) -> None:
        if self.bmc.sessions.get(self.sockaddr) is self:
            del self.bmc.sessions[self.sockaddr]

    def sessionless_data(self, data: bytes, sockaddr: Address) -> None:
        """pyghmi bug 3: a session may be handed sessionless data; the BMC handles it."""
        self.bmc.sessionless_data(data, sockaddr)


class LabBmc(pyghmi_bmc.Bmc):  # type: ignore[misc]
    """One fake BMC on one UDP (address, port) for one machine; served by a BmcFarm."""

    def __init__(
        self,
        state: MachineState,
        *,
        address: str,
        port: int,
        username: str,
        password: str,
        reply_delay: float = 0.0,
        schedule: Schedule | None = None,
    ) -> None:
        # Not IpmiServer.__init__: that binds through pyghmi's client I/O thread, whose
        # select() would then read (and steal) this socket's packets.
        self.state, self.address, self.port = state, address, port
        self.authdata = {username: password}
        self.kg = None
        self.uuid = uuid.uuid4()
        self.timeout = 60
        self.reply_delay, self.schedule = reply_delay, schedule
        self.authcap = bytes([0, 1, 0x80, 0x04, 0x02, 0, 0, 0, 0])
        self.pktqueue: deque[Any] = deque()
        self.sessions: dict[Address, _LabSession] = {}
        self._sel_reservation = self._sdr_reservation = self._boot_in_progress = 0
        family, _, _, _, sockaddr = socket.getaddrinfo(address, port, 0, socket.SOCK_DGRAM)[0]
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.socket.bind(sockaddr)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.port = self.socket.getsockname()[1]  # the one the system chose for port 0
        self.serversocket = _ReplySocket(self.socket, self)
        self._commands: dict[tuple[int, int], Callable[[bytes], Reply]] = {
            (0x00, 0x01): self._chassis_status,
            (0x00, 0x02): self._chassis_control,
            (0x00, 0x08): self._set_boot_options,
            (0x00, 0x09): self._get_boot_options,
            (0x04, 0x27): self._sensor_thresholds,
            (0x04, 0x2D): self._sensor_reading,
            (0x06, 0x01): self._device_id,
            (0x06, 0x37): self._system_guid,
            (0x0A, 0x10): self._fru_area_info,
            (0x0A, 0x11): self._read_fru,
            (0x0A, 0x20): self._sdr_info,
            (0x0A, 0x22): self._reserve_sdr,
            (0x0A, 0x23): self._get_sdr,
            (0x0A, 0x40): self._sel_info,
            (0x0A, 0x42): self._reserve_sel,
            (0x0A, 0x43): self._get_sel_entry,
            (0x0A, 0x47): self._clear_sel,
            (0x0A, 0x48): self._sel_time,
        }

    @classmethod
    def listen(cls, timeout: float = 30) -> None:
        raise NotImplementedError("a LabBmc is served by BmcFarm, not by pyghmi's loop")

    def close(self) -> None:
        self.sessions.clear()
        self.socket.close()

    # --- packets ----------------------------------------------------------------------

    def receive(self, budget: int = 64) -> None:
        """Handle up to ``budget`` waiting datagrams (called by the farm's loop)."""
        for _ in range(budget):
            try:
                data, address = self.socket.recvfrom(4096)
            except OSError:  # BlockingIOError: nothing more waiting
                return
            try:
                self.handle_packet(data, address)
            except Exception:
                log.exception("BMC %s:%d: packet from %s failed", self.address, self.port, address)

    def handle_packet(self, data: bytes, address: Address) -> None:
        """Route one datagram: new session, session traffic, or sessionless request."""
        if len(data) < 16 or data[0] != 6 or data[2:4] != b"\xff\x07":
            return  # not IPMI over RMCP
        if data[4] != 6 or (data[5] & 0x3F == 0 and data[6:10] == bytes(4)):
            self.sessionless_data(data, address)  # IPMI 1.5 framing or session id 0
        elif data[5] & 0x3F == _PAYLOAD["rmcpplusopenreq"]:
            if len(data) < 48:
                return  # too short for an Open Session request
            self.sessions[address] = _LabSession(self, address, data[16:])
        elif (session := self.sessions.get(address)) is not None:
            session.last_seen = time.monotonic()
            session._handle_ipmi_packet(bytearray(data), sockaddr=address)

    def expire_sessions(self, now: float) -> None:
        for address, session in list(self.sessions.items()):
            if now - session.last_seen > SESSION_IDLE_S:
                del self.sessions[address]

    def handle_raw_request(self, request: dict[str, Any], session: Any) -> None:
        command = self._commands.get((request["netfn"], request["command"]))
        if command is None:
            super().handle_raw_request(request, session)  # payload (SOL) activation, else C1h
            return
        try:
            code, data = command(bytes(request["data"]))
        except (IndexError, struct.error):
            code, data = 0xC7, b""  # request data length invalid
        except Exception:
            log.exception("BMC %s:%d: command %r failed", self.address, self.port, request)
            code, data = 0xFF, b""
        session.send_ipmi_response(data=data, code=code)

    # --- chassis and application commands ----------------------------------------------

    def _chassis_status(self, data: bytes) -> Reply:
        on = 1 if self.state.power == "on" else 0
        return _OK, bytes([0x20 | on, 0x10 if self.state.power_changes else 0, 0])

    def _chassis_control(self, data: bytes) -> Reply:
        action = _CONTROL.get(data[0] & 0x0F)
        if action is None:
            return _BAD_FIELD, b""
        return (_OK if self.state.power_control(action) else _NOT_NOW), b""

    def _set_boot_options(self, data: bytes) -> Reply:
        parameter = data[0] & 0x7F
        if parameter == 0:
            self._boot_in_progress = data[1] & 0x03
        elif parameter == 5:
            flags, selector = data[1], data[2] >> 2 & 0x0F
            if selector not in BOOT_DEVICES:
                return _BAD_FIELD, b""
            device = BOOT_DEVICES[selector] if flags & 0x80 else "default"
            self.state.set_boot(device, persistent=bool(flags & 0x40), uefi=bool(flags & 0x20))
        elif parameter not in (3, 4):
            return _BAD_PARAM, b""
        return _OK, b""

    def _get_boot_options(self, data: bytes) -> Reply:
        parameter = data[0] & 0x7F
        if parameter == 5:
            state = self.state
            with state.lock:
                flags = 0
                if state.boot_device != "default":
                    flags = 0x80 | state.boot_persistent << 6 | state.boot_uefi << 5
                selector = BOOT_SELECTORS[state.boot_device]
            return _OK, bytes([1, 5, flags, selector << 2, 0, 0, 0])
        fixed = {0: bytes([self._boot_in_progress]), 3: b"\x00", 4: b"\x00\x00"}
        if parameter not in fixed:
            return _BAD_PARAM, b""
        return _OK, bytes([1, parameter]) + fixed[parameter]

    def _device_id(self, data: bytes) -> Reply:
        # device 20h rev 1, available, fw 1.00, IPMI 2.0, chassis+FRU+SEL+SDR repo+sensor,
        # manufacturer 0 (none: pyghmi's generic OEM code), product 1AB0h, no aux revision.
        return _OK, bytes([0x20, 0x01, 0x01, 0x00, 0x02, 0x8F, 0, 0, 0, 0xB0, 0x1A, 0, 0, 0, 0])

    def _system_guid(self, data: bytes) -> Reply:
        return _OK, self.state.system_guid.bytes_le

    # --- FRU, SDR repository, sensors, SEL (storage and sensor/event netfns) --------------

    def _fru_area_info(self, data: bytes) -> Reply:
        if data[0] != 0:
            return _NOT_PRESENT, b""
        return _OK, struct.pack("<HB", len(bmc_state.fru_image(self.state)), 0)

    def _read_fru(self, data: bytes) -> Reply:
        fru_id, offset, count = struct.unpack_from("<BHB", data)
        if fru_id != 0:
            return _NOT_PRESENT, b""
        chunk = bmc_state.fru_image(self.state)[offset : offset + count]
        return _OK, bytes([len(chunk)]) + chunk

    def _sdr_info(self, data: bytes) -> Reply:
        records = bmc_state.sdr_repository(self.state)
        added = bmc_state.sdr_timestamp(records)
        return _OK, struct.pack("<BHHIIB", 0x51, len(records), 0x1000, added, 0, 0x02)

    def _reserve_sdr(self, data: bytes) -> Reply:
        self._sdr_reservation = self._sdr_reservation % 0xFFFF + 1
        return _OK, struct.pack("<H", self._sdr_reservation)

    def _get_sdr(self, data: bytes) -> Reply:
        reservation, record_id, offset, count = struct.unpack_from("<HHBB", data)
        records = bmc_state.sdr_repository(self.state)
        index = 0 if record_id == 0 else record_id - 1
        if not 0 <= index < len(records):
            return _NOT_PRESENT, b""
        if offset and reservation != self._sdr_reservation:
            return _RESERVATION, b""
        following = index + 2 if index + 1 < len(records) else 0xFFFF
        end = None if count == 0xFF else offset + count
        return _OK, struct.pack("<H", following) + records[index][offset:end]

    def _sensor_reading(self, data: bytes) -> Reply:
        sensor = self._sensor(data[0])
        if sensor is None:
            return _NOT_PRESENT, b""
        return _OK, bmc_state.sensor_reading(sensor)

    def _sensor_thresholds(self, data: bytes) -> Reply:
        sensor = self._sensor(data[0])
        if sensor is None or sensor.discrete:
            return _NOT_PRESENT, b""
        record = bmc_state.sdr_record(0, sensor)
        # readable mask (SDR byte 19), then LNC LC LNR UNC UC UNR (SDR bytes 42 down to 37)
        return _OK, bytes([record[18]]) + bytes(reversed(record[36:42]))

    def _sensor(self, number: int) -> bmc_state.Sensor | None:
        with self.state.lock:
            return next((s for s in self.state.sensors if s.number == number), None)

    def _sel_info(self, data: bytes) -> Reply:
        with self.state.lock:
            count = len(self.state.sel)
            added = self.state.sel[-1].timestamp if count else 0
        free = max(0, 0xFFFF - 16 * count)
        erased = self.state.sel_erased_at
        return _OK, struct.pack("<BHHIIB", 0x51, count, free, added, erased, 0x02)

    def _reserve_sel(self, data: bytes) -> Reply:
        self._sel_reservation = self._sel_reservation % 0xFFFF + 1
        return _OK, struct.pack("<H", self._sel_reservation)

    def _get_sel_entry(self, data: bytes) -> Reply:
        reservation, record_id, offset, count = struct.unpack_from("<HHBB", data)
        if reservation and reservation != self._sel_reservation:
            return _RESERVATION, b""
        with self.state.lock:
            entries = list(self.state.sel)
        ids = [entry.record_id for entry in entries]
        if not ids or (record_id not in (0, 0xFFFF) and record_id not in ids):
            return _NOT_PRESENT, b""
        index = {0: 0, 0xFFFF: len(ids) - 1}.get(record_id)
        if index is None:
            index = ids.index(record_id)
        following = ids[index + 1] if index + 1 < len(ids) else 0xFFFF
        record = bmc_state.sel_record(entries[index])
        end = None if count == 0xFF else offset + count
        return _OK, struct.pack("<H", following) + record[offset:end]

    def _clear_sel(self, data: bytes) -> Reply:
        reservation, magic, action = struct.unpack_from("<H3sB", data)
        if magic != b"CLR" or action not in (0x00, 0xAA):
            return _BAD_FIELD, b""
        if reservation != self._sel_reservation:
            return _RESERVATION, b""
        if action == 0xAA:
            self.state.clear_sel()
        return _OK, b"\x01"  # erasure completed

    def _sel_time(self, data: bytes) -> Reply:
        return _OK, struct.pack("<I", int(time.time()))


class BmcFarm:
    """Many LabBmc served by one event-loop thread of this process.

    Use in-process (``start()`` runs the loop in a daemon thread; ``stop()`` ends it and
    closes every socket; also a context manager) or as the main loop (``serve_forever()``
    until ``request_stop()``, e.g. from a signal handler). ``add()`` may be called at any
    time, also while serving.
    """

    def __init__(
        self,
        address: str = "127.0.0.1",
        username: str = "admin",
        password: str = "",
        *,
        reply_delay: float = 0.0,
    ) -> None:
        self.address, self.username, self.password = address, username, password
        self.reply_delay = reply_delay
        self.bmcs: dict[int, LabBmc] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        self._pending: deque[LabBmc] = deque()
        self._due: list[tuple[float, int, socket.socket, bytes, Address]] = []
        self._order = itertools.count()
        self._stopping = threading.Event()
        self._finished = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None

    def add(
        self,
        port: int,
        state: MachineState | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> LabBmc:
        """Bind a BMC for ``state`` on ``port`` (0: any free port; see ``LabBmc.port``).

        The default state is a machine that is off, with serials named after the port.
        """
        if self._closed:
            raise RuntimeError("the farm is stopped")
        bmc = LabBmc(
            MachineState() if state is None else state,
            address=self.address,
            port=port,
            username=self.username if username is None else username,
            password=self.password if password is None else password,
            reply_delay=self.reply_delay,
            schedule=self._schedule,
        )
        if state is None:
            bmc.state.product_serial = f"LAB{bmc.port:05d}"
            bmc.state.board_serial = f"LABMB{bmc.port:05d}"
            bmc.state.chassis_serial = f"LABCH{bmc.port:05d}"
        self.bmcs[bmc.port] = bmc
        self._pending.append(bmc)
        self._wake()
        return bmc

    def state(self, port: int) -> MachineState:
        return self.bmcs[port].state

    def start(self) -> BmcFarm:
        """Serve from a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("the farm is already serving")
        self._thread = threading.Thread(target=self.serve_forever, name="bmc-farm", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run the event loop in this thread until ``request_stop()``; then close everything."""
        if self._loop_thread is not None or self._closed:
            raise RuntimeError("the farm is already serving or stopped")
        self._loop_thread = threading.current_thread()
        next_sweep = time.monotonic() + _LOOP_WAKE_S
        try:
            while not self._stopping.is_set():
                while self._pending:
                    bmc = self._pending.popleft()
                    self._selector.register(bmc.socket, selectors.EVENT_READ, bmc)
                timeout = _LOOP_WAKE_S
                if self._due:
                    timeout = min(timeout, max(0.0, self._due[0][0] - time.monotonic()))
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            self._wake_reader.recv(4096)
                    else:
                        key.data.receive()
                now = time.monotonic()
                self._send_due(now)
                if now >= next_sweep:
                    next_sweep = now + _LOOP_WAKE_S
                    for bmc in list(self.bmcs.values()):
                        bmc.expire_sessions(now)
        finally:
            self._close()
            self._finished.set()

    def request_stop(self) -> None:
        """Ask the loop to end; safe from any thread and from a signal handler."""
        self._stopping.set()
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop, wait for it and close every socket. Idempotent."""
        self.request_stop()
        if self._loop_thread is None and self._thread is None:
            self._close()
        elif self._loop_thread is not threading.current_thread():
            self._finished.wait(timeout)
            if self._thread is not None:
                self._thread.join(timeout)

    def __enter__(self) -> BmcFarm:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _schedule(self, due: float, sock: socket.socket, packet: bytes, address: Address) -> None:
        heapq.heappush(self._due, (due, next(self._order), sock, packet, address))

    def _send_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            _, _, sock, packet, address = heapq.heappop(self._due)
            with contextlib.suppress(OSError):  # a full buffer drops it; the client retries
                sock.sendto(packet, address)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._due.clear()
        for bmc in self.bmcs.values():
            bmc.close()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()


# --- command line ---------------------------------------------------------------------------


def parse_ports(text: str) -> list[int]:
    """``"9001-9250"``, ``"9001"`` or a comma list of both -> sorted distinct ports."""
    ports: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"not a port or port range: {part.strip()!r}")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"not a port range within 1-65535: {part.strip()!r}")
        ports.update(range(first, last + 1))
    return sorted(ports)


def _ensure_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m provisioner.lab.ipmi_bmc",
        description="Serve simulated (fake) IPMI BMCs, one per UDP port, until SIGTERM.",
    )
    parser.add_argument("--address", default="127.0.0.1", help="address to bind every BMC to")
    parser.add_argument("--ports", required=True, help="e.g. 9001-9250 or 9001,9005-9010")
    parser.add_argument("--user", default="admin", help="the BMCs' user name")
    parser.add_argument("--password-env", required=True, help="environment variable: password")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to delay each reply")
    args = parser.parse_args(argv)
    password = os.environ.get(args.password_env)
    if password is None:
        parser.error(f"environment variable {args.password_env} is not set")
    try:
        ports = parse_ports(args.ports)
    except ValueError as error:
        parser.error(str(error))
    if args.delay < 0:
        parser.error("--delay must not be negative")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _ensure_descriptors(len(ports) + 64)
    farm = BmcFarm(args.address, args.user, password, reply_delay=args.delay)
    try:
        for port in ports:
            farm.add(port)
    except OSError as error:
        farm.stop()
        print(f"cannot listen on {args.address}:{port}: {error}", file=sys.stderr)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: farm.request_stop())
    print(f"ready {args.address} {args.ports} {len(ports)} BMCs pid={os.getpid()}", flush=True)
    farm.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
