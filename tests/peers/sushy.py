"""The sushy-tools Redfish emulator (fake driver) over HTTPS on loopback.

Systems are served at ``/redfish/v1/Systems/<uuid>``; their name also works there but is
answered with a 307 redirect to the UUID path. Basic auth is enforced (bcrypt htpasswd in
``SUSHY_EMULATOR_AUTH_FILE``) except on ``/redfish`` and ``/redfish/v1`` themselves.

The fake driver applies a power change ``int(time.time()) + random.randint(1, 11)`` seconds
after the request, with no setting to change it. The emulator's config file is Python, so
``power_delay=(low, high)`` makes it replace that draw with ``randint(low, high)``; the change
then shows within ``high`` seconds (``(0, 0)``: at the next GET). ``None`` keeps the stock
1-11 s. ``ForceRestart``/``GracefulRestart`` turn the system off at once, on after the delay.

Other behaviour seen (sushy-tools 2.2.0): ``Boot.BootSourceOverrideEnabled`` is always
``Continuous`` (a PATCH's value is ignored, and a PATCH carrying only ``Disabled`` is a 400,
so pyghmi's ``set_bootdev("default")`` fails); boot target starts ``Hdd``; no
``SessionService`` (clients fall back to basic auth); systems have no ``SerialNumber``;
``PushPowerButton`` is a 501. The emulator caches nothing: each GET shows the current state.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import requests

from provisioner.lab.redfish_bmc import write_certificate
from tests.peers import LOOPBACK, bounded_command, free_tcp_port, log_tail, stop_process_group

SYSTEMS_PATH = "/redfish/v1/Systems"
DEFAULT_USERNAME = "admin"
DEFAULT_PASSWORD = "secret"


@dataclass(frozen=True)
class RedfishSystem:
    """One emulated system: ``path`` is ``/redfish/v1/Systems/<uuid>``."""

    uuid: str
    name: str
    mac: str

    @property
    def path(self) -> str:
        return f"{SYSTEMS_PATH}/{self.uuid}"


def system_uuid(index: int) -> str:
    """The known UUID of the ``index``-th system (from 1)."""
    return f"5e5e0000-0000-4000-8000-{index:012d}"


@dataclass
class SushyEmulator:
    """A running emulator. ``cert_path`` is its self-signed certificate (a usable CA file)."""

    host: str
    port: int
    username: str
    password: str
    auth: bool
    systems: list[RedfishSystem]
    cert_path: Path
    cert_sha256: str
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def system(self, key: RedfishSystem | int | str) -> RedfishSystem:
        """A system by itself, by index (from 0), by name or by UUID."""
        if isinstance(key, RedfishSystem):
            return key
        if isinstance(key, int):
            return self.systems[key]
        for system in self.systems:
            if key in (system.name, system.uuid):
                return system
        raise KeyError(key)

    def get_json(self, path: str, timeout: float = 10.0) -> dict[str, Any]:
        """GET ``path`` with the emulator's credentials, TLS checked against its cert."""
        response = requests.get(
            self.url(path),
            auth=(self.username, self.password),
            verify=str(self.cert_path),
            timeout=timeout,
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def system_json(self, key: RedfishSystem | int | str) -> dict[str, Any]:
        """What the emulator holds for a system now (no client cache in between)."""
        return self.get_json(self.system(key).path)

    def power_state(self, key: RedfishSystem | int | str) -> str:
        """``On`` or ``Off``, as the emulator holds it."""
        return str(self.system_json(key)["PowerState"])

    def boot_target(self, key: RedfishSystem | int | str) -> str:
        """``BootSourceOverrideTarget``: ``Hdd`` at start, ``Pxe`` after a network boot set."""
        return str(self.system_json(key)["Boot"]["BootSourceOverrideTarget"])

    def pyghmi_args(self, key: RedfishSystem | int | str) -> dict[str, Any]:
        """Keyword arguments for ``pyghmi.redfish.command.Command`` for one system.

        pyghmi wants the port apart (``bmc="127.0.0.1:PORT"`` fails in getaddrinfo) and
        ``sysurl`` as the UUID path (it does not follow the name path's redirect).
        """
        return {
            "bmc": self.host,
            "port": self.port,
            "userid": self.username,
            "password": self.password,
            "verifycallback": lambda cert: hashlib.sha256(cert).hexdigest() == self.cert_sha256,
            "sysurl": self.system(key).path,
        }


def make_certificate(cert_path: Path, key_path: Path, host: str = LOOPBACK) -> str:
    """Write a self-signed certificate for ``host`` (IP SAN), valid two days, and its key;
    return the SHA-256 fingerprint of the DER certificate, as hex. The lab's own writer."""
    return write_certificate(cert_path, key_path, host, days=2)


def _config(
    port: int,
    workdir: Path,
    systems: Sequence[RedfishSystem],
    auth: bool,
    power_delay: tuple[int, int] | None,
) -> str:
    fake_systems = [
        {
            "uuid": system.uuid,
            "name": system.name,
            "power_state": "Off",
            "external_notifier": False,
            "nics": [{"mac": system.mac, "ip": f"192.0.2.{index + 1}"}],
        }
        for index, system in enumerate(systems)
    ]
    text = (
        f"SUSHY_EMULATOR_LISTEN_IP = {LOOPBACK!r}\n"
        f"SUSHY_EMULATOR_LISTEN_PORT = {port}\n"
        f"SUSHY_EMULATOR_SSL_CERT = {str(workdir / 'cert.pem')!r}\n"
        f"SUSHY_EMULATOR_SSL_KEY = {str(workdir / 'key.pem')!r}\n"
        f"SUSHY_EMULATOR_STATE_DIR = {str(workdir / 'state')!r}\n"
        "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
        f"SUSHY_EMULATOR_FAKE_SYSTEMS = {fake_systems!r}\n"
    )
    if auth:
        text += f"SUSHY_EMULATOR_AUTH_FILE = {str(workdir / 'htpasswd')!r}\n"
    if power_delay is not None:
        low, high = power_delay
        text += (
            "\n# Shorter power delays than the fake driver's randint(1, 11) seconds.\n"
            "import random as _random\n"
            "from sushy_tools.emulator.resources.systems import fakedriver as _fakedriver\n"
            "class _PowerDelay:\n"
            "    @staticmethod\n"
            "    def randint(_low, _high):\n"
            f"        return _random.randint({low}, {high})\n"
            "_fakedriver.random = _PowerDelay\n"
        )
    return text


def start_sushy(
    count: int = 2,
    *,
    names: Sequence[str] | None = None,
    username: str = DEFAULT_USERNAME,
    password: str = DEFAULT_PASSWORD,
    auth: bool = True,
    power_delay: tuple[int, int] | None = (1, 1),
    base_dir: Path | None = None,
    lifetime: float = 600.0,
    ready_timeout: float = 30.0,
) -> SushyEmulator:
    """Start the emulator with ``count`` systems, all powered off, and wait until
    ``/redfish/v1/`` answers. Names default to ``node-01``, ``node-02`` ...; UUIDs are
    ``system_uuid(1)``, ``system_uuid(2)`` ... Stop it with ``stop_sushy``."""
    if names is not None and len(names) != count:
        raise ValueError("one name per system")
    systems = [
        RedfishSystem(
            uuid=system_uuid(index),
            name=names[index - 1] if names is not None else f"node-{index:02d}",
            mac=f"52:54:00:5e:00:{index:02x}",
        )
        for index in range(1, count + 1)
    ]
    failure: RuntimeError | None = None
    for _attempt in range(3):  # a free port may be taken before the emulator binds it
        emulator = _launch(systems, username, password, auth, power_delay, base_dir, lifetime)
        try:
            _wait_ready(emulator, ready_timeout)
        except RuntimeError as exc:
            hung = emulator.process.poll() is None
            stop_sushy(emulator)
            if hung:  # up but not answering: another port would not help
                raise
            failure = exc
            continue
        return emulator
    assert failure is not None
    raise failure


def _launch(
    systems: Sequence[RedfishSystem],
    username: str,
    password: str,
    auth: bool,
    power_delay: tuple[int, int] | None,
    base_dir: Path | None,
    lifetime: float,
) -> SushyEmulator:
    workdir = Path(tempfile.mkdtemp(prefix="sushy-", dir=base_dir))
    (workdir / "state").mkdir()
    fingerprint = make_certificate(workdir / "cert.pem", workdir / "key.pem")
    # Few bcrypt rounds: the emulator checks the password on every request.
    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    (workdir / "htpasswd").write_text(f"{username}:{digest}\n")
    port = free_tcp_port()
    config = workdir / "emulator.conf"
    config.write_text(_config(port, workdir, systems, auth, power_delay))
    with (workdir / "emulator.log").open("wb") as log:
        process = subprocess.Popen(
            bounded_command(
                [sys.executable, "-m", "sushy_tools.emulator.main", "--config", str(config)],
                lifetime,
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return SushyEmulator(
        host=LOOPBACK,
        port=port,
        username=username,
        password=password,
        auth=auth,
        systems=list(systems),
        cert_path=workdir / "cert.pem",
        cert_sha256=fingerprint,
        workdir=workdir,
        process=process,
    )


def _wait_ready(emulator: SushyEmulator, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and emulator.process.poll() is None:
        with contextlib.suppress(requests.RequestException):
            response = requests.get(
                emulator.url("/redfish/v1/"), verify=str(emulator.cert_path), timeout=2
            )
            if response.status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(
        f"sushy-emulator on {emulator.base_url} not ready (exit {emulator.process.poll()}):\n"
        + log_tail(emulator.workdir / "emulator.log")
    )


def stop_sushy(emulator: SushyEmulator) -> None:
    """Kill the emulator's process group, then remove its work and state directory."""
    stop_process_group(emulator.process)
    shutil.rmtree(emulator.workdir, ignore_errors=True)


SushyFactory = Callable[..., SushyEmulator]
"""What the ``sushy_factory`` fixture yields: ``start_sushy``'s signature."""
