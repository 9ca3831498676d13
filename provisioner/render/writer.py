"""Write a rendered tree to a folder: only what changed, atomically, removing what is stale.

The folder keeps a manifest (``.provisioner-render.json``) of the files provisioner wrote, so a
node removed from the spec loses its files on the next render, while files someone else put
there are never touched. A non-empty folder without that manifest is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from provisioner import __version__
from provisioner.errors import ProvisionerError, SecretError
from provisioner.render.tree import RenderedTree
from provisioner.spec import Fleet

MANIFEST = ".provisioner-render.json"
MIN_CALLBACK_KEY = 32  # characters of an install-callback key
KEY_FILE = "callback-key"  # in the site's state folder (state_dir)
_OLD_KEY_FILE = ".callback-key"  # where renders kept the key before: in the render folder
_KEEP = {MANIFEST, _OLD_KEY_FILE}


class RenderTargetError(ProvisionerError):
    """The output folder cannot be used for a render."""


@dataclass
class WriteReport:
    out_dir: Path
    written: list[str] = field(default_factory=list)  # new files
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.written) + len(self.changed) + self.unchanged

    def summary(self) -> str:
        return (
            f"{self.total} files in {self.out_dir}: {len(self.written)} new, "
            f"{len(self.changed)} changed, {self.unchanged} unchanged, "
            f"{len(self.removed)} removed"
        )


def check_target(out_dir: Path) -> None:
    """Refuse a folder that holds files but was not written by provisioner render."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RenderTargetError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and not (out_dir / MANIFEST).exists():
        others = [p.name for p in out_dir.iterdir() if p.name not in _KEEP]
        if others:
            raise RenderTargetError(
                f"{out_dir} is not empty and was not written by provisioner render "
                f"(it holds {', '.join(sorted(others)[:3])}{' ...' if len(others) > 3 else ''}); "
                "choose an empty or new folder"
            )


def write_tree(tree: RenderedTree, out_dir: Path) -> WriteReport:
    check_target(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(out_dir)
    report = WriteReport(out_dir)
    made_dirs: set[str] = set()
    root = str(out_dir)
    for relative in sorted(tree.files):
        data = tree.files[relative].encode("utf-8")
        target = f"{root}/{relative}"
        parent = target.rpartition("/")[0]
        if parent not in made_dirs:
            os.makedirs(parent, exist_ok=True)  # noqa: PTH103 - hot path, plain strings
            made_dirs.add(parent)
        if relative not in previous and _create(target, data):
            report.written.append(relative)
            continue
        try:
            with open(target, "rb") as handle:  # noqa: PTH123 - hot path, plain strings
                current = handle.read()
        except FileNotFoundError:
            _write_atomic(Path(target), data)
            report.written.append(relative)
            continue
        if current == data:
            report.unchanged += 1
        else:
            _write_atomic(Path(target), data)
            report.changed.append(relative)
    for relative in sorted(previous - tree.files.keys()):
        target_path = out_dir / relative
        try:
            target_path.unlink()
        except FileNotFoundError:
            continue
        report.removed.append(relative)
        _prune_empty(target_path.parent, out_dir)
    _write_atomic(
        out_dir / MANIFEST,
        (
            json.dumps({"provisioner": __version__, "files": sorted(tree.files)}, indent=0) + "\n"
        ).encode(),
    )
    return report


def _create(target: str, data: bytes) -> bool:
    """Write a file that must not exist yet; False (nothing written) if it does."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_atomic(target: Path, data: bytes, mode: int = 0o644) -> None:
    temporary = target.with_name(f".{target.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, target)  # noqa: PTH105 - same call as Path.replace


def state_dir(site: str) -> Path:
    """This user's state folder for a site, ``$XDG_STATE_HOME/provisioner/<site>``
    (``~/.local/state/provisioner/<site>`` by default): outside any render folder, which
    people commit."""
    root = Path(os.environ.get("XDG_STATE_HOME", ""))
    if not root.is_absolute():  # unset, or relative: the XDG spec says to ignore it
        root = Path.home() / ".local" / "state"
    return root / "provisioner" / site


def site_key(fleet: Fleet, out_dir: Path, *, create: bool = True) -> bytes:
    """The install-callback key of a site: the spec's ``boot.callback_key`` reference when it
    has one, else the key kept in the site's state folder (made there on first use if
    ``create``). The renderer signs tokens with it and the boot server checks them with it.

    A key an older render left in ``out_dir`` is moved to the state folder by the next render
    (nodes installing meanwhile keep valid tokens), or deleted if the site has a key there
    already; until then a boot server reads it where it is."""
    ref = fleet.document.boot.callback_key
    if ref is not None:
        key = ref.resolve(fleet.base_dir).encode()
        if len(key) < MIN_CALLBACK_KEY:
            raise SecretError(
                f"the callback key from {ref} is {len(key)} characters; use {MIN_CALLBACK_KEY} "
                "or more random ones (e.g. openssl rand -hex 32)"
            )
        return key
    path = state_dir(fleet.document.metadata.site) / KEY_FILE
    old = out_dir / _OLD_KEY_FILE
    if create and old.is_file():
        if not path.is_file():
            _keep_key(path, _read_key(old).decode())
        old.unlink()  # the render that follows signs with the state folder's key
    elif old.is_file() and not path.is_file():
        return _read_key(old)
    if not create and not path.is_file():
        raise RenderTargetError(
            f"no callback key for site {fleet.document.metadata.site} in {path.parent}: render "
            "the spec first (provisioner render) as this user, or set boot.callback_key"
        )
    return callback_key(path)


def callback_key(path: Path) -> bytes:
    """The site key for install-callback tokens kept in ``path`` (mode 0600), made on first
    use. Used when the spec gives no ``boot.callback_key`` reference."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        return _keep_key(path, secrets.token_hex(32))


def _read_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise RenderTargetError(f"cannot read the callback key {path}: {exc}") from exc
    if len(text) < MIN_CALLBACK_KEY:
        raise RenderTargetError(f"the callback key in {path} is too short; delete it to make one")
    return text.encode()


def _keep_key(path: Path, text: str) -> bytes:
    """Store ``text`` as the key at ``path`` unless a key is there already (another process
    made one meanwhile); the key the file holds then. The file appears whole or not at all."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".callback-key-", dir=path.parent)  # mode 0600
    try:
        try:
            _write_all(fd, (text + "\n").encode())
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _read_key(path)
    finally:
        os.unlink(temporary)  # noqa: PTH108 - mkstemp gives a str
    return text.encode()


def _read_manifest(out_dir: Path) -> set[str]:
    try:
        data = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return set()
    files = data.get("files", []) if isinstance(data, dict) else []
    # Only plain relative paths inside the folder: a damaged manifest must not delete elsewhere.
    return {
        f
        for f in files
        if isinstance(f, str) and not f.startswith("/") and ".." not in f.split("/")
    }


def _prune_empty(folder: Path, root: Path) -> None:
    while folder != root and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
