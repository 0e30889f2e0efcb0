"""``rise-export``'s progress bar: tqdm on stderr, drawn only when stderr is a terminal.

The lab's tools follow the same policy: ``lab/progress.py`` builds on :func:`enabled` and
:func:`echo` here (export sits below the lab, so the policy lives on this floor). stdout keeps
exactly the lines and table it had: lines printed while the bar is drawn go through :func:`echo`.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


def enabled(setting: bool | None, stream: TextIO) -> bool:
    """``setting`` if given (``--progress`` / ``--no-progress``), else whether ``stream`` is a terminal."""
    if setting is not None:
        return setting
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed: not a terminal
        return False


def bar(desc: str, total: int, setting: bool | None = None) -> Any:
    """A tqdm bar of ``total`` steps on stderr (disabled: it costs nothing and prints nothing)."""
    stream = sys.stderr  # at call time: a caller (or a test) may have replaced it
    return tqdm(desc=desc, total=total, unit="step", file=stream, disable=not enabled(setting, stream),
                dynamic_ncols=True, leave=True)


def echo(line: str, file: TextIO | None = None) -> None:
    """``print(line, flush=True)`` to ``file`` (default stdout) without tearing a bar being drawn."""
    out = sys.stdout if file is None else file
    with tqdm.external_write_mode(file=out):
        print(line, file=out, flush=True)
