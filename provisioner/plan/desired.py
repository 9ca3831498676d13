"""What the spec wants recorded of each node, fact by fact.

The state store keeps, per node, the facts that the step which established them recorded
(:meth:`provisioner.state.store.Store.move` with ``facts=``):

* ``bmc``    where its BMC answers and with which credential *reference* (never a secret),
             recorded when the BMC answered with them;
* ``image``  the OS image it was installed with, recorded when its installer called back;
* ``stack``  the software stack configured on it (the whole stack, so that a failed upgrade
             can go back to it even after the spec dropped it), recorded when configured;
* ``floors`` the burn-in level and floors it passed, recorded when it became ready.

Each fact carries a ``hash`` of what it was made from; a plan compares hashes only. Facts
are computed once per stack, image and profile, and shared by their nodes (a 10,000-node
fleet has a handful of each).
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from typing import Any

from provisioner.spec import Fleet, Node
from provisioner.spec.catalog import load_catalog

#: The fact kinds a plan compares, in the order a bring-up records them.
FACT_KINDS = ("bmc", "image", "stack", "floors")


def digest(value: Any) -> str:
    """A short, stable hash of a JSON-able value (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Desired:
    """The facts ``fleet`` wants of each of its nodes."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @cached_property
    def _stacks(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, stack in self.fleet.document.stacks.items():
            dump = stack.model_dump(mode="json")
            versions = {
                "driver": stack.driver.version,
                "kernel_modules": stack.driver.kernel_modules,
                "cuda": stack.cuda,
                "container_toolkit": stack.container_toolkit,
                "dcgm": stack.dcgm,
                "fabric_manager": stack.fabric_manager,
            }
            out[name] = {"name": name, "hash": digest(dump), "versions": versions, "stack": dump}
        return out

    @cached_property
    def _images(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "name": name,
                "title": image.title,
                "hash": digest(image.model_dump(mode="json")),
            }
            for name, image in self.fleet.document.images.items()
        }

    @cached_property
    def _floors(self) -> dict[str, dict[str, Any]]:
        catalog = load_catalog()
        out = {}
        for name, profile in self.fleet.document.profiles.items():
            sku = catalog.gpus.get(profile.gpu)
            made_of = {
                "profile": profile.burnin.model_dump(mode="json"),
                "gpu": profile.gpu,
                "gpus": profile.gpus,
                "catalog": None if sku is None else sku.burnin.model_dump(mode="json"),
                "rules": catalog.burnin.model_dump(mode="json"),
            }
            out[name] = {"profile": name, "level": profile.burnin.level, "hash": digest(made_of)}
        return out

    def stack(self, node: Node) -> dict[str, Any]:
        return self._stacks[node.stack]

    def image(self, node: Node) -> dict[str, Any]:
        return self._images[node.image]

    def floors(self, node: Node) -> dict[str, Any]:
        return self._floors[node.profile]

    def bmc(self, node: Node) -> dict[str, Any]:
        username, password = self.fleet.bmc_credentials(node)
        made_of = {"endpoint": node.bmc.url, "username": username, "credential": str(password)}
        return {**made_of, "hash": digest(made_of)}

    def fact(self, kind: str, node: Node) -> dict[str, Any]:
        if kind == "bmc":
            return self.bmc(node)
        if kind == "image":
            return self.image(node)
        if kind == "stack":
            return self.stack(node)
        if kind == "floors":
            return self.floors(node)
        raise ValueError(f"unknown fact kind {kind!r} (known: {', '.join(FACT_KINDS)})")
