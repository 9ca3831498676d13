"""The package naming rules: which Debian packages, versions and relations a stack installs.

The two stacks of the lab spec are checked against full tables written out by hand from
NVIDIA's repositories; the rules that those stacks do not reach (proprietary modules, branches
before R580, point releases, DCGM's CUDA flavours) are checked one by one.
"""

from __future__ import annotations

from typing import Any

import pytest

from provisioner.spec import load_fleet
from provisioner.spec.models import Stack
from provisioner.spec.packages import (
    COMPONENTS,
    DebPackage,
    component_packages,
    cuda_packages,
    dcgm_cuda_flavour,
    driver_cuda_version,
    stack_packages,
    unique_packages,
)
from tests.conftest import LAB_SPEC

H100_570 = [
    ("driver", "cuda", "nvidia-open-570", "570.133.20-0ubuntu1"),
    ("driver", "cuda", "nvidia-driver-570-open", "570.133.20-0ubuntu1"),
    ("driver", "cuda", "nvidia-utils-570", "570.133.20-0ubuntu1"),
    ("fabric_manager", "cuda", "nvidia-fabricmanager-570", "570.133.20-1"),
    ("fabric_manager", "cuda", "libnvidia-nscq-570", "570.133.20-1"),
    ("cuda", "cuda", "cuda-toolkit-12-8", "12.8.0-1"),
    ("cuda", "cuda", "cuda-nvcc-12-8", "12.8.61-1"),
    ("container_toolkit", "container_toolkit", "nvidia-container-toolkit", "1.17.5-1"),
    ("container_toolkit", "container_toolkit", "nvidia-container-toolkit-base", "1.17.5-1"),
    ("container_toolkit", "container_toolkit", "libnvidia-container-tools", "1.17.5-1"),
    ("container_toolkit", "container_toolkit", "libnvidia-container1", "1.17.5-1"),
    ("dcgm", "cuda", "datacenter-gpu-manager-4-core", "1:4.1.1-1"),
    ("dcgm", "cuda", "datacenter-gpu-manager-4-cuda12", "1:4.1.1-1"),
]
H100_580 = [
    ("driver", "cuda", "nvidia-open-580", "580.65.06-0ubuntu1"),
    ("driver", "cuda", "nvidia-driver-580-open", "580.65.06-0ubuntu1"),
    ("driver", "cuda", "nvidia-utils-580", "580.65.06-0ubuntu1"),
    ("fabric_manager", "cuda", "nvidia-fabricmanager", "580.65.06-1"),
    ("fabric_manager", "cuda", "libnvidia-nscq", "580.65.06-1"),
    ("cuda", "cuda", "cuda-toolkit-13-0", "13.0.0-1"),
    ("cuda", "cuda", "cuda-nvcc-13-0", "13.0.48-1"),
    ("container_toolkit", "container_toolkit", "nvidia-container-toolkit", "1.17.8-1"),
    ("container_toolkit", "container_toolkit", "nvidia-container-toolkit-base", "1.17.8-1"),
    ("container_toolkit", "container_toolkit", "libnvidia-container-tools", "1.17.8-1"),
    ("container_toolkit", "container_toolkit", "libnvidia-container1", "1.17.8-1"),
    ("dcgm", "cuda", "datacenter-gpu-manager-4-core", "1:4.2.3-1"),
    ("dcgm", "cuda", "datacenter-gpu-manager-4-cuda12", "1:4.2.3-1"),
]


def _stack(**overrides: Any) -> Stack:
    data: dict[str, Any] = {"driver": {"version": "570.133.20"}}
    data.update(overrides)
    return Stack.model_validate(data)


def _names(packages: list[DebPackage]) -> dict[str, DebPackage]:
    return {p.name: p for p in packages}


# --------------------------------------------------------------------------- the lab stacks


@pytest.mark.parametrize(("stack", "expected"), [("h100-570", H100_570), ("h100-580", H100_580)])
def test_lab_stacks_install_nvidias_package_names_and_versions(
    stack: str, expected: list[tuple[str, str, str, str]]
) -> None:
    packages = stack_packages(load_fleet(LAB_SPEC).document.stacks[stack])
    assert [(p.component, p.repo, p.name, p.version) for p in packages] == expected


def test_lab_stacks_relate_their_packages_like_nvidias() -> None:
    stacks = load_fleet(LAB_SPEC).document.stacks
    got = _names(stack_packages(stacks["h100-570"]))
    assert got["nvidia-open-570"].depends == ("nvidia-driver-570-open (= 570.133.20-0ubuntu1)",)
    assert got["nvidia-driver-570-open"].depends == ("nvidia-utils-570 (= 570.133.20-0ubuntu1)",)
    assert "nvidia-driver-570" in got["nvidia-driver-570-open"].conflicts
    assert got["nvidia-container-toolkit"].depends == (
        "nvidia-container-toolkit-base (= 1.17.5-1)",
        "libnvidia-container-tools (>= 1.17.5-1)",
        "libnvidia-container-tools (<< 2.0.0)",
    )
    assert got["libnvidia-container-tools"].depends == ("libnvidia-container1 (>= 1.17.5-1)",)
    assert got["datacenter-gpu-manager-4-cuda12"].depends == (
        "datacenter-gpu-manager-4-core (= 1:4.1.1-1)",
    )
    assert got["cuda-toolkit-12-8"].depends == ("cuda-nvcc-12-8 (>= 12.8.61)",)


def test_packages_owning_the_same_files_across_branches_replace_each_other() -> None:
    stacks = load_fleet(LAB_SPEC).document.stacks
    old = _names(stack_packages(stacks["h100-570"]))
    new = _names(stack_packages(stacks["h100-580"]))
    for before, after in (
        ("nvidia-utils-570", "nvidia-utils-580"),
        ("nvidia-fabricmanager-570", "nvidia-fabricmanager"),
    ):
        shared = set(old[before].provides) & set(new[after].conflicts) & set(new[after].replaces)
        assert shared, f"{after} does not replace {before}"


def test_upstream_versions_are_what_the_tools_report() -> None:
    got = _names(stack_packages(load_fleet(LAB_SPEC).document.stacks["h100-580"]))
    assert got["nvidia-utils-580"].upstream == "580.65.06"
    assert got["cuda-nvcc-13-0"].upstream == "13.0.48"
    assert got["datacenter-gpu-manager-4-core"].upstream == "4.2.3"
    assert got["datacenter-gpu-manager-4-core"].pin == "datacenter-gpu-manager-4-core=1:4.2.3-1"


def test_file_names_drop_the_epoch() -> None:
    got = _names(stack_packages(load_fleet(LAB_SPEC).document.stacks["h100-570"]))
    core = got["datacenter-gpu-manager-4-core"]
    assert core.filename == "datacenter-gpu-manager-4-core_4.1.1-1_amd64.deb"
    assert got["nvidia-utils-570"].filename == "nvidia-utils-570_570.133.20-0ubuntu1_amd64.deb"


# --------------------------------------------------------------------------- driver


def test_proprietary_modules_install_cuda_drivers_and_the_unsuffixed_driver() -> None:
    stack = _stack(driver={"version": "570.133.20", "kernel_modules": "proprietary"})
    names = [(p.name, p.version) for p in component_packages(stack)["driver"]]
    assert names == [
        ("cuda-drivers-570", "570.133.20-0ubuntu1"),
        ("nvidia-driver-570", "570.133.20-0ubuntu1"),
        ("nvidia-utils-570", "570.133.20-0ubuntu1"),
    ]
    driver = _names(component_packages(stack)["driver"])["nvidia-driver-570"]
    assert driver.conflicts == ("nvidia-driver-570-open",)


def test_open_and_proprietary_stacks_share_one_utils_package() -> None:
    open_stack = _stack(driver={"version": "570.133.20", "kernel_modules": "open"})
    closed = _stack(driver={"version": "570.133.20", "kernel_modules": "proprietary"})
    merged = unique_packages([*stack_packages(open_stack), *stack_packages(closed)])
    assert [p.name for p in merged].count("nvidia-utils-570") == 1
    assert {"nvidia-open-570", "cuda-drivers-570"} <= {p.name for p in merged}


def test_two_different_packages_with_one_name_and_version_are_refused() -> None:
    first = component_packages(_stack())["driver"][2]
    other = DebPackage(
        first.name, first.version, first.component, first.role, "9.9", "something else"
    )
    with pytest.raises(ValueError, match="two different packages nvidia-utils-570="):
        unique_packages([first, other])


@pytest.mark.parametrize(
    ("driver", "cuda"),
    [("570.133.20", "12.8"), ("575.57.08", "12.9"), ("580.65.06", "13.0"), ("535.54.03", "12.2")],
)
def test_driver_reports_the_newest_cuda_it_supports(driver: str, cuda: str) -> None:
    assert driver_cuda_version(driver) == cuda


# --------------------------------------------------------------------------- fabric manager


@pytest.mark.parametrize(
    ("version", "fabric_manager", "nscq"),
    [
        ("550.163.01", "nvidia-fabricmanager-550", "libnvidia-nscq-550"),
        ("575.57.08", "nvidia-fabricmanager-575", "libnvidia-nscq-575"),
        ("580.65.06", "nvidia-fabricmanager", "libnvidia-nscq"),
        ("580.95.05", "nvidia-fabricmanager", "libnvidia-nscq"),
    ],
)
def test_fabric_manager_drops_the_branch_suffix_from_r580(
    version: str, fabric_manager: str, nscq: str
) -> None:
    stack = _stack(driver={"version": version}, fabric_manager=True)
    got = [(p.name, p.version) for p in component_packages(stack)["fabric_manager"]]
    assert got == [(fabric_manager, f"{version}-1"), (nscq, f"{version}-1")]


def test_components_a_stack_leaves_out_install_nothing() -> None:
    got = component_packages(_stack())
    assert list(got) == ["driver"]
    assert [p.name for p in stack_packages(_stack())] == [
        "nvidia-open-570",
        "nvidia-driver-570-open",
        "nvidia-utils-570",
    ]


def test_components_come_in_a_fixed_order() -> None:
    stack = _stack(fabric_manager=True, cuda="12.8", container_toolkit="1.17.5", dcgm="4.1.1")
    assert list(component_packages(stack)) == list(COMPONENTS)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize(
    ("cuda", "toolkit", "nvcc"),
    [
        ("12.8", ("cuda-toolkit-12-8", "12.8.0-1"), ("cuda-nvcc-12-8", "12.8.61-1")),
        ("12.8.1", ("cuda-toolkit-12-8", "12.8.1-1"), ("cuda-nvcc-12-8", "12.8.93-1")),
        ("13.0", ("cuda-toolkit-13-0", "13.0.0-1"), ("cuda-nvcc-13-0", "13.0.48-1")),
        ("12.4", ("cuda-toolkit-12-4", "12.4.0-1"), ("cuda-nvcc-12-4", "12.4.0-1")),
    ],
)
def test_cuda_version_names_the_toolkit_and_its_compiler(
    cuda: str, toolkit: tuple[str, str], nvcc: tuple[str, str]
) -> None:
    assert [(p.name, p.version) for p in cuda_packages(cuda)] == [toolkit, nvcc]


def test_cuda_version_without_a_minor_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a major and a minor"):
        cuda_packages("12")


# --------------------------------------------------------------------------- DCGM and toolkit


@pytest.mark.parametrize(
    ("dcgm", "cuda_major", "flavour"),
    [("4.1.1", 12, 12), ("4.2.3", 13, 12), ("4.4.0", 13, 13), ("4.4.0", 12, 12), ("4.0.0", 11, 11)],
)
def test_dcgm_takes_the_newest_cuda_flavour_it_ships(
    dcgm: str, cuda_major: int, flavour: int
) -> None:
    assert dcgm_cuda_flavour(dcgm, cuda_major) == flavour


def test_dcgm_flavour_follows_the_drivers_cuda_without_a_toolkit() -> None:
    stack = _stack(driver={"version": "580.65.06"}, dcgm="4.4.0")
    assert [p.name for p in component_packages(stack)["dcgm"]] == [
        "datacenter-gpu-manager-4-core",
        "datacenter-gpu-manager-4-cuda13",
    ]


def test_a_revision_in_the_spec_is_kept() -> None:
    stack = _stack(container_toolkit="1.17.5-2", dcgm="4.1.1-3", cuda="12.8")
    got = _names(stack_packages(stack))
    assert got["nvidia-container-toolkit"].version == "1.17.5-2"
    assert (
        got["nvidia-container-toolkit"].depends[0] == "nvidia-container-toolkit-base (= 1.17.5-2)"
    )
    assert got["datacenter-gpu-manager-4-core"].version == "1:4.1.1-3"
