"""YAML loading that keeps, for every value, the file:line it came from.

The document is composed into YAML nodes (libyaml when present), then turned into plain Python
values while a :class:`SourceMap` records the position of every mapping key and sequence item by
its path (``("racks", 1, "nodes", 3, "bmc")``). Validation errors are mapped back through it.

Two deliberate departures from plain ``yaml.safe_load``:

* a duplicate key in one mapping is an error (PyYAML silently keeps the last one);
* a plain scalar that YAML would read as a float or a date stays the text written, so
  ``cuda: 12.10`` is the version "12.10", not the float 12.1; pydantic still turns such text
  into a number where a field wants one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from provisioner.errors import Location, Problem, SpecError

PathKey = tuple[str | int, ...]
Pair = tuple[yaml.Node, yaml.Node]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_NODES = 2_000_000  # bounds absurd documents
_MAX_ALIASED = 100_000  # values built again through aliases ("billion laughs")
_MAX_DEPTH = 500  # libyaml's composer recurses in C and can overflow the stack past ~30,000
_TEXT_TAGS = frozenset({"tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp"})
_MERGE_TAG = "tag:yaml.org,2002:merge"


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
    return load_yaml_text(read_text(path, name), name)


def read_text(path: Path, name: str) -> str:
    """A file's UTF-8 text; SpecError naming the file (and the line of a bad byte)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([Problem(Location(name), "", "no such file")]) from None
    except IsADirectoryError:
        raise SpecError([Problem(Location(name), "", "is a directory, not a file")]) from None
    except OSError as exc:
        raise SpecError([Problem(Location(name), "", exc.strerror or str(exc))]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SpecError(
            [Problem(Location(name, line), "", f"not UTF-8 text ({exc.reason})")]
        ) from None


def yaml_problem(exc: yaml.YAMLError, name: str, text: str = "") -> Problem:
    """One line for a PyYAML error: where the parser gave up, and where the construct it was
    reading began when that was elsewhere."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text[: exc.position].count("\n") + 1 if text else 0
        message = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
        if isinstance(exc.character, bytes):
            message = f"unacceptable byte #x{exc.character[0]:02x}: {exc.reason}"
        return Problem(Location(name, line), "", f"YAML: {message}")
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        column = mark.column + 1 if mark is not None else 0
        parts = []
        if exc.context:
            parts.append(str(exc.context))
            start = exc.context_mark
            if start is not None and mark is not None and start.line != mark.line:
                parts.append(f"(from line {start.line + 1})")
        if exc.problem:
            parts.append(str(exc.problem))
        return Problem(Location(name, line, column), "", "YAML: " + " ".join(parts))
    return Problem(Location(name), "", f"YAML: {str(exc).splitlines()[0]}")


def load_yaml_text(text: str, name: str) -> tuple[Any, SourceMap]:
    """Parse one YAML document from ``text``; ``name`` is the file name used in messages."""
    source = SourceMap(name)
    deep = _too_deep(text)
    if deep:
        raise SpecError([Problem(Location(name, deep), "", "YAML: nested too deeply")])
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SpecError([yaml_problem(exc, name, text)]) from None
    except RecursionError:
        raise SpecError([Problem(Location(name), "", "YAML: nested too deeply")]) from None
    if root is None:
        return None, source
    builder = _Builder(source)
    try:
        value = builder.build(root, ())
    except RecursionError:
        raise SpecError([_alias_too_deep(text, name)]) from None
    if builder.problems:
        raise SpecError(builder.problems)
    return value, source


def _too_deep(text: str) -> int:
    """The line where flow nesting or indentation goes past what any spec needs (0 if none).
    A cheap over-estimate (quotes are not skipped): it only has to stop what would crash
    libyaml, and no real spec comes near."""
    if text.count("[") + text.count("{") > _MAX_DEPTH:
        depth = 0
        line = 1
        for char in text:
            if char in "[{":
                depth += 1
                if depth > _MAX_DEPTH:
                    return line
            elif char in "]}":
                depth = max(0, depth - 1)
            elif char == "\n":
                line += 1
    for number, row in enumerate(text.splitlines(), 1):
        if len(row) - len(row.lstrip(" -")) > 4 * _MAX_DEPTH:
            return number
    return 0


def _alias_too_deep(text: str, name: str) -> Problem:
    """Why building a document that composed fine went too deep, at the alias to blame: an
    alias inside the collection it refers to (a value that contains itself), else the alias
    whose expansion nests deepest (aliases of aliases). Anchors are unique (YAML refuses a
    duplicate), so an alias names one collection."""
    frames: list[tuple[str | None, list[int]]] = []  # open collections: anchor, [depth below]
    depth: dict[str, int] = {}  # anchor -> nesting of its value, aliases expanded
    deepest: tuple[int, yaml.AliasEvent | None] = (0, None)
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            frames.append((event.anchor, [0]))
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, (below,) = frames.pop()
            if anchor is not None:
                depth[anchor] = below + 1
            if frames:
                frames[-1][1][0] = max(frames[-1][1][0], below + 1)
        elif isinstance(event, yaml.AliasEvent):
            alias = str(event.anchor)
            if any(anchor == alias for anchor, _ in frames):
                return Problem(
                    _event_at(event, name),
                    "",
                    f"YAML: alias *{alias} is inside the collection it refers to "
                    "(a value that contains itself)",
                )
            below = depth.get(alias, 0)
            if frames:
                frames[-1][1][0] = max(frames[-1][1][0], below)
            if len(frames) + below > deepest[0]:
                deepest = (len(frames) + below, event)
    levels, found = deepest
    if found is None:
        return Problem(Location(name), "", "YAML: nested too deeply")
    return Problem(
        _event_at(found, name),
        "",
        f"YAML: aliases nest too deeply here (*{found.anchor} expands to a value {levels} "
        "levels deep)",
    )


def _event_at(event: yaml.Event, name: str) -> Location:
    mark = event.start_mark
    return Location(name, mark.line + 1, mark.column + 1) if mark is not None else Location(name)


class _Builder:
    """Turns composed YAML nodes into Python values, recording positions."""

    def __init__(self, source: SourceMap) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self._count = 0
        self._constructor = yaml.SafeLoader("")
        self._split_cache: dict[int, tuple[list[Pair], list[Pair]]] = {}
        self._visited: set[int] = set()
        self._alias_depth = 0
        self._aliased = 0

    def _where(self, node: yaml.Node) -> Location:
        mark = node.start_mark
        return Location(self.source.file, mark.line + 1, mark.column + 1)

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise SpecError([Problem(self._where(node), "", "YAML: document too large")])
        if isinstance(node, yaml.CollectionNode):
            if id(node) in self._visited:  # an alias: its whole subtree is built again
                self._alias_depth += 1
                try:
                    return self._build(node, path)
                finally:
                    self._alias_depth -= 1
            self._visited.add(id(node))
        return self._build(node, path)

    def _build(self, node: yaml.Node, path: PathKey) -> Any:
        if self._alias_depth:
            self._aliased += 1
            if self._aliased > _MAX_ALIASED:
                raise SpecError(
                    [Problem(self._where(node), "", "YAML: aliases expand too far (alias bomb?)")]
                )
        self.source.add(path, self._where(node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node: yaml.Node) -> Any:
        # Plain scalars that YAML would turn into floats or dates stay the text written:
        # "cuda: 12.10" is a version, "description: 2024-01-05" is text. pydantic still
        # converts such text where a field wants a number. (No style: libyaml says "".)
        if node.tag in _TEXT_TAGS and not getattr(node, "style", None):
            text = str(node.value)
            if text.lower().lstrip("+-") not in {".inf", ".nan"}:
                return text
        try:
            return self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.problems.append(yaml_problem(exc, self.source.file))
        except (ValueError, TypeError, OverflowError, KeyError, AttributeError, IndexError):
            # PyYAML's constructors fail in many ways on explicitly tagged junk
            # ("!!bool maybe", "!!int" with no digits).
            self.problems.append(
                Problem(
                    self._where(node),
                    "",
                    f"YAML: {str(node.value)[:40]!r} is not a valid {node.tag.rsplit(':', 1)[-1]}",
                )
            )
        return None

    def _split(self, node: yaml.MappingNode) -> tuple[list[Pair], list[Pair]] | None:
        """(pairs written in the mapping, pairs merged into it by "<<"), once per node:
        flattening rewrites the node, and an alias visits the same node again."""
        if id(node) in self._split_cache:
            return self._split_cache[id(node)]
        written = [pair for pair in node.value if pair[0].tag != _MERGE_TAG]
        merged: list[Pair] = []
        if len(written) != len(node.value):
            try:
                self._constructor.flatten_mapping(node)
            except yaml.YAMLError as exc:
                self.problems.append(yaml_problem(exc, self.source.file))
                return None
            ids = {id(pair[0]) for pair in written}
            merged = [pair for pair in node.value if id(pair[0]) not in ids]
        self._split_cache[id(node)] = (written, merged)
        return written, merged

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[Any, Any]:
        split = self._split(node)
        if split is None:
            return {}
        written, merged = split
        out: dict[Any, Any] = {}
        for key_node, value_node in written:
            key = self._key(key_node)
            if key is None:
                continue
            if key in out:
                first = self.source.exact((*path, key))
                also = f" (first at line {first.line})" if first else ""
                self.problems.append(
                    Problem(
                        self._where(key_node), format_path((*path, key)), f"duplicate key{also}"
                    )
                )
                continue
            self.source.add((*path, key), self._where(key_node))
            out[key] = self.build(value_node, (*path, key))
        # Merged keys ("<<: *defaults") fill in what the mapping does not set itself.
        for key_node, value_node in merged:
            key = self._key(key_node)
            if key is None or key in out:
                continue
            self.source.add((*path, key), self._where(key_node))
            out[key] = self.build(value_node, (*path, key))
        return out

    def _key(self, node: yaml.Node) -> str | int | None:
        key = self._scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if key is None or isinstance(key, (list, dict)):
            self.problems.append(
                Problem(self._where(node), "", "YAML: mapping keys must be plain text")
            )
            return None
        return key if isinstance(key, (str, int)) else str(key)
