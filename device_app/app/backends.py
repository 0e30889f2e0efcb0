"""Where the app's long work runs: never on the UI thread.

A backend takes a :class:`Job` and reports back through a :class:`Sink` (plan, progress,
done, failed), calling it from its worker thread; the controller re-posts every call to
the UI thread. Two backends:

* :class:`NetworkBackend`: an asyncio loop in a worker thread holding one
  :class:`~device_app.client.EdgeClient`, connected lazily on the first job and again
  after a failure (or when the server URL or token changes);
* :class:`OfflineBackend`: device-only generation (:mod:`device_app.app.offline`) in a
  worker thread.

Both share one :class:`BundleHolder` (the bundle is verified and loaded once, in a worker;
:meth:`BundleHolder.check` is the quick check the app runs at start and in Settings;
:meth:`BundleHolder.load_in_background` verifies a bundle chosen from the library before the app
switches to it).
Both can :meth:`~Backend.cancel` a job: the network backend cancels its request task, which tells
the edge (``cancel``; the edge frees the slot); the offline backend stops at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from device_app.app.offline import OFFLINE_WHY, generate_offline, offline_plan
from device_app.bundle_library import quick_check_bundle
from device_app.client import EdgeClient
from device_app.errors import CONNECT_FAILED, EdgeConnectionError, EdgeError, EdgeTimeout
from device_app.results import GenerationResult
from device_app.runtime import DeviceBundle
from device_app.telemetry import LinkSnapshot
from shared.errors import ConfigError, RiseError
from shared.manifest import BundleManifest
from shared.relay_plan import RelayPlan

__all__ = [
    "Backend",
    "BundleHolder",
    "Job",
    "JobCancelled",
    "LinkStatus",
    "NetworkBackend",
    "OfflineBackend",
    "Outcome",
    "Sink",
]


@dataclass(frozen=True)
class Job:
    """One generation the user asked for.

    ``prompt`` is what the user typed; ``model_prompt`` what the family is given, on the edge and on the device
    alike (for a family with a grammar, its reading of the prompt: items placed, cut to the limit, so the picture is
    what the note under the prompt box says), default ``prompt``.
    """

    job_id: int
    prompt: str
    preference: float
    server_url: str = ""
    token: str = ""
    seed: int | None = None
    offline_min_steps: int = 8
    offline_max_steps: int = 25
    model_prompt: str | None = None

    @property
    def given(self) -> str:
        """The prompt the family is given."""
        return self.prompt if self.model_prompt is None else self.model_prompt


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value
class Outcome:
    """A finished image and what was chosen for it.

    ``edge_s`` is the edge's compute (its own figure, or the wait for the handoff when
    it did not say; ``None`` offline); ``device_s`` the device's steps plus decode (and,
    offline, the text encoding); ``total_s`` prompt sent -> image ready. ``offline``: made
    on the device alone.
    """

    request_id: str
    image: np.ndarray = field(repr=False)
    plan: RelayPlan
    seed: int
    scheduler: str
    why: str
    edge_s: float | None
    device_s: float
    total_s: float
    offline: bool
    width: int = 0
    height: int = 0
    family: str = ""
    family_id: str = ""
    notice: str | None = None  # the edge's reading of the prompt (``plan.notice``), when it sent one
    personalization_label: str = ""  # a personalized bundle's label (its small UNet is the user's); "": the family's

    @classmethod
    def from_result(cls, result: GenerationResult, bundle: DeviceBundle | None = None) -> Outcome:
        """The outcome of a relayed or device-only (``result.offline``) generation; ``bundle`` names the family."""
        t = result.timings
        if result.offline:
            edge_s = None
        else:
            edge_s = t.edge_compute_s if t.edge_compute_s is not None else t.edge_wait_s
        notice = getattr(result.plan, "notice", None)  # an optional field of newer edges' plans
        personalization = None if bundle is None else bundle.manifest.personalization
        return cls(
            request_id=result.request_id, image=result.image, plan=result.plan.plan, seed=result.plan.seed,
            scheduler=result.plan.scheduler, why=result.plan.why, edge_s=edge_s, device_s=t.device_s,
            total_s=t.total_latency_s, offline=result.offline, width=result.plan.width, height=result.plan.height,
            family="" if bundle is None else bundle.manifest.family_name,
            family_id="" if bundle is None else bundle.family_id,
            notice=notice if isinstance(notice, str) and notice else None,
            personalization_label="" if personalization is None else personalization.label,
        )


class Sink(Protocol):
    """How a backend reports on a job (called from its worker thread)."""

    def plan(self, plan: RelayPlan, why: str) -> None: ...

    def loading(self, seconds: float) -> None: ...  # the edge loads the family first (its estimate)

    def progress(self, stage: str, step: int, total: int) -> None: ...

    def preview(self, png: bytes) -> None: ...

    def done(self, outcome: Outcome) -> None: ...

    def failed(self, error: BaseException) -> None: ...


#: The link indicator's states: no server set (``device_only``); trying (``connecting``); ``connected``; the edge
#: cannot be reached or the connection was lost (``offline``); the edge refused the token (``unauthorized``); the edge
#: refused this device for another reason, e.g. another family (``refused``); not tried yet (``disconnected``).
LINK_STATES = ("device_only", "disconnected", "connecting", "connected", "offline", "unauthorized", "refused")


@dataclass(frozen=True)
class LinkStatus:
    """What the link indicator shows: ``state`` is one of :data:`LINK_STATES`; ``detail`` says why (errors)."""

    state: str
    server: str = ""
    rtt_s: float | None = None
    bandwidth_bps: float | None = None
    detail: str = ""


class JobCancelled(RiseError):
    """The user cancelled the job (raised inside a worker to stop it; never shown as a failure)."""


def link_for_error(error: BaseException, server: str = "") -> LinkStatus:
    """The indicator's state after a connection attempt failed with ``error``."""
    code = getattr(error, "code", "")
    detail = error.message if isinstance(error, EdgeError) else str(error)
    if code == "unauthorized":
        return LinkStatus("unauthorized", server, detail=detail)
    if isinstance(error, EdgeConnectionError) and code not in (CONNECT_FAILED, "connection_lost"):
        return LinkStatus("refused", server, detail=detail)
    if isinstance(error, (EdgeConnectionError, EdgeTimeout)):
        return LinkStatus("offline", server, detail=detail)
    return LinkStatus("refused", server, detail=detail)


class Backend(Protocol):
    def submit(self, job: Job, sink: Sink) -> None:
        """Start ``job`` in the background; return at once."""

    def rate(self, request_id: str, rating: int, done: Callable[[BaseException | None], None]) -> None:
        """Send a rating in the background; ``done(error or None)`` from the worker."""

    def connect(self, url: str, token: str, done: Callable[[LinkStatus], None]) -> None:
        """Connect in the background (nothing to do for a backend without a link); ``done(link)`` from the worker."""

    def cancel(self, job_id: int) -> None:
        """Stop ``job_id`` if it is still running (its sink may still hear of it: the controller drops that)."""

    def link(self) -> LinkStatus: ...

    def close(self) -> None: ...


class BundleHolder:
    """The device bundle, loaded (and sha256-verified) once, on first use, in whichever worker asks first."""

    def __init__(self, folder: str | Path | None = None, *, bundle: DeviceBundle | None = None,
                 threads: int | None = None) -> None:
        self.folder = None if folder is None else Path(folder)
        self.threads = threads
        self._bundle = bundle
        self._lock = threading.Lock()

    def check(self) -> BundleManifest:
        """The quick check (no hashing, no ONNX session): the folder, its manifest, every listed file at its size.

        Raises :class:`~shared.errors.BundleError` (or ``ConfigError`` when no bundle is set), saying what is
        wrong; the full sha256 check runs when the bundle is loaded (:meth:`get`, :meth:`load_in_background`).
        """
        if self._bundle is not None:
            return self._bundle.manifest
        return check_bundle(self.folder)

    def set_folder(self, folder: str | Path | None, *, bundle: DeviceBundle | None = None) -> None:
        """Use another bundle from the next job on (the loaded one is dropped).

        ``bundle``: that folder's bundle, already verified and loaded (:meth:`load_in_background`), kept.
        """
        with self._lock:
            self.folder = None if folder is None or not str(folder) else Path(folder)
            self._bundle = bundle if bundle is not None and self.folder is not None else None

    def load_in_background(self, folder: str | Path,
                           done: Callable[[DeviceBundle | None, BaseException | None], None]) -> None:
        """Verify (every file's sha256) and load ``folder``'s bundle in a worker thread, without switching to it.

        ``done(bundle, None)`` or ``done(None, error)`` from that thread; hand the bundle to :meth:`set_folder`.
        """
        def run() -> None:
            try:
                bundle = DeviceBundle(folder, threads=self.threads)
            except Exception as exc:  # reported to the UI: a bad bundle is a message, not a dead thread
                done(None, exc)
            else:
                done(bundle, None)

        threading.Thread(target=run, name="rise-app-bundle-check", daemon=True).start()

    def get(self) -> DeviceBundle:
        with self._lock:
            if self._bundle is None:
                if self.folder is None or not str(self.folder):
                    raise ConfigError("no device bundle set: start with --bundle BUNDLE (a rise-export folder)")
                self._bundle = DeviceBundle(self.folder, threads=self.threads)
            return self._bundle


def check_bundle(folder: str | Path | None) -> BundleManifest:
    """:meth:`BundleHolder.check` for ``folder`` (:func:`~device_app.bundle_library.quick_check_bundle`)."""
    if folder is None or not str(folder):
        raise ConfigError("no device bundle set: choose one in Settings or start with --bundle BUNDLE "
                          "(a folder made by rise-export)")
    return quick_check_bundle(folder)


#: The app asks the edge for a live preview every this many steps (its own steps are drawn as often).
APP_PREVIEW_EVERY = 2


class NetworkBackend:
    """Generations through an edge daemon, on an asyncio loop in one worker thread."""

    def __init__(self, bundles: BundleHolder, *, client_name: str = "rise-app", open_timeout: float = 5.0,
                 timeout: float = 120.0, retries: int = 2, rtt_interval_s: float | None = 10.0,
                 preview_every: int | None = None) -> None:
        self.bundles = bundles
        self.preview_every = preview_every  # ask the edge for a live preview every that many steps (None: no)
        self.client_name = client_name
        self.open_timeout = open_timeout
        self.timeout = timeout
        self.retries = retries
        self.rtt_interval_s = rtt_interval_s
        self._client: EdgeClient | None = None
        self._target: tuple[str, str, str] | None = None
        self._status = LinkStatus("disconnected")  # the last attempt's outcome, when there is no open client
        self._jobs: dict[int, concurrent.futures.Future[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rise-app-network", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, job: Job, sink: Sink) -> None:
        future = asyncio.run_coroutine_threadsafe(self._run(job, sink), self._loop)
        self._jobs[job.job_id] = future
        future.add_done_callback(lambda _f: self._jobs.pop(job.job_id, None))

    def cancel(self, job_id: int) -> None:
        """Cancel the job's task: the client sends the edge ``cancel`` for its request (the edge frees the slot).

        Cancelled while this device finishes the handoff, the worker thread runs its remaining steps and the
        image is dropped (there is nothing left to tell the edge: it has delivered).
        """
        future = self._jobs.get(job_id)
        if future is not None:
            future.cancel()

    def connect(self, url: str, token: str, done: Callable[[LinkStatus], None]) -> None:
        """Open the connection in the background (at start, after a settings change); ``done(link)`` from the worker."""
        async def run() -> None:
            try:
                await self._connected(url, token)
            except Exception:  # the state says why
                pass
            done(self.link())

        self._status = LinkStatus("connecting", url)
        asyncio.run_coroutine_threadsafe(run(), self._loop)

    def rate(self, request_id: str, rating: int, done: Callable[[BaseException | None], None]) -> None:
        async def send() -> None:
            try:
                if self._client is None:
                    raise EdgeConnectionError(CONNECT_FAILED, "not connected to the edge")
                await self._client.rate(request_id, rating)
            except Exception as exc:  # reported to the UI, never lost in the loop
                done(exc)
            else:
                done(None)

        asyncio.run_coroutine_threadsafe(send(), self._loop)

    def link(self) -> LinkStatus:
        client, target = self._client, self._target
        if client is None or target is None:
            return self._status
        if client.closed:
            return LinkStatus("offline", target[0], detail="the connection was lost")
        snap: LinkSnapshot = client.link.snapshot()
        return LinkStatus("connected", target[0], snap.rtt_s, snap.bandwidth_bps)

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the loop thread."""
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            if self._client is not None:
                await self._client.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    # ----------------------------------------------------------------- on the loop

    async def _connected(self, url: str, token: str) -> EdgeClient:
        """The open client for ``(url, token)``, connecting (again) if there is none."""
        target = (url, token, str(self.bundles.folder))  # another bundle may be another family: a new hello
        if self._client is not None and (self._client.closed or self._target != target):
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None
        if self._client is None:
            self._status = LinkStatus("connecting", url)
            try:
                bundle = await asyncio.to_thread(self.bundles.get)
                try:
                    self._client = await EdgeClient.open(
                        url, bundle, token=token or None, client_name=self.client_name,
                        open_timeout=self.open_timeout, timeout=self.timeout, rtt_interval_s=self.rtt_interval_s,
                    )
                except EdgeTimeout as exc:  # no welcome in time: as unreachable as a refused connection
                    raise EdgeConnectionError(CONNECT_FAILED, exc.message) from exc
                except ValueError as exc:  # websockets' malformed-URL errors
                    raise ConfigError(f"bad server URL {url!r}: {exc}") from exc
            except asyncio.CancelledError:
                self._status = LinkStatus("disconnected", url)
                raise
            except Exception as exc:
                self._status = link_for_error(exc, url)
                raise
            self._target = target
        return self._client

    def _preview_kwargs(self, sink: Sink) -> dict[str, Any]:
        """Ask for previews only when set: an edge that predates them is sent nothing new."""
        if self.preview_every is None:
            return {}
        return {"preview_every": self.preview_every, "on_preview": lambda _stage, _step, png: sink.preview(png)}

    async def _run(self, job: Job, sink: Sink) -> None:
        try:
            client = await self._connected(job.server_url, job.token)
            result = await client.generate_with_retry(
                job.given, attempts=1 + self.retries, preference=job.preference, seed=job.seed,
                on_plan=sink.plan, on_loading=sink.loading, on_progress=sink.progress, **self._preview_kwargs(sink),
            )
        except Exception as exc:
            sink.failed(exc)
        else:
            sink.done(Outcome.from_result(result, client.bundle))


class OfflineBackend:
    """Device-only generations in one worker thread (one at a time: it is one device)."""

    def __init__(self, bundles: BundleHolder) -> None:
        self.bundles = bundles
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rise-app-device")
        self._ids = itertools.count(1)
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()

    def submit(self, job: Job, sink: Sink) -> None:
        self._pool.submit(self._run, job, sink)

    def cancel(self, job_id: int) -> None:
        """Stop the job before its next step (or before it starts)."""
        with self._lock:
            self._cancelled.add(job_id)

    def _check_cancelled(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._cancelled:
                raise JobCancelled(f"job {job_id} cancelled")

    def rate(self, request_id: str, rating: int, done: Callable[[BaseException | None], None]) -> None:
        done(None)  # nobody to tell: the rating stays in the gallery

    def connect(self, url: str, token: str, done: Callable[[LinkStatus], None]) -> None:
        done(self.link())

    def link(self) -> LinkStatus:
        return LinkStatus("device_only")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job, sink: Sink) -> None:
        def on_step(step: int, total: int) -> None:
            self._check_cancelled(job.job_id)
            sink.progress("device", step, total)

        try:
            self._check_cancelled(job.job_id)
            bundle = self.bundles.get()
            plan = offline_plan(job.preference, min_steps=job.offline_min_steps, max_steps=job.offline_max_steps,
                                samplers=bundle.manifest.samplers)  # an LCM bundle runs only lcm
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            sink.plan(plan, OFFLINE_WHY)
            rid = f"offline-{next(self._ids)}"
            result = generate_offline(bundle, job.given, plan, seed, request_id=rid, on_step=on_step)
        except Exception as exc:
            sink.failed(exc)
            return
        finally:
            with self._lock:
                self._cancelled.discard(job.job_id)
        sink.done(Outcome.from_result(result, bundle))
