"""``ipmi.classify`` and ``redfish.classify`` sort what pyghmi raises into the five BmcError
reasons. Driven by tests/data/bmc/errors.json: exceptions recorded from the real peers (see
its README), each with the reason written by hand."""

from __future__ import annotations

import json
from typing import Any

import pytest

from provisioner.bmc import ipmi, redfish
from provisioner.errors import BmcError
from tests.conftest import DATA
from tests.peers.bmc_errors import rebuild

RECORDS: list[dict[str, Any]] = json.loads((DATA / "bmc" / "errors.json").read_text("utf-8"))
CLASSIFY = {"ipmi": ipmi.classify, "redfish": redfish.classify}
# A BMC that stays silent: only whether a session was up tells dead from slow.
SILENT = (
    "ipmi-dead-port",
    "ipmi-login-blackholed",
    "ipmi-session-blackholed",
    "redfish-silent-server",
    "redfish-emulator-hung",
)


def test_the_records_cover_every_reason_and_both_clients() -> None:
    assert {r["reason"] for r in RECORDS} == set(BmcError.REASONS)
    assert {r["client"] for r in RECORDS} == {"ipmi", "redfish"}
    assert len({r["case"] for r in RECORDS}) == len(RECORDS)
    assert {r["case"] for r in RECORDS} >= set(SILENT)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r["case"])
def test_a_recorded_failure_gets_its_reason(record: dict[str, Any]) -> None:
    error = rebuild(record)
    assert list(error.args) == record["args"]
    result = CLASSIFY[record["client"]](error, record["connected"])
    assert (result.reason, bool(result.message)) == (record["reason"], True), result.message
    assert "Traceback" not in result.message


@pytest.mark.parametrize("case", SILENT)
def test_silence_is_unreachable_before_a_session_and_a_timeout_after(case: str) -> None:
    (record,) = [r for r in RECORDS if r["case"] == case]
    classify = CLASSIFY[record["client"]]
    assert classify(rebuild(record), False).reason == "unreachable"
    assert classify(rebuild(record), True).reason == "timeout"


@pytest.mark.parametrize("client", sorted(CLASSIFY))
def test_a_bmc_error_passes_through_unchanged(client: str) -> None:
    error = BmcError("auth", "no user name")
    assert CLASSIFY[client](error, True) is error
