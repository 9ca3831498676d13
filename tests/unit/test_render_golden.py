"""Golden renders: every file provisioner renders for a spec, byte for byte.

Cases live in tests/data/render/<case>/: ``input/fleet.yaml`` (or, for ``lab``, the real
lab spec) and ``expected/``, the whole tree. After an intended template change regenerate
with ``UPDATE_GOLDEN=1`` and review the diff like any other change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from provisioner.render import render_fleet, write_tree
from provisioner.spec import load_fleet
from tests.conftest import DATA, LAB_SPEC

CASES = DATA / "render"
KEY = b"golden-test-callback-key-0123456789"


def _spec(case: Path) -> Path:
    return LAB_SPEC if case.name == "lab" else case / "input" / "fleet.yaml"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("case", sorted(p for p in CASES.iterdir() if p.is_dir()), ids=str)
def test_render_matches_golden_tree(case: Path, tmp_path: Path) -> None:
    rendered = render_fleet(load_fleet(_spec(case)), KEY)
    expected_dir = case / "expected"
    if os.environ.get("UPDATE_GOLDEN"):
        shutil.rmtree(expected_dir, ignore_errors=True)
        for relative, text in rendered.files.items():
            target = expected_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    expected = _tree(expected_dir)
    actual = {path: text.encode() for path, text in rendered.files.items()}
    assert sorted(actual) == sorted(expected), "rendered file set differs from the golden tree"
    for path in expected:
        assert actual[path] == expected[path], f"{case.name}/{path} differs from the golden file"


def test_render_is_deterministic_and_rerender_changes_nothing(tmp_path: Path) -> None:
    fleet = load_fleet(LAB_SPEC)
    first = render_fleet(fleet, KEY).files
    assert render_fleet(load_fleet(LAB_SPEC), KEY).files == first
    report = write_tree(render_fleet(fleet, KEY), tmp_path / "out")
    assert len(report.written) == len(first) and not report.changed
    again = write_tree(render_fleet(fleet, KEY), tmp_path / "out")
    assert (again.written, again.changed, again.removed) == ([], [], [])
    assert again.unchanged == len(first)


def test_parallel_render_equals_serial_render(tmp_path: Path) -> None:
    """Large fleets render per-node files in forked workers; the bytes must not change."""
    from benchmarks.fleetgen import write_fleet

    fleet = load_fleet(write_fleet(tmp_path / "spec", 2500))
    serial = render_fleet(fleet, KEY, workers=1).files
    parallel = render_fleet(fleet, KEY, workers=3).files
    assert len(serial) > 2500 * 2
    assert parallel == serial


def test_callback_tokens_differ_per_node_and_per_key() -> None:
    fleet = load_fleet(LAB_SPEC)
    files = render_fleet(fleet, KEY).files
    other = render_fleet(fleet, KEY + b"x").files
    tokens = {
        path: next(line for line in text.splitlines() if "X-Provisioner-Token" in line)
        for path, text in files.items()
        if path.endswith("user-data")
    }
    assert len(set(tokens.values())) == len(fleet.nodes)
    assert all(other[path] != text for path, text in files.items() if path.endswith("user-data"))
