"""A Rocky Linux 9 look-alike for Ansible, made of this Debian host without changing it.

No RHEL machine exists here, so the RHEL-family tasks of the roles run against a *root*: the
host's root file system under an overlay whose upper layer lives in the test's folder, with
Rocky's identity files written into it (``/etc/os-release``, ``/etc/redhat-release``, an RPM
database under ``/var/lib/rpm``, Rocky's ``dnf.conf``). Debian's ``dnf``, ``rpm`` and their
Python bindings (for the ``/usr/bin/python3`` that the rendered inventory names) do the
package work, so ``gather_facts`` says Rocky 9 (os family RedHat, package manager dnf) and the
roles' dnf, rpm_key, yum_repository and package_facts tasks talk to a real RPM database.

Every command runs in a private mount namespace (``unshare --mount``) that mounts the
overlay, the host's ``/proc``, ``/sys`` and ``/dev`` and a fresh ``/run``, then ``chroot``\\s
into it: whatever the command writes lands in the upper layer, which the test can list and
compare, and nothing is mounted or written outside it once the command ends. Inside, the
node is a chroot in systemd's sense too (systemctl edits unit files but starts nothing), as
when Ansible configures an image. Root only.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

ROCKY_RELEASE = "9.5"
OS_RELEASE = f"""\
NAME="Rocky Linux"
VERSION="{ROCKY_RELEASE} (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="{ROCKY_RELEASE}"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Rocky Linux {ROCKY_RELEASE} (Blue Onyx)"
ANSI_COLOR="0;32"
HOME_URL="https://rockylinux.org/"
"""
RELEASE_LINE = f"Rocky Linux release {ROCKY_RELEASE} (Blue Onyx)\n"
# Rocky 9's /etc/dnf/dnf.conf.
DNF_CONF = """\
[main]
gpgcheck=1
installonly_limit=3
clean_requirements_on_remove=True
best=True
skip_if_unavailable=False
"""
# Debian's rpm keeps its database in ~/.rpmdb; RHEL's is /var/lib/rpm.
RPM_MACROS = "%_dbpath /var/lib/rpm\n"
# Paths that only caches and logs write (dnf downloads metadata even in check mode).
CACHE_PATHS = ("var/cache/dnf", "var/log", "var/lib/dnf", "root/.cache")
# Inside the root: HOME and Ansible's temporary folders, on the fresh /run (not in the layer).
RUN_HOME = "/run/ansible-home"


class RhelRoot:
    """The look-alike node in ``folder`` (``upper/``, ``work/``, ``merged/``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.upper = folder / "upper"
        self.merged = folder / "merged"

    def create(self, repo_files: dict[str, str], packages: Sequence[Path] = ()) -> None:
        """Lay down Rocky's identity, an RPM database holding ``packages`` (``.rpm`` files,
        e.g. a fake ``rocky-release``) and ``repo_files`` (name -> text) in
        /etc/yum.repos.d."""
        for sub in ("upper", "work", "merged"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        files = {
            "/etc/os-release": OS_RELEASE,
            "/etc/redhat-release": RELEASE_LINE,
            "/etc/rocky-release": RELEASE_LINE,
            "/etc/system-release": RELEASE_LINE,
            "/etc/dnf/dnf.conf": DNF_CONF,
            "/etc/rpm/macros": RPM_MACROS,
            **{f"/etc/yum.repos.d/{name}": text for name, text in repo_files.items()},
        }
        script = [
            "set -e",
            "rm -f /etc/debian_version /etc/lsb-release",
            "rm -rf /etc/yum.repos.d /var/lib/rpm",
            "mkdir -p /etc/yum.repos.d /etc/rpm",
        ]
        for path, text in files.items():
            script.append(f"printf %s {shlex.quote(text)} > {shlex.quote(path)}")
        script.append("rpm --initdb")
        if packages:
            script.append(shlex.join(["rpm", "-i", "--nodeps", *map(str, packages)]))
        done = self.run(["/bin/sh", "-c", "\n".join(script)], timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"could not make the Rocky root: {done.stdout}{done.stderr}")

    def run(
        self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the root (private mount namespace + chroot), as root."""
        merged = shlex.quote(str(self.merged))
        options = f"lowerdir=/,upperdir={self.upper},workdir={self.folder / 'work'}"
        setup = "\n".join([
            "set -e",
            f"mount -t overlay overlay -o {shlex.quote(options)} {merged}",
            *[f"mount --rbind /{m} {merged}/{m}" for m in ("proc", "sys", "dev")],
            f"mount -t tmpfs -o mode=0755 tmpfs {merged}/run",
            f"mkdir -p {merged}{RUN_HOME}",
            f'exec chroot {merged} "$@"',
        ])  # fmt: skip
        variables = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": RUN_HOME,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            **(env or {}),
        }
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", setup,
             "rhelroot", "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in variables.items()],
             *argv],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def snapshot(self, *, skip: tuple[str, ...] = CACHE_PATHS) -> dict[str, str]:
        """What the node's own layer holds: path -> type, mode and content digest (or link
        target); caches and logs (``skip``) left out."""
        found: dict[str, str] = {}
        for folder, dirs, files in os.walk(self.upper):
            base = Path(folder)
            relative = base.relative_to(self.upper).as_posix()
            if relative != "." and relative.startswith(skip):
                dirs.clear()
                continue
            for name in sorted(dirs + files):
                path = base / name
                key = path.relative_to(self.upper).as_posix()
                if key.startswith(skip) or key.endswith(".sqlite-shm"):
                    continue  # -shm: SQLite's shared-memory index, which readers touch too
                found[key] = _describe(path)
        return found

    def rpm_query(self, *names: str) -> dict[str, str]:
        """Installed packages (all, or ``names``): name -> ``[epoch:]version-release``."""
        fmt = "%{NAME} %|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\\n"
        done = self.run(["rpm", "-q" if names else "-qa", "--qf", fmt, *names], timeout=60)
        lines = done.stdout.splitlines()  # "package X is not installed" for a missing one
        return dict(line.split(" ", 1) for line in lines if not line.endswith(" not installed"))


def _describe(path: Path) -> str:
    info = path.lstat()
    mode = f"{stat.S_IMODE(info.st_mode):o}"
    if stat.S_ISLNK(info.st_mode):
        return f"link {path.readlink()}"
    if stat.S_ISDIR(info.st_mode):
        return f"dir {mode}"
    if stat.S_ISCHR(info.st_mode):
        return "whiteout"
    return f"file {mode} {hashlib.sha256(path.read_bytes()).hexdigest()}"
