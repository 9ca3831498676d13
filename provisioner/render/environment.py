"""The jinja2 environment render/ uses: built-in templates, optionally overlaid by a site's.

Templates emit structured formats (YAML, JSON) by passing every value through ``to_json``:
JSON scalars are valid YAML, so quoting is always right, whatever a name or URL contains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2

from provisioner.resources import templates_dir

_encode_str = json.encoder.encode_basestring


def to_json(value: Any, indent: int | None = None) -> str:
    """Deterministic JSON (sorted keys) for templates; also a safe YAML scalar."""
    # Fast paths: templates call this hundreds of thousands of times for a large fleet.
    if value.__class__ is str:
        return _encode_str(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if value.__class__ is int:
        return str(value)
    return json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=False, default=str)


def make_environment(overlay: Path | None = None) -> jinja2.Environment:
    search = [str(overlay)] if overlay is not None else []
    search.append(str(templates_dir()))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - renders configs and scripts, never HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["to_json"] = to_json
    # No Jinja globals (range, dict, lipsum ...): templates get what render passes them, and
    # each of the tens of thousands of per-node renders skips copying the globals.
    env.globals.clear()
    return env
