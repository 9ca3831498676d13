"""The wheel carries playbooks/ and templates/, found through importlib.resources both in a
source checkout and in an installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import provisioner
from provisioner.resources import playbooks_dir, templates_dir
from tests.conftest import LAB_SPEC, REPO

pytestmark = pytest.mark.integration


def test_checkout_finds_top_level_folders() -> None:
    if Path(provisioner.__file__).resolve().parent != REPO / "provisioner":
        pytest.skip("provisioner is not imported from this checkout")
    assert templates_dir() == REPO / "templates"
    assert playbooks_dir() == REPO / "playbooks"
    assert (templates_dir() / "ansible" / "inventory.yml.j2").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("provisioner-*.whl")
    return built


def test_wheel_contains_templates_playbooks_and_catalog(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (REPO / "templates").rglob("*.j2"):
        assert f"provisioner/_data/templates/{template.relative_to(REPO / 'templates')}" in names
    for item in (REPO / "playbooks").rglob("*"):
        if item.is_file():
            assert f"provisioner/_data/playbooks/{item.relative_to(REPO / 'playbooks')}" in names
    assert "provisioner/spec/catalog.yaml" in names


def test_installed_wheel_renders_from_its_own_templates(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import provisioner, provisioner.resources as r;"
            "print(provisioner.__file__); print(r.templates_dir()); print(r.playbooks_dir())",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
        timeout=60,
    )
    module, templates, playbooks = probe.stdout.split()
    assert Path(module).is_relative_to(site)
    assert Path(templates) == site / "provisioner" / "_data" / "templates"
    assert Path(playbooks) == site / "provisioner" / "_data" / "playbooks"
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "provisioner", "render", str(LAB_SPEC), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "ansible" / "inventory.yml").read_text().startswith("# Ansible inventory")
