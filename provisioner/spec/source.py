"""YAML loading that keeps, for every value, the file:line it came from.

The document is composed into YAML nodes (libyaml when present), then turned into plain Python
values while a :class:`SourceMap` records the position of every mapping key and sequence item by
its path (``("racks", 1, "nodes", 3, "bmc")``). Validation errors are mapped back through it.

Two deliberate departures from plain ``yaml.safe_load``:

* a duplicate key in one mapping is an error (PyYAML silently keeps the last one);
* a plain scalar that YAML would read as a float stays the text written, so ``cuda: 12.10``
  is the version "12.10", not the float 12.1; pydantic still turns such text into a float
  where a field wants a number.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from provisioner.errors import Location, Problem, SpecError

PathKey = tuple[str | int, ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_NODES = 2_000_000  # bounds alias expansion ("billion laughs") and absurd documents
_FLOAT_TAG = "tag:yaml.org,2002:float"


class SourceMap:
    """Maps a value's path in a document to where it was written."""

    __slots__ = ("_where", "file")

    def __init__(self, file: str) -> None:
        self.file = file
        self._where: dict[PathKey, Location] = {}

    def add(self, path: PathKey, location: Location) -> None:
        self._where.setdefault(path, location)

    def exact(self, path: PathKey) -> Location | None:
        return self._where.get(path)

    def locate(self, path: PathKey) -> Location:
        """The location of ``path``, or of its nearest ancestor that has one."""
        for end in range(len(path), -1, -1):
            found = self._where.get(path[:end])
            if found is not None:
                return found
        return Location(self.file)

    def __len__(self) -> int:
        return len(self._where)


def format_path(path: PathKey) -> str:
    """``("racks", 1, "nodes", 3, "bmc")`` -> ``racks[1].nodes[3].bmc``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            out.append(("." if out else "") + str(part))
    return "".join(out)


def display_name(path: Path, base: Path | None = None) -> str:
    """A path as a user should read it in a message: relative to ``base`` when inside it."""
    base = base or Path.cwd()
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def load_yaml_file(path: Path) -> tuple[Any, SourceMap]:
    """Read a YAML file; raise SpecError (with file:line) for anything unreadable."""
    name = display_name(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem(Location(name), "", "no such file")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(Location(name), "", "is a directory, not a spec file")]) from None
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(Location(name), "", f"not UTF-8 text ({exc.reason})")]) from exc
    except OSError as exc:
        raise SpecError([Problem(Location(name), "", exc.strerror or str(exc))]) from exc
    return load_yaml_text(text, name)


def load_yaml_text(text: str, name: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document from ``text``; ``name`` is the file name used in messages."""
    source = SourceMap(name)
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        column = mark.column + 1 if mark is not None else 0
        message = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise SpecError([Problem(Location(name, line, column), "", f"YAML: {message}")]) from exc
    except yaml.YAMLError as exc:
        raise SpecError([Problem(Location(name), "", f"YAML: {exc}")]) from exc
    except (ValueError, RecursionError) as exc:  # e.g. NUL bytes, absurd nesting
        raise SpecError([Problem(Location(name), "", f"YAML: {exc}")]) from exc
    if root is None:
        return None, source
    builder = _Builder(source)
    try:
        value = builder.build(root, ())
    except RecursionError as exc:
        raise SpecError([Problem(Location(name), "", "YAML: nested too deeply")]) from exc
    if builder.problems:
        raise SpecError(builder.problems)
    return value, source


class _Builder:
    """Turns composed YAML nodes into Python values, recording positions."""

    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self._count = 0
        self._constructor = yaml.SafeLoader("")

    def _where(self, node: yaml.Node) -> Location:
        mark = node.start_mark
        return Location(self.source.file, mark.line + 1, mark.column + 1)

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise SpecError(
                [Problem(self._where(node), "", "YAML: document too large (alias expansion?)")]
            )
        self.source.add(path, self._where(node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        if node.tag == _FLOAT_TAG and not getattr(
            node, "style", None
        ):  # plain (libyaml says "", PyYAML None)
            text = str(node.value)
            if text.lower().lstrip("+-") not in {".inf", ".nan"}:
                return text
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problems.append(Problem(self._where(node), "", f"YAML: {exc}"))
            return None

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[Any, Any]:
        try:
            self._constructor.flatten_mapping(node)  # resolves "<<" merge keys
        except yaml.YAMLError as exc:
            self.problems.append(Problem(self._where(node), "", f"YAML: {exc}"))
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if key is None or isinstance(key, (list, dict)):
                self.problems.append(
                    Problem(self._where(key_node), "", "YAML: mapping keys must be plain text")
                )
                continue
            if not isinstance(key, (str, int)):
                key = str(key)
            if key in out:
                first = self.source.exact((*path, key))
                also = f" (first at line {first.line})" if first else ""
                self.problems.append(
                    Problem(
                        self._where(key_node),
                        format_path((*path, key)),
                        f"duplicate key{also}",
                    )
                )
                continue
            self.source.add((*path, key), self._where(key_node))
            out[key] = self.build(value_node, (*path, key))
        return out


def walk_paths(value: Any, path: PathKey = ()) -> Iterator[PathKey]:
    """Every path in a plain data tree (used by tests and error mapping)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from walk_paths(item, (*path, i))
