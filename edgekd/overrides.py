"""``--set KEY.PATH=VALUE`` overrides: parsed as YAML values and written into a profile's data before validation."""

from __future__ import annotations

from typing import Any

import yaml

from .errors import EdgekdError


def parse_overrides(assignments: list[str] | None) -> list[tuple[list[str], Any]]:
    """Parse ``key.path=value`` strings; values are read as YAML (``2`` -> int, ``[a, b]`` -> list)."""
    parsed = []
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise EdgekdError(
                f"bad override {item!r}: expected KEY.PATH=VALUE",
                fix="for example --set deployment.threads=2 or --set budgets.max_model_mb=120",
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[tuple[list[str], Any]]) -> dict[str, Any]:
    for path, value in overrides:
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data
