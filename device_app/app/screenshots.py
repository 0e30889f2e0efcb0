"""Drive the real app in a real window, take screenshots, dump what the widgets show.

Used by the real-window tests (each in a subprocess: Kivy's window is process-global) and
by ``docs/make_screenshots.py``. It types each prompt into the prompt box and presses
Generate (the widgets' own handlers, as a user's click would), waits for the Clock to
deliver the result, screenshots the main screen, optionally presses a rating, opens the
gallery and screenshots it::

    SDL_VIDEODRIVER=offscreen python -m device_app.app.screenshots --bundle BUNDLE \\
        --settings /tmp/s.json [--server ws://127.0.0.1:8765 --token-file F] \\
        --prompt "a red bag" --out /tmp/shots --state /tmp/shots/state.json

Exit status 0 when every generation finished and both screenshots were written; 3 when
something timed out or failed (the state file says what the widgets showed then).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KIVY_NO_ARGS", "1")
os.environ.setdefault("KIVY_LOG_MODE", "PYTHON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m device_app.app.screenshots", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--settings", required=True, help="settings file (created)")
    p.add_argument("--server", default="", help="edge URL (empty: no edge, device only)")
    p.add_argument("--token-file", default=None)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several images)")
    p.add_argument("--preference", type=float, default=0.5)
    p.add_argument("--offline-steps", type=int, nargs=2, default=(4, 8), metavar=("MIN", "MAX"))
    p.add_argument("--rate", type=int, choices=(-1, 1), default=None, help="press this rating after the last image")
    p.add_argument("--out", required=True, help="folder for main.png and gallery.png")
    p.add_argument("--state", default=None, help="write what the widgets showed to this JSON file")
    p.add_argument("--size", default="1000x720")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--open-timeout", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds for the whole run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from device_app.app.app import _configure_window

    _configure_window(args.size)

    from kivy.clock import Clock
    from kivy.core.window import Window

    from device_app.app.app import RiseApp, make_controller
    from device_app.token_file import read_token

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    token = read_token(args.token_file) if args.token_file else ""
    controller = make_controller(
        args.settings, bundle=args.bundle, threads=args.threads, open_timeout=args.open_timeout,
        save_dir=out / "saved", server_url=args.server, token=token, preference=args.preference,
        offline_min_steps=args.offline_steps[0], offline_max_steps=args.offline_steps[1],
    )
    app = RiseApp(controller)
    state: dict[str, Any] = {"ok": False, "phases": {}, "events": []}
    deadline = time.monotonic() + args.timeout

    def widgets() -> dict[str, Any]:
        ids = app.screens.get_screen("main").ids
        image = ids.result_image
        iw, ih = image.norm_image_size
        cx, cy = image.to_window(*image.center)
        return {
            "window_size": list(Window.size),
            "screen": app.screens.current,
            "status": ids.status_label.text,
            "progress_value": ids.progress_bar.value,
            "progress_max": ids.progress_bar.max,
            "progress_text": ids.progress_label.text,
            "generate_text": ids.generate_button.text,
            "generate_disabled": ids.generate_button.disabled,
            "result_prompt": ids.prompt_label.text,
            "result_text": ids.result_label.text,
            "link": ids.link_label.text,
            "load": ids.load_label.text,
            "gallery_button": ids.gallery_button.text,
            "rate_up": ids.rate_up.state,
            "rate_down": ids.rate_down.state,
            "texture_size": None if image.texture is None else list(image.texture.size),
            # the drawn image in window pixels, origin bottom-left
            "image_rect": [cx - iw / 2, cy - ih / 2, iw, ih],
            "history": len(controller.history),
            "gallery_cells": len(app.screens.get_screen("gallery").ids.grid.children),
        }

    def finish(ok: bool, why: str = "") -> None:
        state["ok"] = ok
        if why:
            state["error"] = why
        state["final"] = widgets()
        app.stop()

    def shot(name: str) -> str:
        made = Window.screenshot(name=str(out / f"{name}.png"))  # Kivy appends a counter
        target = out / f"{name}.png"
        os.replace(made, target)
        return str(target)

    steps: list[Callable[[], bool]] = []  # each returns True when done; polled on the Clock

    def later(action: Callable[[], None]) -> Callable[[], bool]:
        def run() -> bool:
            action()
            return True
        return run

    def settled(ready: Callable[[], bool] = lambda: True, frames: int = 3) -> Callable[[], bool]:
        """Done once ``ready()`` holds and what the widgets show has not changed for ``frames`` frames.

        Counted in frames (laid out and drawn), not seconds: a loaded machine makes frames slower, never fewer.
        """
        last: list[Any] = []  # [what the widgets showed, the frame it was first seen]

        def run() -> bool:
            if not ready():
                return False
            # The indicators (link, load) are resampled every 1.5 s: not part of what must settle.
            shown = {k: v for k, v in widgets().items() if k not in ("link", "load")}
            frame = Clock.frames_displayed
            if not last or last[0] != shown:
                last[:] = [shown, frame]
                return False
            return bool(frame >= last[1] + frames)
        return run

    def gallery_shown() -> bool:
        screens = app.screens
        return bool(screens.current_screen.name == "gallery" and not screens.transition.is_active)

    def press_generate(prompt: str) -> None:
        ids = app.screens.get_screen("main").ids
        ids.prompt_input.text = prompt
        ids.generate_button.dispatch("on_release")
        state["events"].append(f"generate {prompt!r}: busy={controller.busy}")

    def generation_over() -> bool:
        if controller.busy:
            return False
        if controller.current is None or controller.error is not None:
            raise RuntimeError(f"generation failed: {controller.status}")
        return True

    def record(phase: str) -> Callable[[], None]:
        return lambda: state["phases"].__setitem__(phase, widgets())

    for prompt in args.prompt:
        steps += [later(functools.partial(press_generate, prompt)), generation_over]
    steps += [settled(), later(record("finished")), later(lambda: state.__setitem__("main_png", shot("main")))]
    if args.rate is not None:
        def ids_of() -> Any:  # Kivy's ids: untyped
            return app.screens.get_screen("main").ids

        button = "rate_up" if args.rate == 1 else "rate_down"
        steps += [later(lambda: getattr(ids_of(), button).dispatch("on_release")),
                  lambda: controller.status.startswith(("Rating sent", "Rating not sent", "Rated")),
                  settled(), later(record("rated"))]
    steps += [later(lambda: app.show("gallery")), settled(gallery_shown), later(record("gallery")),
              later(lambda: state.__setitem__("gallery_png", shot("gallery")))]

    def tick(_dt: float) -> None:
        try:
            while steps:
                if time.monotonic() > deadline:
                    finish(False, f"timed out; status {controller.status!r}")
                    return
                if not steps[0]():
                    Clock.schedule_once(tick, 0.1)
                    return
                steps.pop(0)
        except Exception as exc:  # report it in the state file, then leave
            finish(False, f"{type(exc).__name__}: {exc}")
            return
        finish(True)

    app.bind(on_start=lambda _app: Clock.schedule_once(tick, 0.5))
    app.run()
    if args.state:
        Path(args.state).write_text(json.dumps(state, indent=2, default=str) + "\n")
    return 0 if state["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
