"""The fleet spec document: pydantic v2 models, frozen, unknown keys refused.

These models describe what a user writes. Ranges and vendor manifests are expanded into
concrete nodes by :mod:`provisioner.spec.expand`; checks that span the document (duplicates,
address plans, references, driver rules) live in :mod:`provisioner.spec.checks`.
"""

from __future__ import annotations

import re
import string
from ipaddress import IPv4Address, IPv4Network
from typing import Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    ValidationInfo,
    field_validator,
    model_validator,
)

from provisioner.spec.types import (
    Address,
    BmcUrl,
    CountPercent,
    DriverVersion,
    MacAddress,
    Name,
    Network,
    Secret,
    SshPublicKey,
    Version,
    version_tuple,
)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


# --------------------------------------------------------------------------- site and networks


class Metadata(Model):
    site: Name
    description: str = ""


class DhcpRange(Model):
    start: Address
    end: Address
    lease: str = "12h"

    @model_validator(mode="after")
    def _ordered(self) -> DhcpRange:
        if int(self.end) < int(self.start):
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    def __contains__(self, address: IPv4Address) -> bool:
        return int(self.start) <= int(address) <= int(self.end)


class ProvisioningNetwork(Model):
    cidr: Network
    gateway: Address
    dns: tuple[Address, ...] = ()
    domain: str | None = None
    dhcp_range: DhcpRange | None = None
    interface: str | None = Field(
        default=None, description="interface dnsmasq serves DHCP/TFTP on (the boot host's)"
    )
    mtu: int | None = Field(default=None, ge=576, le=9216)

    @field_validator("cidr", mode="before")
    @classmethod
    def _strict_cidr(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                IPv4Network(value, strict=True)
            except ValueError as exc:
                raise ValueError(
                    f"{value!r} is not a network address with prefix ({exc})"
                ) from None
        return value


class BmcNetwork(Model):
    cidr: Network
    gateway: Address | None = None
    dhcp: bool = Field(default=False, description="also serve BMC addresses from the manifest")


class Networks(Model):
    provisioning: ProvisioningNetwork
    bmc: BmcNetwork | None = None


_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


class Ssh(Model):
    user: str = "root"
    authorized_keys: tuple[SshPublicKey, ...]

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if not _USER_RE.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid user name: use up to 32 lowercase letters, digits, "
                "'_' and '-', starting with a letter or '_'"
            )
        return value

    @field_validator("authorized_keys")
    @classmethod
    def _some_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        if not keys:
            raise ValueError("needs at least one entry")
        return keys


class BootServer(Model):
    url: HttpUrl = Field(description="base URL nodes reach the boot server at")
    tftp_root: str = "/srv/tftp"
    callback_key: Secret | None = Field(
        default=None, description="key the per-node install-callback tokens are derived from"
    )


# --------------------------------------------------------------------------- images

OsFamily = Literal["ubuntu", "rocky", "rhel"]
_SUPPORTED_OS: dict[str, tuple[str, ...]] = {
    "ubuntu": ("22.04", "24.04"),
    "rocky": ("9",),
    "rhel": ("9",),
}


class Image(Model):
    os: OsFamily
    version: Version
    kernel_url: HttpUrl
    initrd_url: HttpUrl
    iso_url: HttpUrl | None = Field(default=None, description="Ubuntu live-server ISO")
    repo_url: HttpUrl | None = Field(default=None, description="RHEL-family install tree")
    mirror_url: HttpUrl | None = Field(default=None, description="Ubuntu archive mirror")
    kernel_args: tuple[str, ...] = ()
    packages: tuple[str, ...] = ("python3",)
    storage: Literal["lvm", "direct"] = "lvm"
    timezone: str = "UTC"
    locale: str = "en_US.UTF-8"

    @field_validator("version")
    @classmethod
    def _supported(cls, version: str, info: ValidationInfo) -> str:
        family = info.data.get("os")
        if family is None:
            return version  # the os field has its own error
        major = version if family == "ubuntu" else version.split(".")[0]
        if major not in _SUPPORTED_OS[family]:
            supported = ", ".join(_SUPPORTED_OS[family])
            raise ValueError(f"{family} {version} is not supported (supported: {supported})")
        return version

    @model_validator(mode="after")
    def _installer_source(self) -> Image:
        if self.os == "ubuntu" and self.iso_url is None:
            raise ValueError(
                "an Ubuntu image needs iso_url (the live-server ISO the installer loads)"
            )
        if self.os != "ubuntu" and self.repo_url is None:
            raise ValueError(f"a {self.os} image needs repo_url (the install tree for inst.repo)")
        return self

    @property
    def title(self) -> str:
        """How people write it: "Ubuntu 24.04", "Rocky Linux 9.5", "RHEL 9"."""
        names = {"ubuntu": "Ubuntu", "rocky": "Rocky Linux", "rhel": "RHEL"}
        return f"{names[self.os]} {self.version}"

    @property
    def installer(self) -> Literal["autoinstall", "kickstart"]:
        return "autoinstall" if self.os == "ubuntu" else "kickstart"

    @property
    def distro(self) -> str:
        """NVIDIA's repository name for this OS: ubuntu2204, ubuntu2404, rhel9."""
        if self.os == "ubuntu":
            return "ubuntu" + self.version.replace(".", "")
        return "rhel" + self.version.split(".")[0]


# --------------------------------------------------------------------------- software stacks


class Driver(Model):
    version: DriverVersion
    branch: str | None = Field(default=None, description="driver branch; defaults to the major")
    kernel_modules: Literal["open", "proprietary"] = "open"

    @field_validator("branch", mode="before")
    @classmethod
    def _branch_matches(cls, branch: object, info: ValidationInfo) -> object:
        version = info.data.get("version")
        if isinstance(branch, int) and not isinstance(branch, bool):
            branch = str(branch)
        if branch is not None and version is not None and branch != version.split(".")[0]:
            raise ValueError(f"branch {branch!r} does not match driver {version}")
        return branch

    @property
    def effective_branch(self) -> str:
        return self.branch or self.version.split(".")[0]


class StackRepos(Model):
    """Package sources, with placeholders filled in per node so that a local mirror with the
    same layout works: ``{distro}`` (ubuntu2204, rhel9 ...), ``{arch}`` (NVIDIA's CUDA
    repository name, x86_64), ``{pkg}`` (deb or rpm) and ``{pkg_arch}`` (the package
    manager's architecture: amd64 for deb, x86_64 for rpm, as the container toolkit's
    repository is laid out)."""

    cuda: str = "https://developer.download.nvidia.com/compute/cuda/repos/{distro}/{arch}/"
    container_toolkit: str = "https://nvidia.github.io/libnvidia-container/stable/{pkg}/{pkg_arch}/"
    keyring: str | None = Field(default=None, description="CUDA keyring URL (default: in repo)")
    key_file: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="signing key file name inside both repos (a mirror that publishes its own "
        "key, like the lab's provisioner-lab.asc); default: NVIDIA's key locations",
    )

    @field_validator("cuda", "container_toolkit", "keyring")
    @classmethod
    def _url_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://", "file://")):
            raise ValueError(f"{value!r} is not an http(s):// or file:// URL")
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"bad placeholder in {value!r}: {exc}") from None
        for _, name, spec, conversion in parsed:
            if name is not None and (spec or conversion):
                raise ValueError(f"placeholder {{{name}}} takes no format in {value!r}")
        fields = {name for _, name, _, _ in parsed if name is not None}
        unknown = fields - {"distro", "arch", "pkg", "pkg_arch"}
        if unknown:
            known = "{distro}, {arch}, {pkg}, {pkg_arch}"
            raise ValueError(f"unknown placeholder {sorted(unknown)[0]!r} (known: {known})")
        return value


class Stack(Model):
    driver: Driver
    cuda: Version | None = None
    container_toolkit: Version | None = None
    container_runtime: Literal["containerd", "docker"] = "containerd"
    dcgm: Version | None = None
    fabric_manager: bool = False
    repos: StackRepos = StackRepos()


# --------------------------------------------------------------------------- hardware profiles


class BurninFloors(Model):
    """Per-GPU floors that override the catalog's for this profile (all optional)."""

    gemm_tflops: float | None = Field(default=None, gt=0)
    hbm_gbps: float | None = Field(default=None, gt=0)
    h2d_gbps: float | None = Field(default=None, gt=0)
    d2h_gbps: float | None = Field(default=None, gt=0)
    allreduce_busbw_gbps: float | None = Field(default=None, gt=0)
    max_temperature_c: float | None = Field(default=None, gt=0, le=120)


class Burnin(Model):
    level: Literal["quick", "standard", "extended"] = "standard"
    floors: BurninFloors = BurninFloors()


class Profile(Model):
    gpu: str = Field(description="GPU SKU from the catalog, e.g. H100-SXM5-80GB")
    gpus: int = Field(ge=1, le=16)
    nvswitch: bool | None = Field(default=None, description="default: the SKU's")
    boot_mode: Literal["uefi", "legacy"] = "uefi"
    burnin: Burnin = Burnin()


# --------------------------------------------------------------------------- BMC


class PowerOnStagger(Model):
    count: int = Field(default=4, ge=1, description="power-ons per interval per rack")
    interval: float = Field(default=5.0, ge=0, description="seconds")


class BmcCredentials(Model):
    username: str = Field(min_length=1)
    password: Secret


class Bmc(Model):
    """BMC access and pacing for the whole fleet; racks may override the credentials."""

    username: str = Field(min_length=1)
    password: Secret
    concurrency: int = Field(default=64, ge=1, le=1000)
    min_interval: float = Field(default=0.0, ge=0, description="seconds between commands per BMC")
    timeout: float = Field(default=30.0, gt=0, description="seconds per operation")
    retries: int = Field(default=3, ge=0, le=20)
    power_on_stagger: PowerOnStagger = PowerOnStagger()
    verify_tls: bool = True
    ca_bundle: str | None = None


# --------------------------------------------------------------------------- racks and nodes

_NAME_FIELDS = {"index", "rack"}
_INDEX_FORMAT = r"0?[1-9]d?"  # {index}, {index:3d}, {index:03d}


class NodeSpec(Model):
    name: Name
    ip: Address
    mac: MacAddress
    bmc: BmcUrl
    serial: str | None = None
    bmc_mac: MacAddress | None = None
    profile: Name | None = None
    stack: Name | None = None
    image: Name | None = None


class Manifest(Model):
    """A vendor CSV: one row per node with serial, BMC MAC, BMC address, provisioning MAC."""

    path: str
    join: Literal["position", "serial"] = "position"
    columns: dict[Literal["serial", "bmc_mac", "bmc_address", "provisioning_mac"], str] = Field(
        default_factory=dict, description="our field -> the vendor's column header"
    )


class NodeRange(Model):
    name: str = Field(description="pattern with {index}, e.g. gpu-r01-{index:02d}")
    count: int = Field(ge=1, le=100_000)
    first_index: int = Field(default=1, ge=0)
    first_ip: Address
    first_bmc: BmcUrl | None = None
    bmc_step: Literal["address", "port"] = "address"
    bmc_protocol: Literal["ipmi", "redfish"] = Field(
        default="ipmi", description="for bare addresses in the manifest's bmc_address column"
    )
    first_mac: MacAddress | None = Field(default=None, description="lab ranges without manifest")
    manifest: Manifest | None = None
    serials: tuple[str, ...] | None = Field(default=None, description="slot order, join: serial")
    profile: Name | None = None
    stack: Name | None = None
    image: Name | None = None

    @field_validator("name")
    @classmethod
    def _pattern(cls, value: str) -> str:
        shown = value[:80]
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"bad name pattern {shown!r}: {exc}") from None
        fields = [(name, spec, conv) for _, name, spec, conv in parsed if name is not None]
        if any(name not in _NAME_FIELDS for name, _, _ in fields):
            raise ValueError(f"name pattern {shown!r} may use only {{index}} and {{rack}}")
        if "index" not in [name for name, _, _ in fields]:
            raise ValueError(f"name pattern {shown!r} needs {{index}}, e.g. gpu-r01-{{index:02d}}")
        for name, spec, conversion in fields:
            allowed = _INDEX_FORMAT if name == "index" else ""
            if conversion or (spec and not re.fullmatch(allowed or "(?!)", spec)):
                raise ValueError(
                    f"name pattern {shown!r}: {{{name}}} takes "
                    + ("only a zero-padded width, e.g. {index:03d}" if allowed else "no format")
                )
        return value

    @model_validator(mode="after")
    def _sources(self) -> NodeRange:
        join = self.manifest.join if self.manifest else None
        if self.manifest is None and self.first_mac is None:
            raise ValueError("a range needs a manifest (vendor CSV with MACs) or first_mac")
        if self.manifest is not None and self.first_mac is not None:
            raise ValueError("give MACs in one place: a manifest or first_mac, not both")
        if join == "serial" and self.serials is None:
            raise ValueError("manifest join: serial needs serials (the slot order)")
        if self.serials is not None and join != "serial":
            raise ValueError("serials are only used with a manifest joined by serial")
        if self.serials is not None and len(self.serials) != self.count:
            raise ValueError(f"{len(self.serials)} serials listed for a count of {self.count}")
        return self


class Rack(Model):
    name: Name
    profile: Name
    stack: Name
    image: Name
    location: str | None = Field(default=None, description="row / position in the hall")
    bmc: BmcCredentials | None = Field(default=None, description="override the fleet's")
    nodes: tuple[NodeSpec, ...] = ()
    ranges: tuple[NodeRange, ...] = ()

    @model_validator(mode="after")
    def _not_empty(self) -> Rack:
        if not self.nodes and not self.ranges:
            raise ValueError("a rack needs nodes or ranges")
        return self


# --------------------------------------------------------------------------- operations


class Rollout(Model):
    canary: int = Field(default=1, ge=0)
    max_unavailable: CountPercent = Field(default="10%", validate_default=True)
    max_unavailable_per_rack: CountPercent | None = None
    max_failures: int = Field(default=0, ge=0)
    drain_timeout: float = Field(default=3600.0, gt=0, description="seconds")


class Scheduler(Model):
    type: Literal["none", "slurm", "kubernetes"] = "none"
    kubeconfig: str | None = None
    context: str | None = None

    @model_validator(mode="after")
    def _kube_only(self) -> Scheduler:
        if self.type != "kubernetes" and (self.kubeconfig or self.context):
            raise ValueError("kubeconfig and context apply to type: kubernetes only")
        return self


class TerraformBackend(Model):
    type: Literal["local", "pg"] = "local"
    conn_str: Secret | None = Field(default=None, description="pg backend connection string")

    @model_validator(mode="after")
    def _pg_conn(self) -> TerraformBackend:
        if self.type == "pg" and self.conn_str is None:
            raise ValueError("the pg backend needs conn_str (a reference: env:NAME or file:/path)")
        return self


class Terraform(Model):
    module: str
    backend: TerraformBackend = TerraformBackend()
    workspace: str = "default"


LabFaultKind = Literal[
    "missing_gpu",
    "xid_79",
    "ecc_uncorrectable",
    "row_remap_pending",
    "pcie_gen3",
    "slow_gpu",
    "nvlink_down",
    "silent_data_corruption",
    "secure_boot",
]
# Faults of the node itself rather than of one of its GPUs: their ``gpu`` is not used.
NODE_FAULT_KINDS: frozenset[str] = frozenset({"secure_boot"})


class LabFault(Model):
    kind: LabFaultKind
    gpu: int = Field(default=0, ge=0, le=15, description="the faulty GPU; unused by node faults")

    @property
    def node_level(self) -> bool:
        """A fault of the whole node (``secure_boot``: its firmware has Secure Boot on)."""
        return self.kind in NODE_FAULT_KINDS


class Lab(Model):
    """The embedded lab: which simulated faults (of a GPU, or of the node) each node carries."""

    faults: dict[Name, tuple[LabFault, ...]] = Field(default_factory=dict)


class RenderOptions(Model):
    templates: str | None = Field(
        default=None, description="folder whose templates override the built-in ones"
    )


# --------------------------------------------------------------------------- the document

_Sized = TypeVar("_Sized", tuple[Rack, ...], dict[str, Image], dict[str, Stack], dict[str, Profile])


class FleetDocument(Model):
    version: int
    metadata: Metadata
    networks: Networks
    ssh: Ssh
    boot: BootServer
    bmc: Bmc
    images: dict[Name, Image]
    stacks: dict[Name, Stack]
    profiles: dict[Name, Profile]
    racks: tuple[Rack, ...]
    rollout: Rollout = Rollout()
    scheduler: Scheduler = Scheduler()
    terraform: Terraform | None = None
    lab: Lab | None = None
    render: RenderOptions = RenderOptions()

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        if isinstance(value, str):
            raise ValueError(f"must be the number 1, not the text {value[:20]!r}")
        if value != 1 or isinstance(value, bool):
            raise ValueError(f"this provisioner reads spec version 1, not {value!r}"[:120])
        return value

    @field_validator("racks", "images", "stacks", "profiles")
    @classmethod
    def _not_empty(cls, value: _Sized) -> _Sized:
        # Checked after the items: a Field length bound would also fire when an item fails.
        if not value:
            raise ValueError("needs at least one entry")
        return value


def driver_at_least(version: str, minimum: str) -> bool:
    return version_tuple(version) >= version_tuple(minimum)
