"""Which Debian packages a software stack installs: NVIDIA's names, versions and relations.

The one place that turns a stack of the spec (driver, fabric manager, CUDA, container toolkit,
DCGM) into package names and exact version strings. The lab repository
(:mod:`provisioner.lab.aptrepo`) builds stand-ins with exactly these names and versions, and
the Ansible roles install, pin and hold exactly these (``render`` hands them the pins), so a
playbook run in the lab exercises the same apt operations as on a real node. The rules follow
NVIDIA's Ubuntu repositories; where they come from:

* **Driver** (CUDA repo ``developer.download.nvidia.com/compute/cuda/repos/ubuntu2404/x86_64``):
  per branch ``nvidia-driver-<branch>-open`` (open kernel modules) or ``nvidia-driver-<branch>``
  (proprietary), ``nvidia-smi`` in ``nvidia-utils-<branch>``, and the metapackages the NVIDIA
  driver installation guide installs: ``nvidia-open-<branch>`` (open) and
  ``cuda-drivers-<branch>`` (proprietary). All carry ``<driver>-0ubuntu1``, e.g.
  ``cuda-drivers-570_570.86.10-0ubuntu1`` and ``nvidia-open-580=580.65.06-0ubuntu1`` in that
  repo. (Later R580 point releases moved to ``-1ubuntu1``, and from R590 NVIDIA drops the
  branch from these names and pins with ``nvidia-driver-pinning-<branch>`` — driver
  installation guide, "Recent updates"; neither is modelled, the lab stacks are R570/R580.)
* **Fabric manager**: ``nvidia-fabricmanager-<branch>`` and ``libnvidia-nscq-<branch>`` up to
  R575; from R580 the CUDA repo ships them without the branch suffix (``nvidia-fabricmanager``,
  ``libnvidia-nscq``; the branch lives only in the version, pinned by version). Revision ``-1``
  as NVIDIA's packaging builds it (``nvidia-fabricmanager-460_460.32.03-1_amd64.deb``,
  github.com/NVIDIA/apt-packaging-fabric-manager).
* **CUDA toolkit**: ``cuda-toolkit-<major>-<minor>`` at ``<major>.<minor>.<patch>-1`` with the
  compiler in ``cuda-nvcc-<major>-<minor>`` at its own component version (CUDA 12.8.0 ships
  ``cuda-nvcc-12-8_12.8.61-1``; the CUDA release notes list each component's version).
* **Container toolkit** (``nvidia.github.io/libnvidia-container``): ``nvidia-container-toolkit``,
  ``nvidia-container-toolkit-base``, ``libnvidia-container-tools``, ``libnvidia-container1`` at
  ``<version>-1``, related as in ``packaging/debian/control`` of NVIDIA/nvidia-container-toolkit
  v1.17.5 (toolkit = base exactly, tools >= version and << 2.0.0) and libnvidia-container's
  ``pkg/deb/control`` (tools need the library).
* **DCGM 4** (CUDA repo): ``datacenter-gpu-manager-4-core`` plus the CUDA flavour
  ``datacenter-gpu-manager-4-cuda<major>`` at ``1:<version>-1`` (DCGM installation guide). The
  flavour follows the stack's CUDA major, capped at the newest one that DCGM release ships:
  cuda13 first came with DCGM 4.4 (dcgm-exporter 4.4.0-4.5.0: "Update to DCGM 4.4 and Cuda
  13.0"), so DCGM 4.2.3 on a CUDA 13.0 stack takes the cuda12 flavour.

Relations the lab adds to make its stand-ins behave (an upgrade replaces, never overlaps, the
files of the branch before): packages that own the same files provide, conflict with and
replace one virtual ``provisioner-lab-*`` name. Nothing here depends on a package outside
these repositories, so ``apt-get`` resolves a stack from them alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from provisioner.spec.catalog import load_catalog
from provisioner.spec.models import Driver, Stack
from provisioner.spec.types import version_tuple

Component = Literal["driver", "fabric_manager", "cuda", "container_toolkit", "dcgm"]
RepoKey = Literal["cuda", "container_toolkit"]
Role = Literal[
    "driver-meta",
    "driver",
    "utils",
    "fabricmanager",
    "nscq",
    "cuda-toolkit",
    "cuda-nvcc",
    "container-toolkit",
    "container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container",
    "dcgm-core",
    "dcgm-cuda",
]

COMPONENTS: tuple[Component, ...] = (
    "driver",
    "fabric_manager",
    "cuda",
    "container_toolkit",
    "dcgm",
)
# Which of the stack's repositories (``repos.cuda`` / ``repos.container_toolkit``) serves each.
COMPONENT_REPO: dict[Component, RepoKey] = {
    "driver": "cuda",
    "fabric_manager": "cuda",
    "cuda": "cuda",
    "container_toolkit": "container_toolkit",
    "dcgm": "cuda",
}

DRIVER_REVISION = "0ubuntu1"  # NVIDIA's CUDA repo for Ubuntu, R570 and R580.0x
FABRIC_MANAGER_REVISION = "1"
UNSUFFIXED_FABRIC_MANAGER_FROM = 580  # first branch without -<branch> on FM and NSCQ
CUDA_REVISION = "1"
CONTAINER_TOOLKIT_REVISION = "1"
DCGM_EPOCH = "1"
DCGM_REVISION = "1"
LIBNVIDIA_CONTAINER_TOOLS_BELOW = "2.0.0"

# CUDA release -> version of its nvcc component (CUDA release notes, "component versions").
NVCC_VERSIONS: dict[str, str] = {
    "12.6.0": "12.6.20",
    "12.8.0": "12.8.61",
    "12.8.1": "12.8.93",
    "12.9.0": "12.9.41",
    "13.0.0": "13.0.48",
    "13.0.2": "13.0.88",
}
# DCGM CUDA flavours, from the first DCGM release that shipped each.
DCGM_CUDA_FLAVOURS: dict[int, str] = {11: "4.0.0", 12: "4.0.0", 13: "4.4.0"}

# Lab-only virtual packages: the stand-ins that own the same files exclude each other.
LAB_VIRTUAL_UTILS = "provisioner-lab-nvidia-utils"
LAB_VIRTUAL_FABRIC_MANAGER = "provisioner-lab-fabricmanager"


@dataclass(frozen=True, slots=True)
class DebPackage:
    """One Debian binary package of a stack, as the lab builds it and a node installs it.

    ``version`` is the full Debian version (epoch, upstream, revision) the Ansible roles pin;
    ``upstream`` is the software's own version (what ``nvidia-smi`` or ``dcgmi`` report);
    ``role`` says what the lab stand-in contains (see :mod:`.debcontents`).
    """

    name: str
    version: str
    component: Component
    role: Role
    upstream: str
    summary: str
    depends: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    architecture: str = "amd64"

    @property
    def repo(self) -> RepoKey:
        """The stack repository (``cuda`` or ``container_toolkit``) that serves it."""
        return COMPONENT_REPO[self.component]

    @property
    def pin(self) -> str:
        """``name=version``, as ``apt-get install`` and ``apt-mark`` take it."""
        return f"{self.name}={self.version}"

    @property
    def filename(self) -> str:
        """The .deb file name (Debian drops the epoch from file names)."""
        return f"{self.name}_{self.version.split(':', 1)[-1]}_{self.architecture}.deb"


# --------------------------------------------------------------------------- the stack


def stack_packages(stack: Stack) -> list[DebPackage]:
    """Every package the stack installs, grouped by component in :data:`COMPONENTS` order."""
    return [package for group in component_packages(stack).values() for package in group]


def component_packages(stack: Stack) -> dict[Component, list[DebPackage]]:
    """The stack's packages per component; a component the stack leaves out is absent."""
    out: dict[Component, list[DebPackage]] = {"driver": driver_packages(stack.driver)}
    if stack.fabric_manager:
        out["fabric_manager"] = fabric_manager_packages(stack.driver)
    if stack.cuda is not None:
        out["cuda"] = cuda_packages(stack.cuda)
    if stack.container_toolkit is not None:
        out["container_toolkit"] = container_toolkit_packages(stack.container_toolkit)
    if stack.dcgm is not None:
        out["dcgm"] = dcgm_packages(stack.dcgm, stack_cuda_major(stack))
    return out


def unique_packages(packages: Iterable[DebPackage]) -> list[DebPackage]:
    """One of each (name, version), first seen first; two different ones with the same name and
    version are refused, since a repository can serve only one of them."""
    seen: dict[tuple[str, str], DebPackage] = {}
    for package in packages:
        key = (package.name, package.version)
        if key in seen and seen[key] != package:
            raise ValueError(f"two different packages {package.pin}: {seen[key]} and {package}")
        seen.setdefault(key, package)
    return list(seen.values())


# --------------------------------------------------------------------------- components


def driver_packages(driver: Driver) -> list[DebPackage]:
    """Metapackage -> driver -> utils (``nvidia-smi``), for the open or proprietary flavour."""
    branch = driver.effective_branch
    version = f"{driver.version}-{DRIVER_REVISION}"
    open_modules = driver.kernel_modules == "open"
    flavour = f"nvidia-driver-{branch}" + ("-open" if open_modules else "")
    other = f"nvidia-driver-{branch}" + ("" if open_modules else "-open")
    meta = f"nvidia-open-{branch}" if open_modules else f"cuda-drivers-{branch}"
    utils = f"nvidia-utils-{branch}"
    kind = "open GPU kernel modules" if open_modules else "proprietary kernel modules"
    make = _Maker("driver", driver.version, version)
    return [
        make(meta, "driver-meta", f"NVIDIA driver {branch} metapackage ({kind})",
             depends=(f"{flavour} (= {version})",)),
        make(flavour, "driver", f"NVIDIA driver {driver.version} ({kind})",
             depends=(f"{utils} (= {version})",), conflicts=(other,)),
        make(utils, "utils", "NVIDIA driver support binaries (nvidia-smi)",
             exclusive=LAB_VIRTUAL_UTILS),
    ]  # fmt: skip


def fabric_manager_packages(driver: Driver) -> list[DebPackage]:
    """Fabric manager and the NVSwitch library NSCQ, at exactly the driver's version."""
    suffix = "" if fabric_manager_unsuffixed(driver) else f"-{driver.effective_branch}"
    make = _Maker("fabric_manager", driver.version, f"{driver.version}-{FABRIC_MANAGER_REVISION}")
    return [
        make(f"nvidia-fabricmanager{suffix}", "fabricmanager",
             "Fabric Manager for NVSwitch based systems", exclusive=LAB_VIRTUAL_FABRIC_MANAGER),
        make(f"libnvidia-nscq{suffix}", "nscq", "NVSwitch Configuration and Query library"),
    ]  # fmt: skip


def cuda_packages(cuda: str) -> list[DebPackage]:
    """The toolkit metapackage (``version.json``) and its compiler package (``nvcc``)."""
    release, revision = _split_revision(cuda, CUDA_REVISION)
    toolkit = cuda_release(release)
    suffix = cuda_suffix(release)
    nvcc = nvcc_version(toolkit)
    make = _Maker("cuda", toolkit, f"{toolkit}-{revision}")
    compiler = _Maker("cuda", nvcc, f"{nvcc}-{CUDA_REVISION}")
    return [
        make(f"cuda-toolkit-{suffix}", "cuda-toolkit", f"CUDA Toolkit {release} meta-package",
             depends=(f"cuda-nvcc-{suffix} (>= {nvcc})",)),
        compiler(f"cuda-nvcc-{suffix}", "cuda-nvcc", f"CUDA nvcc {nvcc}"),
    ]  # fmt: skip


def container_toolkit_packages(toolkit: str) -> list[DebPackage]:
    """The four packages of the NVIDIA Container Toolkit with NVIDIA's relations."""
    upstream, revision = _split_revision(toolkit, CONTAINER_TOOLKIT_REVISION)
    version = f"{upstream}-{revision}"
    tools = "libnvidia-container-tools"
    make = _Maker("container_toolkit", upstream, version)
    return [
        make("nvidia-container-toolkit", "container-toolkit", "NVIDIA Container toolkit",
             depends=(f"nvidia-container-toolkit-base (= {version})", f"{tools} (>= {version})",
                      f"{tools} (<< {LIBNVIDIA_CONTAINER_TOOLS_BELOW})")),
        make("nvidia-container-toolkit-base", "container-toolkit-base",
             "NVIDIA Container Toolkit Base (nvidia-ctk)"),
        make(tools, "libnvidia-container-tools",
             "NVIDIA container runtime library (command-line tools)",
             depends=(f"libnvidia-container1 (>= {version})",)),
        make("libnvidia-container1", "libnvidia-container", "NVIDIA container runtime library"),
    ]  # fmt: skip


def dcgm_packages(dcgm: str, cuda_major: int) -> list[DebPackage]:
    """DCGM 4 core (``dcgmi``, ``nv-hostengine``, the service) and its CUDA flavour."""
    upstream, revision = _split_revision(dcgm, DCGM_REVISION)
    version = f"{DCGM_EPOCH}:{upstream}-{revision}"
    flavour = dcgm_cuda_flavour(upstream, cuda_major)
    core = "datacenter-gpu-manager-4-core"
    make = _Maker("dcgm", upstream, version)
    return [
        make(core, "dcgm-core", "NVIDIA Datacenter GPU Management Tools (core)"),
        make(f"datacenter-gpu-manager-4-cuda{flavour}", "dcgm-cuda",
             f"NVIDIA Datacenter GPU Management Tools (CUDA {flavour} plugins)",
             depends=(f"{core} (= {version})",)),
    ]  # fmt: skip


# --------------------------------------------------------------------------- rules


def fabric_manager_unsuffixed(driver: Driver) -> bool:
    """From R580 the fabric manager and NSCQ packages carry no ``-<branch>`` suffix."""
    return int(driver.effective_branch) >= UNSUFFIXED_FABRIC_MANAGER_FROM


def cuda_release(cuda: str) -> str:
    """``"12.8"`` -> ``"12.8.0"`` (the GA release); ``"12.8.1"`` stays."""
    parts = cuda.split(".")
    if len(parts) < 2:
        raise ValueError(f"CUDA version {cuda!r} needs a major and a minor, e.g. 12.8")
    return ".".join([*parts, "0"][:3])


def cuda_suffix(cuda: str) -> str:
    """``"12.8"`` or ``"12.8.1"`` -> ``"12-8"``, the suffix of NVIDIA's CUDA package names."""
    major, minor = cuda_release(cuda).split(".")[:2]
    return f"{major}-{minor}"


def nvcc_version(toolkit: str) -> str:
    """The nvcc component version of a CUDA release; the release itself when not in the table."""
    return NVCC_VERSIONS.get(toolkit, toolkit)


def driver_cuda_version(driver_version: str) -> str:
    """The newest CUDA a driver supports (what ``nvidia-smi`` prints as "CUDA Version")."""
    table = load_catalog().cuda_min_driver
    supported = [
        c for c, low in table.items() if version_tuple(driver_version) >= version_tuple(low)
    ]
    if not supported:
        raise ValueError(f"driver {driver_version} supports no CUDA release in the catalog")
    return max(supported, key=version_tuple)


def stack_cuda_major(stack: Stack) -> int:
    """The CUDA major a stack runs: its toolkit's, or else the newest its driver supports."""
    cuda = stack.cuda if stack.cuda is not None else driver_cuda_version(stack.driver.version)
    return int(cuda.split(".")[0])


def dcgm_cuda_flavour(dcgm: str, cuda_major: int) -> int:
    """The newest DCGM CUDA flavour that this DCGM release ships and the CUDA major can run."""
    shipped = [
        major
        for major, since in DCGM_CUDA_FLAVOURS.items()
        if major <= cuda_major and version_tuple(dcgm) >= version_tuple(since)
    ]
    if not shipped:
        raise ValueError(f"DCGM {dcgm} ships no CUDA flavour for CUDA {cuda_major}")
    return max(shipped)


def by_component(packages: Iterable[DebPackage]) -> Iterator[tuple[Component, list[DebPackage]]]:
    """``(component, packages)`` in :data:`COMPONENTS` order, skipping empty components."""
    listed = list(packages)
    for component in COMPONENTS:
        group = [p for p in listed if p.component == component]
        if group:
            yield component, group


# --------------------------------------------------------------------------- helpers


def _split_revision(text: str, default: str) -> tuple[str, str]:
    """``"1.17.5"`` -> ``("1.17.5", default)``; a spec may give ``"1.17.5-2"``."""
    upstream, _, revision = text.partition("-")
    return upstream, revision or default


@dataclass(frozen=True, slots=True)
class _Maker:
    """Makes the packages of one component that share an upstream and a Debian version."""

    component: Component
    upstream: str
    version: str

    def __call__(
        self,
        name: str,
        role: Role,
        summary: str,
        *,
        depends: tuple[str, ...] = (),
        conflicts: tuple[str, ...] = (),
        exclusive: str | None = None,
    ) -> DebPackage:
        """``exclusive`` names a virtual package that all packages owning the same files
        provide, conflict with and replace, so that installing one removes the other."""
        virtual = (exclusive,) if exclusive else ()
        return DebPackage(
            name=name,
            version=self.version,
            component=self.component,
            role=role,
            upstream=self.upstream,
            summary=summary,
            depends=depends,
            conflicts=conflicts + virtual,
            provides=virtual,
            replaces=virtual,
        )
