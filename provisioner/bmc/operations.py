"""The BMC operations the CLI and the workflows fan out, and the targets of a fleet.

Each operation is ``(client, target) -> JSON-able value``, run by :class:`FanOut`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from provisioner.bmc.base import BmcClient, BootDevice, PowerAction, PowerState
from provisioner.bmc.fanout import NOT_SENT, RETRYABLE, Step, Target
from provisioner.spec.fleet import Fleet, Node


def targets_for(fleet: Fleet, nodes: Sequence[Node]) -> list[Target]:
    out = []
    for node in nodes:
        username, password = fleet.bmc_credentials(node)
        out.append(
            Target(
                node=node.name,
                rack=node.rack,
                endpoint=node.bmc,
                username=username,
                password=password,
                uefi=fleet.profile(node).boot_mode == "uefi",
                expected_serial=node.serial,
            )
        )
    return out


def power_status(client: BmcClient, target: Target) -> str:
    return str(client.get_power_state())


def power(action: PowerAction, wait: float | None = None) -> Step[str]:
    """Change power; with ``wait`` (seconds), the result comes once the final state is
    reached, polled with the BMC free between polls (several systems behind one Redfish
    service wait side by side). The wait is time of its own beyond the per-command timeout,
    and one that ends in vain is not retried: the BMC accepted the change. A cycle, a reset
    or a soft-off is retried only when the BMC could not be reached at all: sent twice, a
    cycle would boot the node twice (and use up a one-time network boot on the first)."""
    final = {
        PowerAction.ON: PowerState.ON,
        PowerAction.OFF: PowerState.OFF,
        PowerAction.SOFT_OFF: PowerState.OFF,
        PowerAction.CYCLE: PowerState.ON,
        PowerAction.RESET: PowerState.ON,
    }[action]

    def run(client: BmcClient, target: Target) -> str:
        client.set_power(action)
        return f"{action} requested"

    def reached(client: BmcClient, target: Target) -> str | None:
        return str(final) if client.get_power_state() is final else None

    once = action in (PowerAction.CYCLE, PowerAction.RESET, PowerAction.SOFT_OFF)
    return Step(
        run,
        retry_on=NOT_SENT if once else RETRYABLE,
        until=reached if wait else None,
        until_timeout=wait or 0.0,
        until_what=f"power did not reach {final}",
    )


def boot(device: BootDevice, persistent: bool = False) -> Callable[[BmcClient, Target], str]:
    def run(client: BmcClient, target: Target) -> str:
        client.set_boot_device(device, persistent=persistent, uefi=target.uefi)
        mode = "UEFI" if target.uefi else "legacy"
        return f"{device} {'always' if persistent else 'next boot'} ({mode})"

    return run


def inventory(client: BmcClient, target: Target) -> dict[str, Any]:
    fru: dict[str, Any] = dict(client.get_fru().as_dict())
    expected = target.expected_serial
    fru["expected_serial"] = expected
    fru["serial_matches"] = None if expected is None else fru["serial"] == expected
    return fru


def event_log(clear: bool) -> Callable[[BmcClient, Target], list[dict[str, Any]]]:
    def run(client: BmcClient, target: Target) -> list[dict[str, Any]]:
        entries = client.clear_sel() if clear else client.get_sel()
        return [entry.as_dict() for entry in entries]

    return run


def sensors(client: BmcClient, target: Target) -> list[dict[str, Any]]:
    return [reading.as_dict() for reading in client.get_sensors()]
