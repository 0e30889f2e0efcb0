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
import logging
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

from device_app.app.backends import APP_PREVIEW_EVERY, BundleHolder, NetworkBackend, OfflineBackend, check_bundle
from device_app.app.controller import Controller, HistoryItem
from device_app.app.gallery import GALLERY_DIR
from device_app.app.settings import SETTINGS_FILE, SettingsStore
from device_app.bundle_library import LibraryBundle, scan_library
from shared.errors import BundleError, ConfigError, RiseError

__all__ = ["RiseApp", "UiState", "build_parser", "image_texture", "main"]

log = logging.getLogger("rise.device.app")

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
    can_generate = BooleanProperty(True)
    progress_value = NumericProperty(0)
    progress_max = NumericProperty(0)
    progress_text = StringProperty("")
    link_text = StringProperty("")
    link_state = StringProperty("")
    link_help = StringProperty("")
    has_result = BooleanProperty(False)
    has_image = BooleanProperty(False)
    texture = ObjectProperty(None, allownone=True)
    result_prompt = StringProperty("")
    result_text = StringProperty("")
    details_text = StringProperty("")
    show_details = BooleanProperty(False)
    rating = NumericProperty(0)
    history_count = NumericProperty(0)
    preference = NumericProperty(0.5)
    server_url = StringProperty("")
    token = StringProperty("")
    bundle = StringProperty("")
    bundle_text = StringProperty("")
    bundle_ok = BooleanProperty(False)
    bundles_dir = StringProperty("")
    library_text = StringProperty("")
    skipped_text = StringProperty("")
    choosing = BooleanProperty(False)
    gallery_dir = StringProperty("")
    default_gallery_dir = StringProperty("")
    save_dir = StringProperty("")
    default_save_dir = StringProperty("")
    prompt_hint = StringProperty("")
    prompt_line = StringProperty("")
    vocabulary = StringProperty("")
    #: A window wider than tall and at least 720 dp: side-by-side panels; else one column (a phone).
    wide = BooleanProperty(False)

    def sync(self, c: Controller, textures: Callable[[HistoryItem], Texture],
             preview: Callable[[np.ndarray], Texture]) -> None:
        """Copy the controller's state into the properties."""
        self.status = c.status
        self.busy = c.busy
        self.can_generate = c.can_generate
        self.progress_value, self.progress_max = c.progress
        self.progress_text = c.progress_text
        self.link_text = c.link_text
        self.link_state = c.link.state
        self.link_help = c.link_help
        self.has_result = c.current is not None
        if c.busy and c.preview is not None:
            self.texture = preview(c.preview)
        else:
            self.texture = None if c.current is None else textures(c.current)
        self.has_image = self.texture is not None
        self.result_prompt = "" if c.current is None else c.current.prompt
        self.result_text = c.result_text
        self.details_text = c.details_text
        self.rating = 0 if c.current is None or c.current.rating is None else c.current.rating
        self.history_count = len(c.history)
        self.preference = c.settings.preference
        self.server_url = c.settings.server_url
        self.token = c.settings.token
        self.bundle = c.settings.bundle
        m = c.manifest
        self.bundle_ok = m is not None and c.bundle_problem is None
        entry = c.bundle_entry
        if m is None or c.bundle_problem is not None:
            self.bundle_text = f"Bundle not usable: {c.bundle_problem}"
        elif entry is not None:
            self.bundle_text = f"Bundle OK: {entry.label} — {entry.details}, samplers {', '.join(m.samplers)}"
        else:
            self.bundle_text = (f"Bundle OK: {m.family_name} ({m.family_id}), {m.dtype}, "
                                f"samplers {', '.join(m.samplers)}")
        self.bundles_dir = c.settings.bundles_dir
        library = c.library
        if library is not None:
            count = len(library)
            self.library_text = (f"{count} bundle{'' if count == 1 else 's'} in {library.folder}"
                                 + (f", {len(library.skipped)} skipped" if library.skipped else "")
                                 + ("" if count else ": none to choose from"))
            self.skipped_text = "\n".join(s.line() for s in library.skipped)
        else:
            self.library_text = "" if c.library_problem is None else f"Bundles folder not usable: {c.library_problem}"
            self.skipped_text = ""
        self.choosing = c.choosing is not None
        self.gallery_dir = c.settings.gallery_dir
        self.default_gallery_dir = str(c.default_gallery_dir)
        self.save_dir = c.settings.save_dir
        self.default_save_dir = str(c.default_save_dir)
        self.prompt_hint = c.prompt_hint
        self.prompt_line = c.prompt_line
        self.vocabulary = c.help.vocabulary


class MainScreen(Screen):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    pass


class SettingsScreen(Screen):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    pass


class GalleryCell(BoxLayout):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    """One image of the gallery: Open (into the result view), Save (a copy), Delete (pressed twice)."""

    texture = ObjectProperty(None, allownone=True)
    prompt = StringProperty("")
    summary = StringProperty("")
    rating_text = StringProperty("")
    confirm_delete = BooleanProperty(False)

    def __init__(self, item: HistoryItem, texture: Texture | None, app: RiseApp, **kwargs: Any) -> None:
        self.item = item
        self._app = app
        super().__init__(**kwargs)
        self.texture = texture
        self.refresh()

    def refresh(self) -> None:
        item = self.item
        self.prompt = item.prompt
        self.summary = item.summary
        rating = {1: "rated good", -1: "rated bad"}.get(item.rating or 0, "not rated")
        self.rating_text = f"seed {item.info.seed} · {rating}" + (" · saved" if item.saved_to else "")

    def open(self) -> None:
        self._app.open_item(self.item)

    def save(self) -> None:
        self._app.controller_or_fail.save(self.item)
        self.refresh()

    def delete(self) -> None:
        if not self.confirm_delete:  # the first press asks, the second deletes
            self.confirm_delete = True
            return
        self._app.delete_item(self.item)


class BundleRow(BoxLayout):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    """One bundle of the library in Settings: its label, its family and kind ("LoRA x0.8"...), and Use."""

    label = StringProperty("")
    details = StringProperty("")
    in_use = BooleanProperty(False)
    checking = BooleanProperty(False)

    def __init__(self, bundle: LibraryBundle, app: RiseApp, *, in_use: bool, checking: bool, **kwargs: Any) -> None:
        self.bundle = bundle
        self._app = app
        super().__init__(**kwargs)
        self.label = bundle.label
        self.details = bundle.details
        self.in_use = in_use
        self.checking = checking

    def use(self) -> None:
        self._app.choose_bundle(self.bundle.name)


class GalleryScreen(Screen):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    def show(self, items: list[HistoryItem], textures: Callable[[HistoryItem], Texture | None], app: RiseApp) -> None:
        grid = self.ids.grid
        grid.clear_widgets()
        for item in items:
            grid.add_widget(GalleryCell(item, textures(item), app))


class RiseApp(App):  # type: ignore[misc]  # Kivy ships no type information: its classes are Any
    """The app. ``controller`` may be given (tests); otherwise :func:`main` builds one."""

    title = "RISE"
    kv_file = str(KV_FILE)  # App.run loads it before build()

    def __init__(self, controller: Controller | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.controller = controller  # set before run() if not given here
        self.ui = UiState()
        self._textures: dict[int, Texture] = {}
        self._preview: tuple[int, Texture] | None = None
        self._save_preference = Clock.create_trigger(self._persist_preference, 0.4)
        self._read_prompt = Clock.create_trigger(self._prompt_changed, 0.3)
        self._pending_preference: float | None = None
        self._library_rows: tuple[object, ...] | None = None  # what the bundle list shows (rebuilt when it changes)

    @property
    def controller_or_fail(self) -> Controller:
        """The controller, which must be set once the app runs (``main`` sets it before ``run()``)."""
        assert self.controller is not None, "give RiseApp a controller before run()"
        return self.controller

    _ctl = controller_or_fail

    # ----------------------------------------------------------------- Kivy lifecycle

    def build(self) -> ScreenManager:
        from kivy.core.window import Window

        assert self.controller is not None, "give RiseApp a controller before run()"
        self.screens = ScreenManager(transition=NoTransition())
        for screen in (MainScreen(), GalleryScreen(), SettingsScreen()):
            self.screens.add_widget(screen)
        self.controller.subscribe(lambda c: self._sync())
        Window.bind(size=lambda _w, size: self._fit(size))
        self._fit(Window.size)
        self._sync()
        Clock.schedule_interval(lambda dt: self._ctl.refresh_indicators(), 1.5)
        return self.screens

    def _fit(self, size: tuple[int, int]) -> None:
        from kivy.metrics import dp

        width, height = size
        self.ui.wide = bool(width >= dp(720) and width > height)

    def _sync(self) -> None:
        self.ui.sync(self._ctl, self.texture_for, self._preview_texture)
        gallery = self.screens.get_screen("gallery")
        if self.screens.current == "gallery" and len(gallery.ids.grid.children) != len(self._ctl.history):
            gallery.show(self._ctl.history, self.texture_for, self)
        self._show_library()

    def _show_library(self) -> None:
        """The settings screen's list of the library's bundles (rebuilt only when what it shows changed)."""
        c = self._ctl
        library = c.library
        in_use = c.bundle_entry
        rows = () if library is None else tuple(library.bundles)
        key = (rows, None if in_use is None else in_use.name, c.choosing)
        if key == self._library_rows:
            return
        self._library_rows = key
        box = self.screens.get_screen("settings").ids.bundle_list
        box.clear_widgets()
        for bundle in rows:
            box.add_widget(BundleRow(bundle, self, in_use=in_use is not None and bundle.name == in_use.name,
                                     checking=c.choosing == bundle.name))

    def on_start(self) -> None:
        self._ctl.start()
        self._ctl.refresh_indicators()

    def on_stop(self) -> None:
        self._ctl.close()

    # ----------------------------------------------------------------- commands (from rise.kv)

    @property
    def main_ids(self) -> Any:
        return self.screens.get_screen("main").ids

    def primary(self) -> bool:
        """The Generate button: Cancel while an image is in progress."""
        if self._ctl.busy:
            return self._ctl.cancel()
        return self.generate()

    def generate(self) -> bool:
        ids = self.main_ids
        return self._ctl.generate(ids.prompt_input.text, seed=ids.seed_input.text)

    def cancel(self) -> bool:
        return self._ctl.cancel()

    def prompt_typed(self, _text: str) -> None:
        self._read_prompt()  # debounced: read once the typing pauses

    def _prompt_changed(self, _dt: float) -> None:
        ids = self.main_ids
        self._ctl.read_prompt(ids.prompt_input.text, ids.seed_input.text)

    def toggle_details(self) -> None:
        self.ui.show_details = not self.ui.show_details

    def rate(self, rating: int) -> None:
        self._ctl.rate(rating)

    def save(self) -> None:
        self._ctl.save()

    def open_item(self, item: HistoryItem) -> None:
        self._ctl.open_item(item)
        for box, text in ((self.main_ids.prompt_input, item.prompt), (self.main_ids.seed_input, str(item.info.seed))):
            box.text = text
            box.do_cursor_movement("cursor_home")  # show the start of a long prompt, not a stale scroll
        self.show("main")

    def delete_item(self, item: HistoryItem) -> None:
        if self._ctl.delete(item):
            self.screens.get_screen("gallery").show(self._ctl.history, self.texture_for, self)

    def preference_moved(self, value: float) -> None:
        self._pending_preference = value
        self._save_preference()  # debounced: one write when the slider stops

    def _persist_preference(self, _dt: float) -> None:
        pending = self._pending_preference
        if pending is not None and abs(pending - self._ctl.settings.preference) > 1e-6:
            self._ctl.set_preference(pending)
        self._pending_preference = None

    def save_settings(self, server_url: str, token: str, bundle: str, gallery_dir: str, save_dir: str,
                      bundles_dir: str | None = None) -> None:
        changes: dict[str, Any] = dict(server_url=server_url, token=token, bundle=bundle, gallery_dir=gallery_dir,
                                       save_dir=save_dir)
        new_library = bundles_dir is not None and bundles_dir.strip() != self._ctl.settings.bundles_dir
        if bundles_dir is not None:
            changes["bundles_dir"] = bundles_dir
        if self._ctl.update_settings(**changes) and not new_library:
            self.show("main")  # a new bundles folder: stay, its bundles are listed to choose from

    def choose_bundle(self, name: str) -> bool:
        """A bundle row's Use: switch to that bundle of the library (checked in full first)."""
        return self._ctl.choose_bundle(name)

    def show(self, name: str) -> None:
        if name == "gallery":
            self.screens.get_screen("gallery").show(self._ctl.history, self.texture_for, self)
        if name == "settings":
            self._ctl.refresh_library()  # bundles may have come or gone since
        self.screens.current = name

    def texture_for(self, item: HistoryItem) -> Texture | None:
        """One texture per image, made once (its pixels read from the gallery file on first use)."""
        key = id(item)
        if key not in self._textures:
            try:
                self._textures[key] = image_texture(item.image)
            except RiseError as exc:  # the file went away or is broken: a blank cell, not a crash
                log.warning("no image for %s: %s", item.prompt, exc)
                return None
            live = {id(i) for i in self._ctl.history} | {id(self._ctl.current)}
            for stale in [k for k in self._textures if k not in live and k != key]:
                del self._textures[stale]
        return self._textures[key]

    def _preview_texture(self, pixels: np.ndarray) -> Texture:
        if self._preview is None or self._preview[0] != id(pixels):
            self._preview = (id(pixels), image_texture(pixels))
        return self._preview[1]


# --------------------------------------------------------------------------- building it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rise-device app",
        description="The RISE device app: type a prompt, the edge runs the first steps and this device "
                    "the rest; with no edge in reach, the device does it all.",
    )
    parser.add_argument("--bundle", default=None,
                        help="device bundle folder (made by rise-export), or with --bundles the folder name or label "
                             "of one of its bundles; remembered")
    parser.add_argument("--bundles", default=None, metavar="DIR",
                        help="a folder of bundles (one per subfolder) to choose from in Settings; remembered")
    parser.add_argument("--server", default=None, help="edge daemon URL, ws://HOST:PORT; remembered")
    parser.add_argument("--token-file", default=None, help="file holding the edge's access token; remembered")
    parser.add_argument("--settings", default=None,
                        help=f"settings file (default: {SETTINGS_FILE} in the app's user data folder)")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's choice)")
    parser.add_argument("--gallery", default=None,
                        help="gallery folder, kept across restarts (default: gallery/ in the app's user data folder); "
                             "remembered")
    parser.add_argument("--size", default="1000x720",
                        help="window size WxH on a desktop (default 1000x720; the layout fits 360x640 and up)")
    return parser


def resolve_bundle_arg(bundle: str, bundles: str | None = None) -> Path:
    """The folder ``--bundle`` names: with a bundles folder, one of its bundles by folder name or label first,
    else a path; checked quickly (:func:`~device_app.app.backends.check_bundle`, a bad one raises
    :class:`~shared.errors.RiseError`)."""
    if bundles is not None:
        library = scan_library(bundles)
        try:
            folder = library.find(bundle).folder
        except BundleError:
            if not Path(bundle).is_dir():
                raise
            folder = Path(bundle)
    else:
        folder = Path(bundle)
    check_bundle(folder)
    return folder.resolve()


def make_controller(settings_path: str | Path, *, bundle: str | None = None, bundles: str | None = None,
                    threads: int | None = None, schedule: Callable[[Callable[[], None]], None] | None = None,
                    open_timeout: float = 5.0, save_dir: str | Path | None = None,
                    gallery_dir: str | Path | None = None, **changes: Any) -> Controller:
    """A controller with the real backends; ``changes`` (and ``bundle``, ``bundles``) are saved into the settings.

    A ``bundle`` given here is checked first (:func:`resolve_bundle_arg`): a bad one raises
    :class:`~shared.errors.RiseError` and nothing is saved. ``bundles``: the bundles folder Settings lists
    (refused if it cannot be listed). ``gallery_dir`` is the default gallery folder (next to the settings file
    when not given; the settings' ``gallery_dir`` wins).
    """
    store = SettingsStore(settings_path)
    if schedule is None:
        def schedule(callback: Callable[[], None]) -> None:
            Clock.schedule_once(lambda _dt: callback(), 0)  # thread-safe: runs on the UI thread's next frame
    if bundles is not None:
        scan_library(bundles)  # a folder that cannot be listed is refused at start
        changes["bundles_dir"] = str(Path(bundles).expanduser().resolve())
    if bundle is not None:  # refused at start, with what is wrong, not at the first Generate
        changes["bundle"] = str(resolve_bundle_arg(bundle, bundles))
    settings = store.load()
    if changes:
        settings = settings.with_changes(**changes)
        store.save(settings)
    holder = BundleHolder(settings.bundle or None, threads=threads)
    if gallery_dir is None:
        gallery_dir = Path(settings_path).resolve().parent / GALLERY_DIR
    return Controller(store, NetworkBackend(holder, open_timeout=open_timeout, preview_every=APP_PREVIEW_EVERY),
                      OfflineBackend(holder),
                      schedule=schedule, save_dir=save_dir, gallery_dir=gallery_dir, bundles=holder)


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
    if args.bundles is not None:
        try:
            scan_library(args.bundles)
        except RiseError as exc:
            print(f"rise-device app: error: --bundles {args.bundles}: {exc}", file=sys.stderr)
            return 2
    if args.bundle is not None:
        try:  # refused here, before any window, not at the first Generate
            resolve_bundle_arg(args.bundle, args.bundles)
        except RiseError as exc:
            print(f"rise-device app: error: --bundle {args.bundle} is not a usable bundle: {exc}", file=sys.stderr)
            return 2
    try:
        _configure_window(args.size)
        changes: dict[str, Any] = {}
        if args.server is not None:
            changes["server_url"] = args.server
        if args.token_file is not None:
            from device_app.token_file import read_token

            changes["token"] = read_token(args.token_file)
        if args.gallery is not None:
            changes["gallery_dir"] = str(Path(args.gallery).resolve())
        app = RiseApp()
        settings_path = Path(args.settings) if args.settings else Path(app.user_data_dir) / SETTINGS_FILE
        app.controller = make_controller(settings_path, bundle=args.bundle, bundles=args.bundles, threads=args.threads,
                                         **changes)
    except RiseError as exc:
        print(f"rise-device app: error: {exc}", file=sys.stderr)
        return 2
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
