"""The ``provisioner`` Typer app and what every command shares: output modes, spec loading,
one-line errors. Commands live beside this module, one module per area."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from provisioner.spec import Fleet, load_fleet

app = typer.Typer(
    name="provisioner",
    help="Turn a declarative GPU fleet spec into running, validated bare-metal nodes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Output(StrEnum):
    text = "text"
    json = "json"


SpecArg = Annotated[Path, typer.Argument(help="fleet spec (YAML)", show_default=False)]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="text or json")]
# The node selection and the SSH side, shared by the commands that take them.
RackOpt = Annotated[list[str] | None, typer.Option("--rack", help="only these racks")]
NodesOpt = Annotated[list[str] | None, typer.Option("--nodes", help="node name glob(s)")]
RenderOpt = Annotated[
    Path | None, typer.Option("--render", help="render folder (default: build/ beside the spec)")
]
KeyOpt = Annotated[
    Path | None,
    typer.Option("--key", help="SSH private key (default: your ssh-agent and SSH config)"),
]


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def load(spec: Path) -> Fleet:
    fleet = load_fleet(spec)
    for warning in fleet.warnings:
        typer.echo(str(warning), err=True)
    return fleet


def count(number: int, word: str) -> str:
    return f"{number} {word}{'' if number == 1 else 's'}"
