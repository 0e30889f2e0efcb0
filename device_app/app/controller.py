"""The app's logic in plain Python: state, commands, and the backends behind them.

No Kivy here: the Kivy app binds its widgets to this object through a small adapter, and
the tests drive it without a window. Every backend report is re-posted through the
injected ``schedule(callback)`` (Kivy's ``Clock.schedule_once`` in the app, a direct
call in tests), so the state only ever changes on the thread that owns the UI.

Offline fallback: a job whose edge cannot be reached (``EdgeConnectionError`` with code
``connect_failed`` or ``connection_lost``), or an app with no server set, is generated on
the device alone, and its result says so.

The gallery persists: every finished image is written at once to the gallery folder
(:mod:`device_app.app.gallery`, a PNG with its parameters in text chunks) and a new controller
reads the folder back, so the gallery survives a restart.

Several bundles: with a bundles folder in the settings (``bundles_dir``), ``library`` lists its
bundles (:mod:`device_app.bundle_library`: base and personalized ones, the broken ones with a
reason) and :meth:`Controller.choose_bundle` switches to one. The chosen bundle's files are
verified in full (sha256) in a worker before the switch, so a bad one is refused with what is wrong
and the one in use stays; once switched, the edge connection is opened again, since its ``hello``
names the bundle's family.
"""

from __future__ import annotations

import io
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from device_app.app.backends import Backend, BundleHolder, Job, LinkStatus, Outcome, check_bundle
from device_app.app.gallery import MAX_SIDE, Gallery, GalleryEntry, GalleryError, ImageArray, ImageInfo
from device_app.app.prompt_help import PromptHelp, prompt_help_for
from device_app.app.settings import Settings, SettingsStore
from device_app.app.words import details_text, link_help, link_label, loading_text, plain_summary
from device_app.bundle_library import BundleLibrary, LibraryBundle, quick_check_bundle, scan_library
from device_app.errors import CONNECT_FAILED, CONNECTION_LOST, EdgeConnectionError
from device_app.finish import DeviceStepCount
from device_app.telemetry import DeviceLoad
from shared.errors import BundleError, ConfigError, RiseError
from shared.manifest import BundleManifest
from shared.relay_plan import RelayPlan

if TYPE_CHECKING:
    from device_app.runtime import DeviceBundle

__all__ = [
    "MAX_SEED",
    "Controller",
    "HistoryItem",
    "UNREACHABLE",
    "describe_outcome",
    "is_unreachable",
    "parse_seed",
]

log = logging.getLogger("rise.device.app")

Schedule = Callable[[Callable[[], None]], None]
Listener = Callable[["Controller"], None]

UNREACHABLE = "Server unreachable — generating on this device"
NO_SERVER = "No server set — generating on this device"
CANCELLED = "Cancelled"
MAX_SEED = 2**31 - 1  # what every tool accepts (A1111's seed field included)


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` means the edge cannot be reached now (so the device should do it all)."""
    return isinstance(error, EdgeConnectionError) and error.code in (CONNECT_FAILED, CONNECTION_LOST)


def parse_seed(text: str | int | None) -> int | None:
    """The seed field: ``"random"`` or empty -> ``None``; else a whole number in [0, :data:`MAX_SEED`]."""
    if text is None:
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        word = str(text).strip().lower()
        if word in ("", "random"):
            return None
        try:
            value = int(word)
        except ValueError:
            raise ValueError(f"the seed must be a whole number or 'random', got {str(text).strip()!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"the seed must be between 0 and {MAX_SEED}, got {value}")
    return value


def info_for(prompt: str, outcome: Outcome, preference: float, created_at: float,
             notice: str | None = None) -> ImageInfo:
    plan = outcome.plan
    height, width = outcome.image.shape[:2]
    return ImageInfo(
        prompt=prompt, seed=outcome.seed, steps=plan.num_inference_steps, split=plan.split, sampler=plan.sampler,
        guidance=float(plan.guidance_scale), width=outcome.width or int(width), height=outcome.height or int(height),
        family=outcome.family, family_id=outcome.family_id, scheduler=outcome.scheduler, why=outcome.why,
        preference=preference, offline=outcome.offline, edge_s=outcome.edge_s, device_s=outcome.device_s,
        total_s=outcome.total_s, created_at=created_at, request_id=outcome.request_id,
        notice=outcome.notice or notice, personalization_label=outcome.personalization_label,
    )


@dataclass(eq=False)
class HistoryItem:
    """One image in the gallery: how it was made (``info``), its file (``entry``, ``None`` if not kept on disk).

    ``rating`` is the user's -1/+1 (``None``: not rated); ``saved_to`` where the user last saved a copy.
    """

    info: ImageInfo
    entry: GalleryEntry | None = None
    _image: ImageArray | None = field(default=None, repr=False)
    saved_to: Path | None = None

    @property
    def prompt(self) -> str:
        return self.info.prompt

    @property
    def rating(self) -> int | None:
        return self.info.rating

    @property
    def image(self) -> ImageArray:
        """The pixels (read from the gallery file on first use)."""
        if self._image is None:
            if self.entry is None:
                raise GalleryError("this image has neither pixels nor a file")
            self._image = self.entry.image()
        return self._image

    @property
    def summary(self) -> str:
        return plain_summary(self.info)


def describe_outcome(outcome: Outcome, preference: float = 0.5) -> str:
    """The plain two lines for an outcome (where the steps ran and why; the time)."""
    return plain_summary(info_for("", outcome, preference, 0.0))


class _JobSink:
    """Backend reports for one job, re-posted to the UI thread; stale (cancelled) jobs' reports are dropped."""

    def __init__(self, controller: Controller, job: Job) -> None:
        self.controller = controller
        self.job = job

    def _post(self, method: Callable[..., None], *args: object) -> None:
        def call() -> None:
            if self.controller.job is self.job:
                method(self.job, *args)

        self.controller.schedule(call)

    def plan(self, plan: RelayPlan, why: str) -> None:
        self._post(self.controller._on_plan, plan, why)

    def loading(self, seconds: float) -> None:
        self._post(self.controller._on_loading, seconds)

    def progress(self, stage: str, step: int, total: int) -> None:
        self._post(self.controller._on_progress, stage, step, total)

    def preview(self, png: bytes) -> None:
        self._post(self.controller._on_preview, png)

    def done(self, outcome: Outcome) -> None:
        self._post(self.controller._on_done, outcome)

    def failed(self, error: BaseException) -> None:
        self._post(self.controller._on_failed, error)


class Controller:
    """State and commands of the device app.

    State (read it; change it only through the commands): ``settings``, ``status``,
    ``busy``, ``plan`` (the configuration in use), ``edge_progress`` / ``device_progress``
    (done, total), ``current`` (the :class:`HistoryItem` in the result view), ``history`` (the
    gallery, newest first), ``link`` (a :class:`LinkStatus`), ``offline`` (the job in hand runs on
    the device alone), ``device_load`` (0..1 or ``None``), ``bundle_problem`` (why no image can be made,
    or ``None``), ``prompt_note`` (what the family makes of the prompt), ``preview`` (a live preview's
    pixels while busy), ``library`` (the bundles folder's :class:`~device_app.bundle_library.BundleLibrary`,
    ``None`` without one; ``library_problem`` why it cannot be listed), ``choosing`` (the library bundle being
    checked before a switch, or ``None``). ``subscribe(listener)`` calls ``listener(controller)`` after every change.
    """

    RECONNECT_S = 15.0  # how often an offline edge is tried again while the app is idle

    def __init__(self, store: SettingsStore, network: Backend, offline: Backend, *,
                 schedule: Schedule = lambda callback: callback(), save_dir: str | Path | None = None,
                 gallery_dir: str | Path | None = None, bundles: BundleHolder | None = None,
                 device_load: DeviceLoad | None = None, max_history: int = 200,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.network = network
        self.offline_backend = offline
        self.schedule = schedule
        self.bundles = bundles
        self.clock = clock
        self.default_save_dir = Path(save_dir) if save_dir is not None else Path.home() / "Pictures" / "rise"
        self.default_gallery_dir = Path(gallery_dir) if gallery_dir is not None else Path.home() / ".rise" / "gallery"
        self.max_history = max_history
        self._device_load = device_load or DeviceLoad()
        self._listeners: list[Listener] = []
        self._job_ids = itertools.count(1)
        try:
            self.settings = store.load()
            self.status = "Ready"
        except ConfigError as exc:  # a broken settings file must not stop the app: defaults, and say so
            self.settings = Settings()
            self.status = f"Settings not loaded ({exc}); using defaults"
        self.busy = False
        self.job: Job | None = None
        self.plan: RelayPlan | None = None
        self.edge_progress = (0, 0)
        self.device_progress = (0, 0)
        self._device_steps = DeviceStepCount()
        self.current: HistoryItem | None = None
        self.preview: ImageArray | None = None
        self.offline = False
        self.offline_reason = ""
        self.link = LinkStatus("disconnected" if self.settings.server_url else "device_only")
        self.device_load: float | None = None
        self.error: BaseException | None = None
        self.manifest: BundleManifest | None = None
        self.bundle_problem: str | None = None
        self.library: BundleLibrary | None = None
        self.library_problem: str | None = None
        self.choosing: str | None = None
        self.help: PromptHelp = PromptHelp()
        self.prompt_note: str | None = None
        self._noted: tuple[str, int | None] = ("", None)  # (prompt, seed) the note was read for at a Generate
        self._last_connect: float | None = None  # when the last background connection attempt started
        self._job_preference = self.settings.preference
        self._job_note: str | None = None
        self.check_bundle()
        self._scan_library()
        self.gallery = Gallery(self.gallery_dir)
        self.history: list[HistoryItem] = []
        self._load_gallery()

    # ----------------------------------------------------------------- observers

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    # ----------------------------------------------------------------- derived state

    @property
    def gallery_dir(self) -> Path:
        return Path(self.settings.gallery_dir) if self.settings.gallery_dir else self.default_gallery_dir

    @property
    def save_dir(self) -> Path:
        return Path(self.settings.save_dir) if self.settings.save_dir else self.default_save_dir

    @property
    def can_generate(self) -> bool:
        return not self.busy and self.bundle_problem is None

    @property
    def progress(self) -> tuple[int, int]:
        """(steps done, steps in all): the edge's, then the device's, on one bar."""
        total = self.edge_progress[1] + self.device_progress[1]
        return self.edge_progress[0] + self.device_progress[0], total

    @property
    def progress_text(self) -> str:
        if self.plan is None:
            return ""
        (e, et), (d, dt) = self.edge_progress, self.device_progress
        if self.offline or et == 0:
            return f"this device {d}/{dt}"
        return f"server {e}/{et} · this device {d}/{dt}"

    @property
    def link_text(self) -> str:
        """The indicator's words: connecting…, connected, offline, unauthorized, this device only…"""
        return link_label(self.link)

    @property
    def link_help(self) -> str:
        return link_help(self.link)

    @property
    def result_text(self) -> str:
        """The plain two lines under the image (no N, K or scheduler names: those are in ``details_text``)."""
        return "" if self.current is None else self.current.summary

    @property
    def details_text(self) -> str:
        if self.current is None:
            return ""
        return details_text(self.current.info, self.link, self.device_load)

    @property
    def prompt_hint(self) -> str:
        return self.help.hint

    @property
    def bundle_entry(self) -> LibraryBundle | None:
        """The library's entry for the bundle in use (``None``: no library, or a bundle from elsewhere)."""
        return None if self.library is None else self.library.holding(self.settings.bundle)

    @property
    def prompt_line(self) -> str:
        """The line under the prompt box: what was not understood or changed, else what the family can draw."""
        return self.prompt_note or self.help.vocabulary

    # ----------------------------------------------------------------- start-up

    def check_bundle(self) -> BundleManifest | None:
        """Check the bundle in the settings (quickly: manifest and file sizes); sets ``bundle_problem``."""
        try:
            self.manifest = check_bundle(self.settings.bundle or None)
        except RiseError as exc:
            self.manifest, self.bundle_problem = None, str(exc)
        else:
            self.bundle_problem = None
        self.help = prompt_help_for(self.manifest)
        return self.manifest

    def _scan_library(self) -> None:
        folder = self.settings.bundles_dir
        self.library, self.library_problem = None, None
        if folder:
            try:
                self.library = scan_library(folder)
            except RiseError as exc:
                self.library_problem = str(exc)

    def refresh_library(self) -> BundleLibrary | None:
        """List the bundles folder again (the app does it when Settings opens): bundles may have come or gone."""
        self._scan_library()
        self._changed()
        return self.library

    def start(self) -> None:
        """What the app does once its window is up: say what is missing, connect to the server in the background."""
        if self.bundle_problem is not None:
            self.status = f"No usable bundle — choose one in Settings ({self.bundle_problem})"
        self._connect()
        self._changed()

    def _connect(self) -> None:
        s = self.settings
        if not s.server_url:
            self.link = LinkStatus("device_only")
            return
        if self.bundle_problem is not None:  # the hello names the bundle's family: nothing to connect with
            self.link = LinkStatus("disconnected", s.server_url)
            return
        self.link = LinkStatus("connecting", s.server_url)
        self._last_connect = self.clock()

        def done(link: LinkStatus) -> None:
            def show() -> None:
                # a later attempt (another server, another bundle) has the last word
                stale = (self.settings.server_url, self.settings.bundle) != (s.server_url, s.bundle)
                if not stale and not (self.busy and self.offline):
                    self.link = link
                    if link.state in ("unauthorized", "refused") and not self.busy:
                        self.status = self.link_help
                    self._changed()

            self.schedule(show)

        self.network.connect(s.server_url, s.token, done)

    def _load_gallery(self) -> None:
        try:
            entries = self.gallery.entries(self.max_history)
        except GalleryError as exc:
            self.status = f"Gallery not loaded: {exc}"
            entries = []
        self.history = [HistoryItem(e.info, e) for e in entries]

    # ----------------------------------------------------------------- commands

    def update_settings(self, **changes: object) -> bool:
        """Apply and persist settings; ``False`` (and the reason in ``status``) if they are not valid.

        A new ``bundle`` is checked first (a bad one is refused, the old one kept); a new ``gallery_dir``
        shows that folder's images; a new ``bundles_dir`` is listed.
        """
        return self._apply_settings(changes)

    def _apply_settings(self, changes: dict[str, object], loaded: DeviceBundle | None = None) -> bool:
        """:meth:`update_settings`; ``loaded``: the new ``bundle``'s bundle, verified in full (switch to it even if
        the path is the one in use: a chosen bundle is checked again)."""
        if self.busy and set(changes) & {"bundle", "server_url", "token"}:
            self.status = "Settings not saved: wait for the image in progress (or cancel it)"
            self._changed()
            return False
        try:
            settings = self.settings.with_changes(**changes)
            if settings.bundle and settings.bundle != self.settings.bundle:
                check_bundle(settings.bundle)
            self.store.save(settings)
        except (RiseError, TypeError) as exc:
            self.status = f"Settings not saved: {exc}"
            self._changed()
            return False
        old = self.settings
        self.settings = settings
        switched = settings.bundle != old.bundle or loaded is not None
        if switched:
            if self.bundles is not None:
                self.bundles.set_folder(settings.bundle or None, bundle=loaded)
            self.check_bundle()
        if settings.gallery_dir != old.gallery_dir:
            self.gallery = Gallery(self.gallery_dir)
            self._load_gallery()
            self.current = None
        if settings.bundles_dir != old.bundles_dir:
            self._scan_library()
        if switched or (settings.server_url, settings.token) != (old.server_url, old.token):
            self._connect()  # the hello names the bundle's family: another bundle, a new connection
        if set(changes) - {"preference"}:
            self.status = "Settings saved"
        self._changed()
        return True

    def choose_bundle(self, key: str) -> bool:
        """Switch to the library's bundle whose folder name or label is ``key``; ``False`` (why in ``status``) if not.

        The bundle is checked quickly here, then in full (every file's sha256) in a worker; the switch happens when
        that check passes (``choosing`` names the bundle until then). A bundle that fails it is refused with what is
        wrong, and the one in use stays.
        """
        if self.busy:
            self.status = "Bundle not changed: wait for the image in progress (or cancel it)"
            self._changed()
            return False
        try:
            if self.library is None:
                raise ConfigError(self.library_problem or "no bundles folder set: set one in Settings "
                                                          "or start with --bundles DIR")
            entry = self.library.find(key)
            quick_check_bundle(entry.folder)  # it may have changed since it was listed
        except RiseError as exc:
            self.status = f"Bundle not changed: {exc}"
            self._changed()
            return False
        if self.bundles is None:  # no holder to load it into (a controller without real backends): switch now
            return self._bundle_checked(entry, None, None)
        self.choosing = entry.name
        self.status = f"Checking {entry.label}…"
        self._changed()

        def done(bundle: DeviceBundle | None, error: BaseException | None) -> None:
            def switch() -> None:
                self._bundle_checked(entry, bundle, error)

            self.schedule(switch)

        self.bundles.load_in_background(entry.folder, done)
        return True

    def _bundle_checked(self, entry: LibraryBundle, bundle: DeviceBundle | None, error: BaseException | None) -> bool:
        if self.bundles is not None and self.choosing != entry.name:
            return False  # a later choice replaced this one
        self.choosing = None
        if error is not None:
            what = error if isinstance(error, RiseError) else f"{type(error).__name__}: {error}"
            self.status = f"Bundle {entry.label!r} not used: {what}"
            self._changed()
            return False
        if not self._apply_settings({"bundle": str(entry.folder)}, loaded=bundle):
            return False
        self.status = f"Using {entry.label} ({entry.kind_text}, family {entry.family_name})"
        self._changed()
        return True

    def set_preference(self, preference: float) -> bool:
        """The quality↔speed slider (0 = fastest .. 1 = best quality), persisted."""
        return self.update_settings(preference=round(float(preference), 3))

    def read_prompt(self, text: str, seed: str | int | None = None) -> str | None:
        """What the family makes of ``text`` (shown under the prompt box as the user types); the note or ``None``."""
        try:
            fixed = parse_seed(seed)
        except ValueError:
            fixed = None
        if (text.strip(), fixed) == self._noted or (fixed is None and text.strip() == self._noted[0]):
            return self.prompt_note  # the note of the generation made from this text (its real seed) stays
        self._noted = ("", None)
        self.prompt_note = self.help.read(text, 0 if fixed is None else fixed).message
        self._changed()
        return self.prompt_note

    def generate(self, prompt: str, *, seed: str | int | None = None) -> bool:
        """Start a generation; ``False`` if one is running, the prompt is empty, the seed or the bundle is bad.

        ``seed``: an int, ``"random"``/``None`` (drawn here, so the prompt note and the picture agree).
        """
        prompt = prompt.strip()
        if self.busy:
            return False
        if self.bundle_problem is not None:
            self.status = f"No usable bundle — choose one in Settings ({self.bundle_problem})"
            self._changed()
            return False
        if not prompt:
            self.status = "Type a prompt first"
            self._changed()
            return False
        try:
            fixed = parse_seed(seed)
        except ValueError as exc:
            self.status = f"{str(exc)[0].upper()}{str(exc)[1:]}"
            self._changed()
            return False
        used_seed = secrets.randbelow(MAX_SEED + 1) if fixed is None else fixed
        reading = self.help.read(prompt, used_seed)
        self.prompt_note = self._job_note = reading.message
        self._noted = (prompt, used_seed)
        if not reading.drawable:  # a blank picture helps nobody: say what the family can draw instead
            self.status = "Nothing to draw: see the note under the prompt"
            self._changed()
            return False
        s = self.settings
        self._job_preference = s.preference
        job = Job(next(self._job_ids), prompt, s.preference, s.server_url, s.token, used_seed,
                  s.offline_min_steps, s.offline_max_steps, model_prompt=reading.prompt)
        self.job, self.busy, self.error, self.preview = job, True, None, None
        self._reset_progress()
        if s.server_url:
            self.offline = False
            self.status = "Asking the server…"
            self._changed()
            self.network.submit(job, _JobSink(self, job))
        else:
            self._go_offline(job, NO_SERVER)
        return True

    def cancel(self) -> bool:
        """Stop the generation in progress (the server is told and frees the slot); ``False`` if none runs."""
        job = self.job
        if job is None or not self.busy:
            return False
        backend = self.offline_backend if self.offline else self.network
        self.job, self.busy, self.preview = None, False, None  # from now on, the job's reports are dropped
        self._reset_progress()
        self.offline = False
        backend.cancel(job.job_id)
        self.status = CANCELLED
        self._changed()
        return True

    def show_preview(self, png: bytes) -> bool:
        """Show a live preview (PNG bytes, e.g. from a progress event) in the image area while busy."""
        from PIL import Image

        if not self.busy:
            return False
        try:
            with Image.open(io.BytesIO(png)) as image:
                if image.format != "PNG" or max(image.size) > MAX_SIDE:
                    raise ValueError(f"not a PNG of at most {MAX_SIDE} a side")
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.info("preview ignored: %s", exc)
            return False
        self.preview = pixels
        self._changed()
        return True

    def rate(self, rating: int, item: HistoryItem | None = None) -> bool:
        """Thumbs up (+1) or down (-1) for ``item`` (default: the current image), kept and sent to the edge."""
        if rating not in (-1, 1):
            raise ValueError(f"rating must be -1 or +1, got {rating!r}")
        item = item or self.current
        if item is None:
            return False
        self._update(item, rating=rating)
        if item.info.offline:
            self.status = "Rated (kept on this device: the image was made offline)"
            self._changed()
            return True
        self.status = "Sending your rating…"
        self._changed()

        def done(error: BaseException | None) -> None:
            def show() -> None:
                self.status = "Rating sent to the server" if error is None else f"Rating kept here, not sent: {error}"
                self._changed()

            self.schedule(show)

        self.network.rate(item.info.request_id, rating, done)
        return True

    def _update(self, item: HistoryItem, **changes: object) -> None:
        item.info = replace(item.info, **changes)  # type: ignore[arg-type]  # the fields named are ImageInfo's
        if item.entry is not None:
            try:
                item.entry = self.gallery.update(item.entry, **changes)
            except GalleryError as exc:
                log.warning("gallery: %s", exc)

    def open_item(self, item: HistoryItem) -> None:
        """Show a gallery image in the result view."""
        self.current = item
        self.prompt_note = item.info.notice
        self._noted = (item.prompt, item.info.seed)
        self._changed()

    def delete(self, item: HistoryItem) -> bool:
        """Remove an image from the gallery (and its file)."""
        if item.entry is not None:
            try:
                self.gallery.delete(item.entry)
            except GalleryError as exc:
                self.status = f"Not deleted: {exc}"
                self._changed()
                return False
        self.history = [h for h in self.history if h is not item]
        if self.current is item:
            self.current = None
        self.status = "Deleted"
        self._changed()
        return True

    def save(self, item: HistoryItem | None = None, folder: str | Path | None = None) -> Path | None:
        """Save a copy of ``item`` (default: the current image), parameters included, to ``folder``
        (default: the save folder in Settings, else ``~/Pictures/rise``)."""
        item = item or self.current
        if item is None:
            return None
        target_dir = Path(folder) if folder is not None else self.save_dir
        try:
            if item.entry is not None and item.entry.path.is_file():
                path = self.gallery.export(item.entry, target_dir)
            else:
                path = Gallery(target_dir).add(item.image, item.info).path
        except GalleryError as exc:
            self.status = f"Not saved: {exc}"
            self._changed()
            return None
        item.saved_to = path
        self.status = f"Saved {path}"
        self._changed()
        return path

    def refresh_indicators(self) -> None:
        """Sample the link and the device's load (the app calls this every second or two).

        An edge found offline is tried again in the background every :attr:`RECONNECT_S` seconds while idle, so the
        indicator turns "connected" when it comes back, before the next Generate.
        """
        if not self.settings.server_url:
            self.link = LinkStatus("device_only")
        elif not (self.offline and self.busy):
            link = self.network.link()
            # "not tried yet" says nothing new: keep what the last attempt found (offline, unauthorized...)
            if link.state != "disconnected" or self.link.state in ("connected", "connecting"):
                self.link = link
        if (self.link.state == "offline" and not self.busy and self.bundle_problem is None
                and (self._last_connect is None or self.clock() - self._last_connect >= self.RECONNECT_S)):
            self._connect()
        self.device_load = self._device_load.sample()
        self._changed()

    def close(self) -> None:
        self.job = None
        for backend in (self.network, self.offline_backend):
            try:
                backend.close()
            except Exception:  # closing must not fail the app's exit
                log.exception("closing %s failed", type(backend).__name__)

    # ----------------------------------------------------------------- backend reports (UI thread)

    def _reset_progress(self) -> None:
        self.plan = None
        self.edge_progress = (0, 0)
        self.device_progress = (0, 0)

    def _go_offline(self, job: Job, why: str) -> None:
        self.offline = True
        self.offline_reason = why
        self.link = LinkStatus("offline" if why == UNREACHABLE else "device_only", job.server_url)
        self.status = why
        self._reset_progress()
        self._changed()
        self.offline_backend.submit(job, _JobSink(self, job))

    def _on_plan(self, job: Job, plan: RelayPlan, why: str) -> None:
        self.plan = plan
        self.edge_progress = (0, plan.edge_steps)
        self.device_progress = (0, plan.device_steps)
        self._device_steps.reset(plan)
        if not self.offline:
            if plan.edge_steps and plan.device_steps:
                self.status = f"The server runs {plan.edge_steps} steps, then this device {plan.device_steps}"
            elif plan.device_steps:
                self.status = f"This device runs all {plan.device_steps} steps"
            else:
                self.status = f"The server runs all {plan.edge_steps} steps"
        self._changed()

    def _on_loading(self, job: Job, seconds: float) -> None:
        """The edge loads the family first (it was not in memory): say so, and how long it expects."""
        if self.plan is None or self.offline:
            return
        self.status = loading_text(seconds)
        self._changed()

    def _on_progress(self, job: Job, stage: str, step: int, total: int) -> None:
        if self.plan is None:
            return
        if stage == "edge":
            self.edge_progress = (min(step, self.plan.edge_steps), self.plan.edge_steps)
            if not self.offline:
                self.status = f"Server: step {step} of {self.plan.edge_steps}"
        else:
            done, steps = self._device_steps.count(step, total)
            start = self._device_steps.start  # where the handoff happened: the edge's part is done
            self.edge_progress = (start, start) if start else self.edge_progress
            self.device_progress = (done, steps)
            self.status = f"This device: step {done} of {steps}"
        self._changed()

    def _on_preview(self, job: Job, png: bytes) -> None:
        self.show_preview(png)

    def _on_done(self, job: Job, outcome: Outcome) -> None:
        info = info_for(job.prompt, outcome, self._job_preference, self.clock(), self._job_note)
        if outcome.offline:  # why it ran here, in the user's words
            info = replace(info, why="the server is unreachable" if self.offline_reason == UNREACHABLE
                           else "no server set")
        item = HistoryItem(info, None, outcome.image)
        kept = ""
        try:
            item.entry = self.gallery.add(outcome.image, info)
        except GalleryError as exc:
            kept = f" (not kept in the gallery: {exc})"
        self.current = item
        self.history.insert(0, item)
        del self.history[self.max_history:]
        self.plan = outcome.plan
        self.edge_progress = (outcome.plan.edge_steps, outcome.plan.edge_steps)
        self.device_progress = (outcome.plan.device_steps, outcome.plan.device_steps)
        self.busy, self.job, self.preview = False, None, None
        if outcome.notice:  # the edge's reading replaces the local one
            self.prompt_note = outcome.notice
        if outcome.offline:
            why = "server unreachable" if self.offline_reason == UNREACHABLE else "no server set"
            self.status = f"Done in {outcome.total_s:.2f} s on this device ({why}){kept}"
        else:
            self.status = f"Done in {outcome.total_s:.2f} s{kept}"
            self.link = self.network.link()
        self._changed()

    def _on_failed(self, job: Job, error: BaseException) -> None:
        if not self.offline and is_unreachable(error):
            log.info("edge unreachable (%s): generating on the device", error)
            self._go_offline(job, UNREACHABLE)
            return
        self.error = error
        self.busy, self.job, self.preview = False, None, None
        self._reset_progress()
        if getattr(error, "code", None) == "unauthorized":
            self.link = LinkStatus("unauthorized", job.server_url, detail=str(error))
        what = error if isinstance(error, RiseError) else f"{type(error).__name__}: {error}"
        self.status = f"Failed: {what}"
        if isinstance(error, BundleError):  # the bundle cannot be loaded (a file changed, a graph unreadable)
            self.bundle_problem = str(error)
            self.status += " — choose another bundle in Settings"
        self._changed()
