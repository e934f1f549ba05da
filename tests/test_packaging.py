"""The wheel carries every subpackage: setuptools silently leaves out one pyproject.toml does not list."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgekd").rglob("__init__.py")}
    assert found, "no packages found"
    assert found <= listed, f"missing from pyproject.toml: {sorted(found - listed)}"
    assert "edgekd.builtin_profiles" in listed  # the profiles, mapped from profiles/
