"""Every problem the spec loader reports, proven from data files: text, file:line and field.

``tests/data/spec_errors/<case>/`` holds ``fleet.yaml`` (a spec with exactly the defect the case
is named after), any CSV manifest it reads, and ``expected.txt``: the problems the loader must
report, one ``str(problem)`` per line, in the order reported. Optional files:

* ``absent.txt``: text (a password, private key material) that no message may contain;
* ``xfail.txt``: why the loader does not give ``expected.txt`` yet. The case is then a strict
  xfail: ``expected.txt`` says what the loader *should* report, and fixing the loader turns the
  case into an XPASS failure that asks for ``xfail.txt`` to be deleted.

``tests/data/spec_warnings/<case>/`` holds specs that load; ``expected.txt`` lists the warnings.

Messages name files relative to the current directory, so each case runs inside its folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.errors import SpecError
from provisioner.spec import load_fleet
from tests.conftest import DATA


def _cases(root: Path) -> list[object]:
    params: list[object] = []
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        reason = folder / "xfail.txt"
        marks = (
            [pytest.mark.xfail(strict=True, reason=reason.read_text(encoding="utf-8").strip())]
            if reason.exists()
            else []
        )
        params.append(pytest.param(folder, id=folder.name, marks=marks))
    return params


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("case", _cases(DATA / "spec_errors"))
def test_invalid_spec_reports_each_problem_at_its_line(
    case: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _lines(case / "expected.txt")
    assert expected, f"{case.name}: expected.txt is missing or empty"
    monkeypatch.chdir(case)

    with pytest.raises(SpecError) as caught:
        load_fleet("fleet.yaml")

    reported = [str(problem) for problem in caught.value.problems]
    shown = "\n".join([str(caught.value), *reported])
    for secret in _lines(case / "absent.txt"):
        assert secret not in shown, f"a message repeats {secret!r}"
    assert reported == expected


@pytest.mark.parametrize("case", _cases(DATA / "spec_warnings"))
def test_valid_spec_loads_with_expected_warnings(
    case: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (case / "expected.txt").exists(), f"{case.name}: expected.txt is missing"
    monkeypatch.chdir(case)

    fleet = load_fleet("fleet.yaml")

    assert [str(warning) for warning in fleet.warnings] == _lines(case / "expected.txt")
    assert all(warning.severity == "warning" for warning in fleet.warnings)
