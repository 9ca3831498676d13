"""Load a fleet spec: YAML with positions -> typed document -> expanded nodes -> checks.

Every problem is reported at once as ``file:line: field.path: message``; when fields fail, the
checks across the document still run on the parts that are valid (see ``partial``). pydantic's
own error locations are mapped back onto the written document: union branch names and
validator tags are dropped, "Value error, " prefixes removed, unknown keys get a "did you
mean".
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from provisioner.errors import Location, Problem, SpecError
from provisioner.gcpause import paused
from provisioner.spec.checks import Checker, did_you_mean
from provisioner.spec.expand import Expander
from provisioner.spec.fleet import Fleet
from provisioner.spec.models import FleetDocument
from provisioner.spec.partial import NO_GAPS, valid_parts
from provisioner.spec.source import PathKey, SourceMap, format_path, load_yaml_file

_PREFIXES = ("Value error, ", "Assertion failed, ")
# Error kinds whose input is safe and useful to repeat (never free text that may be a secret).
_ECHO_INPUT = frozenset(
    {"literal_error", "enum", "ip_v4_address", "ip_v4_network", "int_parsing", "bool_parsing"}
)


def load_fleet(path: str | Path) -> Fleet:
    """Load and check a fleet spec; raise :class:`SpecError` listing every problem."""
    with paused():
        return _load(Path(path))


def _load(spec_path: Path) -> Fleet:
    data, source = load_yaml_file(spec_path)
    if not isinstance(data, dict):
        raise SpecError(
            [
                Problem(
                    Location(source.file, 1),
                    "",
                    "a fleet spec is a YAML mapping (version: 1, metadata:, networks:, ...)",
                )
            ]
        )
    invalid: list[Problem] = []
    gaps = NO_GAPS
    try:
        document = FleetDocument.model_validate(data)
    except ValidationError as exc:
        # Still check across the document, on the parts that are valid on their own.
        invalid = problems_from_validation(exc, data, source)
        document, gaps = valid_parts(data)
    expander = Expander(document, source, spec_path.parent, gaps)
    nodes = expander.expand()
    problems = invalid + expander.problems + Checker(document, source, nodes, gaps).run()
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    if errors:
        raise SpecError(_ordered(errors) + _ordered(warnings))
    return Fleet(document, tuple(nodes), source, spec_path, tuple(_ordered(warnings)))


def _ordered(problems: Sequence[Problem]) -> list[Problem]:
    unique = dict.fromkeys(problems)
    return sorted(unique, key=lambda p: (p.location.file, p.location.line, p.path))


def problems_from_validation(
    exc: ValidationError, data: Any, source: SourceMap, model: type[BaseModel] = FleetDocument
) -> list[Problem]:
    problems: list[Problem] = []
    for error in exc.errors(include_url=False, include_input=True):
        path, extra = _written_path(data, error["loc"])
        shown = path
        if error["type"] == "missing" and extra and isinstance(extra[-1], str):
            shown = (*path, extra[-1])
        message = _message(error, path, model)
        problems.append(Problem(source.locate(path), format_path(shown), message))
    return _ordered(problems)


def _written_path(data: Any, loc: tuple[int | str, ...]) -> tuple[PathKey, list[int | str]]:
    """Split pydantic's location into the part that exists in the data and the rest."""
    path: list[str | int] = []
    extra: list[int | str] = []
    current = data
    for part in loc:
        if isinstance(current, dict) and part in current:
            current = current[part]
            path.append(part)
        elif isinstance(current, dict) and isinstance(part, str) and part.isdigit():
            key = int(part)
            if key in current:
                current = current[key]
                path.append(key)
            else:
                extra.append(part)
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            current = current[part]
            path.append(part)
        else:
            extra.append(part)
    return tuple(path), extra


def _message(error: ErrorDetails, path: PathKey, model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        fields = _fields_at(model, path[:-1])
        hint = did_you_mean(str(path[-1]), fields) if fields else ""
        return f"unknown field{hint}"
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}, not {_describe(error.get('input'))}"
    message = error["msg"]
    for prefix in _PREFIXES:
        if message.startswith(prefix):
            message = message[len(prefix) :]
    message = message.replace("Input should be", "must be").replace("Input is not", "not")
    if kind in _ECHO_INPUT:
        given = error.get("input")
        if isinstance(given, (str, int)) and len(str(given)) <= 40:
            message += f" (got {given!r})"
    return message


# Type errors in YAML's words rather than Python's.
_EXPECTED = {
    "dict_type": "a mapping (name: settings)",
    "model_type": "a mapping of settings",
    "model_attributes_type": "a mapping of settings",
    "list_type": "a list",
    "tuple_type": "a list",
    "string_type": "text",
}


def _describe(value: object) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _fields_at(model: type[BaseModel], path: PathKey) -> list[str]:
    """The field names of the model found at ``path`` of the document, if any."""
    current: Any = model
    for part in path:
        current = _step(current, part)
        if current is None:
            return []
    current = _unwrap_model(current)
    return list(current.model_fields) if current is not None else []


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _step(annotation: Any, part: str | int) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _step(typing.get_args(annotation)[0], part)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _step(arg, part)
            if found is not None:
                return found
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field is not None else None
    args = typing.get_args(annotation)
    if origin in (tuple, list) and isinstance(part, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    return None
