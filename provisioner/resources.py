"""Where the packaged ``templates/`` and ``playbooks/`` live, in a checkout or in a wheel.

An installed wheel carries them inside the package (``provisioner/_data/``, see
pyproject.toml); a source checkout has them at the repository root beside the package.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _data_dir(name: str) -> Path:
    packaged = resources.files("provisioner").joinpath("_data", name)
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(str(resources.files("provisioner"))).parent / name
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(f"provisioner's {name}/ folder is missing from this installation")


def templates_dir() -> Path:
    return _data_dir("templates")


def playbooks_dir() -> Path:
    return _data_dir("playbooks")


def lab_dir() -> Path:
    """The embedded lab's spec folder (``inventories/lab``: fleet.yaml, its SSH key)."""
    packaged = resources.files("provisioner").joinpath("_data", "inventories", "lab")
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(str(resources.files("provisioner"))).parent / "inventories" / "lab"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("the embedded lab (inventories/lab/) is missing from this installation")
