"""What each lab stand-in package contains: tiny, real files, and a note saying what it is.

Every package carries ``/usr/share/doc/<name>/LAB-BUILD``. Beyond that the files depend on the
package's role (see :class:`provisioner.spec.packages.DebPackage`): the driver's utils package
installs ``nvidia-smi``, ``nvidia-persistenced`` with its systemd unit and
``/usr/share/provisioner-lab/driver-version``; the fabric manager
and DCGM install their systemd units and daemons (which log that they are lab builds and sleep);
the CUDA toolkit installs ``/usr/local/cuda-X.Y/version.json`` and ``bin/nvcc``; the container
toolkit ``nvidia-ctk``, ``nvidia-container-cli`` and the runtime hook. The Python tools come from
:mod:`provisioner.lab.labbin` with their ``@NAME@`` placeholders filled in and run with the
node's ``python3`` (3.10 or later); the packages do not declare it, so that apt resolves a stack
from the lab repositories alone. Pure: a package in, its files out.

One lab build is no NVIDIA package: :class:`KernelHeaders`, ``linux-headers-<release>`` for the
kernel the lab nodes run (the host's, which no repository the nodes reach carries), so that
the preflight role can install the running kernel's headers as it does on a real node. It holds
a note and the ``/lib/modules/<release>/build`` link that DKMS builds against; no headers.
Nor is :data:`CONTAINERD`, a stand-in for Ubuntu's ``containerd`` (which no repository the nodes
reach carries either), served beside the container toolkit so that the nvidia_container_toolkit
role can install the runtime a node lacks: a ``containerd`` that idles, its systemd unit, and no
``/etc/containerd/config.toml`` (Ubuntu's package ships none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from provisioner.spec.packages import DebPackage, Role, driver_cuda_version, nvcc_version

LAB_STATE_FILES = "/usr/share/provisioner-lab"
DRIVER_VERSION_FILE = f"{LAB_STATE_FILES}/driver-version"
KERNEL_HEADERS_VERSION = "0~lab1"  # below any distribution's: a real package always wins
_PLACEHOLDER = re.compile(r"@[A-Z_]+@")
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")


@dataclass(frozen=True, slots=True)
class DebFile:
    """One file of a package: absolute path on the node, bytes, permission bits; or, with
    ``link``, a symbolic link to that target."""

    path: str
    data: bytes
    mode: int = 0o644
    link: str | None = None


@dataclass(frozen=True, slots=True)
class KernelHeaders:
    """The lab build of ``linux-headers-<release>``, for the kernel the lab nodes run."""

    release: str  # ``uname -r``
    architecture: str = "amd64"
    depends: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"linux-headers-{self.release}"

    @property
    def version(self) -> str:
        return KERNEL_HEADERS_VERSION

    @property
    def summary(self) -> str:
        return f"Linux kernel headers for {self.release}"

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_{self.architecture}.deb"


@dataclass(frozen=True, slots=True)
class RuntimeStandIn:
    """The lab build of a distribution's container runtime package (:data:`CONTAINERD`)."""

    name: str
    version: str
    summary: str
    architecture: str = "amd64"
    depends: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version}_{self.architecture}.deb"


CONTAINERD = RuntimeStandIn("containerd", "0~lab1", "daemon to control runC")
LabPackage = DebPackage | KernelHeaders | RuntimeStandIn  # what the lab repositories serve


def kernel_headers(release: str) -> KernelHeaders | None:
    """The headers package of kernel ``release``; None when ``linux-headers-<release>`` is no
    valid Debian package name (a kernel built with capitals or ``_`` in its release)."""
    package = KernelHeaders(release)
    return package if _PACKAGE_NAME.fullmatch(package.name) else None


def package_files(package: LabPackage) -> list[DebFile]:
    """All files of the lab build of ``package``, sorted by path."""
    if isinstance(package, KernelHeaders):
        files = _kernel_headers(package)
    elif isinstance(package, RuntimeStandIn):
        files = _container_runtime(package)
    else:
        files = [_lab_note(package), *_ROLE_FILES.get(package.role, _nothing)(package)]
    return sorted(files, key=lambda f: f.path)


# --------------------------------------------------------------------------- per role


# Where a lab daemon notes the version it started as (the journal may drop a line written the
# instant a unit starts): tests read which build runs there.
DAEMONS_STARTED = "/run/provisioner-lab-daemons"


def _started(daemon: str, version: str) -> str:
    """Shell lines noting that ``daemon`` of ``version`` started."""
    return f'mkdir -p {DAEMONS_STARTED}\necho "{version}" > {DAEMONS_STARTED}/{daemon}\n'


def _nothing(package: DebPackage) -> list[DebFile]:
    return []


def _utils(package: DebPackage) -> list[DebFile]:
    values = {"DRIVER_VERSION": package.upstream, "CUDA_VERSION": _cuda_of(package.upstream)}
    # nvidia-persistenced and its unit (NVIDIA's packages ship them in nvidia-compute-utils,
    # which the lab folds into its utils stand-in): the driver role enables and starts it.
    persistenced = _shell(
        f'if [ "${{1:-}}" = "--version" ]; then\n'
        f'  echo "nvidia-persistenced: version {package.upstream}"\n  exit 0\nfi\n'
        f'echo "LAB BUILD of nvidia-persistenced {package.upstream} (provisioner lab) - not NVIDIA'
        f' software: no GPU is kept initialised; idling"\n'
        + _started("nvidia-persistenced", package.upstream)
        + "exec sleep infinity\n"
    )
    unit = _unit(
        "NVIDIA Persistence Daemon (LAB BUILD - not NVIDIA software)",
        "/usr/bin/nvidia-persistenced --verbose",
    )
    return [
        _tool("/usr/bin/nvidia-smi", "nvidia_smi.py", values),
        DebFile("/usr/bin/nvidia-persistenced", persistenced, 0o755),
        DebFile("/lib/systemd/system/nvidia-persistenced.service", unit),
        DebFile(DRIVER_VERSION_FILE, f"{package.upstream}\n".encode()),
    ]


def _fabric_manager(package: DebPackage) -> list[DebFile]:
    version = package.upstream
    daemon = _shell(
        f'if [ "${{1:-}}" = "--version" ] || [ "${{1:-}}" = "-v" ]; then\n'
        f'  echo "Fabric Manager version is : {version}"\n  exit 0\nfi\n'
        f'echo "LAB BUILD of nv-fabricmanager {version} (provisioner lab) - not NVIDIA software:'
        f' no NVSwitch is managed; idling"\n'
        + _started("nv-fabricmanager", version)
        + "exec sleep infinity\n"
    )
    unit = _unit(
        "NVIDIA fabric manager service (LAB BUILD - not NVIDIA software)",
        "/usr/bin/nv-fabricmanager -c /usr/share/nvidia/nvswitch/fabricmanager.cfg",
    )
    return [
        DebFile("/usr/bin/nv-fabricmanager", daemon, 0o755),
        DebFile("/lib/systemd/system/nvidia-fabricmanager.service", unit),
    ]


def _cuda_toolkit(package: DebPackage) -> list[DebFile]:
    toolkit = package.upstream
    document = {
        "cuda": {"name": "CUDA SDK", "version": toolkit},
        "cuda_nvcc": {"name": "CUDA NVCC", "version": nvcc_version(toolkit)},
        "provisioner_lab": {"lab_build": True, "note": "LAB BUILD - not NVIDIA software"},
    }
    path = f"/usr/local/cuda-{_major_minor(toolkit)}/version.json"
    return [DebFile(path, (json.dumps(document, indent=3) + "\n").encode())]


def _cuda_nvcc(package: DebPackage) -> list[DebFile]:
    nvcc = package.upstream
    release = _major_minor(nvcc)
    script = _shell(
        'case "${1:-}" in\n--version|-V)\n'
        "  echo 'nvcc: NVIDIA (R) Cuda compiler driver (LAB BUILD - not NVIDIA software)'\n"
        "  echo 'Copyright (c) 2005-2025 NVIDIA Corporation'\n"
        f"  echo 'Cuda compilation tools, release {release}, V{nvcc}'\n"
        f"  echo 'Build cuda_{release}.r{release}/compiler.lab_0'\n  exit 0 ;;\nesac\n"
        "echo 'nvcc fatal   : LAB BUILD (provisioner lab): nothing can be compiled' >&2\nexit 1\n"
    )
    return [DebFile(f"/usr/local/cuda-{release}/bin/nvcc", script, 0o755)]


def _container_toolkit(package: DebPackage) -> list[DebFile]:
    hook = _shell(
        f'echo "NVIDIA Container Runtime Hook version {package.upstream}'
        f' (LAB BUILD - not NVIDIA software)"\n'
    )
    return [DebFile("/usr/bin/nvidia-container-runtime-hook", hook, 0o755)]


def _container_toolkit_base(package: DebPackage) -> list[DebFile]:
    return [_tool("/usr/bin/nvidia-ctk", "nvidia_ctk.py", {"TOOLKIT_VERSION": package.upstream})]


def _container_cli(package: DebPackage) -> list[DebFile]:
    version = package.upstream
    script = _shell(
        'case "${1:-}" in\n--version|-V)\n'
        f'  echo "cli-version: {version}"\n  echo "lib-version: {version}"\n'
        '  echo "build: LAB BUILD (provisioner lab) - not NVIDIA software"\n  exit 0 ;;\n'
        'info)\n  echo "NVRM version:   $(cat ' + DRIVER_VERSION_FILE + " 2>/dev/null || "
        'echo N/A)"\n  echo "CUDA version:   N/A (LAB BUILD)"\n  exit 0 ;;\nesac\n'
        "echo \"nvidia-container-cli: LAB BUILD: '$*' is not simulated\" >&2\nexit 1\n"
    )
    return [DebFile("/usr/bin/nvidia-container-cli", script, 0o755)]


def _dcgm_core(package: DebPackage) -> list[DebFile]:
    version = package.upstream
    engine = _shell(
        'case "${1:-}" in\n--version|-v)\n'
        f'  echo "nv-hostengine version {version} (LAB BUILD - not NVIDIA software)"\n'
        "  exit 0 ;;\n-n|--no-daemon)\n"
        f'  echo "LAB BUILD of nv-hostengine {version} (provisioner lab): idling"\n'
        "  exec sleep infinity ;;\n-t|--term)\n"
        '  echo "Host engine successfully terminated."\n  exit 0 ;;\nesac\n'
        f'echo "Started host engine version {version} using port number: 5555 (LAB BUILD)"\n'
    )
    unit = _unit(
        "NVIDIA DCGM service (LAB BUILD - not NVIDIA software)",
        "/usr/bin/nv-hostengine -n --service-account nvidia-dcgm",
    )
    return [
        _tool("/usr/bin/dcgmi", "dcgmi.py", {"DCGM_VERSION": version}),
        DebFile("/usr/bin/nv-hostengine", engine, 0o755),
        DebFile("/lib/systemd/system/nvidia-dcgm.service", unit),
    ]


_ROLE_FILES: dict[Role, Callable[[DebPackage], list[DebFile]]] = {
    "utils": _utils,
    "fabricmanager": _fabric_manager,
    "cuda-toolkit": _cuda_toolkit,
    "cuda-nvcc": _cuda_nvcc,
    "container-toolkit": _container_toolkit,
    "container-toolkit-base": _container_toolkit_base,
    "libnvidia-container-tools": _container_cli,
    "dcgm-core": _dcgm_core,
}


def _kernel_headers(package: KernelHeaders) -> list[DebFile]:
    release = package.release
    folder = f"/usr/src/linux-headers-{release}"
    note = (
        "LAB BUILD - not a kernel package.\n\n"
        f"{package.name} {package.version} is a stand-in built by provisioner's lab\n"
        "(provisioner.lab.aptrepo) for the kernel the lab nodes run, which is the lab\n"
        "host's. It lets the preflight role install the running kernel's headers with\n"
        "real apt. It holds no headers: nothing can be built against it.\n"
    )
    return [
        DebFile(f"{folder}/LAB-BUILD", note.encode()),
        DebFile(f"/lib/modules/{release}/build", b"", link=folder),
    ]


def _container_runtime(package: RuntimeStandIn) -> list[DebFile]:
    name, version = package.name, package.version
    note = (
        "LAB BUILD - not containerd.\n\n"
        f"{name} {version} is a stand-in built by provisioner's lab (provisioner.lab.aptrepo)\n"
        f"for Ubuntu's package of that name: {package.summary}. Its daemon runs no\n"
        "containers; it idles, so that the nvidia_container_toolkit role can install, start\n"
        "and restart a container runtime with real apt and systemd.\n"
    )
    daemon = _shell(
        'case "${1:-}" in\n--version|-v)\n'
        f'  echo "{name} github.com/containerd/containerd {version} (LAB BUILD - not containerd)"\n'
        "  exit 0 ;;\nesac\n"
        f'echo "LAB BUILD of {name} {version} (provisioner lab): no containers run; idling"\n'
        "exec sleep infinity\n"
    )
    unit = _unit("containerd container runtime (LAB BUILD - not containerd)", f"/usr/bin/{name}")
    return [
        DebFile(f"/usr/share/doc/{name}/LAB-BUILD", note.encode()),
        DebFile(f"/usr/bin/{name}", daemon, 0o755),
        DebFile(f"/lib/systemd/system/{name}.service", unit),
    ]


# --------------------------------------------------------------------------- helpers


def _lab_note(package: DebPackage) -> DebFile:
    text = (
        "LAB BUILD - not NVIDIA software.\n\n"
        f"{package.name} {package.version} is a tiny stand-in built by provisioner's lab\n"
        "(provisioner.lab.aptrepo) under the name and version of NVIDIA's package:\n"
        f"{package.summary}.\n\n"
        "It lets playbooks run real apt against the lab rack. It contains no NVIDIA code\n"
        "and drives no hardware; its tools read the simulated GPUs in\n"
        "/run/provisioner-lab/gpus.json.\n"
    )
    return DebFile(f"/usr/share/doc/{package.name}/LAB-BUILD", text.encode())


def _tool(path: str, source: str, values: dict[str, str]) -> DebFile:
    """A :mod:`provisioner.lab.labbin` script with its placeholders filled in."""
    text = resources.files("provisioner.lab.labbin").joinpath(source).read_text("utf-8")
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = _PLACEHOLDER.search(text)
    if left:
        raise ValueError(f"{source}: placeholder {left.group()} has no value")
    return DebFile(path, text.encode(), 0o755)


def _shell(body: str) -> bytes:
    return f"#!/bin/sh\n# LAB BUILD (provisioner lab) - not NVIDIA software.\n{body}".encode()


def _unit(description: str, exec_start: str) -> bytes:
    return (
        f"[Unit]\nDescription={description}\nAfter=network-online.target\n\n"
        f"[Service]\nType=simple\nExecStart={exec_start}\nRestart=on-failure\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ).encode()


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _cuda_of(driver: str) -> str:
    try:
        return driver_cuda_version(driver)
    except ValueError:
        return "N/A"
