"""The ``provisioner`` command line: parse, call the layer below, print. Nothing else.

Errors raised on purpose (:class:`ProvisionerError`) become one-line messages on stderr and
exit code 1; no traceback reaches the user. ``--output json`` prints machine-readable results.
"""

from __future__ import annotations

import sys

import typer

from provisioner.cli import (  # noqa: F401 - registers commands
    bmc,
    boot,
    bringup,
    burnin,
    configure,
    demo,
    lab,
    plan,
    spec,
    state,
)
from provisioner.cli.app import app
from provisioner.errors import ProvisionerError, SecretError, SpecError

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except SpecError as exc:
        for problem in exc.problems:
            typer.echo(str(problem), err=True)
        sys.exit(1)
    except SecretError as exc:
        typer.echo(f"error: secret: {exc}", err=True)
        sys.exit(1)
    except ProvisionerError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
