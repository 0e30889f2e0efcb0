"""Saving and loading the scheduler's learned state: versioned JSON, written atomically.

The file is one JSON object::

    {"format": "rise-bandit-state", "version": 1,
     "policy": {"kind": "linucb", ...the policy's state_dict()...},
     "arms": ["N10k0", "N10k5", ...],          # arm labels, in index order
     "features": ["w", "w*c", ...],            # context feature names, in order
     "meta": {...}}                            # free-form (counts, saved_at...)

:func:`atomic_write_text` writes a temporary file in the same folder, flushes and fsyncs it,
``os.replace`` s it over the target (atomic on POSIX) and fsyncs the folder, so a reader or
a process killed at any instant (``kill -9``) sees either the old complete file or the new
one, never a mix. One writer per state file (it removes its own stale temporaries).

:func:`load_state` checks the format, the version, the policy kind, the arm labels and the
feature names against the running configuration, and the array shapes (inside the
policy's ``load_state_dict``); any mismatch raises :class:`StateError` saying what differs.
Arrays are stored as nested lists: at 40 arms x 12 features the file is ~200 KB.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import StateError
from .policies import Policy

STATE_FORMAT = "rise-bandit-state"
STATE_VERSION = 1


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (temp file + fsync + os.replace)."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


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
    text = json.dumps(state_document(policy, arms, features, meta), allow_nan=False, separators=(",", ":"))
    atomic_write_text(path, text)


def read_state(path: str | Path) -> dict[str, Any]:
    """The parsed and format/version-checked state document of ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StateError(f"cannot read scheduler state {path}: {exc}") from exc
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise StateError(f"scheduler state {path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise StateError(f"{path} is not a RISE scheduler state (format {STATE_FORMAT!r})")
    if doc.get("version") != STATE_VERSION:
        raise StateError(f"{path}: scheduler state version {doc.get('version')!r}, this code reads {STATE_VERSION}")
    for key, kind in (("policy", dict), ("arms", list), ("features", list), ("meta", dict)):
        if not isinstance(doc.get(key), kind):
            raise StateError(f"{path}: field {key!r} missing or not a {kind.__name__}")
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
    return doc["meta"]


def _diff(saved: Sequence[Any], current: Sequence[Any]) -> str:
    saved_set, current_set = set(map(str, saved)), set(map(str, current))
    gone, new = sorted(saved_set - current_set), sorted(current_set - saved_set)
    parts = []
    if gone:
        parts.append("only in the file: " + ", ".join(gone[:6]) + (" ..." if len(gone) > 6 else ""))
    if new:
        parts.append("only here: " + ", ".join(new[:6]) + (" ..." if len(new) > 6 else ""))
    return "; ".join(parts) or f"same names in another order ({len(saved)} vs {len(current)})"


def _no_constant(name: str) -> float:
    raise ValueError(f"non-standard JSON constant {name}")
