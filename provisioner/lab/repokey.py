"""The lab repository's signing key: made once with ``gpg --batch``, kept, used to sign.

The key lives in a private GnuPG home (mode 0700) in the build cache, so rebuilds reuse it and
nodes that trusted it once keep trusting it. It is an Ed25519 signing key whose user ID says
it is a lab key. Each use copies that home into a short-lived one under the system temp folder
(gpg-agent's socket path must stay short) and stops the agent afterwards.

Signatures are made at a fixed time (``--faked-system-time``, from ``SOURCE_DATE_EPOCH``), and
Ed25519 signatures are deterministic, so signing the same ``Release`` twice gives the same
``InRelease`` and ``Release.gpg`` bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from provisioner.lab.debbuild import LabRepoError

KEY_USER_ID = (
    "provisioner lab apt repository (LAB BUILDS - not NVIDIA software) <lab@provisioner.invalid>"
)
_TIMEOUT = 120


class RepoKey:
    """A signing session on the cached lab key; use as a context manager."""

    def __init__(self, home: Path, epoch: int) -> None:
        self.home = home
        self.epoch = epoch
        self._work: Path | None = None
        self.fingerprint = ""
        self.created = 0
        if shutil.which("gpg") is None:
            raise LabRepoError("gpg is not installed (Debian package gpg)")

    def __enter__(self) -> RepoKey:
        self._work = Path(tempfile.mkdtemp(prefix="plab-gpg-"))
        self._work.chmod(0o700)
        if not (self.home / "pubring.kbx").is_file():
            self._generate()
        shutil.copytree(self.home, self._work, dirs_exist_ok=True)
        self.fingerprint, self.created = self._find_key()
        return self

    def __exit__(self, *_: object) -> None:
        if self._work is not None:
            subprocess.run(
                ["gpgconf", "--homedir", str(self._work), "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
                timeout=_TIMEOUT,
            )
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    # ------------------------------------------------------------------ use

    def public_key(self) -> bytes:
        """The public key, ASCII-armoured, as the nodes' apt reads it (``signed-by``)."""
        return self._gpg("--armor", "--export", self.fingerprint)

    def clearsign(self, data: bytes) -> bytes:
        """``InRelease``: the Release text with its signature inline."""
        return self._sign("--clearsign", data)

    def detach_sign(self, data: bytes) -> bytes:
        """``Release.gpg``: an armoured detached signature of the Release text."""
        return self._sign("--detach-sign", data, "--armor")

    # ------------------------------------------------------------------ gpg

    def _sign(self, mode: str, data: bytes, *extra: str) -> bytes:
        when = max(self.epoch, self.created)  # a signature may not predate its key
        return self._gpg(
            f"--faked-system-time={when}!",
            "--local-user",
            self.fingerprint,
            "--digest-algo",
            "SHA512",
            *extra,
            mode,
            stdin=data,
        )

    def _generate(self) -> None:
        """Make the key in a fresh home, then keep that home as the cache's."""
        with _gpg_home() as fresh:
            _run_gpg(
                fresh,
                f"--faked-system-time={self.epoch}!",
                "--passphrase",
                "",
                "--quick-generate-key",
                KEY_USER_ID,
                "ed25519",
                "sign",
                "never",
            )
            self.home.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.home, ignore_errors=True)
            shutil.copytree(fresh, self.home, ignore=shutil.ignore_patterns("S.*", "*.lock"))
            self.home.chmod(0o700)

    def _find_key(self) -> tuple[str, int]:
        listing = self._gpg("--with-colons", "--list-secret-keys").decode()
        fingerprint, created = "", 0
        for line in listing.splitlines():
            fields = line.split(":")
            if fields[0] == "sec" and not created:
                created = int(fields[5])
            elif fields[0] == "fpr" and not fingerprint:
                fingerprint = fields[9]
        if not fingerprint:
            raise LabRepoError(f"no secret key in the lab key cache {self.home}")
        return fingerprint, created

    def _gpg(self, *args: str, stdin: bytes | None = None) -> bytes:
        if self._work is None:
            raise LabRepoError("RepoKey is used outside its with-block")
        return _run_gpg(self._work, *args, stdin=stdin)


@contextmanager
def _gpg_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="plab-gpg-"))
    home.chmod(0o700)
    try:
        yield home
    finally:
        subprocess.run(
            ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
            capture_output=True,
            check=False,
            timeout=_TIMEOUT,
        )
        shutil.rmtree(home, ignore_errors=True)


def _run_gpg(home: Path, *args: str, stdin: bytes | None = None) -> bytes:
    command = ["gpg", "--batch", "--no-tty", "--quiet", "--homedir", str(home)]
    command += ["--pinentry-mode", "loopback", *args]
    done = subprocess.run(command, input=stdin, capture_output=True, check=False, timeout=_TIMEOUT)
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise LabRepoError(f"gpg {' '.join(args[:2])} failed: {message}")
    return done.stdout
