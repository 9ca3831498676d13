"""The burn-in agent's parsers over recorded-format outputs in tests/data/burnin/<parser>/<case>/.

Each case holds the tool's output (``input.*``, see tests/data/burnin/README.md for where the
formats come from) and ``expected.json``, the parser's answer. After an intended parser change
regenerate with ``UPDATE_GOLDEN=1`` and review the diff like any other change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from provisioner.burnin import agent
from tests.conftest import DATA

CASES = DATA / "burnin"


def _cases(parser: str) -> list[Path]:
    return sorted(path for path in (CASES / parser).iterdir() if path.is_dir())


def _check(case: Path, actual: Any) -> None:
    expected_file = case / "expected.json"
    if os.environ.get("UPDATE_GOLDEN"):
        expected_file.write_text(json.dumps(actual, indent=2) + "\n", encoding="utf-8")
    assert actual == json.loads(expected_file.read_text(encoding="utf-8"))


def _smi(case: Path) -> dict[str, Any]:
    fields = (case / "query.txt").read_text().strip().split(",")
    rows, other = agent.split_smi_csv(fields, (case / "output.csv").read_text())
    assert agent.parse_smi_csv(fields, (case / "output.csv").read_text()) == rows
    return {"rows": rows, "other_lines": other, "gpus": [agent.gpu_from_smi(r) for r in rows]}


def _xid(case: Path) -> list[dict[str, Any]]:
    bus_ids = json.loads((case / "gpus.json").read_text())
    return agent.parse_xid_log((case / "input.log").read_text(), bus_ids)


PARSERS: dict[str, Callable[[Path], Any]] = {
    "smi": _smi,
    "banner": lambda case: agent.parse_smi_banner((case / "input.txt").read_text()),
    "nvlink": lambda case: agent.parse_nvlink_status((case / "input.txt").read_text()),
    "xid": _xid,
    "dcgm": lambda case: agent.parse_dcgm_diag((case / "input.json").read_text()),
    "all_reduce_perf": lambda case: agent.parse_all_reduce_perf((case / "input.txt").read_text()),
}


@pytest.mark.parametrize(
    ("parser", "case"),
    [(parser, case) for parser in PARSERS for case in _cases(parser)],
    ids=lambda value: value if isinstance(value, str) else value.name,
)
def test_parser_reads_recorded_output(parser: str, case: Path) -> None:
    _check(case, PARSERS[parser](case))


# --------------------------------------------------------------------------- what the cases say


def _faulty_smi() -> dict[str, Any]:
    return _smi(CASES / "smi" / "h100_faulty_under_load")


def test_smi_rows_turn_na_into_none_and_words_into_bools() -> None:
    rows = _faulty_smi()["rows"]
    assert [row["index"] for row in rows] == list(range(7))
    assert rows[3]["serial"] is None and rows[3]["power.draw"] is None
    assert rows[3]["temperature.gpu"] is None
    assert rows[0]["serial"] == "1652922038145"  # a serial stays text, not a number
    assert rows[0]["driver_version"] == "570.133.20"
    assert rows[2]["remapped_rows.pending"] is True and rows[0]["remapped_rows.pending"] is False
    assert rows[0]["ecc.mode.current"] is True and rows[0]["persistence_mode"] is True
    assert rows[6]["clocks_event_reasons.active"] == 0x8
    assert rows[0]["power.draw"] == pytest.approx(612.45)


def test_smi_lost_gpu_line_is_kept_aside_not_parsed() -> None:
    assert _faulty_smi()["other_lines"] == [
        "Unable to determine the device handle for GPU0000:DB:00.0: Unknown Error"
    ]


def test_smi_gpu_records_show_the_recorded_faults() -> None:
    gpus = _faulty_smi()["gpus"]
    assert gpus[2]["ecc"]["volatile_uncorrectable"] == 2
    assert gpus[2]["row_remap"] == {
        "correctable": 0,
        "uncorrectable": 1,
        "pending": True,
        "failure": False,
    }
    assert (gpus[5]["pcie"]["gen"], gpus[5]["pcie"]["max_gen"]) == (3, 5)
    assert all(gpu["retired_pages"] is None for gpu in gpus)


def test_smi_pre_ampere_has_retired_pages_instead_of_row_remap() -> None:
    gpus = _smi(CASES / "smi" / "v100_retired_pages_r470")["gpus"]
    assert [gpu["row_remap"] for gpu in gpus] == [None, None]
    assert gpus[1]["retired_pages"] == {"single_bit": 2, "double_bit": 1, "pending": True}
    assert gpus[0]["persistence_mode"] is False


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("[N/A]", None),
        ("[Not Supported]", None),
        ("N/A", None),
        ("", None),
        ("Enabled", True),
        ("Disabled", False),
        ("Not Active", False),
        ("0x0000000000000008", 8),
        ("0x00000000000000A0", 0xA0),
        ("81559 MiB", 81559),  # when asked without nounits
        ("350.12 W", 350.12),
        ("5", 5),
    ],
)
def test_smi_value(raw: str, value: object) -> None:
    assert agent.smi_value("power.draw", raw) == value


def test_nvlink_down_link_is_listed() -> None:
    status = agent.parse_nvlink_status(
        (CASES / "nvlink" / "h100_gpu3_link17_down" / "input.txt").read_text()
    )
    assert [(gpu["gpu"], gpu["down"]) for gpu in status if gpu["down"]] == [(3, [17])]
    assert len(status[3]["up"]) == 17 and len(status[0]["up"]) == 18


def test_xid_with_and_without_pci_prefix_map_to_visible_gpus() -> None:
    events = _xid(CASES / "xid" / "journal_h100_r570")
    assert [(e["xid"], e["pci"], e["gpu"]) for e in events] == [
        (63, "0000:3a:00", 2),
        (48, "0000:3a:00", 2),
        (94, "0000:ba:00", 6),
        (119, "0000:5d:00", 3),
        (79, "0000:db:00", 7),
        (79, "0000:c1:00", None),  # not a GPU the driver still sees
    ]
    legacy = _xid(CASES / "xid" / "dmesg_v100_r470")
    assert [(e["xid"], e["gpu"]) for e in legacy] == [(48, 1), (63, 1), (13, 0), (79, 0)]


def test_dcgm_3_and_4_give_the_same_shape() -> None:
    old = agent.parse_dcgm_diag((CASES / "dcgm" / "dcgm3_fail_level2" / "input.json").read_text())
    new = agent.parse_dcgm_diag((CASES / "dcgm" / "dcgm4_fail_level3" / "input.json").read_text())
    assert (old["version"], new["version"]) == ("3.3.5", "4.2.3")
    failed_old = [(r["test"], r["gpu"]) for r in old["results"] if r["status"] == "fail"]
    failed_new = [(r["test"], r["gpu"]) for r in new["results"] if r["status"] == "fail"]
    assert failed_old == [("GPU Memory", 3)]
    assert failed_new == [("memory", 5)]
    assert "memory mismatch was detected on GPU 5" in next(
        r["info"] for r in new["results"] if r["status"] == "fail"
    )
    assert {r["status"] for r in new["results"]} == {"pass", "fail", "warn", "skip"}
    software = [r for r in old["results"] if r["category"] == "Deployment"]
    assert {r["gpu"] for r in software} == {None}  # "0,1,...,7": the whole node


def test_dcgm_text_before_the_json_and_unknown_status() -> None:
    text = (
        'Successfully ran diagnostic.\n{"DCGM Diagnostic": {"test_categories": [{"category": "X",'
    )
    text += ' "tests": [{"name": "t", "results": [{"entity_group": "GPU", "entity_id": 1,'
    text += ' "status": "Odd"}]}]}]}}\ntrailing'
    parsed = agent.parse_dcgm_diag(text)
    assert parsed["results"] == [
        {
            "category": "X",
            "test": "t",
            "gpu": 1,
            "status": "warn",
            "info": "unrecognised DCGM status 'Odd'",
        }
    ]


@pytest.mark.parametrize(
    "text",
    ["", "Error: unable to establish a connection", '{"other": {}}', "{not json"],
)
def test_dcgm_without_a_diagnostic_raises(text: str) -> None:
    with pytest.raises(ValueError, match=r"dcgmi|DCGM"):
        agent.parse_dcgm_diag(text)


def test_all_reduce_perf_counts_wrong_results_and_best_busbw() -> None:
    parsed = agent.parse_all_reduce_perf(
        (CASES / "all_reduce_perf" / "h100_8gpu_wrong_results" / "input.txt").read_text()
    )
    assert parsed == {"busbw_gbps": 372.7325, "max_busbw_gbps": 375.02, "wrong": 3}


def test_all_reduce_perf_without_average_raises() -> None:
    with pytest.raises(ValueError, match="Avg bus bandwidth"):
        agent.parse_all_reduce_perf("# nThread 1 nGpus 8\nNCCL failure common.cu:1012\n")
