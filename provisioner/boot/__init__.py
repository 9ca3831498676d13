"""Network boot, server side: the HTTP server that hands nodes their rendered iPXE scripts,
installer answers and OS images, and takes the installer's callback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from provisioner.boot.server import BootEvent, BootServer, BootServerError
from provisioner.render.writer import site_key
from provisioner.spec import Fleet

__all__ = ["BootEvent", "BootServer", "BootServerError", "for_fleet"]


def for_fleet(
    fleet: Fleet,
    render_dir: Path,
    *,
    host: str | None = None,
    port: int | None = None,
    images: Path | None = None,
    events: Path | None = None,
    on_event: Callable[[BootEvent], None] | None = None,
) -> BootServer:
    """A boot server for ``fleet``'s rendered files, at the path and port of its ``boot.url``
    unless told otherwise (``host`` defaults to every address). Not started."""
    url = urlsplit(str(fleet.document.boot.url))
    return BootServer(
        render_dir,
        site_key(fleet, render_dir, create=False),
        {node.name: node.mac for node in fleet.nodes},
        base_path=url.path or "/",
        host=host if host is not None else "0.0.0.0",  # noqa: S104 - the provisioning side
        port=port if port is not None else (url.port or 80),
        images=images,
        events=events,
        on_event=on_event,
    )
