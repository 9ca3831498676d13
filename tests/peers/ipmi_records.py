"""Bytes that IPMI peers exchange, encoded by hand: FRU images, SDR records, and a
session-less probe datagram (RMCP + IPMI 1.5 Get Channel Authentication Capabilities).
"""

from __future__ import annotations

import socket
from typing import Literal

from tests.peers import LOOPBACK

FruLayout = Literal["full", "compact"]

BMC_ADDR = 0x20
# ipmi_sim answers Read FRU Data with at most 34 bytes; a "compact" image fits one read.
COMPACT_FRU_SIZE = 32


def _type_length(text: str) -> bytes:
    """An IPMI FRU type/length byte (8-bit ASCII) and the text."""
    data = text.encode("ascii")
    if len(data) > 63:
        raise ValueError(f"FRU field too long: {text!r}")
    return bytes([0xC0 | len(data)]) + data


def _fru_area(body: bytes) -> bytes:
    """A FRU info area: version, length in 8-byte units, ``body``, end mark, pad, checksum."""
    area = bytearray([0x01, 0x00]) + body + b"\xc1"
    while (len(area) + 1) % 8:
        area.append(0)
    area[1] = (len(area) + 1) // 8
    area.append(-sum(area) & 0xFF)
    return bytes(area)


def encode_fru(serial: str, layout: FruLayout = "full") -> bytes:
    """An IPMI Platform Management FRU image (spec v1.0) carrying ``serial``.

    ``full``: chassis (serial ``SERIAL-CH``), board (``SERIAL-MB``) and product areas
    (product serial ``SERIAL``, manufacturer ``OpenIPMI Sim``, name ``GPU Node Sim``).
    ``compact``: a product area with only the serial (at most 12 characters), 32 bytes in
    all, so that one Read FRU Data returns everything (see ``COMPACT_FRU_SIZE``).
    """
    if layout == "compact":
        product = _fru_area(b"\x00" + b"\xc0" * 4 + _type_length(serial) + b"\xc0\xc0")
        areas = [b"", b"", product]
    else:
        chassis = _fru_area(b"\x17" + _type_length("SIM-CHASSIS") + _type_length(f"{serial}-CH"))
        board = _fru_area(
            b"\x00\x00\x00\x00"  # English; manufacturing date unspecified
            + _type_length("OpenIPMI Sim")
            + _type_length("Sim Board")
            + _type_length(f"{serial}-MB")
            + _type_length("SIM-BOARD-1")
            + _type_length("")
        )
        product = _fru_area(
            b"\x00"
            + _type_length("OpenIPMI Sim")
            + _type_length("GPU Node Sim")
            + _type_length("SIM-NODE-1")
            + _type_length("1.0")
            + _type_length(serial)
            + _type_length("")
            + _type_length("")
        )
        areas = [chassis, board, product]
    header = bytearray([0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00])
    offset = 1
    for index, area in enumerate(areas):
        if area:
            header[2 + index] = offset
            offset += len(area) // 8
    header.append(-sum(header) & 0xFF)
    image = bytes(header) + b"".join(areas)
    if layout == "compact" and len(image) > COMPACT_FRU_SIZE:
        raise ValueError(f"serial {serial!r} too long for a compact FRU (12 characters)")
    return image


def temperature_sdr(number: int, name: str, upper: tuple[int, int, int]) -> bytes:
    """A Full Sensor Record (type 01h) for a threshold temperature sensor on the BMC.

    Readings are raw bytes in degrees C (M=1, B=0); ``upper`` is (non-critical, critical,
    non-recoverable), all readable and settable.
    """
    ident = name.encode("ascii")
    unc, ucr, unr = upper
    body = bytes(
        [
            BMC_ADDR, 0x00, number,  # owner, LUN, sensor number
            0x07, 0x01,  # entity: system board 1
            0x67, 0x88,  # initialisation (scanning, events), capabilities
            0x01, 0x01,  # sensor type temperature, threshold reading type
            0x80, 0x0A, 0x80, 0x7A,  # assertion and deassertion masks (upper thresholds)
            0x38, 0x38,  # readable and settable thresholds: upper three
            0x00, 0x01, 0x00, 0x00,  # unsigned, degrees C, no modifier, linear
            0x01, 0x00, 0x00, 0x00, 0x00, 0x00,  # M=1, B=0, accuracy, exponents
            0x00, 0x00, 0x00, 0x00,  # analog flags, nominal, normal max, normal min
            0xFF, 0x00,  # sensor maximum and minimum reading
            unr, ucr, unc, 0x00, 0x00, 0x00,  # thresholds, upper then lower
            0x00, 0x00, 0x00, 0x00, 0x00,  # hysteresis, reserved, OEM
            0xC0 | len(ident),
        ]
    ) + ident  # fmt: skip
    return bytes([0x00, 0x00, 0x51, 0x01, len(body)]) + body


def emu_bytes(data: bytes) -> str:
    """Bytes as ipmi_sim emu arguments. It reads numbers C-style ("31" is decimal), so
    every byte carries its 0x."""
    return " ".join(f"0x{byte:02x}" for byte in data)


# RMCP + IPMI 1.5 session-less "Get Channel Authentication Capabilities" (channel 0x0e,
# admin, IPMI v2 extended data): one datagram, one reply, no session.
_AUTH_CAPS_REQUEST = bytes.fromhex(
    "0600ff07"  # RMCP v1.0, no ACK, class IPMI
    "00" "00000000" "00000000" "09"  # no auth, sequence 0, session 0, 9 bytes follow
    "2018c8" "8100388e04b5"  # BMC, netfn App; SWID 81h, Get Ch. Auth. Caps., checksums
)  # fmt: skip


def channel_auth_probe(port: int, host: str = LOOPBACK, timeout: float = 5.0) -> bytes:
    """Send one session-less Get Channel Authentication Capabilities request; return the
    reply datagram. ``TimeoutError`` if none comes, ``ConnectionRefusedError`` when the
    port is closed (ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.send(_AUTH_CAPS_REQUEST)
        return sock.recv(1024)


def probe_completion_code(reply: bytes) -> int:
    """The IPMI completion code of a ``channel_auth_probe`` reply (0 means success)."""
    if len(reply) < 21 or reply[:4] != b"\x06\x00\xff\x07":
        raise ValueError(f"not an RMCP/IPMI reply: {reply.hex()}")
    return reply[20]
