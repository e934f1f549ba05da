"""A profile's YAML read defensively: a clear error for bad syntax, and bounds before the schema walks it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import EdgekdError

MAX_PROFILE_BYTES, MAX_PROFILE_NODES, MAX_PROFILE_DEPTH = 1 << 20, 20_000, 32  # a real profile: ~6 kB, ~300 nodes, depth 4


def _check_yaml_size(text: str, path: Path) -> None:
    """Refuse a profile that is huge, nested deeper than any schema, or whose anchors expand to
    more values than a profile holds (a "billion laughs" YAML): before pydantic walks it."""
    if len(text) > MAX_PROFILE_BYTES:
        raise EdgekdError(f"profile {path} is {len(text):,} bytes; a profile is a few kB", fix="pass a device profile YAML")
    stack, nodes = [(yaml.compose(text, Loader=yaml.SafeLoader), 0)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_PROFILE_NODES or depth > MAX_PROFILE_DEPTH:
            what = "expands to more than 20,000 values (anchors and aliases?)" if nodes > MAX_PROFILE_NODES else "is nested deeper than 32 levels"
            raise EdgekdError(f"profile {path} {what}", fix="write the profile's values out; its schema is 4 levels deep")
        if isinstance(node, yaml.MappingNode):
            stack += [(n, depth + 1) for kv in node.value for n in kv]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(n, depth + 1) for n in node.value]


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        _check_yaml_size(text, path)
        data = yaml.safe_load(text)
    except RecursionError:
        raise EdgekdError(f"profile {path} is nested too deeply to read", fix="pass a device profile YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise EdgekdError(
            f"profile {path} is not valid YAML{where}: {problem}",
            fix="fix the YAML syntax (indentation, a missing colon or quote)",
        ) from None
    except UnicodeDecodeError:
        raise EdgekdError(f"profile {path} is not a UTF-8 text file", fix="pass a YAML profile") from None
    if not isinstance(data, dict):
        raise EdgekdError(
            f"profile {path} must be a YAML mapping of keys to values, got {type(data).__name__}",
            fix="start from a built-in profile: edgekd profiles show raspberry-pi-5 > my.yaml",
        )
    return data
