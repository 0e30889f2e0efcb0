"""The app's logic in plain Python: state, commands, and the backends behind them.

No Kivy here: the Kivy app binds its widgets to this object through a small adapter, and
the tests drive it without a window. Every backend report is re-posted through the
injected ``schedule(callback)`` (Kivy's ``Clock.schedule_once`` in the app, a direct
call in tests), so the state only ever changes on the thread that owns the UI.

Offline fallback: a job whose edge cannot be reached (``EdgeConnectionError`` with code
``connect_failed`` or ``connection_lost``), or an app with no server set, is generated on
the device alone, and its result says so.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_app.app.backends import Backend, Job, LinkStatus, Outcome
from device_app.app.settings import Settings, SettingsStore
from device_app.errors import CONNECT_FAILED, CONNECTION_LOST, EdgeConnectionError
from device_app.telemetry import DeviceLoad
from shared.errors import ConfigError, RiseError
from shared.relay_plan import RelayPlan

__all__ = ["Controller", "HistoryItem", "UNREACHABLE", "describe_outcome", "is_unreachable"]

log = logging.getLogger("rise.device.app")

Schedule = Callable[[Callable[[], None]], None]
Listener = Callable[["Controller"], None]

UNREACHABLE = "Edge unreachable — generating on this device"
NO_SERVER = "No edge server set — generating on this device"
OFFLINE_NOTE = "device only (offline)"


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error`` means the edge cannot be reached now (so the device should do it all)."""
    return isinstance(error, EdgeConnectionError) and error.code in (CONNECT_FAILED, CONNECTION_LOST)


@dataclass
class HistoryItem:
    """One image in the gallery. ``rating`` is the user's -1/+1 (``None``: not rated)."""

    prompt: str
    outcome: Outcome
    created_at: float = field(default_factory=time.time)
    rating: int | None = None
    saved_to: Path | None = None

    @property
    def image(self) -> np.ndarray:
        return self.outcome.image

    @property
    def summary(self) -> str:
        return describe_outcome(self.outcome)


def describe_plan(plan: RelayPlan) -> str:
    return (f"N={plan.num_inference_steps} K={plan.split} (edge {plan.edge_steps} · device {plan.device_steps} steps), "
            f"{plan.sampler}, guidance {plan.guidance_scale:g}")


def describe_outcome(outcome: Outcome) -> str:
    """Two lines: what was chosen, and where the time went."""
    if outcome.offline:
        chosen = f"{OFFLINE_NOTE}: {describe_plan(outcome.plan)}"
        times = f"edge — · device {outcome.device_s:.2f} s · total {outcome.total_s:.2f} s"
    else:
        chosen = f"{describe_plan(outcome.plan)} — chosen by {outcome.scheduler}"
        edge = "—" if outcome.edge_s is None else f"{outcome.edge_s:.2f} s"
        times = f"edge {edge} · device {outcome.device_s:.2f} s · total {outcome.total_s:.2f} s"
    return f"{chosen}\n{times}"


class _JobSink:
    """Backend reports for one job, re-posted to the UI thread; stale jobs' reports are dropped."""

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

    def progress(self, stage: str, step: int, total: int) -> None:
        self._post(self.controller._on_progress, stage, step, total)

    def done(self, outcome: Outcome) -> None:
        self._post(self.controller._on_done, outcome)

    def failed(self, error: BaseException) -> None:
        self._post(self.controller._on_failed, error)


class Controller:
    """State and commands of the device app.

    State (read it; change it only through the commands): ``settings``, ``status``,
    ``busy``, ``plan`` (the configuration in use), ``edge_progress`` / ``device_progress``
    (done, total), ``current`` (the latest :class:`HistoryItem`), ``history`` (newest
    first), ``link`` (a :class:`LinkStatus`), ``offline`` (the job in hand runs on the
    device alone), ``device_load`` (0..1 or ``None``). ``subscribe(listener)`` calls
    ``listener(controller)`` after every change.
    """

    def __init__(self, store: SettingsStore, network: Backend, offline: Backend, *,
                 schedule: Schedule = lambda callback: callback(), save_dir: str | Path | None = None,
                 device_load: DeviceLoad | None = None, max_history: int = 50) -> None:
        self.store = store
        self.network = network
        self.offline_backend = offline
        self.schedule = schedule
        self.default_save_dir = Path(save_dir) if save_dir is not None else Path.home() / "Pictures" / "rise"
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
        self.current: HistoryItem | None = None
        self.history: list[HistoryItem] = []
        self.offline = False
        self.offline_reason = ""
        self.link = LinkStatus("disconnected" if self.settings.server_url else "offline")
        self.device_load: float | None = None
        self.error: BaseException | None = None

    # ----------------------------------------------------------------- observers

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    # ----------------------------------------------------------------- derived state

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
        edge = "edge —" if self.offline else f"edge {e}/{et}"
        return f"{edge} · device {d}/{dt}"

    @property
    def link_text(self) -> str:
        link = self.link
        if link.state == "connected":
            ms = None if link.rtt_s is None else link.rtt_s * 1000
            rtt = "" if ms is None else f", rtt {ms:.1f} ms" if ms < 10 else f", rtt {ms:.0f} ms"
            return f"edge: connected{rtt}"
        if link.state == "offline" or self.offline:
            return "edge: offline (device only)"
        return "edge: not connected"

    @property
    def load_text(self) -> str:
        return "device load: —" if self.device_load is None else f"device load: {100 * self.device_load:.0f}%"

    @property
    def result_text(self) -> str:
        return "" if self.current is None else self.current.summary

    # ----------------------------------------------------------------- commands

    def update_settings(self, **changes: object) -> bool:
        """Apply and persist settings; ``False`` (and the reason in ``status``) if they are not valid."""
        try:
            settings = self.settings.with_changes(**changes)
            self.store.save(settings)
        except (ConfigError, TypeError) as exc:
            self.status = f"Settings not saved: {exc}"
            self._changed()
            return False
        self.settings = settings
        if not self.busy:
            self.link = LinkStatus("disconnected" if settings.server_url else "offline")
            if set(changes) - {"preference"}:
                self.status = "Settings saved"
        self._changed()
        return True

    def set_preference(self, preference: float) -> bool:
        """The quality↔speed slider (0 = fastest .. 1 = best quality), persisted."""
        return self.update_settings(preference=round(float(preference), 3))

    def generate(self, prompt: str, *, seed: int | None = None) -> bool:
        """Start a generation; ``False`` if one is running or the prompt is empty."""
        prompt = prompt.strip()
        if self.busy:
            return False
        if not prompt:
            self.status = "Type a prompt first"
            self._changed()
            return False
        s = self.settings
        job = Job(next(self._job_ids), prompt, s.preference, s.server_url, s.token, seed,
                  s.offline_min_steps, s.offline_max_steps)
        self.job, self.busy, self.error = job, True, None
        self._reset_progress()
        if s.server_url:
            self.offline = False
            self.status = f"Asking the edge at {s.server_url}…"
            self._changed()
            self.network.submit(job, _JobSink(self, job))
        else:
            self._go_offline(job, NO_SERVER)
        return True

    def rate(self, rating: int, item: HistoryItem | None = None) -> bool:
        """Thumbs up (+1) or down (-1) for ``item`` (default: the current image), sent to the edge."""
        if rating not in (-1, 1):
            raise ValueError(f"rating must be -1 or +1, got {rating!r}")
        item = item or self.current
        if item is None:
            return False
        item.rating = rating
        if item.outcome.offline:
            self.status = "Rated (kept on this device: the image was made offline)"
            self._changed()
            return True
        self.status = "Sending your rating…"
        self._changed()

        def done(error: BaseException | None) -> None:
            def show() -> None:
                self.status = "Rating sent to the edge" if error is None else f"Rating not sent: {error}"
                self._changed()

            self.schedule(show)

        self.network.rate(item.outcome.request_id, rating, done)
        return True

    def save(self, item: HistoryItem | None = None, path: str | Path | None = None) -> Path | None:
        """Write ``item`` (default: the current image) as PNG to ``path`` (default: the save folder)."""
        from PIL import Image  # the device extra ships pillow

        item = item or self.current
        if item is None:
            return None
        if path is None:
            folder = Path(self.settings.save_dir) if self.settings.save_dir else self.default_save_dir
            slug = re.sub(r"[^a-z0-9]+", "-", item.prompt.lower()).strip("-")[:40] or "image"
            path = folder / f"rise-{time.strftime('%Y%m%d-%H%M%S', time.localtime(item.created_at))}-{slug}.png"
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(item.image).save(path, format="PNG")
        except OSError as exc:
            self.status = f"Not saved: {exc.strerror or exc}"
            self._changed()
            return None
        item.saved_to = path
        self.status = f"Saved {path}"
        self._changed()
        return path

    def refresh_indicators(self) -> None:
        """Sample the link and the device's load (the app calls this every second or two)."""
        self.link = self.offline_backend.link() if (self.offline and self.busy) else self.network.link()
        if not self.settings.server_url:
            self.link = LinkStatus("offline")
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
        self.link = LinkStatus("offline")
        self.status = why
        self._reset_progress()
        self._changed()
        self.offline_backend.submit(job, _JobSink(self, job))

    def _on_plan(self, job: Job, plan: RelayPlan, why: str) -> None:
        self.plan = plan
        self.edge_progress = (0, plan.edge_steps)
        self.device_progress = (0, plan.device_steps)
        if not self.offline:
            self.status = f"Edge chose N={plan.num_inference_steps}, K={plan.split}: {why}"
        self._changed()

    def _on_progress(self, job: Job, stage: str, step: int, total: int) -> None:
        if self.plan is None:
            return
        if stage == "edge":
            self.edge_progress = (min(step, self.plan.edge_steps), self.plan.edge_steps)
            if not self.offline:
                self.status = f"Edge step {step} of {self.plan.edge_steps}"
        else:  # device steps count from K + 1 to N
            done = min(max(step - self.plan.split, 0), self.plan.device_steps)
            self.edge_progress = (self.plan.edge_steps, self.plan.edge_steps)
            self.device_progress = (done, self.plan.device_steps)
            where = "Offline: device" if self.offline else "Device"
            self.status = f"{where} step {done} of {self.plan.device_steps}"
        self._changed()

    def _on_done(self, job: Job, outcome: Outcome) -> None:
        item = HistoryItem(job.prompt, outcome)
        self.current = item
        self.history.insert(0, item)
        del self.history[self.max_history:]
        self.plan = outcome.plan
        self.edge_progress = (outcome.plan.edge_steps, outcome.plan.edge_steps)
        self.device_progress = (outcome.plan.device_steps, outcome.plan.device_steps)
        self.busy, self.job = False, None
        if outcome.offline:
            why = "edge unreachable" if self.offline_reason == UNREACHABLE else "no edge server set"
            self.status = f"Done in {outcome.total_s:.2f} s — {OFFLINE_NOTE}: {why}"
        else:
            self.status = f"Done in {outcome.total_s:.2f} s (edge + device)"
        if not outcome.offline:
            self.link = self.network.link()
        self._changed()

    def _on_failed(self, job: Job, error: BaseException) -> None:
        if not self.offline and is_unreachable(error):
            log.info("edge unreachable (%s): generating on the device", error)
            self._go_offline(job, UNREACHABLE)
            return
        self.error = error
        self.busy, self.job = False, None
        self._reset_progress()
        what = error if isinstance(error, RiseError) else f"{type(error).__name__}: {error}"
        self.status = f"Failed: {what}"
        self._changed()
