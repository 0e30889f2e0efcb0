"""The device's websocket client: ask the edge for a generation, finish it on ONNX Runtime, report back.

An asyncio adapter around the sans-I/O :class:`shared.protocol.ClientConnection`::

    async with EdgeClient.connect("ws://edge:8765", DeviceBundle("bundle/"), token=token) as client:
        result = await client.generate("a red bicycle", preference=0.7, seed=42)
        Image.fromarray(result.image).save("out.png")
        print(result.timings)

One connection carries several requests at once (up to the server's ``max_in_flight``;
more wait locally for a slot). Inside a client:

* **one reader task** feeds every frame to the connection object and routes the events
  to the per-request queue of the :meth:`EdgeClient.generate` call that owns them;
* **one writer path** (:meth:`EdgeClient._flush`, under a lock) drains
  ``conn.data_to_send()`` and sends the frames in order;
* the **device half** (:func:`device_app.finish.finish_handoff`: steps + VAE decode) runs
  in a worker thread, so the event loop keeps reading frames, answering pings and serving
  other requests; its progress comes back to the loop with ``call_soon_threadsafe``. One
  request at a time runs on the device by default (``device_workers=1``): it is one device.

A **speculative** plan also starts this device's own device-only run at once (one more task per
request, on the same device slot); the handoff, when it comes, is taken or declined by
:func:`shared.planning.speculative_switch`, and the edge request is cancelled if the device won
(:mod:`device_app.speculative` holds the run's state and the emulated slow device).

Errors live in :mod:`device_app.errors`, results in :mod:`device_app.results`.

What the edge sends is checked against what was asked before any work on it
(:mod:`device_app.expected`): the plan against the request and this device's
:class:`~device_app.expected.DeviceLimits`, the handoff's latent and the PNG's declared size
against the plan; a mismatch raises :class:`EdgeMismatch` and the edge is told.

Every wait has a timeout, and every request an overall deadline that progress frames do not
extend; a lost connection fails every request in flight with
:class:`EdgeConnectionError`; a server :class:`~shared.protocol.Error` raises
:class:`EdgeError` carrying its ``code`` (and ``retry_after_s`` for ``busy`` /
``rate_limited``, which :meth:`EdgeClient.generate_with_retry` honours).

No torch here (this is the device).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection as WebSocket
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException

from device_app.app.offline import device_only_handoff  # no Kivy there (device_app/app/__init__.py)
from device_app.errors import (
    CONNECT_FAILED,
    CONNECTION_LOST,
    DEADLINE,
    TIMEOUT,
    DeviceRunError,
    EdgeConnectionError,
    EdgeError,
    EdgeMismatch,
    EdgeTimeout,
)
from device_app.expected import DeviceLimits, check_handoff, check_plan, check_png, decode_png
from device_app.finish import StepCallback, X0Callback, finish_handoff
from device_app.preview import DevicePreviewer, PreviewCallback
from device_app.results import Finished, GenerationResult, Timings
from device_app.runtime import DeviceBundle
from device_app.speculative import EmulatedDevice, OwnRun, RunStopped
from device_app.telemetry import DeviceLoad, LinkEstimator
from shared.handoff import Handoff, HandoffLimits
from shared.protocol import (
    FATAL_CLOSE_CODES,
    ClientConnection,
    Error,
    FrameRejected,
    Generate,
    HandoffReceived,
    Plan,
    Progress,
    ProtocolError,
    ProtocolLimits,
    Report,
    ResultReceived,
    Welcome,
    newer_fields,
)
from shared.relay_plan import RelayPlan

__all__ = ["EdgeClient", "LoadingCallback", "PlanCallback", "PreviewCallback", "ProgressCallback"]

log = logging.getLogger("rise.device.client")

ProgressCallback = Callable[[str, int, int], None]  # (stage "edge" | "device", step, total)
PlanCallback = Callable[[RelayPlan, str], None]  # (the chosen configuration, why)
LoadingCallback = Callable[[float], None]  # (seconds the edge expects to load the family before its first step)

# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class _Item:
    """One event for a request, with when the reader got it and how long the connection took to parse it."""

    event: Any
    at: float
    parse_s: float = 0.0


@dataclass
class _Pending:
    request: Generate
    queue: asyncio.Queue[_Item | BaseException] = field(default_factory=asyncio.Queue)


@dataclass
class _Speculation:
    """A request's speculative state: the device's own run once it started, and the steps it discarded."""

    run: OwnRun | None = None
    wasted_steps: int = 0
    plan_at: float | None = None  # when the plan arrived (the own run starts then)

    def stop(self) -> None:
        if self.run is not None:
            self.run.decide(1, 1)  # any handoff switches: the run stops at its next step


@dataclass
class _OwnResult:
    """The device's own run of a speculative plan, finished."""

    plan: Plan  # the edge's plan message with the device-only configuration that ran
    finished: Finished
    encode_s: float
    device_wait_s: float
    steps: int
    plan_at: float | None = None
    sent_at: float = 0.0


def _warm_up(bundle: DeviceBundle) -> None:
    """Create the ORT sessions a relay needs now, not inside the first request's latency."""
    for name in ("unet", "vae_decoder"):
        bundle.graph(name)


def _now() -> float:
    return time.perf_counter()


#: A monotonic clock in seconds (the request deadlines' clock; tests pass a fake one).
Clock = Callable[[], float]


class EdgeClient:
    """One websocket connection to an edge daemon, carrying any number of generations.

    Build it with :meth:`connect` (an async context manager) or :meth:`open` /
    :meth:`close`. ``timeout`` bounds every wait for the server (the welcome, and the
    silence between a request's events: plan, progress, payload); on expiry the request
    is cancelled on the server and :class:`EdgeTimeout` (code ``timeout``) raised.
    ``deadline`` bounds a request's whole wait for the edge (generate sent -> payload
    received), however many progress frames arrive (:class:`EdgeTimeout`, code
    ``deadline``; ``None``: no deadline), measured on ``clock``. ``device_limits`` are
    what this device runs, whatever the edge's welcome allows. ``speculative``,
    ``speculative_slack_steps`` and ``emulate``: see :meth:`open`.
    """

    def __init__(
        self,
        ws: WebSocket,
        conn: ClientConnection,
        bundle: DeviceBundle,
        *,
        url: str,
        timeout: float,
        device_load: DeviceLoad,
        link: LinkEstimator,
        device_workers: int = 1,
        rtt_interval_s: float | None = 5.0,
        deadline: float | None = 600.0,
        clock: Clock = time.monotonic,
        device_limits: DeviceLimits | None = None,
        speculative: bool = True,
        speculative_slack_steps: float = 0.0,
        emulate: EmulatedDevice | None = None,
    ) -> None:
        if conn.welcome is None:
            raise ValueError("EdgeClient needs an open connection: use EdgeClient.open() or EdgeClient.connect()")
        self.url = url
        self.bundle = bundle
        self.timeout = timeout
        self.deadline = _checked_deadline(deadline)
        self.device_limits = device_limits or DeviceLimits()
        self._clock = clock
        #: Run speculative plans speculatively (False: as plain relays); the switch rule's slack in steps.
        self.speculative = speculative
        self.speculative_slack_steps = speculative_slack_steps
        #: Pace this device's steps and decode like a slower device's (tests, benchmarks), or None.
        self.emulate = emulate
        self._previewer: DevicePreviewer | None = None  # made on the first request that asks for previews
        self._said_no_edge_previews = False  # logged once that a first-release edge sends no previews
        self.device_load = device_load
        self.link = link
        #: Connection-level errors the server sent that did not end the connection (for logs and tests).
        self.notices: list[Error] = []
        self._ws = ws
        self._conn = conn
        self._pending: dict[str, _Pending] = {}
        self._write_lock = asyncio.Lock()
        # The server counts a request in flight until its payload (or error) arrives; wait here for a slot.
        self._slots = asyncio.Semaphore(conn.welcome.limits.max_in_flight)
        self._device = asyncio.Semaphore(device_workers)
        self._fatal: EdgeError | None = None  # why the server ended the connection, if it said
        self._lost: EdgeConnectionError | None = None
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name=f"rise-reader {url}")
        self._pinger = (
            asyncio.get_running_loop().create_task(self._ping_loop(rtt_interval_s), name=f"rise-ping {url}")
            if rtt_interval_s
            else None
        )

    # ----------------------------------------------------------------- opening and closing

    @classmethod
    async def open(
        cls,
        url: str,
        bundle: DeviceBundle,
        *,
        token: str | None = None,
        client_name: str = "rise-device",
        open_timeout: float = 10.0,
        timeout: float = 120.0,
        ssl: SSLContext | None = None,
        device_class: str | None = None,
        device_step_s: float | None = None,
        device_workers: int = 1,
        rtt_interval_s: float | None = 5.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        close_timeout: float | None = 10.0,
        limits: ProtocolLimits | None = None,
        handoff_limits: HandoffLimits | None = None,
        device_load: DeviceLoad | None = None,
        link: LinkEstimator | None = None,
        warm_up: bool = True,
        deadline: float | None = 600.0,
        clock: Clock = time.monotonic,
        device_limits: DeviceLimits | None = None,
        speculative: bool = True,
        speculative_slack_steps: float = 0.0,
        emulate: EmulatedDevice | None = None,
    ) -> EdgeClient:
        """Connect, say hello with ``bundle``'s family, and wait for the welcome.

        Raises :class:`EdgeConnectionError` (code ``connect_failed``, or the server's
        refusal: ``unauthorized``, ``unsupported_version``, ``wrong_family``...) or
        :class:`EdgeTimeout`. ``ping_interval`` / ``ping_timeout`` are the websocket
        keepalive (None turns it off): a dead link fails every request in flight with
        ``connection_lost`` after about ``ping_interval + ping_timeout + close_timeout``
        (the last bounds the wait for the closing handshake the dead link never completes).
        ``limits`` are this side's receive limits (frame sizes); ``warm_up`` creates the ORT
        sessions before returning. ``deadline`` (seconds, None: none), ``clock`` and
        ``device_limits`` are the requests' (see :class:`EdgeClient`). ``speculative`` (default True)
        runs speculative plans speculatively, switching by :func:`shared.planning.speculative_switch`
        with ``speculative_slack_steps``; ``emulate`` paces this device like a slower one
        (:class:`~device_app.speculative.EmulatedDevice`; its step time also goes in the hello as
        ``device_step_s`` unless that is given).
        """
        deadline = _checked_deadline(deadline)
        if device_step_s is None and emulate is not None and emulate.step_s > 0:
            device_step_s = emulate.step_s  # the speed the edge should plan for
        limits = limits or ProtocolLimits()
        load = device_load or DeviceLoad()
        link = link or LinkEstimator()
        try:
            conn = ClientConnection(
                family_id=bundle.family_id,
                client_name=client_name,
                token=token,
                device_class=device_class,
                device_step_s=device_step_s,
                device_load=load.sample(),
                limits=limits,
                handoff_limits=handoff_limits or HandoffLimits(max_bytes=limits.max_payload_bytes),
            )
        except ProtocolError as exc:  # a malformed token or client name: never reaches the network
            raise EdgeError("bad_message", f"hello: {exc}", field=exc.field, local=True) from None
        if warm_up:
            await asyncio.to_thread(_warm_up, bundle)
        kwargs: dict[str, Any] = {} if ssl is None else {"ssl": ssl}
        try:
            ws = await ws_connect(
                url,
                max_size=limits.websocket_max_size,  # a handoff is one binary frame
                compression=None,  # permessage-deflate costs ~20x the time of a latent frame and saves little
                open_timeout=open_timeout,
                ping_interval=ping_interval,
                ping_timeout=ping_timeout,
                close_timeout=close_timeout,
                **kwargs,
            )
        except (TimeoutError, OSError, InvalidURI, WebSocketException, ValueError) as exc:
            detail = str(exc) or type(exc).__name__
            raise EdgeConnectionError(CONNECT_FAILED, f"cannot connect to {url}: {detail}") from exc
        try:
            await cls._handshake(ws, conn, url, open_timeout)
        except BaseException:
            await ws.close()
            raise
        client = cls(
            ws, conn, bundle, url=url, timeout=timeout, device_load=load, link=link,
            device_workers=device_workers, rtt_interval_s=rtt_interval_s, deadline=deadline, clock=clock,
            device_limits=device_limits, speculative=speculative, speculative_slack_steps=speculative_slack_steps,
            emulate=emulate,
        )
        with contextlib.suppress(EdgeError):
            await client.measure_rtt(timeout=open_timeout)  # the first request then carries an RTT
        return client

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, bundle: DeviceBundle, **kwargs: Any) -> AsyncIterator[EdgeClient]:
        """``async with EdgeClient.connect(url, bundle, token=...) as client:`` (arguments as :meth:`open`)."""
        client = await cls.open(url, bundle, **kwargs)
        try:
            yield client
        finally:
            await client.close()

    @staticmethod
    async def _handshake(ws: WebSocket, conn: ClientConnection, url: str, timeout: float) -> Welcome:
        for frame in conn.data_to_send():
            await ws.send(frame)
        deadline = _now() + timeout
        while True:
            try:
                frame = await asyncio.wait_for(ws.recv(), max(0.0, deadline - _now()))
            except TimeoutError:
                raise EdgeTimeout(TIMEOUT, f"no welcome from {url} within {timeout:g} s") from None
            except ConnectionClosed as exc:
                raise EdgeConnectionError(
                    CONNECTION_LOST, f"{url} closed the connection before its welcome ({_close_text(exc)})"
                ) from None
            now = _now()
            events = conn.receive_text(frame, now) if isinstance(frame, str) else conn.receive_bytes(frame, now)
            for frame_out in conn.data_to_send():  # our complaint about a bad welcome, if any
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(frame_out)
            for event in events:
                if isinstance(event, Welcome):
                    return event
                if isinstance(event, Error):  # any refusal of the hello ends the connection
                    raise EdgeConnectionError(event.code, f"{url} refused the connection: {event.message}",
                                              field=event.field, retry_after_s=event.retry_after_s)
                if isinstance(event, FrameRejected) and event.fatal:
                    error = event.error
                    raise EdgeConnectionError(error.code, f"bad welcome from {url}: {error.message}", field=error.field)

    async def close(self) -> None:
        """Close the connection (requests still in flight fail with :class:`EdgeConnectionError`)."""
        if self._closing:
            return
        self._closing = True
        if self._pinger is not None:
            self._pinger.cancel()
        await self._ws.close()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._reader, timeout=10.0)
        for task in list(self._background):
            task.cancel()

    # ----------------------------------------------------------------- state

    @property
    def welcome(self) -> Welcome:
        assert self._conn.welcome is not None
        return self._conn.welcome

    @property
    def server_limits(self) -> ProtocolLimits:
        return self.welcome.limits

    @property
    def closed(self) -> bool:
        return self._lost is not None or self._closing

    @property
    def in_flight(self) -> tuple[str, ...]:
        """Request ids sent and not yet delivered or failed."""
        return self._conn.in_flight

    # ----------------------------------------------------------------- requests

    async def generate(
        self,
        prompt: str,
        *,
        preference: float = 0.5,
        seed: int | None = None,
        pinned: RelayPlan | None = None,
        steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        rating: int | None = None,
        on_progress: ProgressCallback | None = None,
        on_plan: PlanCallback | None = None,
        on_preview: PreviewCallback | None = None,
        preview_every: int | None = None,
        timeout: float | None = None,
        deadline: float | None = None,
        on_loading: LoadingCallback | None = None,
    ) -> GenerationResult:
        """Generate one image: the edge's steps, the handoff, this device's steps and decode.

        ``preference`` is 0 (fastest) to 1 (best quality); ``pinned`` fixes the relay
        configuration, ``steps`` only ``N``; ``seed``/``height``/``width`` default to the
        server's choice. ``on_plan(plan, why)`` is called when the edge announces its
        choice and ``on_progress(stage, step, total)`` for every edge step (from the
        server) and device step (``step`` counts from ``split + 1`` to ``N``; a speculative
        run's own steps from 1), both on the event loop. ``preview_every`` asks the edge for a
        live preview every that many steps; ``on_preview(stage, step, png)`` gets each one (after
        ``on_progress``). When the plan says the edge must first load the family (``Plan.loading_s``:
        it was not in memory), ``on_loading(seconds)`` is called after ``on_plan`` and the wait for
        the edge's first word after the plan may be that much longer than ``timeout``. After the
        image is ready the :class:`Report` (with ``rating`` if given) is sent. ``timeout`` and
        ``deadline`` override the client's for this request (``deadline=math.inf``: none). The
        plan, the handoff and the PNG are checked before any work on them
        (:mod:`device_app.expected`).

        A **speculative** plan (``RelayPlan.speculative``, and this client's ``speculative``) starts
        this device's own device-only run at once; on the handoff's arrival
        :func:`shared.planning.speculative_switch` decides: switch (the own run stops, the handoff
        is finished: ``path == "relay"``) or finish alone (``path == "device"``: the edge is told
        ``cancelled``, so it expects no report). An own run that finishes first cancels the edge
        request (its ``cancelled`` answer is no failure); one still running when the edge fails
        (busy, timeout, lost connection) finishes the image alone.

        Raises :class:`EdgeError` (server refusal or failure, code attached),
        :class:`EdgeTimeout`, :class:`EdgeConnectionError`, :class:`EdgeMismatch` (the edge sent
        what was not asked for), :class:`DeviceRunError`.
        """
        self._check_open()
        timeout = self.timeout if timeout is None else timeout
        limit = self.deadline if deadline is None else _checked_deadline(deadline)
        await self._slots.acquire()
        slot_held = True
        try:
            self._check_open()
            rid = self._conn.new_request_id()
            link = self.link.snapshot()
            try:
                request = Generate(
                    request_id=rid, prompt=prompt, preference=preference, seed=seed, height=height, width=width,
                    steps=steps, pinned=pinned, device_load=self.device_load.sample(), rtt_s=link.rtt_s,
                    bandwidth_bps=link.bandwidth_bps, preview_every=preview_every,
                )
                self._conn.send_generate(request)  # checks the server's limits: a bad request never leaves
            except ProtocolError as exc:
                raise EdgeError(exc.code, str(exc), request_id=rid, field=exc.field, local=True) from None
            if not self._said_no_edge_previews and "preview_every" in newer_fields(request, self.welcome.version):
                self._said_no_edge_previews = True
                log.warning("%s speaks protocol version %d: it sends no live previews of its steps (this device "
                            "still draws its own)", self.url, self.welcome.version)
            pending = _Pending(request)
            self._pending[rid] = pending
            sent_at = _now()
            deadline_at = None if limit is None else self._clock() + limit
            try:
                await self._flush()
            except BaseException:
                self._pending.pop(rid, None)
                raise
            loop = asyncio.get_running_loop()
            planned: asyncio.Future[Plan] = loop.create_future()
            spec = _Speculation()

            def on_plan_message(message: Plan) -> None:
                if not planned.done():
                    planned.set_result(message)

            device_preview = self._threadsafe_preview(on_preview, preview_every)
            own = loop.create_task(self._speculate(planned, prompt, spec, on_progress, device_preview),
                                   name=f"rise-own {rid}")
            delivery = loop.create_task(self._await_delivery(
                pending, timeout, (limit, deadline_at), on_plan, on_progress, on_preview,
                on_plan_message=on_plan_message, on_loading=on_loading,
            ), name=f"rise-delivery {rid}")
            try:
                outcome = await self._race(rid, delivery, own, spec)
            except BaseException:
                spec.stop()
                own.cancel()
                delivery.cancel()
                self._pending.pop(rid, None)
                self._abandon(rid)
                raise
            finally:
                if not planned.done():
                    planned.cancel()
            if isinstance(outcome, _OwnResult):  # the device finished alone
                self._pending.pop(rid, None)
                outcome.sent_at = sent_at
                if rid in self._conn.in_flight and not self.closed:
                    # Cancel it, and keep its slot until the edge answers: it counts it in flight until then.
                    self._conn.send_cancel(rid)
                    self._pending[rid] = pending  # its answer ("cancelled", or the handoff that raced it)
                    slot_held = False
                    self._spawn(self._until_answered(pending))
                    await self._flush_quietly()
                else:
                    self._abandon(rid)  # delivered and declined: "cancelled", so no report is awaited
                return self._own_result(rid, outcome)
            self._pending.pop(rid, None)
            plan, plan_at, delivery_item = outcome
        finally:
            if slot_held:
                self._slots.release()
        item, event = delivery_item, delivery_item.event
        timings: dict[str, Any] = {
            "plan_s": None if plan_at is None else plan_at - sent_at,
            "edge_wait_s": max(0.0, item.at - event.transfer_s - sent_at),
            "transfer_s": event.transfer_s,
            "handoff_decode_s": item.parse_s if isinstance(event, HandoffReceived) else 0.0,
            "queue_s": event.announcement.queue_s,
            "edge_compute_s": event.announcement.edge_compute_s,
            "speculative_steps": spec.wasted_steps,
        }
        if isinstance(event, HandoffReceived):
            self.link.add_transfer(len(event.payload), event.transfer_s)
        else:
            self.link.add_transfer(len(event.png), event.transfer_s)
        try:  # before any ORT or Pillow work: nothing the plan did not announce is run or decoded
            if isinstance(event, HandoffReceived):
                check_handoff(self.bundle, event.handoff, plan)
            else:
                check_png(event.png, plan, self.device_limits)
        except EdgeMismatch as exc:
            await self._refuse_payload(rid, exc)
            raise
        waited = _now()
        async with self._device:
            timings["device_wait_s"] = _now() - waited
            try:
                if isinstance(event, HandoffReceived):
                    finished: Finished = await asyncio.to_thread(
                        self._device_steps, event.handoff, self._threadsafe_progress(on_progress), None,
                        device_preview,
                    )
                    assert finished.image is not None  # decoded: finish_handoff's default
                    latents, image, png = finished.latents, finished.image, None
                    compute_s, decode_s = finished.steps_s, finished.decode_s
                else:
                    latents, png = None, event.png
                    image, decode_s = await asyncio.to_thread(_decode_png, event.png, plan, self.device_limits)
                    compute_s = 0.0
            except EdgeMismatch as exc:  # what Pillow read disagreed with the header checked above
                await self._refuse_payload(rid, exc)
                raise
            except Exception as exc:
                await self._device_failed(rid, exc)
                raise DeviceRunError(f"request {rid}: the device half failed: {exc}", request_id=rid) from exc
        timings.update(device_compute_s=compute_s, decode_s=decode_s, total_latency_s=_now() - sent_at)
        result_timings = Timings(**timings)
        report = await self._send_report(rid, result_timings, rating)
        payload = event.payload if isinstance(event, HandoffReceived) else event.png
        return GenerationResult(
            request_id=rid, image=image, latents=latents, plan=plan, timings=result_timings,
            payload_bytes=len(payload), png=png, report=report,
            path_taken="relay" if isinstance(event, HandoffReceived) else "edge",
        )

    async def generate_with_retry(
        self,
        prompt: str,
        *,
        attempts: int = 3,
        max_wait_s: float = 60.0,
        on_retry: Callable[[EdgeError, float], None] | None = None,
        **kwargs: Any,
    ) -> GenerationResult:
        """:meth:`generate`, tried up to ``attempts`` times in all while the edge answers
        ``busy``/``rate_limited`` (waiting at least its ``retry_after_s``) or
        ``too_many_in_flight`` (at least 0.5 s). Later retries back off exponentially with
        jitter, so many devices turned away together do not all come back together. A
        server-advised wait longer than ``max_wait_s`` is not worth it: that error is raised
        instead. ``on_retry(error, delay)`` is called before each wait."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        for attempt in range(1, attempts + 1):
            try:
                return await self.generate(prompt, **kwargs)
            except EdgeError as exc:
                advised = exc.retry_after_s if exc.retry_after_s is not None else 0.5
                if not exc.retryable or attempt == attempts or advised > max_wait_s:
                    raise
                backoff = advised * 2 ** (attempt - 1) * random.uniform(1.0, 1.5)
                delay = min(backoff, max_wait_s)
                if on_retry is not None:
                    on_retry(exc, delay)
                log.info("request %s: %s; retrying in %.3g s (attempt %d of %d)", exc.request_id, exc.code, delay,
                         attempt + 1, attempts)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def rate(self, request_id: str, rating: int) -> None:
        """Send the user's -1/0/+1 for a delivered request (any time after its image arrived)."""
        self._check_open()
        try:
            self._conn.send_rating(request_id, rating)
        except ProtocolError as exc:
            raise EdgeError("invalid_request", str(exc), request_id=request_id, local=True) from None
        await self._flush()

    async def measure_rtt(self, timeout: float | None = None) -> float:
        """Time one websocket ping/pong, fold it into :attr:`link`, return it (seconds)."""
        self._check_open()
        timeout = self.timeout if timeout is None else timeout
        try:
            started = _now()
            pong = await self._ws.ping()
            await asyncio.wait_for(pong, timeout)
        except TimeoutError:
            raise EdgeTimeout(TIMEOUT, f"no pong from {self.url} within {timeout:g} s") from None
        except ConnectionClosed as exc:
            raise self._lost_error(exc) from None
        return self.link.add_rtt(_now() - started)


    # ----------------------------------------------------------------- speculative relay internals

    async def _race(
        self, rid: str, delivery: asyncio.Task[tuple[Plan, float | None, _Item]],
        own: asyncio.Task[_OwnResult | None], spec: _Speculation,
    ) -> _OwnResult | tuple[Plan, float | None, _Item]:
        """Wait for the edge's payload and, for a speculative plan, the device's own run; say who won."""
        while not delivery.done():
            await asyncio.wait({delivery, own} if not own.done() else {delivery},
                               return_when=asyncio.FIRST_COMPLETED)
            if own.done() and not delivery.done() and isinstance(own.result(), _OwnResult):
                delivery.cancel()  # the device finished first: the caller cancels the edge request
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await delivery
                return own.result()  # type: ignore[return-value]  # checked just above
        try:
            plan, plan_at, item = delivery.result()
        except EdgeError as exc:
            if spec.run is None:
                raise
            log.info("request %s: the edge failed (%s); the device finishes alone", rid, exc.code)
            alone = await own
            if alone is None:
                raise
            return alone
        event = item.event
        if spec.run is not None and isinstance(event, HandoffReceived):
            finished_alone = own.done() and isinstance(own.result(), _OwnResult)
            switch = spec.run.decide(plan.plan.num_inference_steps, event.handoff.split,
                                     slack_steps=self.speculative_slack_steps, finished=finished_alone)
            if not switch:
                alone = await own
                if alone is not None:
                    log.info("request %s: the handoff came after %d own steps: finished alone", rid, alone.steps)
                    return alone  # the caller tells the edge "cancelled": the delivered handoff goes unused
                # the own run failed: the handoff finishes the image after all
            else:
                await own  # stops at its next step boundary
                spec.wasted_steps = spec.run.steps_done
        return plan, plan_at, item

    async def _speculate(self, planned: asyncio.Future[Plan], prompt: str, spec: _Speculation,
                         on_progress: ProgressCallback | None,
                         on_x0: X0Callback | None = None) -> _OwnResult | None:
        """For a speculative plan, this device's own device-only run (``None``: not speculative, or stopped)."""
        plan = await planned
        spec.plan_at = _now()
        relay = plan.plan
        if not (relay.speculative and self.speculative):
            return None
        own_plan = RelayPlan(relay.num_inference_steps, 0, relay.sampler, relay.guidance_scale, "device")
        run = spec.run = OwnRun(relay.num_inference_steps)
        waited = _now()
        try:
            async with self._device:
                device_wait_s = _now() - waited
                if run.switched:
                    return None
                started = _now()
                handoff = await asyncio.to_thread(
                    device_only_handoff, self.bundle, prompt, own_plan, plan.seed, height=plan.height,
                    width=plan.width, request_id=plan.request_id,
                )
                encode_s = _now() - started
                if run.switched:
                    return None
                finished = await asyncio.to_thread(
                    self._device_steps, handoff, self._threadsafe_progress(on_progress), run, on_x0
                )
        except RunStopped:
            return None
        except Exception as exc:  # the relay may still deliver: a failed speculation is not the request's end
            log.warning("request %s: the device's own run failed: %s", plan.request_id, exc)
            spec.run = None
            return None
        assert finished.image is not None  # decoded: finish_handoff's default
        why = (f"speculative relay: finished on this device before the edge's handoff could win "
               f"({relay.split} of {relay.num_inference_steps} steps on the edge were planned)")
        announced = dataclasses.replace(plan, plan=own_plan, why=why)
        return _OwnResult(announced, finished, encode_s, device_wait_s, run.steps_done, plan_at=spec.plan_at)

    def _device_steps(self, handoff: Handoff, on_step: StepCallback | None, run: OwnRun | None,
                      on_x0: X0Callback | None = None) -> Finished:
        """Finish ``handoff`` here (worker thread), paced like the emulated device if any, stoppable by ``run``;
        ``on_x0`` gets each step's predicted clean latent (the live preview's)."""
        emulated = self.emulate
        paced = on_step if emulated is None else emulated.chain(on_step)
        callback = paced
        if run is not None:
            run.then = paced
            callback = run.on_step
        if emulated is None:
            return finish_handoff(self.bundle, handoff, on_step=callback, on_x0=on_x0)
        emulated.start()
        finished = finish_handoff(self.bundle, handoff, on_step=callback, on_x0=on_x0)
        decode_s = emulated.decode(finished.decode_s)
        return Finished(latents=finished.latents, image=finished.image, steps_s=finished.steps_s, decode_s=decode_s)

    def _own_result(self, rid: str, own: _OwnResult) -> GenerationResult:
        finished = own.finished
        assert finished.image is not None
        timings = Timings(
            total_latency_s=_now() - own.sent_at, plan_s=None if own.plan_at is None else own.plan_at - own.sent_at,
            edge_wait_s=0.0, transfer_s=0.0,
            handoff_decode_s=0.0, device_compute_s=finished.steps_s, decode_s=finished.decode_s,
            device_wait_s=own.device_wait_s, text_encode_s=own.encode_s, speculative_steps=own.steps,
        )
        return GenerationResult(
            request_id=rid, image=finished.image, latents=finished.latents, plan=own.plan, timings=timings,
            payload_bytes=0, report=None, path_taken="device",
        )

    async def _until_answered(self, pending: _Pending) -> None:
        """Hold a cancelled request's slot until the edge's answer (``cancelled``, or a handoff that raced the
        cancel, then declined) arrives, so the next request is not refused as one too many in flight."""
        rid = pending.request.request_id
        try:
            while True:
                try:
                    item = await asyncio.wait_for(pending.queue.get(), self.timeout)
                except TimeoutError:
                    return
                if isinstance(item, BaseException):
                    return
                event = item.event
                if isinstance(event, (HandoffReceived, ResultReceived)):
                    self._pending.pop(rid, None)
                    self._abandon(rid)
                    return
                if isinstance(event, (Error, FrameRejected)):
                    return  # "cancelled" (or the edge's own failure): the request is over, no error for anyone
        finally:
            if self._pending.get(rid) is pending:
                self._pending.pop(rid, None)
            self._slots.release()

    # ----------------------------------------------------------------- request internals

    async def _await_delivery(
        self,
        pending: _Pending,
        timeout: float,
        deadline: tuple[float | None, float | None],
        on_plan: PlanCallback | None,
        on_progress: ProgressCallback | None,
        on_preview: PreviewCallback | None = None,
        *,
        on_plan_message: Callable[[Plan], object] | None = None,
        on_loading: LoadingCallback | None = None,
    ) -> tuple[Plan, float | None, _Item]:
        """Consume a request's events until its payload arrives; raise on an error, a timeout or the deadline.

        ``deadline`` is (its seconds, when it falls on ``self._clock``), or (None, None); no event extends it.
        The silence ``timeout`` after a plan whose edge loads the family first grows by its ``loading_s``
        (until the edge's next word).
        """
        rid = pending.request.request_id
        limit, deadline_at = deadline
        plan: Plan | None = None
        plan_at: float | None = None
        loading_s = 0.0  # the announced load, until the edge says more
        while True:
            stage = "its plan" if plan is None else "its payload"
            left = math.inf if deadline_at is None else deadline_at - self._clock()
            if left <= 0:
                raise EdgeTimeout(
                    DEADLINE, f"request {rid}: {self.url} did not deliver within the {limit:g} s deadline (waiting "
                    f"for {stage}; progress does not extend it)", request_id=rid,
                )
            silence = timeout + loading_s
            try:
                item = await asyncio.wait_for(pending.queue.get(), min(silence, left))
            except TimeoutError:
                if left < silence:
                    continue  # the deadline, not the silence: said at the top of the loop
                loading = f" (it said it would load the family first, ~{loading_s:g} s)" if loading_s else ""
                raise EdgeTimeout(
                    TIMEOUT, f"request {rid}: {self.url} sent nothing for {silence:g} s while waiting for "
                    f"{stage}{loading}", request_id=rid,
                ) from None
            loading_s = 0.0
            if isinstance(item, BaseException):
                raise item
            event = item.event
            if isinstance(event, Plan):
                check_plan(self.bundle, pending.request, event, self.device_limits)  # else cancelled by the caller
                plan, plan_at = event, item.at
                if on_plan_message is not None:
                    on_plan_message(event)
                if on_plan is not None:
                    on_plan(event.plan, event.why)
                if event.loading_s is not None:
                    loading_s = event.loading_s
                    if on_loading is not None:
                        on_loading(event.loading_s)
            elif isinstance(event, Progress):
                if on_progress is not None:
                    on_progress(event.stage, event.step, event.total)
                if on_preview is not None and event.preview is not None:
                    png = event.preview_png()
                    if png is not None:
                        on_preview(event.stage, event.step, png)
            elif isinstance(event, (HandoffReceived, ResultReceived)):
                assert plan is not None  # the connection accepts a payload only for a planned request
                return plan, plan_at, item
            elif isinstance(event, Error):
                raise EdgeError.from_error(event)
            elif isinstance(event, FrameRejected):
                error = event.error
                raise EdgeError(
                    error.code, f"request {rid}: the server's frame was refused here: {error.message}",
                    request_id=rid, field=error.field,
                )

    def _threadsafe_preview(self, on_preview: PreviewCallback | None, every: int | None) -> X0Callback | None:
        """Previews of this device's own steps (every ``every``-th and the last), delivered on the loop."""
        if on_preview is None or every is None:
            return None
        if self._previewer is None:
            self._previewer = DevicePreviewer(self.bundle)
        loop = asyncio.get_running_loop()

        def deliver(stage: str, step: int, png: bytes) -> None:
            loop.call_soon_threadsafe(on_preview, stage, step, png)  # runs on the loop, in order

        return self._previewer.step_hook(every, deliver)

    def _threadsafe_progress(self, on_progress: ProgressCallback | None) -> Callable[[int, int], None] | None:
        if on_progress is None:
            return None
        loop = asyncio.get_running_loop()

        def on_step(step: int, total: int) -> None:
            loop.call_soon_threadsafe(on_progress, "device", step, total)  # runs on the loop, in order

        return on_step

    async def _refuse_payload(self, rid: str, exc: EdgeMismatch) -> None:
        """Tell the edge a delivered payload was refused unopened (it then expects no report)."""
        log.error("request %s: refused the edge's payload: %s", rid, exc)
        with contextlib.suppress(ProtocolError, EdgeError):
            self._conn.send_error(rid, "bad_handoff", f"refused by the device: {exc.message}"[:1000])
            await self._flush()

    async def _device_failed(self, rid: str, exc: BaseException) -> None:
        log.error("request %s: device half failed: %s", rid, exc)
        with contextlib.suppress(ProtocolError, EdgeError):
            self._conn.send_error(rid, "internal", f"device failed: {type(exc).__name__}: {exc}"[:1000])
            await self._flush()

    async def _send_report(self, rid: str, timings: Timings, rating: int | None) -> Report | None:
        link = self.link.snapshot()
        report = Report(
            request_id=rid,
            device_compute_s=timings.device_compute_s + timings.decode_s,
            transfer_s=timings.transfer_s,
            total_latency_s=timings.total_latency_s,
            device_load=self.device_load.sample(),
            rtt_s=link.rtt_s,
            bandwidth_bps=link.bandwidth_bps,
            rating=rating,
        )
        if self.closed:
            return None  # the image is ready; the edge just will not hear about it
        try:
            self._conn.send_report(report)
            await self._flush()
        except (EdgeError, ProtocolError) as exc:
            log.warning("request %s: report not sent: %s", rid, exc)
            return None
        return report

    def _abandon(self, rid: str) -> None:
        """Tell the server this side gave up on ``rid`` (best effort, never raises).

        Still in flight: cancel it. Already delivered (the payload raced a timeout or an
        error here): say so, since the server would otherwise wait for its report.
        """
        if self.closed:
            return
        if rid in self._conn.in_flight:
            self._conn.send_cancel(rid)
        elif rid in self._conn.delivered:
            with contextlib.suppress(ProtocolError):
                self._conn.send_error(rid, "cancelled", "the device gave up on this request before it arrived")
        else:
            return
        self._spawn(self._flush_quietly())

    # ----------------------------------------------------------------- I/O

    def _check_open(self) -> None:
        if self._lost is not None:
            raise self._lost.copy()
        if self._closing:
            raise EdgeConnectionError(CONNECTION_LOST, f"the connection to {self.url} is closed")

    async def _flush(self) -> None:
        """The one writer path: send the connection's queued frames in order."""
        async with self._write_lock:
            frames = self._conn.data_to_send()
            try:
                for frame in frames:
                    await self._ws.send(frame)
            except ConnectionClosed as exc:
                raise self._lost_error(exc) from None

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(EdgeError):
            await self._flush()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read_loop(self) -> None:
        """The one reader: every frame through the connection object, events to their requests."""
        closed_by: ConnectionClosed | None = None
        try:
            async for frame in self._ws:
                now = _now()
                if isinstance(frame, str):
                    events = self._conn.receive_text(frame, now)
                else:
                    events = self._conn.receive_bytes(frame, now)
                parse_s = _now() - now
                await self._flush_quietly()  # errors the connection queued for the server
                for event in events:
                    self._dispatch(_Item(event, now, parse_s))
                if self._conn.close is not None:
                    log.warning("closing the connection to %s: %s", self.url, self._conn.close.reason)
                    await self._ws.close(self._conn.close.code, self._conn.close.reason)
                    break
        except ConnectionClosed as exc:
            closed_by = exc
        except Exception:  # a bug here must not leave requests waiting forever
            log.exception("reader for %s failed", self.url)
        finally:
            self._conn.connection_closed()
            self._lost = self._lost_error(closed_by)
            for pending in list(self._pending.values()):
                pending.queue.put_nowait(self._lost.copy())  # one instance per task: tracebacks differ
            if self._pinger is not None:
                self._pinger.cancel()

    def _dispatch(self, item: _Item) -> None:
        event = item.event
        rid = getattr(event, "request_id", None)
        pending = self._pending.get(rid) if rid is not None else None
        if pending is not None:
            pending.queue.put_nowait(item)
            return
        if isinstance(event, (HandoffReceived, ResultReceived)) and rid is not None:
            self._abandon(rid)  # delivered after this side gave up: the server would await a report
        elif isinstance(event, Error) and rid is None:
            if event.code in FATAL_CLOSE_CODES:
                self._fatal = EdgeError.from_error(event, f"{self.url} ended the connection: ")
            else:
                self.notices.append(event)
                log.warning("server %s: %s: %s", self.url, event.code, event.message)
        elif isinstance(event, FrameRejected) and rid is None:
            log.warning("refused a frame from %s: %s", self.url, event.error.message)
            if event.fatal:
                self._fatal = EdgeConnectionError(
                    event.error.code, f"{self.url} broke the protocol: {event.error.message}"
                )
        # Anything else is for a request this side already gave up on: nothing to do.

    def _lost_error(self, exc: ConnectionClosed | None = None) -> EdgeConnectionError:
        if self._lost is not None:
            return self._lost.copy()  # type: ignore[return-value]
        if self._fatal is not None:
            fatal = self._fatal
            return EdgeConnectionError(fatal.code, fatal.message, field=fatal.field)
        if self._closing:
            return EdgeConnectionError(CONNECTION_LOST, f"the connection to {self.url} was closed by this client")
        how = _close_text(exc) if exc is not None else "reader stopped"
        return EdgeConnectionError(CONNECTION_LOST, f"the connection to {self.url} was lost ({how})")

    async def _ping_loop(self, interval: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while not self.closed:
                await asyncio.sleep(interval)
                try:
                    await self.measure_rtt(timeout=max(interval, 1.0))
                except EdgeTimeout:
                    log.warning("no pong from %s within %.3g s", self.url, max(interval, 1.0))
                except EdgeError:
                    return


def _close_text(exc: ConnectionClosed) -> str:
    """Why a websocket closed, for an error message."""
    close = exc.rcvd or exc.sent
    if close is None:
        return "no close frame: the peer went away"
    reason = f" {close.reason}" if close.reason else ""
    return f"close code {close.code}{reason}"


def _decode_png(png: bytes, plan: Plan, limits: DeviceLimits) -> tuple[np.ndarray, float]:
    """An edge-decoded PNG of ``plan``'s size as uint8 (H, W, 3), and the seconds it took."""
    started = _now()
    image = decode_png(png, plan, limits)
    return image, _now() - started


def _checked_deadline(deadline: float | None) -> float | None:
    """A request deadline in seconds (> 0; ``math.inf`` or None: none)."""
    if deadline is None or deadline == math.inf:
        return None
    number = isinstance(deadline, (int, float)) and not isinstance(deadline, bool)
    if not (number and math.isfinite(deadline) and deadline > 0):
        raise ValueError(f"deadline must be > 0 seconds (or None), got {deadline!r}")
    return float(deadline)
