"""Small helpers for reading input from a peer: strict JSON, exact type checks, safe echoes.

Shared by the handoff codec and the wire protocol, which each wrap a failure in their own
error type (``HandoffMalformed`` / ``ProtocolError``).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of duplicate keys, other parsers (safetensors' Rust one) the first:
    # reject the ambiguity rather than read something the other side did not.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(f"duplicate key {show(key, 40)}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"non-standard JSON constant {name}")


def loads_strict(text: str) -> Any:
    """Standard JSON only: no NaN/Infinity, no duplicate keys. Raises ValueError on any failure."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:  # deep nesting
        raise ValueError("JSON nested too deeply") from None


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON ``true`` must never pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def type_name(value: object) -> str:
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def show(value: object, limit: int = 80) -> str:
    """A short ASCII repr, safe to put in an error message that echoes peer input."""
    try:
        text = ascii(value)
    except ValueError:  # an int with more digits than str() allows
        text = f"<{type_name(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
