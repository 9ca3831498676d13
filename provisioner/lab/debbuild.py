"""Build the lab's .deb files with ``dpkg-deb``, once per content, byte for byte reproducibly.

A package's *content key* is the SHA-256 of everything that goes into its .deb (control
fields, every file's path, mode and bytes, the build settings). Built files are kept in a cache
folder under that key, so a rebuild with the same content runs no ``dpkg-deb`` at all. Builds
are deterministic: files are staged with fixed modes and mtimes (``SOURCE_DATE_EPOCH``),
``dpkg-deb --root-owner-group`` makes every file root's, and ``dpkg-deb`` itself uses
``SOURCE_DATE_EPOCH`` for the archive timestamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from provisioner.errors import ProvisionerError
from provisioner.lab.debcontents import (
    DebFile,
    KernelHeaders,
    LabPackage,
    RuntimeStandIn,
    package_files,
)

MAINTAINER = "provisioner lab"
COMPRESSION = "xz"  # what Ubuntu 24.04 and Debian 12 dpkg both read (not zstd)
_BUILD_SETTINGS = f"dpkg-deb --root-owner-group -Z{COMPRESSION} (lab build 1)"


class LabRepoError(ProvisionerError):
    """The lab's apt repository could not be built (a tool failed or is missing)."""


@dataclass(frozen=True, slots=True)
class BuiltDeb:
    """A .deb in the cache, with the facts its ``Packages`` stanza needs."""

    package: LabPackage
    path: Path
    control: tuple[tuple[str, str], ...]
    built: bool  # False when the cache already held it


def control_fields(package: LabPackage, files: list[DebFile]) -> list[tuple[str, str]]:
    """The DEBIAN/control fields, in Debian's usual order; empty relations left out."""
    installed_kib = sum(max(1, -(-len(f.data) // 1024)) for f in files)
    fields = [
        ("Package", package.name),
        ("Version", package.version),
        ("Architecture", package.architecture),
        ("Maintainer", MAINTAINER),
        ("Installed-Size", str(installed_kib)),
        ("Depends", ", ".join(package.depends)),
        ("Conflicts", ", ".join(package.conflicts)),
        ("Replaces", ", ".join(package.replaces)),
        ("Provides", ", ".join(package.provides)),
        ("Section", "misc"),
        ("Priority", "optional"),
        ("Description", description(package)),
    ]
    return [(name, value) for name, value in fields if value]


def description(package: LabPackage) -> str:
    """Synopsis plus extended lines (each continuation line starts with a space)."""
    if isinstance(package, KernelHeaders):
        return (
            f"LAB BUILD of {package.name} - not a kernel package\n"
            " Tiny stand-in built by the provisioner lab for the kernel the lab nodes run\n"
            " (the host's): a note and the modules' build link. It holds no headers."
        )
    if isinstance(package, RuntimeStandIn):
        return (
            f"LAB BUILD of {package.name} - not the real {package.name}\n"
            " Tiny stand-in built by the provisioner lab for Ubuntu's package of that name\n"
            f" ({package.summary}).\n"
            " Its daemon idles; it runs no containers."
        )
    return (
        f"LAB BUILD of {package.name} - not NVIDIA software\n"
        f" Tiny stand-in built by the provisioner lab under the name and version of\n"
        f" NVIDIA's package: {package.summary}. It contains no NVIDIA code."
    )


def render_control(fields: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    return "".join(f"{name}: {value}\n" for name, value in fields)


def content_key(control: str, files: list[DebFile], epoch: int) -> str:
    """SHA-256 over everything that decides the .deb's bytes."""
    digest = hashlib.sha256()
    head = {"settings": _BUILD_SETTINGS, "epoch": epoch, "control": control}
    digest.update(json.dumps(head, sort_keys=True).encode())
    for file in files:
        digest.update(f"\0{file.path}\0{file.mode:o}\0{len(file.data)}\0".encode())
        digest.update(file.data)
        if file.link is not None:
            digest.update(f"\0->{file.link}\0".encode())
    return digest.hexdigest()


class DebBuilder:
    """Builds .deb files into ``cache`` (one per content key), skipping those already there."""

    def __init__(self, cache: Path, epoch: int) -> None:
        self.cache = cache
        self.epoch = epoch
        self.cache.mkdir(parents=True, exist_ok=True)
        if shutil.which("dpkg-deb") is None:
            raise LabRepoError("dpkg-deb is not installed (Debian package dpkg)")

    def build(self, package: LabPackage) -> BuiltDeb:
        files = package_files(package)
        fields = tuple(control_fields(package, files))
        control = render_control(fields)
        target = self.cache / f"{content_key(control, files, self.epoch)}.deb"
        if target.is_file():
            return BuiltDeb(package, target, fields, built=False)
        with tempfile.TemporaryDirectory(prefix="stage-", dir=self.cache) as tmp:
            root = Path(tmp) / "root"
            self._stage(root, control, files)
            partial = Path(tmp) / "out.deb"
            self._dpkg_deb(root, partial)
            partial.replace(target)
        return BuiltDeb(package, target, fields, built=True)

    def _stage(self, root: Path, control: str, files: list[DebFile]) -> None:
        md5sums = "".join(
            f"{hashlib.md5(f.data, usedforsecurity=False).hexdigest()}  {f.path.lstrip('/')}\n"
            for f in files
            if f.link is None
        )
        staged = [*files, DebFile("/DEBIAN/control", control.encode())]
        staged.append(DebFile("/DEBIAN/md5sums", md5sums.encode()))
        for file in staged:
            path = root / file.path.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            if file.link is not None:
                path.symlink_to(file.link)
                continue
            path.write_bytes(file.data)
            path.chmod(file.mode)
        for path in sorted(root.rglob("*"), reverse=True):
            if path.is_dir() and not path.is_symlink():  # a link's target is the host's path
                path.chmod(0o755)
            os.utime(path, (self.epoch, self.epoch), follow_symlinks=False)
        root.chmod(0o755)
        os.utime(root, (self.epoch, self.epoch))

    def _dpkg_deb(self, root: Path, out: Path) -> None:
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(self.epoch), "LC_ALL": "C.UTF-8"}
        command = ["dpkg-deb", "--root-owner-group", f"-Z{COMPRESSION}", "--build", str(root)]
        done = subprocess.run(
            [*command, str(out)], capture_output=True, text=True, env=env, check=False
        )
        if done.returncode != 0:
            raise LabRepoError(f"dpkg-deb failed for {root}: {done.stderr.strip()}")
