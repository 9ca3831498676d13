"""``provisioner boot serve``: run the boot server for a rendered spec until interrupted."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from provisioner import boot
from provisioner.cli.app import Output, OutputOpt, SpecArg, app, fail, load

boot_app = typer.Typer(help="The network-boot HTTP server.", no_args_is_help=True)
app.add_typer(boot_app, name="boot")


def _listen(text: str | None) -> tuple[str | None, int | None]:
    if text is None:
        return None, None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--listen {text!r}: give HOST:PORT, e.g. 0.0.0.0:8080")
    return host or None, int(port)


@boot_app.command("serve")
def serve(
    spec: SpecArg,
    render_dir: Annotated[Path, typer.Option("--render", help="folder render wrote")],
    images: Annotated[
        Path | None, typer.Option("--images", help="folder served under images/")
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="HOST:PORT (default: every address, boot.url's port)"),
    ] = None,
    events: Annotated[
        Path | None, typer.Option("--events", help="append every request as a JSON line here")
    ] = None,
    output: OutputOpt = Output.text,
) -> None:
    """Serve iPXE scripts, installer answers and images; take install callbacks."""
    fleet = load(spec)
    logging.getLogger("provisioner.boot").addHandler(logging.NullHandler())  # shown below
    host, port = _listen(listen)
    if images is not None and not images.is_dir():
        fail(f"--images {images}: no such folder")

    def show(event: boot.BootEvent) -> None:
        if output is Output.json:
            typer.echo(json.dumps(event.as_dict(), sort_keys=True))
        elif event.kind == "callback":
            verdict = "accepted" if event.accepted else f"refused ({event.reason})"
            typer.echo(f"callback {event.node} from {event.client}: {verdict}")

    server = boot.for_fleet(
        fleet, render_dir, host=host, port=port, images=images, events=events, on_event=show
    )
    stop = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    with server:
        typer.echo(f"ready {server.url}", err=output is Output.json)
        stop.wait()
    typer.echo("stopped", err=True)
