"""Synthetic fleet specs for benchmarks: N racks of 32 HGX H100 nodes with vendor CSVs.

The generated spec looks like a real site's: per-rack ranges joined with vendor manifests by
position, two stacks, Ubuntu and Rocky images, a BMC network served by dnsmasq.
"""

from __future__ import annotations

import csv
import random
from ipaddress import IPv4Address
from pathlib import Path

NODES_PER_RACK = 32
LAB_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6GFuN4SG+YD2Cpod/OiC9w02Ut6b3UUarAS03nJ2dT bench"


def write_fleet(folder: Path, nodes: int, seed: int = 7) -> Path:
    """Write ``fleet.yaml`` and its manifests for ``nodes`` nodes under ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vendor").mkdir(exist_ok=True)
    racks = []
    first_prov = int(IPv4Address("10.64.0.11"))
    first_bmc = int(IPv4Address("10.96.0.11"))
    remaining = nodes
    rack = 0
    while remaining > 0:
        count = min(NODES_PER_RACK, remaining)
        name = f"r{rack + 1:04d}"
        manifest = folder / "vendor" / f"{name}.csv"
        with manifest.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["System S/N", "BMC MAC", "BMC IP", "NIC1 MAC"])
            for slot in range(count):
                number = rack * NODES_PER_RACK + slot
                writer.writerow(
                    [
                        f"SN{number:07d}{rng.choice('ABCDEF')}",
                        _mac(0x7CC255000000 + number),
                        str(IPv4Address(first_bmc + number)),
                        _mac(0xB83FD2000000 + number),
                    ]
                )
        image = "rocky-9" if rack % 4 == 3 else "ubuntu-2204"
        stack = "prod-580" if rack % 10 == 9 else "prod-570"
        racks.append(
            f"""  - name: {name}
    profile: hgx-h100
    stack: {stack}
    image: {image}
    ranges:
      - name: gpu-{name}-n{{index:02d}}
        count: {count}
        first_ip: {IPv4Address(first_prov + rack * NODES_PER_RACK)}
        manifest:
          path: vendor/{name}.csv
          columns:
            serial: System S/N
            bmc_mac: BMC MAC
            bmc_address: BMC IP
            provisioning_mac: NIC1 MAC
"""
        )
        remaining -= count
        rack += 1
    spec = folder / "fleet.yaml"
    spec.write_text(_HEADER.format(key=LAB_KEY) + "racks:\n" + "".join(racks))
    return spec


def _mac(number: int) -> str:
    digits = f"{number:012x}"
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


_HEADER = """version: 1
metadata: {{site: bench}}
networks:
  provisioning:
    cidr: 10.64.0.0/14
    gateway: 10.64.0.1
    dns: [10.64.0.2]
    domain: bench.example.net
    dhcp_range: {{start: 10.67.255.1, end: 10.67.255.250}}
  bmc: {{cidr: 10.96.0.0/14, dhcp: true}}
ssh:
  user: ops
  authorized_keys: ["{key}"]
boot: {{url: "http://10.64.0.5:8080/"}}
bmc: {{username: admin, password: env:BENCH_BMC_PASSWORD}}
images:
  ubuntu-2204:
    os: ubuntu
    version: "22.04"
    kernel_url: http://10.64.0.5:8080/ubuntu/vmlinuz
    initrd_url: http://10.64.0.5:8080/ubuntu/initrd
    iso_url: http://10.64.0.5:8080/ubuntu/ubuntu-22.04.5-live-server-amd64.iso
  rocky-9:
    os: rocky
    version: "9"
    kernel_url: http://10.64.0.5:8080/rocky/vmlinuz
    initrd_url: http://10.64.0.5:8080/rocky/initrd.img
    repo_url: http://10.64.0.5:8080/rocky/9/BaseOS/x86_64/os/
stacks:
  prod-570:
    driver: {{version: 570.133.20}}
    cuda: "12.8"
    container_toolkit: 1.17.5
    dcgm: 4.1.1
    fabric_manager: true
  prod-580:
    driver: {{version: 580.65.06}}
    cuda: "13.0"
    container_toolkit: 1.17.8
    dcgm: 4.2.3
    fabric_manager: true
profiles:
  hgx-h100: {{gpu: H100-SXM5-80GB, gpus: 8}}
"""
