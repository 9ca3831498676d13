"""FAKE RPM packages and signed dnf repositories of them, for tests of the RHEL-family tasks.

Nothing built here is NVIDIA's or any distribution's software: each package is a stand-in
with a real package's name, epoch, version, release and provides, and a payload of a few
tiny files (a note saying it is a test fake, and where a role needs one, a systemd unit or a
shell script that answers like the real tool). They exist so that real ``rpm`` and ``dnf``
can resolve, verify and install exactly what the roles ask for, without NVIDIA's
repositories and without a RHEL machine.

* :class:`FakeRpm` is one package; :func:`build_rpms` makes ``.rpm`` files of them with
  ``rpmbuild`` (no automatic requires: the fakes resolve from their repositories alone).
  ``rpmbuild`` and ``rpmsign`` get a private RPM database, so that Debian's rpm does not make
  one in ``~/.rpmdb``.
* :class:`SigningKey` is a throwaway GnuPG key in a private home: it signs packages
  (``rpmsign``, for ``gpgcheck``) and repository metadata (``repomd.xml.asc``, for
  ``repo_gpgcheck``), and publishes its public key for ``rpm_key`` and dnf's ``gpgkey``.
* :func:`write_repo` lays out one repository: packages, ``createrepo_c`` metadata, signature
  and key file.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_TIMEOUT = 120
FAKE_NOTE = "FAKE package built by provisioner's tests: not NVIDIA's or any vendor's software.\n"


@dataclass(frozen=True)
class RpmFile:
    """One file of a fake package: absolute path, text, mode; or, with ``link``, a symlink."""

    path: str
    text: str = ""
    mode: int = 0o644
    link: str | None = None


@dataclass(frozen=True)
class FakeRpm:
    """A stand-in package: the real one's name, EVR and provides; a tiny payload."""

    name: str
    version: str
    release: str = "1"
    epoch: int | None = None
    arch: str = "x86_64"
    provides: tuple[str, ...] = ()
    files: tuple[RpmFile, ...] = field(default=())

    @property
    def evr(self) -> str:
        epoch = f"{self.epoch}:" if self.epoch is not None else ""
        return f"{epoch}{self.version}-{self.release}"

    @property
    def nevra(self) -> str:
        return f"{self.name}-{self.evr}.{self.arch}"

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.version}-{self.release}.{self.arch}.rpm"


def unit(description: str, exec_start: str) -> str:
    """A systemd service unit that a fake package installs (enabled by multi-user.target)."""
    return (
        f"[Unit]\nDescription={description} (FAKE test package)\n\n"
        f"[Service]\nExecStart={exec_start}\n\n[Install]\nWantedBy=multi-user.target\n"
    )


def build_rpms(packages: Iterable[FakeRpm], dest: Path) -> list[Path]:
    """Build each package into ``dest`` with ``rpmbuild``; returns the ``.rpm`` paths."""
    dest.mkdir(parents=True, exist_ok=True)
    built = []
    with tempfile.TemporaryDirectory(prefix="fake-rpm-") as work:
        for package in packages:
            built.append(_build_one(package, Path(work) / package.nevra, dest))
    return built


def _build_one(package: FakeRpm, work: Path, dest: Path) -> Path:
    payload = work / "payload"
    files = (RpmFile(f"/usr/share/doc/{package.name}/FAKE-PACKAGE", FAKE_NOTE), *package.files)
    listed = []
    for item in files:
        target = payload / item.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if item.link is not None:
            target.symlink_to(item.link)
            listed.append(item.path)
        else:
            target.write_text(item.text)
            target.chmod(item.mode)
            listed.append(f"%attr({item.mode:o},root,root) {item.path}")
    spec = work / f"{package.name}.spec"
    lines = [
        f"Name: {package.name}",
        f"Version: {package.version}",
        f"Release: {package.release}",
        *([f"Epoch: {package.epoch}"] if package.epoch is not None else []),
        "Summary: FAKE stand-in package for provisioner's tests",
        "License: Apache-2.0",
        f"BuildArch: {package.arch}",
        "AutoReqProv: no",
        *[f"Provides: {provide}" for provide in package.provides],
        "%global debug_package %{nil}",
        "%global __os_install_post %{nil}",
        "%global _build_id_links none",
        "%description",
        FAKE_NOTE.strip(),
        "%install",
        f"cp -a {payload}/. %{{buildroot}}/",
        "%files",
        *listed,
        "",
    ]
    spec.write_text("\n".join(lines))
    _run(
        ["rpmbuild", "-bb", "--quiet", "--target", package.arch,
         "--define", f"_topdir {work / 'top'}", "--define", f"_rpmdir {work / 'out'}",
         "--define", "_rpmfilename %{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}.rpm",
         "--define", "_binary_payload w2.gzdio", "--define", f"_dbpath {work / 'rpmdb'}",
         "--nodeps", str(spec)],
    )  # fmt: skip
    built = dest / package.file_name
    shutil.move(work / "out" / package.file_name, built)
    return built


class SigningKey:
    """A throwaway Ed25519 signing key in a private GnuPG home; use as a context manager."""

    USER_ID = "provisioner tests FAKE repository key (not NVIDIA's) <tests@provisioner.invalid>"

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="fake-gpg-"))  # short: gpg-agent's socket
        self.home.chmod(0o700)
        self.fingerprint = ""

    def __enter__(self) -> SigningKey:
        self._gpg("--passphrase", "", "--quick-generate-key", self.USER_ID, "ed25519", "sign",
                  "never")  # fmt: skip
        for line in self._gpg("--with-colons", "--list-secret-keys").decode().splitlines():
            if line.startswith("fpr:"):
                self.fingerprint = line.split(":")[9]
                break
        return self

    def __exit__(self, *_: object) -> None:
        subprocess.run(
            ["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"],
            capture_output=True, check=False, timeout=_TIMEOUT,
        )  # fmt: skip
        shutil.rmtree(self.home, ignore_errors=True)

    def public_key(self) -> bytes:
        """The ASCII-armoured public key (what ``rpm --import`` and dnf's gpgkey read)."""
        return self._gpg("--armor", "--export", self.fingerprint)

    def sign_rpms(self, paths: Sequence[Path]) -> None:
        """Add a package signature to each ``.rpm`` (dnf checks it where gpgcheck is on)."""
        _run(
            ["rpmsign", "--addsign", "--define", f"_dbpath {self.home / 'rpmdb'}",
             "--define", f"_gpg_name {self.fingerprint}",
             "--define", f"_gpg_path {self.home}",
             "--define", f"__gpg_sign_cmd {shutil.which('gpg')} gpg --batch --no-tty"
             " --pinentry-mode loopback --homedir %{_gpg_path} -u %{_gpg_name}"
             " --digest-algo sha256 -sbo %{__signature_filename} %{__plaintext_filename}",
             *map(str, paths)],
        )  # fmt: skip

    def detach_sign(self, path: Path) -> None:
        """``<path>.asc``: an armoured detached signature (dnf's repo_gpgcheck reads it)."""
        self._gpg("--local-user", self.fingerprint, "--armor", "--detach-sign", "--output",
                  f"{path}.asc", str(path))  # fmt: skip

    def _gpg(self, *args: str) -> bytes:
        return _run(["gpg", "--batch", "--no-tty", "--quiet", "--homedir", str(self.home),
                     "--pinentry-mode", "loopback", *args])  # fmt: skip


def write_repo(
    folder: Path,
    rpms: Sequence[Path],
    *,
    key: SigningKey | None = None,
    key_file: str = "",
    sign_metadata: bool = False,
) -> None:
    """A dnf repository in ``folder``: the packages, ``repodata/`` from ``createrepo_c``, with
    ``key``: its public key as ``key_file`` and, with ``sign_metadata``, ``repomd.xml.asc``."""
    folder.mkdir(parents=True, exist_ok=True)
    for rpm in rpms:
        shutil.copy2(rpm, folder / rpm.name)
    _run(["createrepo_c", "--quiet", "--no-database", str(folder)])
    if key is not None:
        if key_file:
            (folder / key_file).write_bytes(key.public_key())
        if sign_metadata:
            key.detach_sign(folder / "repodata" / "repomd.xml")


def _run(command: list[str]) -> bytes:
    done = subprocess.run(command, capture_output=True, check=False, timeout=_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:3])} ... failed ({done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout
