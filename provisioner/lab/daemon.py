"""The lab daemon: runs one site's :class:`LabRack` until SIGTERM.

Started by ``provisioner lab up`` in its own session; prints ``ready`` on stdout once every
server listens and every node is wired (all nodes off), or ``error: ...`` on stderr and
exits 1. On SIGTERM it powers every node off and stops its servers; ``lab down`` then removes
what is left on the host.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from provisioner.errors import ProvisionerError, SpecError
from provisioner.lab.rack import LabRack
from provisioner.spec import load_fleet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m provisioner.lab.daemon")
    parser.add_argument("spec", type=Path)
    parser.add_argument("--dir", type=Path, required=True, help="the site's lab folder")
    parser.add_argument("--base", type=Path, required=True, help="base root filesystem")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        rack = LabRack(load_fleet(args.spec), args.dir, args.base)
        try:
            rack.start()
        except BaseException:
            rack.stop()
            raise
    except SpecError as exc:
        print("\n".join(str(p) for p in exc.problems), file=sys.stderr, flush=True)
        return 1
    except ProvisionerError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print("ready", flush=True)
    stop.wait()
    rack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
