"""Saving and loading the scheduler's learned state: versioned JSON, written atomically.

The file is one JSON object::

    {"format": "rise-bandit-state", "version": 1,
     "policy": {"kind": "linucb", ...the policy's state_dict()...},
     "arms": ["N10k0", "N10k5", ...],          # arm labels, in index order
     "features": ["w", "w*c", ...],            # context feature names, in order
     "meta": {...}}                            # free-form (counts, saved_at...)

:func:`save_state` writes with :func:`shared.validation.write_json_atomic` (here also
:func:`atomic_write_text`): a temporary file in the same folder, flushed and fsynced,
``os.replace`` d over the target (atomic on POSIX), then the folder fsynced, so a reader or a
process killed at any instant (``kill -9``) sees either the old complete file or the new one,
never a mix. One writer per state file (it removes its own stale temporaries).

:func:`load_state` checks the format, the version, the policy kind, the arm labels and the
feature names against the running configuration, and the array shapes (inside the
policy's ``load_state_dict``); any mismatch raises :class:`StateError` saying what differs.
Arrays are stored as nested lists: at 40 arms x 12 features the file is ~200 KB.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.validation import load_versioned_json, read_list, read_mapping, write_json_atomic
from shared.validation import write_text_atomic as atomic_write_text

from .errors import StateError
from .policies import Policy

__all__ = ["STATE_FORMAT", "STATE_VERSION", "atomic_write_text", "load_state", "read_state", "save_state",
           "state_document"]

STATE_FORMAT = "rise-bandit-state"
STATE_VERSION = 1


def state_document(policy: Policy, arms: Sequence[str], features: Sequence[str],
                   meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object :func:`save_state` writes."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "policy": policy.state_dict(),
        "arms": list(arms),
        "features": list(features),
        "meta": {"saved_at": time.time(), **(meta or {})},
    }


def save_state(path: str | Path, policy: Policy, arms: Sequence[str], features: Sequence[str],
               meta: dict[str, Any] | None = None) -> None:
    """Write ``policy`` 's state (with the arm labels and feature names it belongs to) atomically."""
    write_json_atomic(path, state_document(policy, arms, features, meta))


def read_state(path: str | Path) -> dict[str, Any]:
    """The parsed and format/version-checked state document of ``path``."""
    doc = load_versioned_json(path, STATE_FORMAT, STATE_VERSION, what="scheduler state", error=StateError)
    try:
        for key in ("policy", "meta"):
            read_mapping(doc, key, error=StateError)
        for key in ("arms", "features"):
            read_list(doc, key, error=StateError)
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from None
    return doc


def load_state(path: str | Path, policy: Policy, arms: Sequence[str], features: Sequence[str]) -> dict[str, Any]:
    """Load ``path`` into ``policy`` after checking it was saved for these arms and features; return its meta."""
    doc = read_state(path)
    if doc["arms"] != list(arms):
        raise StateError(
            f"{path} was saved for other arms ({_diff(doc['arms'], arms)}); "
            "move it away to start learning afresh, or serve the arms it was saved for"
        )
    if doc["features"] != list(features):
        raise StateError(f"{path} was saved for other context features ({_diff(doc['features'], features)})")
    try:
        policy.load_state_dict(doc["policy"])
    except StateError as exc:
        raise StateError(f"{path}: {exc}") from None
    meta: dict[str, Any] = doc["meta"]  # read_state checked it is a JSON object
    return meta


def _diff(saved: Sequence[Any], current: Sequence[Any]) -> str:
    saved_set, current_set = set(map(str, saved)), set(map(str, current))
    gone, new = sorted(saved_set - current_set), sorted(current_set - saved_set)
    parts = []
    if gone:
        parts.append("only in the file: " + ", ".join(gone[:6]) + (" ..." if len(gone) > 6 else ""))
    if new:
        parts.append("only here: " + ", ".join(new[:6]) + (" ..." if len(new) > 6 else ""))
    return "; ".join(parts) or f"same names in another order ({len(saved)} vs {len(current)})"
