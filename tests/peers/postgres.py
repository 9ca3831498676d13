"""A real PostgreSQL server on loopback for the state store's tests.

:func:`start_postgres` runs Debian's ``initdb`` and ``pg_ctl`` (``/usr/lib/postgresql/<ver>/
bin``) as the ``postgres`` system user (the server refuses to run as root), with its data and
socket in a fresh temporary folder owned by that user, listening on 127.0.0.1 on a free port
with trust authentication; :meth:`PostgresServer.stop` stops it (``-m immediate``) and removes
the folder. Every command is bounded in time. Durability is off: the data is thrown away.

Needs root (to act as ``postgres``) and the ``postgresql`` package (``scripts/bootstrap
--dev`` installs it).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.peers import LOOPBACK, free_tcp_port

USER = "postgres"


class PostgresUnavailable(Exception):
    """PostgreSQL cannot be started here; the message says why."""


def _bindir() -> Path:
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda path: [int(n) for n in re.findall(r"\d+", path.parent.parent.name)],
    )
    if not found:
        raise PostgresUnavailable(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl):"
            " scripts/bootstrap --dev installs it"
        )
    return found[-1].parent


@dataclass
class PostgresServer:
    root: Path
    bindir: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@{LOOPBACK}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # a name we made, not input
        return self.url(name)

    def _as_postgres(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runuser", "-u", USER, "--", *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                pg_ctl = str(self.bindir / "pg_ctl")
                self._as_postgres(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """Start a throwaway server (root only); raises :class:`PostgresUnavailable`."""
    if os.geteuid() != 0:
        raise PostgresUnavailable("starting PostgreSQL as the postgres user needs root")
    bindir = _bindir()
    try:
        account = pwd.getpwnam(USER)
    except KeyError:
        missing = f"no {USER} system user (the postgresql package makes it)"
        raise PostgresUnavailable(missing) from None
    root = Path(tempfile.mkdtemp(prefix="provisioner-pg-"))
    os.chown(root, account.pw_uid, account.pw_gid)
    server = PostgresServer(root, bindir, 0)
    try:
        _init(server)
        for _ in range(3):  # a free port can be taken before the server binds it
            server.port = free_tcp_port()
            if _start(server):
                return server
        raise PostgresUnavailable(f"pg_ctl start failed: {_log(server)}")
    except BaseException:
        server.stop()
        raise


def _init(server: PostgresServer) -> None:
    done = server._as_postgres(
        str(server.bindir / "initdb"),
        "-D",
        str(server.data),
        "-U",
        USER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-sync",
    )
    if done.returncode != 0:
        raise PostgresUnavailable(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")


def _start(server: PostgresServer) -> bool:
    options = (
        f"-p {server.port} -k {server.root} -c listen_addresses={LOOPBACK}"
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    done = server._as_postgres(
        str(server.bindir / "pg_ctl"),
        "-D",
        str(server.data),
        "-l",
        str(server.root / "server.log"),
        "-o",
        options,
        "-w",
        "-t",
        "30",
        "start",
    )
    return done.returncode == 0


def _log(server: PostgresServer) -> str:
    try:
        return (server.root / "server.log").read_text(encoding="utf-8")[-2000:]
    except OSError:
        return "(no server log)"
