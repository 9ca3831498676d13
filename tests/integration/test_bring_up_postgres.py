"""Two bring-ups of the same nodes at once on a real PostgreSQL state database (the server
tests.peers.postgres starts; root only), where the node locks are advisory locks: the
second is refused with :class:`~provisioner.state.locks.LockHeld` naming the first, touches
nothing, and once the first has finished a new run goes ahead. The same check as the unit
test's on SQLite (tests/unit/test_bring_up_workflow.py), with its fake steps and the lab's
spec without a lab.
"""

from __future__ import annotations

import pytest

from tests.peers.postgres import PostgresServer
from tests.unit.test_bring_up_workflow import lab_fleet, second_is_refused_while_the_first_runs

pytestmark = pytest.mark.integration


def test_a_second_bring_up_is_refused_naming_the_first_then_a_later_one_proceeds(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fleet = lab_fleet(tmp_path_factory.mktemp("spec"))
    second_is_refused_while_the_first_runs(fleet, postgres.create_database())
