"""The agent's document (schema ``provisioner-burnin/1``), read and checked on the controller.

The agent (``agent.py``, run on the node) measures and prints one JSON document; it judges
nothing. These models are the controller's reading of that contract: frozen, every field the
contract names required (``null`` where it allows), keys the contract does not name ignored
(a newer agent may add some within the same schema). A document that is not JSON, has
another schema or breaks the contract raises :class:`BurninDocumentError` naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from provisioner.errors import BurninFailed

SCHEMA = "provisioner-burnin/1"
Level = Literal["quick", "standard", "extended"]
LEVELS: tuple[Level, ...] = ("quick", "standard", "extended")


class BurninDocumentError(BurninFailed):
    """An agent document cannot be read: not JSON, another schema, or a field off contract."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Tools(_Model):
    torch: str | None
    cupy: str | None
    pynvml: str | None
    dcgmi: str | None
    all_reduce_perf: str | None


class Host(_Model):
    hostname: str
    kernel: str
    driver_version: str | None
    cuda_driver_version: str | None
    tools: Tools


class Ecc(_Model):
    mode: bool | None
    volatile_corrected: int | None
    volatile_uncorrectable: int | None
    aggregate_uncorrectable: int | None


class RowRemap(_Model):
    correctable: int
    uncorrectable: int
    pending: bool
    failure: bool


class RetiredPages(_Model):
    single_bit: int
    double_bit: int
    pending: bool


class Pcie(_Model):
    max_gen: int | None
    max_width: int | None
    gen: int | None
    width: int | None
    under_load: bool
    replay_delta: int | None


class NvLink(_Model):
    links_up: int | None
    links_down: tuple[int, ...]
    error_delta: int | None


class Thermal(_Model):
    max_temperature_c: float | None
    max_power_w: float | None
    clock_events: tuple[str, ...]


class Gemm(_Model):
    dtype: Literal["bf16", "fp16"]
    n: int
    tflops: float
    iterations: int
    sdc_repeats: int
    sdc_mismatches: int
    max_abs_diff: float


class Bandwidth(_Model):
    gbps: float


class Gpu(_Model):
    index: int
    name: str
    uuid: str
    serial: str | None
    pci_bus_id: str
    memory_mib: int | None
    persistence_mode: bool | None
    ecc: Ecc
    row_remap: RowRemap | None
    retired_pages: RetiredPages | None
    pcie: Pcie
    nvlink: NvLink
    thermal: Thermal
    gemm: Gemm | None
    hbm: Bandwidth | None
    h2d: Bandwidth | None
    d2h: Bandwidth | None


class XidEvent(_Model):
    xid: int
    pci: str
    gpu: int | None
    line: str


class Xid(_Model):
    source: Literal["journalctl", "dmesg", "lab"] | None
    events: tuple[XidEvent, ...]


class Nccl(_Model):
    tool: Literal["all_reduce_perf", "torch", "lab"]
    gpus: int
    busbw_gbps: float


class DcgmResult(_Model):
    category: str
    test: str
    gpu: int | None
    status: Literal["pass", "fail", "warn", "skip"]
    info: str


class Dcgm(_Model):
    version: str | None
    level: int
    results: tuple[DcgmResult, ...]


class Skipped(_Model):
    check: str
    reason: str


class AgentError(_Model):
    check: str
    message: str


class AgentDocument(_Model):
    schema_id: str = Field(alias="schema")  # "schema" would shadow a BaseModel method
    agent_version: str
    node: str
    backend: Literal["nvml", "smi", "lab"] | None  # None: no backend could run (exit 3)
    level: Level
    started: str
    finished: str
    duration_s: float
    host: Host
    gpus: tuple[Gpu, ...]
    xid: Xid
    nccl: Nccl | None
    dcgm: Dcgm | None
    skipped: tuple[Skipped, ...]
    errors: tuple[AgentError, ...]

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    def gpu(self, index: int) -> Gpu | None:
        return next((gpu for gpu in self.gpus if gpu.index == index), None)


def parse_document(data: Any, source: str = "document") -> AgentDocument:
    """The agent document in ``data`` (decoded JSON); ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise BurninDocumentError(f"{source}: not a burn-in agent document (not a JSON object)")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise BurninDocumentError(
            f"{source}: schema {schema!r} is not {SCHEMA!r} "
            "(not a burn-in agent document, or an agent of another version)"
        )
    try:
        return AgentDocument.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(document)"
        more = exc.error_count() - 1
        tail = f" (and {more} more)" if more else ""
        raise BurninDocumentError(f"{source}: {where}: {first['msg']}{tail}") from exc


def load_document(path: Path) -> AgentDocument:
    """Read and check the agent document in the file ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BurninDocumentError(f"{path}: cannot read: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BurninDocumentError(f"{path}: not JSON: {exc}") from exc
    return parse_document(data, str(path))
