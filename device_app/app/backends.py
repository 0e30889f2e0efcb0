"""Where the app's long work runs: never on the UI thread.

A backend takes a :class:`Job` and reports back through a :class:`Sink` (plan, progress,
done, failed), calling it from its worker thread; the controller re-posts every call to
the UI thread. Two backends:

* :class:`NetworkBackend`: an asyncio loop in a worker thread holding one
  :class:`~device_app.client.EdgeClient`, connected lazily on the first job and again
  after a failure (or when the server URL or token changes);
* :class:`OfflineBackend`: device-only generation (:mod:`device_app.app.offline`) in a
  worker thread.

Both share one :class:`BundleHolder` (the bundle is verified and loaded once, in a worker).
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
from typing import Protocol

import numpy as np

from device_app.app.offline import OFFLINE_WHY, generate_offline, offline_plan
from device_app.client import EdgeClient
from device_app.errors import CONNECT_FAILED, EdgeConnectionError, EdgeTimeout
from device_app.results import GenerationResult
from device_app.runtime import DeviceBundle
from device_app.telemetry import LinkSnapshot
from shared.errors import ConfigError
from shared.relay_plan import RelayPlan

__all__ = [
    "Backend",
    "BundleHolder",
    "Job",
    "LinkStatus",
    "NetworkBackend",
    "OfflineBackend",
    "Outcome",
    "Sink",
]


@dataclass(frozen=True)
class Job:
    """One generation the user asked for."""

    job_id: int
    prompt: str
    preference: float
    server_url: str = ""
    token: str = ""
    seed: int | None = None
    offline_min_steps: int = 8
    offline_max_steps: int = 25


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

    @classmethod
    def from_result(cls, result: GenerationResult) -> Outcome:
        """The outcome of a relayed or a device-only (``result.offline``) generation."""
        t = result.timings
        if result.offline:
            edge_s = None
        else:
            edge_s = t.edge_compute_s if t.edge_compute_s is not None else t.edge_wait_s
        return cls(
            request_id=result.request_id, image=result.image, plan=result.plan.plan, seed=result.plan.seed,
            scheduler=result.plan.scheduler, why=result.plan.why, edge_s=edge_s, device_s=t.device_s,
            total_s=t.total_latency_s, offline=result.offline,
        )


class Sink(Protocol):
    """How a backend reports on a job (called from its worker thread)."""

    def plan(self, plan: RelayPlan, why: str) -> None: ...

    def progress(self, stage: str, step: int, total: int) -> None: ...

    def done(self, outcome: Outcome) -> None: ...

    def failed(self, error: BaseException) -> None: ...


@dataclass(frozen=True)
class LinkStatus:
    """What the link indicator shows: ``state`` is ``connected``, ``disconnected`` or ``offline``."""

    state: str
    server: str = ""
    rtt_s: float | None = None
    bandwidth_bps: float | None = None


class Backend(Protocol):
    def submit(self, job: Job, sink: Sink) -> None:
        """Start ``job`` in the background; return at once."""

    def rate(self, request_id: str, rating: int, done: Callable[[BaseException | None], None]) -> None:
        """Send a rating in the background; ``done(error or None)`` from the worker."""

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

    def get(self) -> DeviceBundle:
        with self._lock:
            if self._bundle is None:
                if self.folder is None or not str(self.folder):
                    raise ConfigError("no device bundle set: start with --bundle BUNDLE (a rise-export folder)")
                self._bundle = DeviceBundle(self.folder, threads=self.threads)
            return self._bundle


class NetworkBackend:
    """Generations through an edge daemon, on an asyncio loop in one worker thread."""

    def __init__(self, bundles: BundleHolder, *, client_name: str = "rise-app", open_timeout: float = 5.0,
                 timeout: float = 120.0, retries: int = 2, rtt_interval_s: float | None = 10.0) -> None:
        self.bundles = bundles
        self.client_name = client_name
        self.open_timeout = open_timeout
        self.timeout = timeout
        self.retries = retries
        self.rtt_interval_s = rtt_interval_s
        self._client: EdgeClient | None = None
        self._target: tuple[str, str] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rise-app-network", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, job: Job, sink: Sink) -> None:
        asyncio.run_coroutine_threadsafe(self._run(job, sink), self._loop)

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
            return LinkStatus("disconnected")
        if client.closed:
            return LinkStatus("disconnected", target[0])
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
        if self._client is not None and (self._client.closed or self._target != (url, token)):
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None
        if self._client is None:
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
            self._target = (url, token)
        return self._client

    async def _run(self, job: Job, sink: Sink) -> None:
        try:
            client = await self._connected(job.server_url, job.token)
            result = await client.generate_with_retry(
                job.prompt, attempts=1 + self.retries, preference=job.preference, seed=job.seed,
                on_plan=sink.plan, on_progress=sink.progress,
            )
        except Exception as exc:
            sink.failed(exc)
        else:
            sink.done(Outcome.from_result(result))


class OfflineBackend:
    """Device-only generations in one worker thread (one at a time: it is one device)."""

    def __init__(self, bundles: BundleHolder) -> None:
        self.bundles = bundles
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rise-app-device")
        self._ids = itertools.count(1)

    def submit(self, job: Job, sink: Sink) -> None:
        self._pool.submit(self._run, job, sink)

    def rate(self, request_id: str, rating: int, done: Callable[[BaseException | None], None]) -> None:
        done(None)  # nobody to tell: the rating stays in the gallery

    def link(self) -> LinkStatus:
        return LinkStatus("offline")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job: Job, sink: Sink) -> None:
        try:
            bundle = self.bundles.get()
            plan = offline_plan(job.preference, min_steps=job.offline_min_steps, max_steps=job.offline_max_steps,
                                samplers=bundle.manifest.samplers)  # an LCM bundle runs only lcm
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            sink.plan(plan, OFFLINE_WHY)
            rid = f"offline-{next(self._ids)}"
            result = generate_offline(bundle, job.prompt, plan, seed, request_id=rid,
                                      on_step=lambda step, total: sink.progress("device", step, total))
        except Exception as exc:
            sink.failed(exc)
            return
        sink.done(Outcome.from_result(result))
