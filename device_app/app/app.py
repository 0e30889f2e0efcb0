"""``rise-device app``: the Kivy front end of the device.

Layout in ``rise.kv``; state in :class:`UiState` (Kivy properties, copied from the
:class:`~device_app.app.controller.Controller` after each change); logic in the
controller. Network and ONNX Runtime work runs in the backends' worker threads and comes
back through ``Clock.schedule_once``, so the UI never blocks.

Kivy reads its own command line and environment when imported: :func:`main` parses
the app's arguments first and sets ``KIVY_NO_ARGS`` so Kivy leaves them alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("KIVY_NO_ARGS", "1")
os.environ.setdefault("KIVY_LOG_MODE", "PYTHON")  # Kivy logs through logging, not its own console handler

import numpy as np
from kivy.app import App
from kivy.clock import Clock
from kivy.event import EventDispatcher
from kivy.graphics.texture import Texture
from kivy.properties import (
    BooleanProperty,
    NumericProperty,
    ObjectProperty,
    StringProperty,
)
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.screenmanager import NoTransition, Screen, ScreenManager

from device_app.app.backends import BundleHolder, NetworkBackend, OfflineBackend
from device_app.app.controller import Controller, HistoryItem
from device_app.app.settings import SETTINGS_FILE, SettingsStore
from shared.errors import ConfigError, RiseError

__all__ = ["RiseApp", "UiState", "build_parser", "image_texture", "main"]

KV_FILE = Path(__file__).with_name("rise.kv")


def image_texture(image: np.ndarray) -> Texture:
    """A Kivy texture for a uint8 (H, W, 3) image (rows flipped: GL's origin is bottom-left)."""
    h, w = image.shape[:2]
    rgba = np.empty((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = image[..., :3]
    rgba[..., 3] = 255  # RGBA rows are 4-byte aligned whatever the width
    texture = Texture.create(size=(w, h), colorfmt="rgba")
    texture.mag_filter = "nearest"  # small images scaled up stay sharp
    texture.blit_buffer(np.ascontiguousarray(rgba[::-1]).tobytes(), colorfmt="rgba", bufferfmt="ubyte")
    return texture


class UiState(EventDispatcher):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    """What the widgets show, as Kivy properties (``rise.kv`` binds to ``app.ui.*``)."""

    status = StringProperty("")
    busy = BooleanProperty(False)
    progress_value = NumericProperty(0)
    progress_max = NumericProperty(0)
    progress_text = StringProperty("")
    link_text = StringProperty("")
    link_state = StringProperty("")
    load_text = StringProperty("")
    has_result = BooleanProperty(False)
    texture = ObjectProperty(None, allownone=True)
    result_prompt = StringProperty("")
    result_text = StringProperty("")
    rating = NumericProperty(0)
    history_count = NumericProperty(0)
    preference = NumericProperty(0.5)
    server_url = StringProperty("")
    token = StringProperty("")
    save_dir = StringProperty("")
    default_save_dir = StringProperty("")

    def sync(self, c: Controller, textures: Callable[[HistoryItem], Texture]) -> None:
        """Copy the controller's state into the properties."""
        self.status = c.status
        self.busy = c.busy
        self.progress_value, self.progress_max = c.progress
        self.progress_text = c.progress_text
        self.link_text = c.link_text
        self.link_state = "connected" if c.link.state == "connected" else c.link.state
        self.load_text = c.load_text
        self.has_result = c.current is not None
        self.texture = None if c.current is None else textures(c.current)
        self.result_prompt = "" if c.current is None else c.current.prompt
        self.result_text = c.result_text
        self.rating = 0 if c.current is None or c.current.rating is None else c.current.rating
        self.history_count = len(c.history)
        self.preference = c.settings.preference
        self.server_url = c.settings.server_url
        self.token = c.settings.token
        self.save_dir = c.settings.save_dir
        self.default_save_dir = str(c.default_save_dir)


class MainScreen(Screen):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    pass


class SettingsScreen(Screen):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    pass


class GalleryCell(BoxLayout):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    texture = ObjectProperty(None, allownone=True)
    prompt = StringProperty("")
    summary = StringProperty("")
    rating_text = StringProperty("")

    def __init__(self, item: HistoryItem, texture: Texture, on_save: Callable[[HistoryItem], Any], **kwargs: Any):
        self.item = item
        self._on_save = on_save
        super().__init__(**kwargs)
        self.texture = texture
        self.refresh()

    def refresh(self) -> None:
        item = self.item
        self.prompt = item.prompt
        self.summary = item.summary
        rating = {1: "rated +1", -1: "rated -1"}.get(item.rating or 0, "not rated")
        self.rating_text = rating + (" · saved" if item.saved_to else "")

    def save(self) -> None:
        self._on_save(self.item)
        self.refresh()


class GalleryScreen(Screen):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    def show(self, items: list[HistoryItem], textures: Callable[[HistoryItem], Texture],
             on_save: Callable[[HistoryItem], Any]) -> None:
        grid = self.ids.grid
        grid.clear_widgets()
        for item in items:
            grid.add_widget(GalleryCell(item, textures(item), on_save))


class RiseApp(App):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    """The app. ``controller`` may be given (tests); otherwise :func:`main` builds one."""

    title = "RISE"
    kv_file = str(KV_FILE)  # App.run loads it before build()

    def __init__(self, controller: Controller | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.controller = controller  # set before run() if not given here
        self.ui = UiState()
        self._textures: dict[int, Texture] = {}
        self._history_shown: list[int] | None = None
        self._save_preference = Clock.create_trigger(self._persist_preference, 0.4)
        self._pending_preference: float | None = None

    @property
    def _ctl(self) -> Controller:
        """The controller, which must be set once the app runs (``main`` sets it before ``run()``)."""
        assert self.controller is not None, "give RiseApp a controller before run()"
        return self.controller

    # ----------------------------------------------------------------- Kivy lifecycle

    def build(self) -> ScreenManager:
        assert self.controller is not None, "give RiseApp a controller before run()"
        self.screens = ScreenManager(transition=NoTransition())
        for screen in (MainScreen(), GalleryScreen(), SettingsScreen()):
            self.screens.add_widget(screen)
        self.controller.subscribe(lambda c: self.ui.sync(c, self.texture_for))
        self.ui.sync(self.controller, self.texture_for)
        Clock.schedule_interval(lambda dt: self._ctl.refresh_indicators(), 1.5)
        return self.screens

    def on_start(self) -> None:
        self._ctl.refresh_indicators()

    def on_stop(self) -> None:
        self._ctl.close()

    # ----------------------------------------------------------------- commands (from rise.kv)

    @property
    def main_ids(self) -> Any:
        return self.screens.get_screen("main").ids

    def generate(self) -> bool:
        return self._ctl.generate(self.main_ids.prompt_input.text)

    def rate(self, rating: int) -> None:
        self._ctl.rate(rating)

    def save(self) -> None:
        self._ctl.save()

    def preference_moved(self, value: float) -> None:
        self._pending_preference = value
        self._save_preference()  # debounced: one write when the slider stops

    def _persist_preference(self, _dt: float) -> None:
        pending = self._pending_preference
        if pending is not None and abs(pending - self._ctl.settings.preference) > 1e-6:
            self._ctl.set_preference(pending)
        self._pending_preference = None

    def save_settings(self, server_url: str, token: str, save_dir: str) -> None:
        if self._ctl.update_settings(server_url=server_url, token=token, save_dir=save_dir.strip()):
            self.show("main")

    def show(self, name: str) -> None:
        if name == "gallery":
            self.screens.get_screen("gallery").show(self._ctl.history, self.texture_for, self._save_item)
        self.screens.current = name

    def _save_item(self, item: HistoryItem) -> None:
        self._ctl.save(item)

    def texture_for(self, item: HistoryItem) -> Texture:
        """One texture per image, made once (history items keep theirs)."""
        key = id(item.outcome)
        if key not in self._textures:
            self._textures[key] = image_texture(item.image)
            live = {id(i.outcome) for i in self._ctl.history}
            for stale in [k for k in self._textures if k not in live and k != key]:
                del self._textures[stale]
        return self._textures[key]


# --------------------------------------------------------------------------- building it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rise-device app",
        description="The RISE device app: type a prompt, the edge runs the first steps and this device "
                    "the rest; with no edge in reach, the device does it all.",
    )
    parser.add_argument("--bundle", default=None, help="device bundle folder (made by rise-export); remembered")
    parser.add_argument("--server", default=None, help="edge daemon URL, ws://HOST:PORT; remembered")
    parser.add_argument("--token-file", default=None, help="file holding the edge's access token; remembered")
    parser.add_argument("--settings", default=None,
                        help=f"settings file (default: {SETTINGS_FILE} in the app's user data folder)")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    parser.add_argument("--size", default="1000x720", help="window size WxH on a desktop (default 1000x720)")
    return parser


def make_controller(settings_path: str | Path, *, bundle: str | None = None, threads: int | None = None,
                    schedule: Callable[[Callable[[], None]], None] | None = None,
                    open_timeout: float = 5.0, save_dir: str | Path | None = None, **changes: Any) -> Controller:
    """A controller with the real backends; ``changes`` (and ``bundle``) are saved into the settings."""
    store = SettingsStore(settings_path)
    if schedule is None:
        def schedule(callback: Callable[[], None]) -> None:
            Clock.schedule_once(lambda _dt: callback(), 0)  # thread-safe: runs on the UI thread's next frame
    settings = store.load()
    if bundle is not None:
        changes["bundle"] = str(Path(bundle).resolve())
    if changes:
        settings = settings.with_changes(**changes)
        store.save(settings)
    holder = BundleHolder(settings.bundle or None, threads=threads)
    return Controller(store, NetworkBackend(holder, open_timeout=open_timeout), OfflineBackend(holder),
                      schedule=schedule, save_dir=save_dir)


def _configure_window(size: str) -> None:
    from kivy.config import Config

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like 1000x720, got {size!r}") from None
    Config.set("graphics", "width", str(width))
    Config.set("graphics", "height", str(height))
    Config.set("input", "mouse", "mouse,disable_multitouch")
    Config.set("kivy", "exit_on_escape", "0")


def main(argv: list[str] | None = None) -> int:
    """Run the app; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _configure_window(args.size)
        changes: dict[str, Any] = {}
        if args.server is not None:
            changes["server_url"] = args.server
        if args.token_file is not None:
            from device_app.token_file import read_token

            changes["token"] = read_token(args.token_file)
        app = RiseApp()
        settings_path = Path(args.settings) if args.settings else Path(app.user_data_dir) / SETTINGS_FILE
        app.controller = make_controller(settings_path, bundle=args.bundle, threads=args.threads, **changes)
    except RiseError as exc:
        print(f"rise-device app: error: {exc}", file=sys.stderr)
        return 2
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
