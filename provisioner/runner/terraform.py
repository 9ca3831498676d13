"""Terraform through python-terraform: one call, one result (the only module importing it).

:func:`terraform_apply` runs the spec's Terraform module (``terraform.module``, a folder relative
to the spec file) on the fleet's node facts and returns a frozen :class:`TerraformResult`:

1. ``terraform.tfvars.json`` (:func:`provisioner.render.tree.tfvars`: site, provisioning network,
   node facts; no credentials) is written into the module folder, only when its content changed;
2. ``init -input=false -reconfigure``, then ``workspace select -or-create`` the spec's workspace;
3. ``plan -input=false -detailed-exitcode -out=<workdir>/tfplan`` (exit 0: no changes, 2:
   changes, anything else: :class:`~provisioner.errors.TerraformFailed`);
4. unless ``dry_run``, and only when the plan has changes, ``apply -input=false <tfplan>``;
5. ``output -json``: the outputs in state after the run (after a dry run, those of the last
   apply: nothing was applied).

Where things live:

* ``workdir`` (default ``<module>/.terraform``, terraform's own default) is terraform's data
  folder (``TF_DATA_DIR``: backend settings, selected workspace) and holds the saved plan
  ``tfplan``. With the default, ``terraform output`` run by hand in the module folder sees the
  same initialised working directory.
* The backend is the module's. ``backend.type: local`` runs the module as it is (with no
  backend block: ``terraform.tfstate`` in the module folder, ``terraform.tfstate.d/<ws>/`` for
  other workspaces); a module that declares another backend (s3, ...) keeps it. With
  ``backend.type: pg`` provisioner writes ``provisioner_backend_override.tf.json``
  (``{"terraform": {"backend": {"pg": {}}}}``) beside the module's files, which terraform
  merges over them, so a module with no backend block, a partial ``backend "pg" {}`` or a local
  one keeps its state in PostgreSQL (schema ``terraform_remote_state``, table ``states``, one
  row per workspace); with ``local`` that file is removed again. ``init -reconfigure`` never
  migrates state between backends.
* The secret: ``backend.conn_str`` (``env:NAME`` or ``file:/path``) is resolved in memory here
  and reaches terraform only through its environment as ``PG_CONN_STR`` (which the pg backend
  reads), never on its command line (every user sees those in ``ps``) nor in a file: the backend
  settings terraform records in ``TF_DATA_DIR`` and in the saved plan hold ``conn_str: null``.
  While it is set, ``TF_LOG*`` variables are dropped, and every message and log line is
  scrubbed of it.

Terraform's environment is this process's plus ``CHECKPOINT_DISABLE=1`` (no call home),
``TF_IN_AUTOMATION=1``, ``TF_INPUT=0`` and ``TF_DATA_DIR``, less ``TF_WORKSPACE`` (the spec
names the workspace) and any ``PG_CONN_STR`` of this process's own.

``timeout`` bounds the whole call. On running out, terraform gets SIGINT (it stops cleanly and
releases its state lock) and ``STOP_GRACE`` seconds before it is killed.

python-terraform 0.10.1 builds the command lines: its ``init``, ``plan`` and ``apply`` add
``-no-color -input=false``, ``init`` adds ``-reconfigure -backend=true``, ``plan``
``-detailed-exitcode``. Its ``cmd`` runs them with this process's environment and no time
limit, so :class:`_Terraform` replaces just that step. Its quirks, handled here: an empty
``variables`` dict turns into a temporary ``-var-file`` (refused together with a saved plan), so
every call passes ``var=None``; ``apply`` adds ``-auto-approve=false``, harmless with a saved
plan; ``output()`` swallows errors, so ``output_cmd`` is used; it parses the local state file
after every command, which is switched off.

Needs Terraform >= 1.4 (``workspace select -or-create``); the example module needs >= 1.9.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from python_terraform import IsFlagged, Terraform  # type: ignore[import-untyped]

from provisioner.errors import TerraformFailed
from provisioner.render.tree import tfvars
from provisioner.spec import Fleet

__all__ = ["BACKEND_OVERRIDE", "TFVARS", "TerraformFailed", "TerraformResult", "terraform_apply"]

log = logging.getLogger(__name__)

TFVARS = "terraform.tfvars.json"
BACKEND_OVERRIDE = "provisioner_backend_override.tf.json"
PLAN_FILE = "tfplan"
STOP_GRACE = 30.0  # seconds terraform has to stop cleanly once told to
_TAIL = 4000  # characters of stderr kept on a TerraformFailed
_MESSAGE_LIMIT = 1200


@dataclass(frozen=True)
class TerraformResult:
    """What one :func:`terraform_apply` did."""

    changed: bool  # the plan had changes (applied unless dry_run)
    outputs: dict[str, Any]  # output name -> value, as in state after the run
    module: Path
    plan_summary: str  # "2 to add, 0 to change, 0 to destroy"


def terraform_apply(
    fleet: Fleet,
    *,
    workdir: Path | None = None,
    dry_run: bool = False,
    binary: str | None = None,
    timeout: float = 1800,
) -> TerraformResult:
    """Plan and (unless ``dry_run``) apply the fleet's Terraform module; see the module doc.

    Raises ValueError when the spec has no ``terraform:`` section, :class:`TerraformFailed`
    when terraform is missing, fails or runs past ``timeout`` seconds, and
    :class:`~provisioner.errors.SecretError` when the pg connection string cannot be read.
    """
    spec = fleet.document.terraform
    if spec is None:
        raise ValueError(f"{fleet.spec_path} has no terraform: section")
    module = (fleet.base_dir / spec.module).absolute()
    if not module.is_dir():
        raise TerraformFailed(
            "init",
            f"terraform module folder {module} does not exist "
            f"(terraform.module: {spec.module} in {fleet.spec_path})",
        )
    executable = _find_binary(binary)
    secret: str | None = None
    if spec.backend.type == "pg" and spec.backend.conn_str is not None:
        secret = spec.backend.conn_str.resolve(fleet.base_dir)
    data_dir = (workdir if workdir is not None else module / ".terraform").absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    plan_file = data_dir / PLAN_FILE

    _prepare(fleet, module, data_dir, spec.backend.type)

    tf = _Terraform(module, executable, _environment(data_dir, secret), timeout, secret)
    tf.check("init", tf.init(var=None))
    tf.check(
        "workspace",
        tf.cmd("workspace select", spec.workspace, or_create=True, no_color=IsFlagged),
    )
    code, out, _ = tf.check("plan", tf.plan(out=str(plan_file), var=None), ok=(0, 2))
    changed = code == 2
    summary = _plan_summary(out, changed)
    if changed and not dry_run:
        tf.check("apply", tf.apply(str(plan_file), var=None))
    _, out, _ = tf.check("output", tf.output_cmd(json=IsFlagged, no_color=IsFlagged))
    outputs = _outputs(module, out)
    log.info(
        "terraform %s in %s: %s%s",
        "plan" if dry_run else "apply",
        module,
        summary,
        " (dry run: nothing applied)" if dry_run and changed else "",
    )
    return TerraformResult(changed=changed, outputs=outputs, module=module, plan_summary=summary)


# --------------------------------------------------------------------------- running terraform


class _Terraform(Terraform):  # type: ignore[misc]  # python-terraform is untyped
    """python-terraform's wrapper, its ``cmd`` run with our environment and a deadline."""

    def __init__(
        self,
        module: Path,
        executable: str,
        env: dict[str, str],
        timeout: float,
        secret: str | None,
    ) -> None:
        super().__init__(working_dir=str(module), terraform_bin_path=executable)
        self.module = module
        self.env = env
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.secrets = _secret_fragments(secret)

    def read_state_file(self, file_path: str | None = None) -> None:
        """Not used: outputs come from ``terraform output -json``, whatever the backend."""

    def cmd(self, cmd: str, *args: Any, **kwargs: Any) -> tuple[int, str, str]:
        for option in ("capture_output", "raise_on_error", "synchronous"):
            kwargs.pop(option, None)
        try:
            argv = [str(part) for part in self.generate_cmd_string(cmd, *args, **kwargs)]
        finally:
            self.temp_var_files.clean_up()
        name = cmd.split()[0]
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TerraformFailed(
                name, f"terraform {name} in {self.module}: the {self.timeout:g} s limit is spent"
            )
        log.debug("running %s in %s", " ".join(argv), self.module)
        try:
            proc = subprocess.Popen(
                argv,
                cwd=self.module,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
                errors="replace",
            )
        except OSError as exc:
            raise TerraformFailed(
                name, f"cannot run {argv[0]} {name} in {self.module}: {exc.strerror or exc}"
            ) from exc
        try:
            out, err = proc.communicate(timeout=remaining)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # terraform stops cleanly and unlocks its state
            out, err = _finish(proc)
            raise TerraformFailed(
                name,
                f"terraform {name} in {self.module} ran past the {self.timeout:g} s limit "
                "and was stopped",
                stderr=self.scrub(err)[-_TAIL:],
            ) from None
        except BaseException:
            # Ctrl-C reached terraform too (same process group): let it stop on its own.
            _finish(proc)
            raise
        return proc.returncode, out, err

    def scrub(self, text: str) -> str:
        for fragment in self.secrets:
            text = text.replace(fragment, "***")
        return text

    def check(
        self, command: str, result: tuple[int, str, str], ok: tuple[int, ...] = (0,)
    ) -> tuple[int, str, str]:
        code, out, err = result
        if code in ok:
            return code, out, err
        err = self.scrub(err or "")
        detail = _diagnostics(err) or _last_lines(err) or _last_lines(self.scrub(out or ""))
        raise TerraformFailed(
            command,
            f"terraform {command} failed in {self.module} (exit {code}): "
            f"{detail or 'no error message'}",
            exit_code=code,
            stderr=err[-_TAIL:],
        )


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def _find_binary(binary: str | None) -> str:
    found = shutil.which(binary or "terraform")
    if found is None:
        where = f"no executable {binary}" if binary else "no terraform on PATH"
        raise TerraformFailed(
            "init",
            f"terraform is not installed: {where}; install Terraform >= 1.4 "
            "(https://developer.hashicorp.com/terraform/install) or name the binary",
        )
    return found


def _environment(data_dir: Path, secret: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_WORKSPACE", "PG_CONN_STR")}
    env.update(
        CHECKPOINT_DISABLE="1",
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        TF_DATA_DIR=str(data_dir),
    )
    if secret is not None:
        env = {k: v for k, v in env.items() if not k.startswith("TF_LOG")}
        env["PG_CONN_STR"] = secret
    return env


def _secret_fragments(secret: str | None) -> tuple[str, ...]:
    """The connection string and the password inside it (URL or ``password=`` form)."""
    if not secret:
        return ()
    parts = {secret}
    try:
        password = urlsplit(secret).password
    except ValueError:
        password = None
    if password:
        parts.update({password, unquote(password)})
    keyword = re.search(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", secret)
    if keyword:
        parts.add(keyword.group(1).strip("'"))
    return tuple(sorted((p for p in parts if len(p) >= 4), key=len, reverse=True))


# --------------------------------------------------------------------------- files


def _prepare(fleet: Fleet, module: Path, data_dir: Path, backend: str) -> None:
    """The node facts and the backend override in the module folder; no workspace selected."""
    _write_if_changed(module / TFVARS, json.dumps(tfvars(fleet), indent=2, sort_keys=True) + "\n")
    override = module / BACKEND_OVERRIDE
    if backend == "pg":
        _write_if_changed(override, json.dumps({"terraform": {"backend": {"pg": {}}}}) + "\n")
    else:
        override.unlink(missing_ok=True)
    # The workspace a previous run selected may not exist in this backend: init in "default".
    (data_dir / "environment").unlink(missing_ok=True)


def _write_if_changed(path: Path, text: str) -> bool:
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    path.write_text(text, encoding="utf-8")
    return True


# --------------------------------------------------------------------------- terraform's output

_PLAN_LINE = re.compile(r"^Plan: (.+?)\.\s*$", re.M)
_WHERE = re.compile(r"^\s*on (.+?) line (\d+)")
_INIT_PREAMBLE = "Terraform encountered problems during initialisation"
_SNIPPET = re.compile(r"^\s*(\d+:|[├│╷╵])")  # quoted source lines and value annotations


def _outputs(module: Path, stdout: str) -> dict[str, Any]:
    try:
        return {name: item["value"] for name, item in json.loads(stdout or "{}").items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TerraformFailed(
            "output", f"terraform output -json in {module} printed no outputs object: {exc!r}"
        ) from exc


def _plan_summary(stdout: str, changed: bool) -> str:
    found = _PLAN_LINE.search(stdout or "")
    if found:
        return found.group(1)
    return "0 to add, 0 to change, 0 to destroy" + (" (outputs change)" if changed else "")


@dataclass
class _Diagnostic:
    summary: str
    where: str = ""
    detail: str = ""


def _diagnostics(stderr: str) -> str:
    """Terraform's errors in one paragraph: ``FILE:LINE: Error: SUMMARY. DETAIL``; quoted
    source (which for a variable can be the whole tfvars file) and warnings are left out."""
    errors: list[_Diagnostic] = []
    current: _Diagnostic | None = None
    in_summary = False
    for raw in stderr.splitlines():
        if raw.startswith(("╷", "╵")):
            continue
        line = raw[1:] if raw.startswith("│") else raw  # boxed diagnostics
        heading = re.match(r"\s*(Error|Warning): (.*)", line)
        if heading:
            current = _Diagnostic(heading.group(2).strip()) if heading.group(1) == "Error" else None
            if current is not None:
                errors.append(current)
            in_summary = True
            continue
        if current is None:
            continue
        if not line.strip():
            in_summary = False
            continue
        where = _WHERE.match(line)
        if in_summary:  # a summary too long for one line
            current.summary = f"{current.summary} {line.strip()}"
        elif where and not current.where and not current.detail:
            current.where = f"{where.group(1)}:{where.group(2)}"
        elif not _SNIPPET.match(line):
            current.detail = f"{current.detail} {line.strip()}".strip()
    if len(errors) > 1:  # init's preamble to the configuration's own errors
        errors = [e for e in errors if not e.summary.startswith(_INIT_PREAMBLE)] or errors
    errors.sort(key=lambda e: not e.where)  # errors that point somewhere first
    parts = []
    for error in errors[:3]:
        text = f"{error.where}: " if error.where else ""
        text += f"Error: {error.summary.rstrip('.')}."
        if error.detail:
            text += f" {error.detail}"
        parts.append(text if text.endswith((".", "?", "!")) else text + ".")
    return _shorten(" ".join(parts))


def _last_lines(text: str, count: int = 3) -> str:
    lines = [ln.strip(" │╷╵") for ln in text.splitlines()]
    return _shorten(" ".join([ln for ln in lines if ln][-count:]))


def _shorten(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."
