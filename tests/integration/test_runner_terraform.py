"""terraform_apply with the real terraform binary (through python-terraform), offline.

The example pod's own module (inventories/example-h100-pod/terraform: built-in features only)
runs on a copy of the pod's spec in tmp_path, with the local backend and with the pg backend on
the session's real PostgreSQL server. Tests that need terraform skip when none is installed.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from provisioner.errors import TerraformFailed
from provisioner.runner.terraform import BACKEND_OVERRIDE, TFVARS, terraform_apply
from provisioner.spec import Fleet, load_fleet
from tests.conftest import POD_SPEC
from tests.peers.postgres import PostgresServer

needs_terraform = pytest.mark.skipif(
    shutil.which("terraform") is None,
    reason="terraform is not installed (no terraform on PATH); install Terraform >= 1.9",
)

SECTION = "terraform:\n  module: terraform\n"
GENERATED = (".terraform", "terraform.tfstate*", TFVARS, BACKEND_OVERRIDE, "tfplan")


def pod_copy(folder: Path, section: str = SECTION) -> Path:
    """The example pod's spec, vendor CSVs and Terraform module under ``folder``; the spec's
    terraform section replaced by ``section``."""
    source = POD_SPEC.parent
    shutil.copytree(source / "vendor", folder / "vendor")
    ignore = shutil.ignore_patterns(*GENERATED)
    shutil.copytree(source / "terraform", folder / "terraform", ignore=ignore)
    text = POD_SPEC.read_text(encoding="utf-8")
    assert SECTION in text, "the example pod's spec has no terraform section"
    spec = folder / "fleet.yaml"
    spec.write_text(text.replace(SECTION, section), encoding="utf-8")
    return spec


def expected_racks(fleet: Fleet) -> dict[str, dict[str, object]]:
    """Rack -> its sorted node names and GPU count, from the spec itself."""
    names: dict[str, list[str]] = {}
    gpus: dict[str, int] = {}
    for node in fleet.nodes:
        names.setdefault(node.rack, []).append(node.name)
        gpus[node.rack] = gpus.get(node.rack, 0) + fleet.profile(node).gpus
    return {rack: {"nodes": sorted(names[rack]), "gpus": gpus[rack]} for rack in names}


@pytest.fixture
def pod(tmp_path: Path) -> Fleet:
    return load_fleet(pod_copy(tmp_path / "pod"))


@needs_terraform
def test_example_module_applies_the_pod_then_finds_nothing_to_change(
    pod: Fleet, tmp_path: Path
) -> None:
    module = pod.base_dir / "terraform"
    (module / BACKEND_OVERRIDE).write_text('{"terraform": {"backend": {"pg": {}}}}\n')
    racks = expected_racks(pod)
    gpus = sum(pod.profile(node).gpus for node in pod.nodes)
    domain = pod.document.networks.provisioning.domain

    first = terraform_apply(pod, workdir=tmp_path / "work")

    assert first.changed
    assert first.module == module
    assert first.plan_summary == f"{len(racks)} to add, 0 to change, 0 to destroy"
    assert not (module / BACKEND_OVERRIDE).exists(), "a stale pg override survived (local)"
    assert (module / "terraform.tfstate").is_file()
    assert (tmp_path / "work" / "tfplan").is_file()
    assert first.outputs["racks"] == racks
    assert first.outputs["inventory_total_gpus"] == gpus
    assert first.outputs["site"] == pod.document.metadata.site
    nodes = first.outputs["nodes"]
    assert len(nodes) == len(pod.nodes) == 128 and len(racks) == 4
    for node in pod.nodes:
        assert nodes[node.name]["rack"] == node.rack
        assert nodes[node.name]["ip"] == str(node.ip)
        assert nodes[node.name]["dns_name"] == f"{node.name}.{domain}"
        assert nodes[node.name]["gpu_count"] == pod.profile(node).gpus
    tfvars = module / TFVARS
    written = tfvars.stat().st_mtime_ns

    second = terraform_apply(pod, workdir=tmp_path / "work")

    assert not second.changed
    assert second.plan_summary == "0 to add, 0 to change, 0 to destroy"
    assert second.outputs == first.outputs
    assert tfvars.stat().st_mtime_ns == written, "unchanged tfvars were written again"


@needs_terraform
def test_dry_run_plans_but_applies_nothing(pod: Fleet, tmp_path: Path) -> None:
    module = pod.base_dir / "terraform"
    racks = len(pod.document.racks)

    planned = terraform_apply(pod, workdir=tmp_path / "work", dry_run=True)

    assert planned.changed
    assert planned.plan_summary == f"{racks} to add, 0 to change, 0 to destroy"
    assert planned.outputs == {}
    assert not (module / "terraform.tfstate").exists()
    assert (tmp_path / "work" / "tfplan").is_file()
    # Nothing was applied: a real run still has everything to do.
    assert terraform_apply(pod, workdir=tmp_path / "work").changed


BROKEN = {
    "undeclared": ('resource "terraform_data" "x" {\n  input = var.nope\n}\n', "plan"),
    "syntax": ('resource "terraform_data" "x" {\n  input =\n}\n', "init"),
    "validation": (
        'variable "min_racks" {\n'
        "  type    = number\n"
        "  default = 5\n"
        "  validation {\n"
        "    condition     = var.min_racks <= length(distinct([for n in values(var.nodes) :"
        " n.rack]))\n"
        '    error_message = "This pod has fewer racks than min_racks."\n'
        "  }\n"
        "}\n",
        "plan",
    ),
}
BROKEN_MESSAGES = {
    "undeclared": ("broken.tf:2: Error: Reference to undeclared input variable", "nope"),
    "syntax": ("broken.tf:2: Error: Invalid expression", "Expected the start of an expression"),
    "validation": (
        "broken.tf:1: Error: Invalid value for variable",
        "This pod has fewer racks than min_racks.",
    ),
}


@needs_terraform
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_failing_module_raises_naming_command_and_place_and_changes_no_state(
    pod: Fleet, tmp_path: Path, case: str
) -> None:
    module = pod.base_dir / "terraform"
    terraform_apply(pod, workdir=tmp_path / "work")
    state = (module / "terraform.tfstate").read_bytes()
    content, command = BROKEN[case]
    (module / "broken.tf").write_text(content, encoding="utf-8")

    with pytest.raises(TerraformFailed) as failed:
        terraform_apply(pod, workdir=tmp_path / "work")

    message = str(failed.value)
    assert failed.value.command == command
    assert failed.value.exit_code == 1
    assert message.startswith(f"terraform {command} failed in {module} (exit 1): ")
    where, detail = BROKEN_MESSAGES[case]
    assert where in message and detail in message
    assert "\n" not in message and len(message) < 1300  # one paragraph, no quoted tfvars
    assert "bmc_host" not in message
    assert (module / "terraform.tfstate").read_bytes() == state


@pytest.fixture
def pg_secret(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str, str]]:
    """A fresh database's connection string with a password in it (trust authentication
    ignores it) in the environment variable POD_A_TF_PG; yields (url, conn_str, password)."""
    url = postgres.create_database()
    password = f"pw-{secrets.token_hex(12)}"
    conn_str = url.replace("postgres@", f"postgres:{password}@", 1) + "?sslmode=disable"
    assert password in conn_str
    monkeypatch.setenv("POD_A_TF_PG", conn_str)
    yield url, conn_str, password


def file_texts(*folders: Path) -> Iterator[tuple[Path, bytes]]:
    """Every file under ``folders`` and, for zip files (a saved plan), every member."""
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            yield path, path.read_bytes()
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    for member in archive.namelist():
                        yield path / member, archive.read(member)


@needs_terraform
def test_pg_backend_keeps_state_in_postgresql_and_the_secret_nowhere(
    tmp_path: Path,
    postgres: PostgresServer,
    pg_secret: tuple[str, str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url, conn_str, password = pg_secret
    section = (
        "terraform:\n  module: terraform\n  workspace: pod-a\n"
        "  backend: {type: pg, conn_str: env:POD_A_TF_PG}\n"
    )
    fleet = load_fleet(pod_copy(tmp_path / "pod", section))
    module = fleet.base_dir / "terraform"
    work = tmp_path / "work"
    gpus = sum(fleet.profile(node).gpus for node in fleet.nodes)

    first = terraform_apply(fleet, workdir=work)

    assert first.changed and first.outputs["inventory_total_gpus"] == gpus
    assert json.loads((module / BACKEND_OVERRIDE).read_text()) == {
        "terraform": {"backend": {"pg": {}}}
    }
    assert not (module / "terraform.tfstate").exists()
    assert not (module / "terraform.tfstate.d").exists()
    with psycopg.connect(url, connect_timeout=10) as conn:
        rows = conn.execute("SELECT name, data FROM terraform_remote_state.states").fetchall()
    assert [name for name, _ in rows] == ["pod-a"]
    state = json.loads(rows[0][1])
    assert state["outputs"]["inventory_total_gpus"]["value"] == gpus
    assert sorted(r["name"] for r in state["resources"]) == ["rack"]
    assert len(state["resources"][0]["instances"]) == len(fleet.document.racks)

    second = terraform_apply(fleet, workdir=work)
    assert not second.changed, "the state in PostgreSQL was not read back"

    closed = conn_str.replace(f":{postgres.port}/", ":1/")  # nothing listens on port 1
    assert closed != conn_str
    monkeypatch.setenv("POD_A_TF_PG", closed)
    with pytest.raises(TerraformFailed) as failed:
        terraform_apply(fleet, workdir=work)
    assert failed.value.command == "init"
    assert "connection refused" in str(failed.value)

    for text in (str(failed.value), failed.value.stderr, caplog.text):
        assert password not in text
    for path, data in file_texts(module, work):
        assert password.encode() not in data, f"the pg password is in {path}"
        assert b"sslmode=disable" not in data, f"the pg connection string is in {path}"


def test_missing_terraform_is_a_clear_error(
    pod: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder

    with pytest.raises(TerraformFailed, match="terraform is not installed: no terraform on PATH"):
        terraform_apply(pod, workdir=tmp_path / "work")
    missing = str(tmp_path / "nowhere" / "terraform")
    expected = re.escape(f"terraform is not installed: no executable {missing}")
    with pytest.raises(TerraformFailed, match=expected):
        terraform_apply(pod, workdir=tmp_path / "work", binary=missing)
    assert not (pod.base_dir / "terraform" / TFVARS).exists()


@needs_terraform
def test_the_time_limit_stops_terraform(pod: Fleet, tmp_path: Path) -> None:
    with pytest.raises(TerraformFailed, match=r"the 0\.001 s limit") as failed:
        terraform_apply(pod, workdir=tmp_path / "work", timeout=0.001)
    assert failed.value.command == "init"


def test_a_spec_without_terraform_section_is_refused(tmp_path: Path) -> None:
    fleet = load_fleet(pod_copy(tmp_path / "pod", section=""))
    with pytest.raises(ValueError, match="has no terraform: section"):
        terraform_apply(fleet)


def test_apply_runs_the_module_first_and_its_node_outputs_land_in_state(
    pod: Fleet, tmp_path: Path
) -> None:
    """``apply`` with the real terraform stage (the example module through python-terraform);
    the bring-up itself is a fake here (tests/unit/test_apply_workflow.FakeParts, which walks
    the nodes through the store's own moves): its real one needs the pod's hardware."""
    from provisioner.state.store import open_store
    from provisioner.workflows.apply import Apply, current_plan
    from tests.unit.test_apply_workflow import FakeParts

    class Parts(FakeParts):
        def terraform(self) -> dict[str, object]:
            self.calls.append(("terraform", ()))
            return terraform_apply(pod).outputs

    with open_store(f"sqlite:///{tmp_path / 'state.db'}", None) as store:
        parts = Parts(store, pod.document.metadata.site)
        outcome = Apply(pod, current_plan(pod, store), store, parts).run()
        facts = store.facts("terraform")
    assert outcome.ok and [call for call, _ in parts.calls] == ["terraform", "bring_up"]
    assert len(facts) == 128
    node = pod.nodes[0]
    domain = pod.document.networks.provisioning.domain
    assert facts[node.name]["dns_name"] == f"{node.name}.{domain}"
    assert facts[node.name]["rack"] == node.rack
