"""The lab's progress bars, one policy for every long run (``rise-eval``, training, ``rise-sim``).

Bars are tqdm's, drawn on **stderr** and only when stderr is a terminal (``setting=None``, the
default); ``True`` / ``False`` force them on or off (the tools' ``--progress`` / ``--no-progress``).
stdout is never touched: a table or JSON printed there stays exactly what it was. Lines a tool
prints while a bar is drawn go through :func:`echo`, which lifts the bar off the terminal, prints,
and puts it back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

from export.progress import echo, enabled  # the one policy (export sits below the lab)

T = TypeVar("T")


def progress_enabled(setting: bool | None = None, stream: TextIO | None = None) -> bool:
    """Whether to draw bars: ``setting`` if given, else whether ``stream`` (default stderr) is a terminal."""
    return enabled(setting, sys.stderr if stream is None else stream)


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: float | None = None, unit: str = "it",
        setting: bool | None = None, initial: float = 0, leave: bool = True) -> Any:
    """A tqdm bar on stderr, disabled unless :func:`progress_enabled` (a disabled bar costs nothing).

    Returns the ``tqdm`` object: iterate it, or call ``update(n)`` / ``set_postfix_str(s)`` / ``close()``.
    """
    stream = sys.stderr  # looked up at call time: a caller (or a test) may have replaced it
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave, file=stream,
                disable=not progress_enabled(setting, stream), dynamic_ncols=True, smoothing=0.1)


def counting(pbar: Any, file: TextIO | None = None) -> Callable[[str], None]:
    """A ``progress(line)`` callback for a loop that reports a line per item: one step of ``pbar``
    and the line, as before, on ``file`` (default stderr) through :func:`echo`."""

    def report(line: str) -> None:
        pbar.update(1)
        echo(line, sys.stderr if file is None else file)

    return report
