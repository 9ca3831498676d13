"""The spec's rollout policy as the play keywords of driver-upgrade.yml (serial and
max_fail_percentage), rendered into group_vars/all.yml."""

from __future__ import annotations

import pytest

from provisioner.render.inventory import rollout_vars
from provisioner.spec.models import Rollout


@pytest.mark.parametrize(
    ("policy", "nodes", "serial", "percentage"),
    [
        ({"canary": 1, "max_unavailable": 1, "max_failures": 1}, 4, [1, 1], 100),
        ({}, 1000, [1, "10%"], 0),  # defaults: canary 1, 10 %, no failure tolerated
        ({"canary": 0, "max_unavailable": 8, "max_failures": 2}, 64, [8], 25),
        ({"canary": 2, "max_unavailable": 3, "max_failures": 1}, 64, [2, 3], 33.34),
        ({"max_unavailable": "25%", "max_failures": 2}, 1000, [1, "25%"], 0.8),
        ({"max_unavailable": "12.5%"}, 1000, [1, 125], 0),  # Ansible takes whole percents
        ({"max_unavailable": 4, "max_failures": 9}, 64, [1, 4], 100),
    ],
)
def test_rollout_policy_becomes_serial_and_max_fail_percentage(
    policy: dict[str, object], nodes: int, serial: list[object], percentage: float
) -> None:
    assert rollout_vars(Rollout.model_validate(policy), nodes) == {
        "provisioner_rollout_serial": serial,
        "provisioner_rollout_max_fail_percentage": percentage,
    }


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 10, 64, 333, 1000])
@pytest.mark.parametrize("max_failures", [0, 1, 2, 5])
def test_a_full_batch_stops_at_one_failure_more_than_max_failures(
    batch: int, max_failures: int
) -> None:
    """Ansible stops a rollout when failed / batch > max_fail_percentage / 100."""
    policy = Rollout(canary=0, max_unavailable=batch, max_failures=max_failures)
    percentage = rollout_vars(policy, 10_000)["provisioner_rollout_max_fail_percentage"]

    def stops(failed: int) -> bool:
        return failed / batch > percentage / 100

    if max_failures < batch:
        assert not stops(max_failures) and stops(max_failures + 1)
    else:
        assert not any(stops(failed) for failed in range(batch + 1))
