"""``provisioner plan`` and ``provisioner apply`` as a user runs them (a new process each):
detailed exit codes, formats, a saved plan refused when the spec or the recorded state moved
on, and planning that never creates a state database. The recorded state is written through
the store's own moves (tests.unit.test_upgrade_workflow.bring_up), as a bring-up records it."""

from __future__ import annotations

import json
from pathlib import Path

from provisioner.spec import load_fleet
from provisioner.state.lifecycle import State
from provisioner.state.store import open_store
from tests.conftest import LAB_SPEC, RunCli
from tests.unit.test_plan import edited
from tests.unit.test_upgrade_workflow import bring_up

BUMP = ("version: 570.133.20", "version: 570.172.08")


def test_plan_exit_codes_and_formats(tmp_path: Path, run_cli: RunCli) -> None:
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    fresh = run_cli("plan", LAB_SPEC, "--state", url, "--detailed-exitcode")
    assert fresh.returncode == 2, fresh.stderr
    assert "4 to enroll, 4 to bring up" in fresh.stdout and not db.exists()
    with open_store(url, None) as store:
        bring_up(store, load_fleet(LAB_SPEC))
    same = run_cli("plan", LAB_SPEC, "--state", url, "--detailed-exitcode")
    assert same.returncode == 0 and "No changes" in same.stdout, same.stdout + same.stderr
    bumped = edited(tmp_path, LAB_SPEC, BUMP).spec_path
    md = run_cli("plan", bumped, "--state", url, "--format", "markdown", "--detailed-exitcode")
    assert md.returncode == 2
    assert "| lab1 | `gpu-lab-[01-04]` | h100-570 | driver 570.133.20 → 570.172.08 |" in md.stdout
    as_json = json.loads(run_cli("plan", bumped, "--state", url, "--format", "json").stdout)
    assert as_json["summary"] == {"upgrade-stack": 4}
    broken = tmp_path / "broken.yaml"
    broken.write_text(LAB_SPEC.read_text().replace("gpus: 8", "gpus: eight"))
    bad = run_cli("plan", broken, "--state", url, "--detailed-exitcode")
    assert bad.returncode == 1 and "profiles.hgx-h100.gpus" in bad.stderr


def test_apply_refuses_a_stale_plan_before_touching_anything(
    tmp_path: Path, run_cli: RunCli
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with open_store(url, None) as store:
        bring_up(store, load_fleet(LAB_SPEC))
    bumped = edited(tmp_path, LAB_SPEC, BUMP).spec_path
    saved = tmp_path / "plan.json"
    made = run_cli("plan", bumped, "--state", url, "--out", saved)
    assert made.returncode == 0 and saved.is_file(), made.stderr
    with open_store(url, None) as store:  # another run moves a node meanwhile
        run = store.start_run("burnin", "lab")
        store.move("gpu-lab-03", State.burning_in, run_id=run)
        store.finish_run(run, "succeeded")
    render = tmp_path / "render"
    refused = run_cli("apply", saved, "--state", url, "--render", render)
    assert refused.returncode == 1
    assert "refusing a stale plan: the recorded state changed" in refused.stderr
    assert not render.exists()  # not even rendered
    with open_store(url, None) as store:
        assert store.node("gpu-lab-01").state is State.ready  # type: ignore[union-attr]
    # The spec moved on too: both are said.
    bumped.write_text(bumped.read_text().replace("max_failures: 1", "max_failures: 2"))
    refused = run_cli("apply", saved, "--state", url, "--render", render)
    assert "the spec changed since it was made" in refused.stderr
    assert "the recorded state changed" in refused.stderr


def test_apply_of_a_spec_that_matches_its_state_has_nothing_to_do(
    tmp_path: Path, run_cli: RunCli
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with open_store(url, None) as store:
        bring_up(store, load_fleet(LAB_SPEC))
    done = run_cli("apply", LAB_SPEC, "--auto-approve", "--state", url)
    assert done.returncode == 0 and "No changes" in done.stdout, done.stderr
    retire = run_cli("apply", tmp_path / "plan.json", "--retire")
    assert retire.returncode == 1 and "--retire belongs to the plan" in retire.stderr
