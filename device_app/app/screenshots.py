"""Drive the real app in a real window, take screenshots, dump what the widgets show.

Used by the real-window tests (each in a subprocess: Kivy's window is process-global) and
by ``docs/make_screenshots.py``. It types each prompt into the prompt box and presses
Generate (the widgets' own handlers, as a user's click would), waits for the Clock to
deliver the result, screenshots the main screen, optionally presses a rating, opens the
gallery and screenshots it::

    SDL_VIDEODRIVER=offscreen python -m device_app.app.screenshots --bundle BUNDLE \\
        --settings /tmp/s.json [--server ws://127.0.0.1:8765 --token-file F] \\
        --prompt "a red bag" --out /tmp/shots --state /tmp/shots/state.json

``--cancel`` presses Cancel once the first request's plan has arrived (and waits for the
app to say so) before the prompts; ``--pick NAME`` (with ``--bundles DIR``, repeatable) opens
Settings, screenshots its bundle list (``bundles.png``), presses the Use button of the bundle in
folder NAME and waits for the app to switch to it or say why not, before the prompts;
``--open-first`` re-opens the gallery's newest image into the result view; ``--check-layout``
records :func:`~device_app.app.layout_check.layout_problems` for every screen shown (main, main
with details, gallery, settings, the bundle list). Without ``--prompt`` the app only starts (what a
restarted app shows: its gallery).

Exit status 0 when every step finished and the screenshots were written; 3 when
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
    p.add_argument("--bundle", default=None, help="device bundle (default: the one in the settings)")
    p.add_argument("--bundles", default=None, metavar="DIR", help="a folder of bundles listed in Settings")
    p.add_argument("--pick", action="append", default=[], metavar="NAME",
                   help="press Use on this bundle (a folder name in --bundles) in Settings, before the prompts")
    p.add_argument("--settings", required=True, help="settings file (created)")
    p.add_argument("--server", default=None, help="edge URL (empty: no edge, device only; default: the settings')")
    p.add_argument("--token-file", default=None)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several images)")
    p.add_argument("--seed", default="random", help="what to type in the seed field")
    p.add_argument("--cancel", default=None, metavar="PROMPT",
                   help="generate PROMPT and press Cancel once its plan arrived, before the --prompt ones")
    p.add_argument("--preview-shot", action="store_true",
                   help="with --cancel: wait for the live preview to show, screenshot preview.png, then cancel")
    p.add_argument("--open-first", action="store_true", help="re-open the gallery's newest image (after the rest)")
    p.add_argument("--check-layout", action="store_true", help="record widgets that do not fit, on every screen")
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
    from device_app.app.layout_check import layout_problems
    from device_app.token_file import read_token

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    changes: dict[str, Any] = {}
    if args.server is not None:
        changes["server_url"] = args.server
    if args.token_file:
        changes["token"] = read_token(args.token_file)
    controller = make_controller(
        args.settings, bundle=args.bundle, bundles=args.bundles, threads=args.threads, open_timeout=args.open_timeout,
        save_dir=out / "saved", preference=args.preference,
        offline_min_steps=args.offline_steps[0], offline_max_steps=args.offline_steps[1], **changes,
    )
    app = RiseApp(controller)
    state: dict[str, Any] = {"ok": False, "phases": {}, "events": [], "layout": {}}
    deadline = time.monotonic() + args.timeout

    def main_ids() -> Any:  # Kivy's ids: untyped
        return app.screens.get_screen("main").ids

    def widgets() -> dict[str, Any]:
        ids = main_ids()
        image = ids.result_image
        iw, ih = image.norm_image_size
        cx, cy = image.to_window(*image.center)
        return {
            "window_size": list(Window.size),
            "screen": app.screens.current,
            "wide": app.ui.wide,
            "status": ids.status_label.text,
            "progress_value": ids.progress_bar.value,
            "progress_max": ids.progress_bar.max,
            "progress_text": ids.progress_label.text,
            "generate_text": ids.generate_button.text,
            "generate_disabled": ids.generate_button.disabled,
            "prompt_hint": ids.prompt_input.hint_text,
            "prompt_note": ids.prompt_note_label.text,
            "result_prompt": ids.prompt_label.text,
            "result_text": ids.result_label.text,
            "details": ids.details_label.text,
            "link": ids.link_label.text,
            "link_state": app.ui.link_state,
            "gallery_button": ids.gallery_button.text,
            "rate_up": ids.rate_up.state,
            "rate_down": ids.rate_down.state,
            "texture_size": None if image.texture is None else list(image.texture.size),
            # the drawn image in window pixels, origin bottom-left
            "image_rect": [cx - iw / 2, cy - ih / 2, iw, ih],
            "history": len(controller.history),
            "history_prompts": [h.prompt for h in controller.history],
            "history_seeds": [h.info.seed for h in controller.history],
            "gallery_cells": len(app.screens.get_screen("gallery").ids.grid.children),
            "gallery_files": sorted(p.name for p in controller.gallery_dir.glob("*.png")),
            "bundle": controller.settings.bundle,
        }

    def library_widgets() -> dict[str, Any]:
        """What the settings screen shows of the bundles: each row's words and button, the lines around them."""
        ids = app.screens.get_screen("settings").ids
        rows = list(reversed(ids.bundle_list.children))  # Kivy keeps children last-added first
        return {
            "rows": [{"name": r.bundle.name, "label": r.ids.bundle_row_label.text,
                      "details": r.ids.bundle_row_details.text, "button": r.ids.use_button.text,
                      "disabled": r.ids.use_button.disabled} for r in rows],
            "library_text": ids.library_label.text,
            "skipped_text": ids.skipped_label.text,
            "bundle_text": ids.bundle_label.text,
            "bundle_input": ids.bundle_input.text,
            "status": ids.settings_status_label.text,
            "bundle": controller.settings.bundle,
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
            # The link indicator is resampled every 1.5 s: not part of what must settle.
            shown = {k: v for k, v in widgets().items() if k not in ("link", "link_state")}
            frame = Clock.frames_displayed
            if not last or last[0] != shown:
                last[:] = [shown, frame]
                return False
            return bool(frame >= last[1] + frames)
        return run

    def screen_shown(name: str) -> Callable[[], bool]:
        def run() -> bool:
            screens = app.screens
            return bool(screens.current_screen.name == name and not screens.transition.is_active)
        return run

    def press_generate(prompt: str) -> None:
        ids = main_ids()
        for box, text in ((ids.prompt_input, prompt), (ids.seed_input, args.seed)):
            box.text = ""
            box.insert_text(text)  # as typed: the box scrolls to the cursor as it would for a user
        ids.generate_button.dispatch("on_release")
        state["events"].append(f"generate {prompt!r}: busy={controller.busy}")

    def press_cancel() -> None:
        if not controller.busy:
            raise RuntimeError(f"nothing to cancel: {controller.status}")
        ids = main_ids()
        state["events"].append(f"cancel: button {ids.generate_button.text!r}")
        ids.generate_button.dispatch("on_release")  # while busy it reads "Cancel"

    def generation_over() -> bool:
        if controller.busy:
            return False
        if controller.current is None or controller.error is not None:
            raise RuntimeError(f"generation failed: {controller.status}")
        return True

    def record(phase: str) -> Callable[[], None]:
        return lambda: state["phases"].__setitem__(phase, widgets())

    def check_layout(phase: str) -> Callable[[], None]:
        def run() -> None:
            if args.check_layout:
                state["layout"][phase] = layout_problems(app.screens.current_screen, tuple(Window.size))
        return run

    def look_at(phase: str) -> list[Callable[[], bool]]:
        return [settled(), later(record(phase)), later(check_layout(phase))]

    steps += [settled(lambda: app.ui.link_state not in ("connecting",)), later(record("start")),
              later(check_layout("start"))]
    if args.cancel is not None:
        steps += [later(functools.partial(press_generate, args.cancel)),
                  lambda: controller.plan is not None or not controller.busy,  # the edge has the request
                  later(check_layout("busy"))]
        if args.preview_shot:
            steps += [lambda: controller.preview is not None or not controller.busy, *look_at("preview"),
                      later(lambda: state.__setitem__("preview_png", shot("preview")))]
        steps += [later(press_cancel), lambda: not controller.busy, *look_at("cancelled")]
    def press_use(name: str) -> None:
        rows = app.screens.get_screen("settings").ids.bundle_list.children
        row = next((r for r in rows if r.bundle.name == name), None)
        if row is None:
            raise RuntimeError(f"no bundle {name!r} in the list: {[r.bundle.name for r in rows]}")
        button = row.ids.use_button
        state["events"].append(f"pick {name!r}: button {button.text!r}, disabled={button.disabled}")
        button.dispatch("on_release")

    def record_library(phase: str) -> Callable[[], None]:
        return lambda: state["library"].__setitem__(phase, library_widgets())

    state["library"] = {}
    if args.pick:
        def scroll_to_list() -> None:
            ids = app.screens.get_screen("settings").ids
            view = ids.settings_scroll
            if view.children and view.children[0].height > view.height:  # all in view already: nothing to scroll
                view.scroll_to(ids.bundle_list, padding=10, animate=False)

        steps += [later(lambda: app.show("settings")), settled(screen_shown("settings")),
                  later(record_library("listed")), later(check_layout("bundles")), later(scroll_to_list), settled(),
                  later(lambda: state.__setitem__("bundles_png", shot("bundles")))]
    for name in args.pick:
        steps += [later(functools.partial(press_use, name)), lambda: controller.choosing is None,
                  settled(), later(record_library(f"picked {name}"))]
    if args.pick:
        steps += [later(check_layout("picked")), later(lambda: app.show("main")), settled(screen_shown("main"))]
    for prompt in args.prompt:
        steps += [later(functools.partial(press_generate, prompt)), generation_over]
    if args.prompt:
        steps += [*look_at("finished"), later(lambda: state.__setitem__("main_png", shot("main")))]
        if args.check_layout:
            steps += [later(lambda: main_ids().details_button.dispatch("on_release")), *look_at("details"),
                      later(lambda: state.__setitem__("details_png", shot("details"))),
                      later(lambda: main_ids().details_button.dispatch("on_release"))]
    if args.rate is not None:
        button = "rate_up" if args.rate == 1 else "rate_down"
        steps += [later(lambda: getattr(main_ids(), button).dispatch("on_release")),
                  lambda: controller.status.startswith(("Rating sent", "Rating kept", "Rated")),
                  settled(), later(record("rated"))]
    steps += [later(lambda: app.show("gallery")), settled(screen_shown("gallery")), later(record("gallery")),
              later(check_layout("gallery")), later(lambda: state.__setitem__("gallery_png", shot("gallery")))]
    if args.open_first:
        def open_first() -> None:
            cells = list(reversed(app.screens.get_screen("gallery").ids.grid.children))
            if not cells:
                raise RuntimeError("the gallery is empty: nothing to open")
            cells[0].open()

        steps += [later(open_first), settled(screen_shown("main")), *look_at("reopened")]
    if args.check_layout:
        steps += [later(lambda: app.show("settings")), settled(screen_shown("settings")), later(record("settings")),
                  later(check_layout("settings")), later(lambda: state.__setitem__("settings_png", shot("settings"))),
                  later(lambda: app.show("main"))]

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

    def started(_app: Any) -> None:  # returns None: a true return would stop Kivy calling the app's own on_start
        Clock.schedule_once(tick, 0.5)

    app.bind(on_start=started)
    app.run()
    if args.state:
        Path(args.state).write_text(json.dumps(state, indent=2, default=str) + "\n")
    return 0 if state["ok"] else 3


if __name__ == "__main__":
    sys.exit(main())
