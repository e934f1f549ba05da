"""A profile's schema errors in the user's words: one line per problem, with its key path and a fix
(a did-you-mean for an unknown key, the new place of a renamed one)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

# Keys moved by a schema change: (old key path) -> new key path. A profile that still uses one
# gets a message naming the new place instead of "unknown key".
RENAMED_KEYS = {
    ("compression", "distill", "seq_len"): "compression.data.block_len",
    ("compression", "distill", "logit_cache_top_k"): "compression.distill.logit_cache.k",
    ("compression", "distill", "logit_cache_kind"): "compression.distill.logit_cache.kind",
}


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Allowed keys at ``loc`` inside ``model`` (for did-you-mean suggestions)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def describe_validation_errors(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    lines = []
    for err in exc.errors():
        # pydantic puts union member names ('int', "literal['auto']") in loc; drop them
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in {"int", "float", "str"})))
        key = ".".join(str(p) for p in loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden" and loc in RENAMED_KEYS:
            lines.append(f"{key}: renamed to {RENAMED_KEYS[loc]}; move the value there")
        elif kind == "extra_forbidden":
            allowed = _field_names(model, loc[:-1])
            name, _, value = str(loc[-1]).partition(":")
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed keys here: {', '.join(allowed)}"
            if value and name in allowed:  # {corpus:0.5} in YAML is one key, "corpus:0.5", with no value
                hint = f"YAML needs a space after the colon: {name}: {value}"
            lines.append(f"{key}: unknown key; {hint}")
        elif kind == "missing":
            lines.append(f"{key}: required key is missing; add it")
        else:
            got = err.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) and got is not None else ""
            msg = err["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            lines.append(f"{key}: {msg}{got_text}")
    # union types report one error per member; keep each line once
    return list(dict.fromkeys(lines))
