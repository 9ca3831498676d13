"""Small value types of the fleet spec: names, MACs, BMC endpoints, secret references, versions.

Each is a pydantic-compatible annotated type whose validator raises ``ValueError`` with a short
message; the loader prefixes it with file:line and the field path.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, PlainSerializer

from provisioner.errors import SecretError

# --------------------------------------------------------------------------- names

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("must be text")
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


Name = Annotated[str, BeforeValidator(check_name)]
"""A DNS-label style name (racks, profiles, stacks, images, node host names)."""


def group_name(prefix: str, name: str) -> str:
    """An Ansible-safe group name: ``group_name("rack", "r-01") == "rack_r_01"``."""
    return f"{prefix}_{name.replace('-', '_')}"


# --------------------------------------------------------------------------- MAC addresses

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_MAC_DOTTED_RE = re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$")


def normalize_mac(value: object) -> str:
    """``AA-BB-CC-DD-EE-FF``, ``aabb.ccdd.eeff``, ``aabbccddeeff`` -> ``aa:bb:cc:dd:ee:ff``."""
    if not isinstance(value, str):
        raise ValueError("not a MAC address (write it as text, e.g. 'aa:bb:cc:dd:ee:ff')")
    text = value.strip().lower()
    if len(text) == 17 and _MAC_RE.fullmatch(text):
        mac = text.replace("-", ":")
    elif _MAC_RE.fullmatch(text) or _MAC_DOTTED_RE.fullmatch(text):
        digits = text.replace(".", "")
        mac = ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    else:
        raise ValueError(f"{value!r} is not a MAC address")
    if mac[1] in "13579bdf":
        raise ValueError(f"{value!r} is a multicast MAC address, not a NIC's")
    return mac


MacAddress = Annotated[str, BeforeValidator(normalize_mac)]


def mac_plus(mac: str, offset: int) -> str:
    """The MAC ``offset`` addresses after ``mac`` (for lab ranges)."""
    number = int(mac.replace(":", ""), 16) + offset
    if number >= 1 << 48:
        raise ValueError(f"MAC address range starting at {mac} overflows")
    digits = f"{number:012x}"
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


# --------------------------------------------------------------------------- BMC endpoints

BmcProtocol = Literal["ipmi", "redfish"]
_DEFAULT_PORTS: dict[str, int] = {"ipmi": 623, "redfish": 443}


@dataclass(frozen=True, slots=True)
class BmcEndpoint:
    """Where a node's BMC answers: ``ipmi://host[:port]`` or
    ``redfish+https://host[:port][/redfish/v1/Systems/ID]``. Holds no credentials."""

    protocol: BmcProtocol
    host: str
    port: int
    system: str | None = None  # Redfish system path, when the BMC serves several

    @property
    def url(self) -> str:
        scheme = "ipmi" if self.protocol == "ipmi" else "redfish+https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == _DEFAULT_PORTS[self.protocol] else f":{self.port}"
        return f"{scheme}://{host}{port}{self.system or ''}"

    @property
    def key(self) -> tuple[str, str, int, str]:
        """Identity for duplicate checks: two nodes may share a Redfish service only with
        different system paths."""
        return (self.protocol, self.host.lower(), self.port, (self.system or "").rstrip("/"))

    def with_host(self, host: str) -> BmcEndpoint:
        return BmcEndpoint(self.protocol, host, self.port, self.system)

    def with_port(self, port: int) -> BmcEndpoint:
        if not 0 < port < 65536:
            raise ValueError(f"BMC port {port} is out of range")
        return BmcEndpoint(self.protocol, self.host, port, self.system)

    def __str__(self) -> str:
        return self.url


_HOST_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
    re.ASCII,
)


def _valid_host(host: str) -> bool:
    if _HOST_RE.fullmatch(host):
        return True
    try:
        IPv6Address(host)
    except ValueError:
        return False
    return True


def bmc_at(protocol: BmcProtocol, host: str) -> BmcEndpoint:
    """A BMC at a bare host name or IPv4 address on the protocol's default port."""
    if not _HOST_RE.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or IPv4 address")
    return BmcEndpoint(protocol, host, _DEFAULT_PORTS[protocol])


def parse_bmc_url(value: object) -> BmcEndpoint:
    if isinstance(value, BmcEndpoint):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("a BMC endpoint is a URL such as ipmi://10.0.0.5 or redfish+https://bmc1")
    if "@" in value:
        # Never echo the value: "user:password@host" in any spelling holds a password.
        raise ValueError(
            "credentials are not allowed in a BMC URL; set bmc.username and bmc.password "
            "(a reference such as env:BMC_PASSWORD)"
        )
    value = value.strip()
    if "://" not in value and _HOST_RE.fullmatch(value.split(":")[0]):
        raise ValueError(
            f"{value!r} has no scheme: write ipmi://{value} or redfish+https://{value}"
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid BMC URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "ipmi":
        protocol: BmcProtocol = "ipmi"
        if parts.path not in ("", "/"):
            raise ValueError(f"an ipmi:// URL has no path: {value!r}")
    elif scheme == "redfish+https":
        protocol = "redfish"
    elif scheme in ("redfish", "redfish+http", "https", "http"):
        raise ValueError(f"use redfish+https://HOST[:PORT][/redfish/v1/Systems/ID], not {value!r}")
    else:
        raise ValueError(
            f"{value!r}: unknown BMC scheme {scheme!r} (use ipmi:// or redfish+https://)"
        )
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    if not _valid_host(parts.hostname):
        raise ValueError(f"{value!r}: {parts.hostname!r} is not a host name or IP address")
    if port == 0:
        raise ValueError(f"{value!r}: port 0 is not a port a BMC listens on")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r}: a BMC URL takes no query or fragment")
    system = parts.path.rstrip("/") or None
    if system is not None and not system.startswith("/redfish/v1/Systems/"):
        raise ValueError(f"{value!r}: a Redfish system path looks like /redfish/v1/Systems/ID")
    return BmcEndpoint(protocol, parts.hostname, port or _DEFAULT_PORTS[protocol], system)


BmcUrl = Annotated[
    BmcEndpoint,
    BeforeValidator(parse_bmc_url),
    PlainSerializer(lambda endpoint: endpoint.url, return_type=str),
]


# --------------------------------------------------------------------------- secret references

_ENV_RE = re.compile(r"^env:([A-Za-z_][A-Za-z0-9_]*)$")


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives (``env:NAME`` or ``file:/path``); never the secret itself.

    :meth:`resolve` reads it in memory at the call site; nothing else ever sees the value.
    """

    scheme: Literal["env", "file"]
    target: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"

    def resolve(self, base_dir: Path | None = None) -> str:
        """Read the secret. A ``file:`` reference relative to ``base_dir`` (the spec's
        folder) is read there; the file must not be readable by group or others."""
        if self.scheme == "env":
            value = os.environ.get(self.target)
            if value is None:
                raise SecretError(f"environment variable {self.target} is not set (from {self})")
            return value
        path = Path(self.target).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise SecretError(f"cannot read {self}: {exc.strerror}") from None
        if mode & 0o077:
            raise SecretError(
                f"{path} is readable by group or others (mode {mode & 0o777:o}); "
                f"run: chmod 600 {path}"
            )
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"cannot read {self}: {exc}") from None


def parse_secret_ref(value: object) -> SecretRef:
    if isinstance(value, SecretRef):
        return value
    if isinstance(value, str):
        text = value.strip()
        env = _ENV_RE.fullmatch(text)
        if env:
            return SecretRef("env", env.group(1))
        if text.startswith("file:") and len(text) > len("file:"):
            return SecretRef("file", text[len("file:") :])
        if text.startswith("env:"):
            raise ValueError("env: must name an environment variable, e.g. env:BMC_PASSWORD")
    # The value is never echoed: it may be the very secret that must not be written down.
    raise ValueError(
        "a literal secret is not allowed in the spec; give a reference: "
        "env:NAME (an environment variable) or file:/path (a file only its owner can read)"
    )


Secret = Annotated[
    SecretRef,
    BeforeValidator(parse_secret_ref),
    PlainSerializer(str, return_type=str),
]


# --------------------------------------------------------------------------- versions

_DRIVER_RE = re.compile(r"^[0-9]{3}\.\d{1,3}(\.\d{1,3})?$", re.ASCII)
_DOTTED_RE = re.compile(r"^\d+(\.\d+){0,3}(-\d+)?$", re.ASCII)


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        raise ValueError("a version is text such as '12.8'")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        raise ValueError("write a version as text, e.g. '12.8'")
    if not isinstance(value, str):
        raise ValueError("a version is text such as '12.8'")
    return value.strip()


def _check_driver_version(value: object) -> str:
    text = _as_text(value)
    if not _DRIVER_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not an NVIDIA driver version (like 570.133.20)")
    return text


def _check_version(value: object) -> str:
    text = _as_text(value)
    if not _DOTTED_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a version (digits and dots, like 1.17.5)")
    return text


DriverVersion = Annotated[str, BeforeValidator(_check_driver_version)]
Version = Annotated[str, BeforeValidator(_check_version)]


def version_tuple(text: str) -> tuple[int, ...]:
    """``"570.133.20"`` -> ``(570, 133, 20)``; a Debian-style ``-1`` suffix is dropped."""
    return tuple(int(part) for part in text.split("-", 1)[0].split("."))


# --------------------------------------------------------------------------- SSH keys

_SSH_TYPES = {
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}


def _check_ssh_key(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("an SSH public key is one line of text")
    text = value.strip()
    if "PRIVATE KEY" in text:
        raise ValueError("this is a private key; give the public key (the .pub file's line)")
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] not in _SSH_TYPES:
        raise ValueError(
            "not an SSH public key (expected 'ssh-ed25519 AAAA... comment' or another "
            f"OpenSSH type: {', '.join(sorted(_SSH_TYPES))})"
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the SSH public key's base64 part is damaged") from None
    if len(blob) < 4:
        raise ValueError("the SSH public key's base64 part is damaged")
    length = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + length].decode("ascii", "replace") != parts[0]:
        raise ValueError(f"the key's data is not of type {parts[0]} (copied wrong?)")
    if "\n" in text:
        raise ValueError("an SSH public key is one line")
    return text


SshPublicKey = Annotated[str, BeforeValidator(_check_ssh_key)]


# --------------------------------------------------------------------------- counts or percents

_PERCENT_RE = re.compile(r"^(\d{1,3}(?:\.\d+)?)\s*%$", re.ASCII)


@dataclass(frozen=True, slots=True)
class CountOrPercent:
    """``3`` (nodes) or ``"10%"`` (of the nodes in scope); at least one node when positive."""

    value: float
    percent: bool

    def of(self, total: int) -> int:
        if not self.percent:
            return int(self.value)
        if total <= 0:
            return 0
        return max(1, int(total * self.value / 100.0))

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else str(int(self.value))


def parse_count_or_percent(value: Any) -> CountOrPercent:
    if isinstance(value, CountOrPercent):
        return value
    if isinstance(value, bool):
        raise ValueError("give a count such as 4 or a percentage such as '10%'")
    if isinstance(value, int):
        if value < 1:
            raise ValueError("must be at least 1")
        return CountOrPercent(float(value), percent=False)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return parse_count_or_percent(int(text))
        match = _PERCENT_RE.fullmatch(text)
        if match:
            percent = float(match.group(1))
            if not 0 < percent <= 100:
                raise ValueError("a percentage must be above 0 and at most 100")
            return CountOrPercent(percent, percent=True)
    raise ValueError("give a count such as 4 or a percentage such as '10%'")


CountPercent = Annotated[
    CountOrPercent,
    BeforeValidator(parse_count_or_percent),
    PlainSerializer(lambda v: str(v) if v.percent else int(v.value), return_type=str | int),
]


def _address_text(value: object) -> object:
    """Addresses are written as text: YAML's 167772161 or true is never meant as one."""
    if isinstance(value, (bool, int, float)):
        raise ValueError(f"write the address as text, e.g. '10.0.0.1', not {value!r}")
    return value


Address = Annotated[IPv4Address, BeforeValidator(_address_text)]
Network = Annotated[IPv4Network, BeforeValidator(_address_text)]


def ipv4_int(text: str) -> int | None:
    """A dotted-quad IPv4 address as an int, or None if ``text`` is not one (fast path)."""
    parts = text.split(".")
    if len(parts) != 4:
        return None
    number = 0
    for part in parts:
        if (
            not (part.isascii() and part.isdigit())
            or len(part) > 3
            or (len(part) > 1 and part[0] == "0")
        ):
            return None
        octet = int(part)
        if octet > 255:
            return None
        number = number << 8 | octet
    return number


def ipv4_plus(address: IPv4Address, offset: int) -> IPv4Address:
    try:
        return IPv4Address(int(address) + offset)
    except ValueError:
        raise ValueError(
            f"the address range starting at {address} runs past 255.255.255.255"
        ) from None
