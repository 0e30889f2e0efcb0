"""Does a screen fit its window? Geometry checks over a live Kivy widget tree.

:func:`layout_problems` walks the widgets a user can see (opacity > 0, non-zero size) and returns one
line per problem:

* a widget not inside the window (inside a ScrollView: not inside the ScrollView's width; its content
  may be taller than the view, that is what scrolling is for);
* a widget not inside its parent (a row whose fixed-width children add up to more than the row);
* two siblings in a BoxLayout or GridLayout that overlap (RelativeLayout and FloatLayout stack on purpose);
* a label or button whose text is larger than the widget (the text is cut).

Used by the real-window tests and ``python -m device_app.app.screenshots --check-layout``.
Imports Kivy (only the app's window code does).
"""

from __future__ import annotations

from typing import Any

from kivy.uix.boxlayout import BoxLayout
from kivy.uix.gridlayout import GridLayout
from kivy.uix.label import Label
from kivy.uix.scrollview import ScrollView

__all__ = ["layout_problems"]

Rect = tuple[float, float, float, float]  # x, y, width, height in window pixels
TOLERANCE = 1.0  # pixels: layouts round positions


def _rect(widget: Any) -> Rect:
    x, y = widget.to_window(widget.x, widget.y)
    return float(x), float(y), float(widget.width), float(widget.height)


def _inside(inner: Rect, outer: Rect, *, horizontal_only: bool = False) -> bool:
    x, y, w, h = inner
    ox, oy, ow, oh = outer
    fits_x = x >= ox - TOLERANCE and x + w <= ox + ow + TOLERANCE
    if horizontal_only:
        return fits_x
    return fits_x and y >= oy - TOLERANCE and y + h <= oy + oh + TOLERANCE


def _overlap(a: Rect, b: Rect) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    dx = min(ax + aw, bx + bw) - max(ax, bx)
    dy = min(ay + ah, by + bh) - max(ay, by)
    return dx > TOLERANCE and dy > TOLERANCE


def _visible(widget: Any) -> bool:
    return bool(widget.opacity > 0 and widget.width > 0 and widget.height > 0)


def _name(widget: Any, ids: dict[int, str]) -> str:
    label = ids.get(id(widget))
    text = getattr(widget, "text", "")
    what = type(widget).__name__ + (f"#{label}" if label else "")
    if isinstance(text, str) and text:
        short = text.replace("\n", " ")
        what += f" {short[:30]!r}"
    return what


def _collect_ids(widget: Any, ids: dict[int, str]) -> None:
    for key, child in getattr(widget, "ids", {}).items():
        ids.setdefault(id(child), key)
    for child in widget.children:
        _collect_ids(child, ids)


def layout_problems(root: Any, window_size: tuple[float, float]) -> list[str]:
    """What does not fit in ``root``'s visible tree (see the module docstring); ``[]`` when it all fits."""
    ids: dict[int, str] = {}
    _collect_ids(root, ids)
    window: Rect = (0.0, 0.0, float(window_size[0]), float(window_size[1]))
    problems: list[str] = []

    def walk(widget: Any, bounds: Rect, scrolled: bool) -> None:
        rect = _rect(widget)
        name = _name(widget, ids)
        if not _inside(rect, bounds, horizontal_only=scrolled):
            where = "its scroll view" if scrolled else "the window"
            problems.append(f"{name} at {_fmt(rect)} is outside {where} {_fmt(bounds)}")
        if isinstance(widget, Label) and not isinstance(getattr(widget, "texture_size", None), type(None)):
            tw, th = widget.texture_size
            if widget.text and (tw > widget.width + TOLERANCE or th > widget.height + TOLERANCE):
                problems.append(f"{name}: its text ({tw:.0f}x{th:.0f}) is larger than the widget "
                                f"({widget.width:.0f}x{widget.height:.0f})")
        children = [c for c in reversed(widget.children) if _visible(c)]
        inner_scrolled = scrolled or isinstance(widget, ScrollView)
        for child in children:
            child_rect = _rect(child)
            if not isinstance(widget, ScrollView) and not _inside(child_rect, rect, horizontal_only=scrolled):
                problems.append(f"{_name(child, ids)} at {_fmt(child_rect)} is outside its parent {name} {_fmt(rect)}")
        if isinstance(widget, (BoxLayout, GridLayout)):
            rects = [(_rect(c), c) for c in children]
            for i, (a, wa) in enumerate(rects):
                for b, wb in rects[i + 1:]:
                    if _overlap(a, b):
                        problems.append(f"{_name(wa, ids)} {_fmt(a)} overlaps {_name(wb, ids)} {_fmt(b)}")
        child_bounds = rect if isinstance(widget, ScrollView) else bounds
        for child in children:
            walk(child, child_bounds, inner_scrolled)

    if _visible(root):
        walk(root, window, False)
    return problems


def _fmt(rect: Rect) -> str:
    x, y, w, h = rect
    return f"({x:.0f},{y:.0f} {w:.0f}x{h:.0f})"
