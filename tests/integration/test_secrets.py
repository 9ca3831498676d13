"""Secrets never leave memory: no rendered file, no output line holds a BMC password or the
callback-token key, and the key provisioner makes for itself is kept outside the render folder
(in the site's state folder), readable by its owner only.

Each test sets the variables the spec's references name to fresh random values and then
searches every byte render wrote (hidden files included) and everything the CLI printed.
"""

from __future__ import annotations

import secrets
import shutil
import stat
from pathlib import Path

import pytest

from provisioner.render.writer import site_key
from provisioner.spec import load_fleet
from provisioner.spec.types import SecretRef
from tests.conftest import LAB_SPEC, POD_SPEC, RunCli

CALLBACK_VARIABLE = "PROVISIONER_TEST_CALLBACK_KEY"


def _env_name(ref: SecretRef | None) -> str:
    assert ref is not None and ref.scheme == "env", f"expected an env: reference, got {ref}"
    return ref.target


def _files(root: Path) -> dict[Path, bytes]:
    found = {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}
    assert found, f"render wrote nothing under {root}"
    return found


def _holding(root: Path, needle: str) -> list[str]:
    """The files under ``root`` whose bytes contain ``needle`` (as UTF-8)."""
    data = needle.encode()
    return [str(path.relative_to(root)) for path, body in _files(root).items() if data in body]


@pytest.fixture
def bmc_password() -> str:
    return f"bmc-pw-{secrets.token_hex(16)}"


@pytest.fixture
def callback_key_value() -> str:
    return f"cb-key-{secrets.token_hex(24)}"


def _keyed_copy(example: Path, folder: Path) -> Path:
    """A copy of an example spec (with its vendor manifests) whose boot.callback_key is
    ``env:PROVISIONER_TEST_CALLBACK_KEY``."""
    folder.mkdir(parents=True, exist_ok=True)
    if (example.parent / "vendor").is_dir():
        shutil.copytree(example.parent / "vendor", folder / "vendor")
    text = example.read_text(encoding="utf-8")
    assert "callback_key:" not in text
    text = text.replace("\nboot:\n", f"\nboot:\n  callback_key: env:{CALLBACK_VARIABLE}\n", 1)
    spec = folder / "fleet.yaml"
    spec.write_text(text, encoding="utf-8")
    assert _env_name(load_fleet(spec).document.boot.callback_key) == CALLBACK_VARIABLE
    return spec


@pytest.mark.parametrize("example", [LAB_SPEC, POD_SPEC], ids=["lab", "pod"])
def test_render_writes_and_prints_no_bmc_password(
    run_cli: RunCli, tmp_path: Path, bmc_password: str, example: Path
) -> None:
    variable = _env_name(load_fleet(example).document.bmc.password)
    env = {variable: bmc_password}
    out = tmp_path / "out"
    result = run_cli("render", example, "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    assert _holding(out, bmc_password) == []
    assert bmc_password not in result.stdout + result.stderr
    for args in (["validate", example, "--output", "json"], ["inventory", example, "--list"]):
        shown = run_cli(*args, env=env)
        assert shown.returncode == 0, shown.stderr
        assert bmc_password not in shown.stdout + shown.stderr


@pytest.mark.parametrize("example", [LAB_SPEC, POD_SPEC], ids=["lab", "pod"])
def test_referenced_callback_key_is_written_nowhere(
    run_cli: RunCli,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bmc_password: str,
    callback_key_value: str,
    example: Path,
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))  # run_cli passes os.environ on
    spec = _keyed_copy(example, tmp_path / "spec")
    env = {
        _env_name(load_fleet(spec).document.bmc.password): bmc_password,
        CALLBACK_VARIABLE: callback_key_value,
    }
    out = tmp_path / "out"
    result = run_cli("render", spec, "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    assert _holding(out, callback_key_value) == []
    assert _holding(out, bmc_password) == []
    assert callback_key_value not in result.stdout + result.stderr
    assert not (out / ".callback-key").exists(), "the spec names the key: none is made"
    assert not (state / "provisioner").exists(), "the spec names the key: none is made"
    # The tokens derived from the key are there (the installer needs them).
    assert _holding(out, "X-Provisioner-Token"), "no callback token was rendered"


def test_callback_tokens_come_from_the_referenced_key(
    run_cli: RunCli, tmp_path: Path, callback_key_value: str
) -> None:
    spec = _keyed_copy(LAB_SPEC, tmp_path / "spec")
    user_data = Path("boot/autoinstall/gpu-lab-01/user-data")
    rendered = {}
    for name, key in (("a", callback_key_value), ("b", callback_key_value[::-1])):
        out = tmp_path / name
        result = run_cli("render", spec, "--out", out, env={CALLBACK_VARIABLE: key})
        assert result.returncode == 0, result.stderr
        rendered[name] = (out / user_data).read_text(encoding="utf-8")
    assert "X-Provisioner-Token" in rendered["a"]
    assert rendered["a"] != rendered["b"], "the token does not depend on the key"


def test_unset_callback_key_variable_is_named_and_nothing_is_written(
    run_cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _keyed_copy(LAB_SPEC, tmp_path / "spec")
    monkeypatch.delenv(CALLBACK_VARIABLE, raising=False)  # run_cli passes os.environ on
    out = tmp_path / "out"
    result = run_cli("render", spec, "--out", out)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert CALLBACK_VARIABLE in result.stderr
    assert "not set" in result.stderr
    assert not out.exists()


def _state_key(state: Path, site: str = "lab") -> Path:
    """Where render keeps the key it makes: the site's state folder, under XDG_STATE_HOME."""
    return state / "provisioner" / site / "callback-key"


def test_made_callback_key_is_private_kept_outside_the_render_folder_and_reused(
    run_cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))  # run_cli passes os.environ on
    out = tmp_path / "out"
    result = run_cli("render", LAB_SPEC, "--out", out)
    assert result.returncode == 0, result.stderr
    key_file = _state_key(state)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text(encoding="ascii").strip()
    assert len(key) >= 32
    # A render folder is committed (GitOps): no file in it may hold the key.
    assert _holding(out, key) == []
    assert key not in result.stdout + result.stderr
    assert _holding(out, "X-Provisioner-Token"), "no callback token was rendered"
    # A second render, into another folder too, keeps the key (tokens stay valid).
    for folder in (out, tmp_path / "elsewhere"):
        again = run_cli("render", LAB_SPEC, "--out", folder)
        assert again.returncode == 0, again.stderr
        assert key_file.read_text(encoding="ascii").strip() == key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert _holding(folder, key) == []
    assert sorted(path.name for path in key_file.parent.iterdir()) == ["callback-key"]


def test_key_an_older_render_left_in_its_folder_is_moved_out_and_kept(
    run_cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    out = tmp_path / "out"
    assert run_cli("render", LAB_SPEC, "--out", out).returncode == 0
    old = out / ".callback-key"
    _state_key(state).rename(old)  # where renders before kept it
    key = old.read_text(encoding="ascii").strip()
    # A boot server started before the next render still checks tokens with that key.
    assert site_key(load_fleet(LAB_SPEC), out, create=False) == key.encode()
    result = run_cli("render", LAB_SPEC, "--out", out)
    assert result.returncode == 0, result.stderr
    assert not old.exists()
    assert _state_key(state).read_text(encoding="ascii").strip() == key
    assert stat.S_IMODE(_state_key(state).stat().st_mode) == 0o600
    assert _holding(out, key) == []
    # A second old folder of the site, with a key of its own: the site's key wins, and no
    # key stays in the folder.
    other = tmp_path / "other"
    assert run_cli("render", LAB_SPEC, "--out", other).returncode == 0
    (other / ".callback-key").write_text("f" * 64 + "\n", encoding="ascii")
    assert run_cli("render", LAB_SPEC, "--out", other).returncode == 0
    assert not (other / ".callback-key").exists()
    assert _state_key(state).read_text(encoding="ascii").strip() == key
    assert _holding(other, "f" * 64) == []


def test_literal_secrets_in_a_spec_are_refused_without_being_printed(
    run_cli: RunCli, tmp_path: Path, bmc_password: str
) -> None:
    text = LAB_SPEC.read_text(encoding="utf-8")
    text = text.replace("password: env:PROVISIONER_LAB_BMC_PASSWORD", f"password: {bmc_password}")
    text = text.replace('"ipmi://127.0.0.1:9001"', f'"ipmi://admin:{bmc_password}@127.0.0.1:9001"')
    text = text.replace("  tftp_root:", f"  callback_key: {bmc_password}x\n  tftp_root:")
    assert text.count(bmc_password) == 3
    spec = tmp_path / "fleet.yaml"
    spec.write_text(text, encoding="utf-8")
    for output in ("text", "json"):
        result = run_cli("validate", spec, "--output", output)
        assert result.returncode == 1
        printed = result.stdout + result.stderr
        assert "bmc.password" in printed
        assert "racks[0].nodes[0].bmc" in printed
        assert "boot.callback_key" in printed
        assert bmc_password not in printed
    rendered = run_cli("render", spec, "--out", tmp_path / "out")
    assert rendered.returncode == 1
    assert bmc_password not in rendered.stdout + rendered.stderr


def test_empty_callback_key_is_refused(run_cli: RunCli, tmp_path: Path) -> None:
    spec = _keyed_copy(LAB_SPEC, tmp_path / "spec")
    out = tmp_path / "out"
    result = run_cli("render", spec, "--out", out, env={CALLBACK_VARIABLE: ""})
    assert result.returncode == 1
    assert not out.exists() or not any(out.rglob("user-data"))
