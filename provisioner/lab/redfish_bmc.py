"""The lab's Redfish BMCs: sushy-tools' emulator (its fake driver) standing in for the Redfish
BMCs of lab nodes, which have no hardware here. A lab fake, never a BMC to manage real servers.

One emulator process per distinct ``host:port`` of the spec's Redfish URLs, on loopback, over
HTTPS with a self-signed certificate made at start, with basic auth (a bcrypt htpasswd file)
for the nodes' BMC credentials. Each node is one fake system: its UUID is the last segment of
the node's ``/redfish/v1/Systems/<UUID>`` URL, its name the node's, its NIC the node's MAC;
all are off at start. The files (config, certificate, key, htpasswd, the emulator's state
and log) live in the folder the farm is given, under the lab site's folder.

The power hook: the fake driver PUTs a system's JSON to ``EXTERNAL_NOTIFICATION_URL`` on
every change; the farm listens there (loopback, a free port) and turns each new power request
into ``on_power(action, device)`` for the node, on one worker thread per node, so a node's
requests run in order. The emulator's config file is Python; it changes the fake driver in two
ways: a power change shows at the next read (not 1-11 s later), and a pending change records
the ``ResetType`` asked for and a request id (the driver keeps only the target, On or Off).

Two things a real BMC does that the emulator does not, done here: a boot override is
one-time (the emulator says ``Continuous`` and ignores what it is sent), so once a node has
booted from the network the farm sets the target back to ``Hdd``: a persistent override also
acts once in the lab. And when a node powers itself off, ``machine_stopped`` makes the emulator
say Off by a ForceOff of its own, which is not handed back to the node.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import queue
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from provisioner.lab.bmc_state import PowerAction
from provisioner.lab.host import LabError, die_with_parent
from provisioner.spec.types import BmcEndpoint

log = logging.getLogger("provisioner.lab.redfish")
SYSTEMS = "/redfish/v1/Systems/"
READY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0
_ACTIONS: dict[str, PowerAction] = {
    "On": "on",
    "ForceOn": "on",
    "ForceOff": "off",
    "GracefulShutdown": "soft",
    "ForceRestart": "reset",
    "GracefulRestart": "reset",
}
_DRIVER_PATCH = """
# The lab's changes to the fake driver (this file is Python, run once by the emulator).
import threading as _threading
import time as _time

from sushy_tools.emulator.resources.systems import fakedriver as _fakedriver


class _NoDelay:  # a power change shows at the next read, not randint(1, 11) s later
    @staticmethod
    def randint(low, high):
        return 0


_fakedriver.random = _NoDelay
_reset = _threading.local()
_set_power_state = _fakedriver.FakeDriver.set_power_state
_update = _fakedriver.FakeDriver._update


def _set_power_state_noted(self, identity, state):
    _reset.type = state
    try:
        _set_power_state(self, identity, state)
    finally:
        _reset.type = None


def _update_noted(self, system, **changes):
    pending = changes.get("pending_power")
    if pending and getattr(_reset, "type", None):  # a new request: what and which
        pending.update(reset_type=_reset.type, request=_time.time())
    _update(self, system, **changes)


_fakedriver.FakeDriver.set_power_state = _set_power_state_noted
_fakedriver.FakeDriver._update = _update_noted
"""


@dataclass(eq=False)
class RedfishSystem:
    """One node's fake system. ``on_power(action, device)`` carries out a power request
    (``device``: ``network`` or ``disk``); ``powered()`` says whether the node has power.
    ``power`` is what the BMC says: the last request's target, else the applied state."""

    node: str
    uuid: str
    mac: str
    on_power: Callable[[PowerAction, str], None]
    powered: Callable[[], bool]
    power: str = "off"
    boot_target: str = "Hdd"
    request: float | None = None  # the id of the last power request seen
    own_off: bool = False  # the farm is turning the emulator off itself
    work: queue.Queue[Callable[[], None] | None] = field(default_factory=queue.Queue)

    @property
    def boot_device(self) -> str:
        return "network" if self.boot_target == "Pxe" else "disk"


@dataclass(eq=False)
class _Emulator:
    host: str
    port: int
    folder: Path
    users: dict[str, str] = field(default_factory=dict)
    systems: list[RedfishSystem] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


class RedfishFarm:
    """The lab's Redfish BMCs: ``add()`` each node, ``start()``, ``stop()``."""

    def __init__(self, folder: Path, on_change: Callable[[], None]) -> None:
        self.folder = folder
        self._on_change = on_change
        self._emulators: dict[tuple[str, int], _Emulator] = {}
        self._systems: dict[str, RedfishSystem] = {}
        self._listener: ThreadingHTTPServer | None = None
        self._workers: list[threading.Thread] = []

    def add(
        self,
        node: str,
        endpoint: BmcEndpoint,
        credentials: tuple[str, str],
        mac: str,
        on_power: Callable[[PowerAction, str], None],
        powered: Callable[[], bool],
    ) -> RedfishSystem:
        system_path = (endpoint.system or "").rstrip("/")
        uuid = system_path.removeprefix(SYSTEMS)
        if not system_path.startswith(SYSTEMS) or not uuid or "/" in uuid:
            raise LabError(f"{node}: a lab Redfish URL ends in {SYSTEMS}<UUID>: {endpoint}")
        if uuid in self._systems:
            raise LabError(f"{node}: system {uuid} is also {self._systems[uuid].node}'s")
        host = "127.0.0.1" if endpoint.host == "localhost" else endpoint.host
        emulator = self._emulators.setdefault(
            (host, endpoint.port),
            _Emulator(host, endpoint.port, self.folder / f"{host}-{endpoint.port}"),
        )
        username, password = credentials
        if emulator.users.setdefault(username, password) != password:
            raise LabError(
                f"{node}: {endpoint.host}:{endpoint.port} has two passwords for {username}"
            )
        system = RedfishSystem(node, uuid, mac, on_power, powered)
        emulator.systems.append(system)
        self._systems[uuid] = system
        return system

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if not self._emulators:
            return
        self._listener = _listen(self._notified)
        threading.Thread(
            target=self._listener.serve_forever, name="redfish-hook", daemon=True
        ).start()
        notify_url = f"http://127.0.0.1:{self._listener.server_address[1]}/"
        for emulator in self._emulators.values():
            _launch(emulator, notify_url)
        for emulator in self._emulators.values():
            _wait_ready(emulator)
        for system in self._systems.values():
            worker = threading.Thread(
                target=self._worker, args=(system,), name=f"redfish-{system.node}", daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def stop(self) -> None:
        for system in self._systems.values():
            system.work.put(None)
        for worker in self._workers:
            worker.join(REQUEST_TIMEOUT)
        for emulator in self._emulators.values():
            if emulator.process is not None and emulator.process.poll() is None:
                emulator.process.terminate()
                try:
                    emulator.process.wait(5)
                except subprocess.TimeoutExpired:
                    emulator.process.kill()
                    emulator.process.wait()
        if self._listener is not None:
            self._listener.shutdown()
            self._listener.server_close()

    # ------------------------------------------------------------------ the node's side

    def boot_device(self, system: RedfishSystem) -> str:
        """What a (re)booting node boots from; a network boot uses up the override."""
        device = system.boot_device
        if device == "network":
            system.boot_target = "Hdd"
            system.work.put(lambda: self._boot_target(system, "Hdd"))
        return device

    def machine_stopped(self, system: RedfishSystem) -> None:
        """The node lost power; if no power request did that, make the BMC say Off."""
        system.work.put(lambda: self._mirror_off(system))

    # ------------------------------------------------------------------ the BMC's side

    def _notified(self, body: dict[str, Any]) -> None:
        """A PUT from the emulator (on its request thread): note it, queue any new request."""
        system = self._systems.get(str(body.get("uuid")))
        if system is None:
            return
        system.boot_target = str(body.get("boot_device", "Hdd"))
        pending = body.get("pending_power")
        if not pending:
            system.power = str(body.get("power_state", "Off")).lower()
        elif pending.get("request") != system.request:
            system.request = pending.get("request")
            system.power = "off" if pending.get("power_state") == "Off" else "on"
            action = _ACTIONS.get(str(pending.get("reset_type")))
            if action is not None and not system.own_off:
                device = system.boot_device
                system.work.put(lambda: self._power(system, action, device))
        self._on_change()

    def _power(self, system: RedfishSystem, action: PowerAction, device: str) -> None:
        system.on_power(action, device)
        if device == "network" and action in ("on", "reset"):
            self._boot_target(system, "Hdd")  # the node booted with it: a one-time override

    def _mirror_off(self, system: RedfishSystem) -> None:
        if system.powered() or system.power == "off":
            return  # a power request did it, or the node is on again
        system.own_off = True
        try:
            self._request(
                system, "POST", "/Actions/ComputerSystem.Reset", {"ResetType": "ForceOff"}
            )
        finally:
            system.own_off = False

    def _boot_target(self, system: RedfishSystem, target: str) -> None:
        self._request(system, "PATCH", "", {"Boot": {"BootSourceOverrideTarget": target}})

    def _request(self, system: RedfishSystem, method: str, path: str, body: object) -> None:
        emulator = next(e for e in self._emulators.values() if system in e.systems)
        _call(emulator, f"{SYSTEMS}{system.uuid}{path}", method, body)

    def _worker(self, system: RedfishSystem) -> None:
        while (task := system.work.get()) is not None:
            try:
                task()
            except Exception:
                log.exception("%s: Redfish BMC task failed", system.node)


# ---------------------------------------------------------------------- the emulator process


def _launch(emulator: _Emulator, notify_url: str) -> None:
    try:
        import bcrypt
    except ImportError:
        raise LabError(
            "lab Redfish BMCs need sushy-tools: pip install 'provisioner[lab]'"
        ) from None
    folder = emulator.folder
    shutil.rmtree(folder, ignore_errors=True)  # a state left by a crashed lab is stale
    (folder / "state").mkdir(parents=True)
    folder.chmod(0o700)
    write_certificate(folder / "cert.pem", folder / "key.pem", emulator.host)
    # Few bcrypt rounds: the emulator checks the password on every request.
    (folder / "htpasswd").touch(mode=0o600)
    (folder / "htpasswd").write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, password in emulator.users.items()
        )
    )
    systems = [
        {
            "uuid": system.uuid,
            "name": system.node,
            "power_state": "Off",
            "external_notifier": True,
            "nics": [{"mac": system.mac}],
        }
        for system in emulator.systems
    ]
    settings = {
        "SUSHY_EMULATOR_LISTEN_IP": emulator.host,
        "SUSHY_EMULATOR_LISTEN_PORT": emulator.port,
        "SUSHY_EMULATOR_SSL_CERT": str(folder / "cert.pem"),
        "SUSHY_EMULATOR_SSL_KEY": str(folder / "key.pem"),
        "SUSHY_EMULATOR_AUTH_FILE": str(folder / "htpasswd"),
        "SUSHY_EMULATOR_STATE_DIR": str(folder / "state"),
        "SUSHY_EMULATOR_FAKE_DRIVER": True,
        "SUSHY_EMULATOR_FAKE_SYSTEMS": systems,
        "EXTERNAL_NOTIFICATION_URL": notify_url,
    }
    config = folder / "emulator.conf"
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()) + _DRIVER_PATCH)
    with (folder / "emulator.log").open("ab") as output:
        emulator.process = subprocess.Popen(
            [sys.executable, "-m", "sushy_tools.emulator.main", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )


def _wait_ready(emulator: _Emulator) -> None:
    assert emulator.process is not None
    deadline = time.monotonic() + READY_TIMEOUT
    while emulator.process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            _call(emulator, "/redfish/v1/", timeout=2)
            return
        time.sleep(0.2)
    lines = (emulator.folder / "emulator.log").read_text(errors="replace").strip().splitlines()
    raise LabError(
        f"the Redfish BMC emulator on {emulator.host}:{emulator.port} did not start "
        f"(exit {emulator.process.poll()}): {' / '.join(lines[-2:]) or 'no output'}"
    )


def _call(
    emulator: _Emulator,
    path: str,
    method: str = "GET",
    body: object = None,
    timeout: float = REQUEST_TIMEOUT,
) -> None:
    """One request to an emulator as its first user, over TLS checked against its certificate."""
    username, password = next(iter(emulator.users.items()))
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 - an https URL of our own making
        emulator.url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=str(emulator.folder / "cert.pem"))
    with urllib.request.urlopen(request, timeout=timeout, context=context):  # noqa: S310 - ditto
        pass


def write_certificate(cert_path: Path, key_path: Path, host: str, days: int = 365) -> str:
    """A self-signed certificate for ``host`` (its own CA) and its key, readable by root only;
    returns the SHA-256 fingerprint of the DER certificate, as hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"provisioner lab BMC {host}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# ---------------------------------------------------------------------- the notification hook


def _listen(notified: Callable[[dict[str, Any]], None]) -> ThreadingHTTPServer:
    """An HTTP server on a free loopback port that hands each PUT's JSON to ``notified``."""

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                data = json.loads(body)
            except ValueError:
                self.send_error(400, "not JSON")
                return
            if isinstance(data, dict):
                notified(data)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server
