"""The lab's local apt repositories of LAB BUILDS of NVIDIA packages, built and served.

For every stack whose repository URLs point at the lab repository's address (``host_port``,
e.g. ``10.200.0.1:8081``), and every Debian-family image of the fleet, :func:`build_repo`
builds a *flat* apt repository (``deb [signed-by=KEY] URL /``, the layout of NVIDIA's CUDA and
container-toolkit repositories) at the URL path the stack names. URL templates are expanded as
the Ansible inventory expands them for a node of that image (``{distro}`` ubuntu2404, ``{arch}``
x86_64, ``{pkg}`` deb, ``{pkg_arch}`` amd64). All stacks that name the same URL share one
repository, so it holds e.g. both the R570 and the R580 driver and playbooks can test upgrades,
pins and holds.
The CUDA repositories also serve the lab build of ``linux-headers-<release>`` for the kernel
the lab nodes run (the host's, ``kernel``), which the preflight role installs; the container
toolkit repositories the lab build of Ubuntu's ``containerd``, which the nvidia_container_toolkit
role installs on a node that lacks the runtime.

Layout under ``dest``::

    repo/                  the web root :func:`serve` publishes
      provisioner-lab.asc  the signing key (also in every repository folder)
      <url path>/          *.deb, Packages, Packages.gz, Release, InRelease, Release.gpg,
                           provisioner-lab.asc
    cache/                 never served: debs/ (built .debs by content hash), gnupg/ (the
                           lab's private signing key, made once); ``cache=`` puts it elsewhere,
                           so that several labs (one web root each) share one

:data:`KEY_FILE` (``provisioner-lab.asc``) is the ASCII-armoured public key; playbooks fetch
``<repo URL>provisioner-lab.asc`` and name it in ``signed-by``. Rebuilds are incremental (a
.deb whose content is unchanged is not rebuilt, an unchanged ``Release`` is not re-signed) and
deterministic: with the same cache, two builds give byte-identical files. Builds that share a
cache take turns (a file lock in it), so labs brought up at once never make two keys.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from provisioner.lab.debbuild import BuiltDeb, DebBuilder, LabRepoError, render_control
from provisioner.lab.debcontents import CONTAINERD, LabPackage, kernel_headers
from provisioner.lab.repokey import RepoKey
from provisioner.render.inventory import all_vars, image_vars, repo_url
from provisioner.spec import Fleet, load_fleet
from provisioner.spec.packages import DebPackage, component_packages, unique_packages

KEY_FILE = "provisioner-lab.asc"
WEB_ROOT = "repo"
CACHE = "cache"
DEFAULT_EPOCH = 1735689600  # 2025-01-01T00:00:00Z, when SOURCE_DATE_EPOCH is not set
ORIGIN = "provisioner lab"
LABEL = "LAB BUILDS - not NVIDIA software"
_INVENTORY_VAR = re.compile(r"\{\{ (\w+) \}\}")


@dataclass(frozen=True, slots=True)
class RepoPlan:
    """One flat repository to build: where nodes find it, and what it serves."""

    url: str  # as nodes see it, e.g. http://10.200.0.1:8081/cuda/ubuntu2404/x86_64/
    path: str  # its folder under the web root, e.g. cuda/ubuntu2404/x86_64
    packages: tuple[LabPackage, ...]


@dataclass(frozen=True, slots=True)
class RepoBuild:
    """What :func:`build_repo` made."""

    root: Path  # the web root
    repos: tuple[RepoPlan, ...]
    fingerprint: str  # of the signing key
    built: int  # .debs built by dpkg-deb this time
    reused: int  # .debs taken from the cache
    seconds: float


# --------------------------------------------------------------------------- planning


def plan_repos(fleet: Fleet, host_port: str, kernel: str | None = None) -> list[RepoPlan]:
    """The repositories at ``host_port`` that the fleet's stacks name, with their packages;
    the CUDA ones with the headers of kernel ``kernel`` too, when given (and a valid name)."""
    found: dict[str, tuple[str, list[DebPackage]]] = {}
    cuda_paths: set[str] = set()
    toolkit_paths: set[str] = set()  # where the lab's containerd stand-in is served too
    doc = fleet.document
    for image_name, image in sorted(doc.images.items()):
        variables = {**all_vars(fleet), **image_vars(image_name, image)}
        if variables["provisioner_pkg_format"] != "deb":
            continue
        for _, stack in sorted(doc.stacks.items()):
            templates = {
                "cuda": stack.repos.cuda,
                "container_toolkit": stack.repos.container_toolkit,
            }
            for packages in component_packages(stack).values():
                url = node_url(templates[packages[0].repo], variables)
                path = local_path(url, host_port)
                if path is not None:
                    found.setdefault(path, (url, []))[1].extend(packages)
                    if packages[0].repo == "cuda":
                        cuda_paths.add(path)
                    else:
                        toolkit_paths.add(path)
    headers = kernel_headers(kernel) if kernel else None
    return [
        RepoPlan(
            url,
            path,
            (
                *unique_packages(packages),
                *([headers] if headers and path in cuda_paths else []),
                *([CONTAINERD] if path in toolkit_paths else []),
            ),
        )
        for path, (url, packages) in sorted(found.items())
    ]


def node_url(template: str, variables: dict[str, Any]) -> str:
    """A spec URL template as a node of these inventory variables sees it: the inventory's
    own rendering (``repo_url``) with its ``{{ var }}`` filled in."""
    return _INVENTORY_VAR.sub(lambda m: str(variables[m.group(1)]), repo_url(template))


def local_path(url: str, host_port: str) -> str | None:
    """The folder for ``url`` if the lab repository at ``host_port`` serves it, else None."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.netloc != host_port:
        return None
    segments = [s for s in parts.path.split("/") if s]
    if any(s in (".", "..") for s in segments):
        raise LabRepoError(f"repository URL {url} has '.' or '..' in its path")
    return "/".join(segments)


# --------------------------------------------------------------------------- building


def build_repo(
    fleet: Fleet,
    dest: Path,
    host_port: str,
    *,
    epoch: int | None = None,
    kernel: str | None = None,
    cache: Path | None = None,
) -> RepoBuild:
    """Build (or bring up to date) every lab repository at ``host_port`` under ``dest``;
    ``kernel`` is the release whose headers the CUDA repositories serve (default: this host's,
    which the lab nodes run); ``cache`` holds the built .debs and the signing key (default
    ``dest/cache``)."""
    started = time.monotonic()
    when = epoch if epoch is not None else int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    plans = plan_repos(fleet, host_port, kernel if kernel is not None else os.uname().release)
    if not plans:
        raise LabRepoError(
            f"no stack of {fleet.spec_path} names a repository at http://{host_port}/"
        )
    root, cache = dest / WEB_ROOT, cache or dest / CACHE
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # given back when the file closes
        debs = _build_debs(DebBuilder(cache / "debs", when), plans)
        return _publish(root, cache, plans, debs, when, started)


def _publish(
    root: Path,
    cache: Path,
    plans: Sequence[RepoPlan],
    debs: dict[tuple[str, str], BuiltDeb],
    when: int,
    started: float,
) -> RepoBuild:
    """Write each repository's .debs, indexes and key under the web root ``root``."""
    with RepoKey(cache / "gnupg", when) as key:
        public = key.public_key()
        _write_if_changed(root / KEY_FILE, public)
        for plan in plans:
            folder = root / plan.path
            _sync_debs(folder, [debs[(p.name, p.version)] for p in plan.packages])
            _write_indexes(folder, [debs[(p.name, p.version)] for p in plan.packages], when, key)
            _write_if_changed(folder / KEY_FILE, public)
    built = sum(1 for deb in debs.values() if deb.built)
    return RepoBuild(
        root, tuple(plans), key.fingerprint, built, len(debs) - built, time.monotonic() - started
    )


def _build_debs(builder: DebBuilder, plans: Iterable[RepoPlan]) -> dict[tuple[str, str], BuiltDeb]:
    listed = [p for plan in plans for p in plan.packages]
    others = {p for p in listed if not isinstance(p, DebPackage)}  # headers, containerd
    nvidia = unique_packages(p for p in listed if isinstance(p, DebPackage))
    packages: list[LabPackage] = [*nvidia, *sorted(others, key=lambda p: p.name)]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        built = list(pool.map(builder.build, packages))
    return {(deb.package.name, deb.package.version): deb for deb in built}


def _sync_debs(folder: Path, debs: Sequence[BuiltDeb]) -> None:
    """Make the folder's .deb files exactly these (copy new or changed ones, drop others)."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {deb.package.filename: deb for deb in debs}
    for stale in folder.glob("*.deb"):
        if stale.name not in wanted:
            stale.unlink()
    for name, deb in wanted.items():
        _write_if_changed(folder / name, deb.path.read_bytes())


def _write_indexes(folder: Path, debs: Sequence[BuiltDeb], epoch: int, key: RepoKey) -> None:
    packages = packages_index(debs).encode()
    indexes = {"Packages": packages, "Packages.gz": gzip.compress(packages, 9, mtime=0)}
    for name, data in indexes.items():
        _write_if_changed(folder / name, data)
    release = release_file(indexes, epoch).encode()
    changed = _write_if_changed(folder / "Release", release)
    if changed or not (folder / "InRelease").is_file() or not (folder / "Release.gpg").is_file():
        _write_if_changed(folder / "InRelease", key.clearsign(release))
        _write_if_changed(folder / "Release.gpg", key.detach_sign(release))


def packages_index(debs: Sequence[BuiltDeb]) -> str:
    """The ``Packages`` file: each package's control fields plus file name, size and hashes."""
    stanzas = []
    for deb in sorted(debs, key=lambda d: (d.package.name, d.package.version)):
        data = deb.path.read_bytes()
        fields = [f for f in deb.control if f[0] != "Description"] + [
            ("Filename", f"./{deb.package.filename}"),
            ("Size", str(len(data))),
            ("MD5sum", hashlib.md5(data, usedforsecurity=False).hexdigest()),
            ("SHA1", hashlib.sha1(data, usedforsecurity=False).hexdigest()),
            ("SHA256", hashlib.sha256(data).hexdigest()),
            *[f for f in deb.control if f[0] == "Description"],
        ]
        stanzas.append(render_control(fields))
    return "\n".join(stanzas)


def release_file(indexes: dict[str, bytes], epoch: int) -> str:
    """The ``Release`` file of a flat repository, listing the indexes with their hashes."""
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime(epoch))
    lines = [f"Origin: {ORIGIN}", f"Label: {LABEL}", "Architectures: amd64 all", f"Date: {date}"]
    for field, algorithm in (("MD5Sum", "md5"), ("SHA256", "sha256")):
        lines.append(f"{field}:")
        for name, data in sorted(indexes.items()):
            digest = hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()
            lines.append(f" {digest} {len(data):>16} {name}")
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless the file already holds it; True if it was written."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_file = path.with_name(f".{path.name}.tmp")
    partial_file.write_bytes(data)
    partial_file.chmod(0o644)
    partial_file.replace(path)
    return True


# --------------------------------------------------------------------------- serving


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged."""


class RepoServer:
    """The web root served over HTTP from daemon threads until :meth:`stop`."""

    def __init__(self, root: Path, host: str, port: int) -> None:
        handler = partial(_QuietHandler, directory=str(root))
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="lab-apt-repo", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> RepoServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def serve(dest: Path, host: str, port: int) -> RepoServer:
    """Start serving ``dest``'s web root (never its cache) on ``host:port`` (0: any port)."""
    root = dest / WEB_ROOT
    if not root.is_dir():
        raise LabRepoError(f"{root} does not exist: build the repository first")
    return RepoServer(root, host, port)


# --------------------------------------------------------------------------- command line


def spec_address(fleet: Fleet) -> str:
    """The one http address the fleet's stacks name for their repositories."""
    urls = [
        u for s in fleet.document.stacks.values() for u in (s.repos.cuda, s.repos.container_toolkit)
    ]
    found = sorted({urlsplit(u).netloc for u in urls if u.startswith("http://")})
    if len(found) != 1:
        raise LabRepoError(f"stacks name {found or 'no http'} repository addresses: pass --address")
    return found[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m provisioner.lab.aptrepo",
        description="Build (and serve) the lab's apt repositories of NVIDIA package LAB BUILDS.",
    )
    parser.add_argument("spec", type=Path, help="fleet spec (e.g. inventories/lab/fleet.yaml)")
    parser.add_argument("--dest", type=Path, required=True, help="output folder")
    parser.add_argument("--address", help="HOST:PORT the spec's URLs use (default: the spec's)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="serve the result until Ctrl-C")
    parser.add_argument("--kernel", help="serve headers of this kernel (default: uname -r)")
    args = parser.parse_args(argv)
    try:
        fleet = load_fleet(args.spec)
        address = args.address or spec_address(fleet)
        result = build_repo(fleet, args.dest, address, kernel=args.kernel)
    except LabRepoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _report(result)
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        with serve(args.dest, host or "0.0.0.0", int(port)) as server:  # noqa: S104
            print(f"serving {result.root} at {server.url} (Ctrl-C stops)")
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                print("stopped")
    return 0


def _report(result: RepoBuild) -> None:
    for plan in result.repos:
        print(f"{plan.url} -> {result.root / plan.path} ({len(plan.packages)} packages)")
    print(
        f"key {result.fingerprint}; {result.built} .deb built, {result.reused} reused; "
        f"{result.seconds:.2f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
