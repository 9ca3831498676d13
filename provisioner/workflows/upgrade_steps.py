"""The upgrade's steps on real nodes and on the lab: playbooks/driver-upgrade.yml through
ansible-runner for the new stack and for the way back, and the quick burn-in of
:class:`~provisioner.workflows.bring_up.SiteSteps`.

The rendered inventory (``render_dir/ansible``, rendered from the spec being applied) puts
each node in its new stack's group; going back to the previous stack hands the roles that
stack's variables as extra variables (which win over group variables), made from the stack
fact recorded when the node was last configured, so a stack the spec no longer names can
still be gone back to, pins and all. Every run reboots the nodes it changed (the kernel must
load the new driver) and the roles check that ``nvidia-smi`` then reports the pinned driver.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from provisioner.burnin.results import reasons_from
from provisioner.render.inventory import stack_vars
from provisioner.runner.ansible import run_playbook
from provisioner.spec import Fleet
from provisioner.spec.models import Stack
from provisioner.workflows.bring_up import BurninOutcome, SiteSteps

PLAYBOOK = "driver-upgrade.yml"


class SiteUpgradeSteps:
    """:class:`~provisioner.workflows.upgrade.UpgradeSteps` over ansible-runner."""

    def __init__(self, site: SiteSteps) -> None:
        self.site = site

    def _run(self, nodes: Sequence[str], extravars: Mapping[str, Any]) -> dict[str, str | None]:
        every = {
            **self.site.extravars,  # nvidia_driver_reboot: true
            # One batch per run: the workflow keeps the window; one node's failure must not
            # stop the others of its batch.
            "provisioner_rollout_serial": [len(nodes)],
            "provisioner_rollout_max_fail_percentage": 100,
            **extravars,
        }
        result = run_playbook(
            PLAYBOOK,
            self.site.render_dir / "ansible",
            limit=nodes,
            private_key=self.site.key,
            extravars=every,
        )
        reasons = reasons_from(result, nodes)
        return {n: (f"{PLAYBOOK}: {reasons[n]}" if n in reasons else None) for n in nodes}

    def upgrade(self, nodes: Sequence[str]) -> Mapping[str, str | None]:
        return self._run(nodes, {})

    def roll_back(
        self, nodes: Sequence[str], stacks: Mapping[str, Mapping[str, Any]]
    ) -> Mapping[str, str | None]:
        groups: dict[str, list[str]] = {}
        for node in nodes:
            groups.setdefault(str(stacks[node].get("hash")), []).append(node)
        out: dict[str, str | None] = {}
        for members in groups.values():
            fact = stacks[members[0]]
            try:
                stack = Stack.model_validate(fact["stack"])
            except (KeyError, ValueError) as exc:
                out |= dict.fromkeys(members, f"the recorded stack cannot be read back: {exc}")
                continue
            out |= self._run(members, stack_vars(str(fact.get("name")), stack))
        return out

    def burn_in(self, nodes: Sequence[str], run_id: str) -> Mapping[str, BurninOutcome | str]:
        return self.site.burn_in(nodes, run_id)

    def recover(self) -> None:
        self.site.recover()


@contextmanager
def site_upgrade_steps(
    fleet: Fleet, render_dir: Path, *, key: Path | None = None
) -> Iterator[SiteUpgradeSteps]:
    """Steps for an upgrade: a quick burn-in (the workflow's gate, whatever the profile's
    level); nothing network-boots, so no boot events are read."""
    site = SiteSteps(
        fleet, render_dir, render_dir / "boot-events.jsonl", key=key, burnin_level="quick"
    )
    try:
        yield SiteUpgradeSteps(site)
    finally:
        site.close()
