"""A small real edge server for the device client's tests: the real protocol, no batching.

Built from :class:`shared.protocol.ServerConnection` and :class:`edge_server.relay.EdgeRelay`
on a real websocket (127.0.0.1, a free port), running in the test's event loop. The
large model runs in one worker thread, one request at a time (the real daemon batches;
this is a test double that speaks the real protocol). Knobs make it misbehave the ways
a client must survive: refuse requests (``busy``, a policy error), vanish mid-request,
or stall.

    async with FakeEdge(tiny_family, token="s3cret") as edge:
        async with EdgeClient.connect(edge.url, bundle, token="s3cret") as client:
            ...
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from websockets.asyncio.server import Server, serve
from websockets.asyncio.server import ServerConnection as WebSocket
from websockets.exceptions import ConnectionClosed

from edge_server.family import Family
from edge_server.relay import EdgeRelay, decode_latents
from shared.handoff import Handoff, encode_handoff
from shared.protocol import (
    PROTOCOL_VERSIONS,
    Cancel,
    Error,
    Generate,
    ProtocolLimits,
    Rating,
    Report,
    ServerConnection,
)
from shared.relay_plan import RelayPlan

DEFAULT_PLAN = RelayPlan(6, 3, "dpmpp_2m", 5.0)


@dataclass
class Served:
    """What the fake edge did for one request (tests compare the client's result to it)."""

    request: Generate
    plan: RelayPlan
    seed: int
    handoff: Handoff | None = None
    payload_bytes: int = 0


@dataclass
class FakeEdge:
    """A real websocket edge server for tests. See the module docstring.

    ``min_steps``: requests asking for fewer steps get ``invalid_request`` (a server-side
    policy the client cannot check). ``busy_first``: the first n requests get ``busy``
    with ``retry_after_s``. ``vanish_after_plan``: the server drops the TCP connection
    (no close frame) right after sending a plan. ``stall``: the server sends the plan and
    then nothing. ``speculative``: the plans it makes say so; ``loading_s``: they say a family load is ahead. ``hold_handoff``: awaited after the
    edge's steps, before the handoff goes out (a late edge, without clocks); :attr:`cancelled` is
    set when a ``cancel`` arrives. ``preview_png``: sent as the preview of every
    ``preview_every``-th edge step of a request that asked for previews.
    """

    family: Family
    token: str | None = None
    family_id: str | None = None  # the family the server claims (default: the loaded one's)
    plan: RelayPlan = DEFAULT_PLAN
    limits: ProtocolLimits = field(default_factory=lambda: ProtocolLimits(allowed_sizes=(), requests_per_minute=6000, burst=100))
    min_steps: int = 2
    busy_first: int = 0
    retry_after_s: float = 0.05
    vanish_after_plan: bool = False
    stall: bool = False
    speculative: bool = False
    loading_s: float | None = None  # what its plans say of a family load ahead (Plan.loading_s)
    hold_handoff: Callable[[], Awaitable[object]] | None = None
    preview_png: bytes | None = None
    versions: tuple[int, ...] = PROTOCOL_VERSIONS  # the protocol versions it speaks ((1,): a first-release edge)
    served: dict[str, Served] = field(default_factory=dict)  # by request id
    reports: list[Report] = field(default_factory=list)
    ratings: list[Rating] = field(default_factory=list)
    client_errors: list[Error] = field(default_factory=list)
    cancels: list[Cancel] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self._relay = EdgeRelay(self.family)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-edge")  # one request at a time
        self._server: Server | None = None
        self._busy_left = self.busy_first
        self._tasks: set[asyncio.Task[Any]] = set()
        self.cancelled = asyncio.Event()
        side = self.family.default_latent_size * self.family.vae_scale_factor
        self.size = (side, side)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"ws://{host}:{port}"

    async def __aenter__(self) -> FakeEdge:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, max_size=self.limits.max_message_bytes, compression=None,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        self._executor.shutdown(wait=True)

    # ----------------------------------------------------------------- one connection

    async def _handle(self, ws: WebSocket) -> None:
        self.connections += 1
        conn = ServerConnection(
            family_id=self.family_id or self.family.family_id, server_name="fake-edge", token=self.token,
            limits=self.limits, versions=self.versions,
        )
        lock = asyncio.Lock()

        async def flush() -> None:
            async with lock:  # one writer: an announcement and its binary frame stay adjacent
                try:
                    for frame in conn.data_to_send():
                        await ws.send(frame)
                    if conn.close is not None:
                        await ws.close(conn.close.code, conn.close.reason)
                except ConnectionClosed:
                    pass

        tasks: set[asyncio.Task[Any]] = set()
        try:
            async for frame in ws:
                now = time.monotonic()
                events = conn.receive_text(frame, now) if isinstance(frame, str) else conn.receive_bytes(frame, now)
                await flush()
                for event in events:
                    if isinstance(event, Generate):
                        task = asyncio.get_running_loop().create_task(self._serve(ws, conn, event, flush))
                        tasks.add(task)
                        self._tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        task.add_done_callback(self._tasks.discard)
                    elif isinstance(event, Report):
                        self.reports.append(event)
                    elif isinstance(event, Rating):
                        self.ratings.append(event)
                    elif isinstance(event, Cancel):
                        self.cancels.append(event)  # the handoff, when ready, becomes a "cancelled" error
                        self.cancelled.set()
                    elif isinstance(event, Error):
                        self.client_errors.append(event)
                if conn.close is not None:
                    break
        except ConnectionClosed:
            pass
        finally:
            conn.connection_closed()
            for task in tasks:
                task.cancel()

    async def _serve(self, ws: WebSocket, conn: ServerConnection, request: Generate, flush: Any) -> None:
        rid = request.request_id
        enqueued = time.perf_counter()
        if self._busy_left > 0:
            self._busy_left -= 1
            conn.send_error(rid, "busy", "the fake edge is busy", retry_after_s=self.retry_after_s)
            await flush()
            return
        steps = request.pinned.num_inference_steps if request.pinned else request.steps or self.plan.num_inference_steps
        if steps < self.min_steps:
            conn.send_error(rid, "invalid_request", f"steps: expected at least {self.min_steps}, got {steps}", field="steps")
            await flush()
            return
        if request.pinned is not None:
            plan, why, policy = request.pinned, "pinned by the client", "pinned"
        else:
            split = round(steps * self.plan.split / self.plan.num_inference_steps)
            plan = RelayPlan(steps, split, self.plan.sampler, self.plan.guidance_scale, speculative=self.speculative)
            why, policy = f"fixed policy: edge runs {split} of {steps} steps", "fixed"
        seed = request.seed if request.seed is not None else int(np.random.default_rng().integers(2**31))
        height, width = self.size
        conn.send_plan(rid, plan, seed=seed, height=height, width=width, scheduler=policy, why=why,
                       loading_s=self.loading_s)
        served = self.served[rid] = Served(request, plan, seed)
        await flush()
        if self.vanish_after_plan:
            ws.transport.abort()  # a crash: no close frame, the socket just goes
            return
        if self.stall:
            await asyncio.sleep(3600)
        loop = asyncio.get_running_loop()

        every = request.preview_every

        def on_step(step: int, total: int) -> None:  # worker thread -> the loop, in order
            # A step with a preview is one progress frame carrying it, as the real edge sends it.
            preview = self.preview_png if every is not None and step % every == 0 else None
            loop.call_soon_threadsafe(_progress, conn, rid, step, plan.split, preview)
            loop.call_soon_threadsafe(lambda: self._spawn(flush()))

        started: list[float] = []

        def work() -> Handoff | bytes:  # on the edge's one worker thread
            started.append(time.perf_counter())
            if plan.decode_on == "edge":
                return self._edge_decoded(request.prompt, plan, seed, rid, on_step)
            return self._relay.start(request.prompt, plan, seed, request_id=rid, on_step=on_step)

        out = await loop.run_in_executor(self._executor, work)
        timing = {"edge_compute_s": time.perf_counter() - started[0], "queue_s": started[0] - enqueued}
        if self.hold_handoff is not None:
            await self.hold_handoff()
        if isinstance(out, bytes):
            conn.send_result(rid, out, **timing)
            served.payload_bytes = len(out)
        else:
            payload = encode_handoff(out)
            conn.send_handoff(rid, payload, **timing)
            served.handoff, served.payload_bytes = out, len(payload)
        await flush()

    def _edge_decoded(self, prompt: str, plan: RelayPlan, seed: int, rid: str, on_step: Any) -> bytes:
        handoff = self._relay.start(prompt, plan, seed, request_id=rid, on_step=on_step)
        image = decode_latents(self.family, torch.from_numpy(handoff.latents))[0]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _progress(conn: ServerConnection, rid: str, step: int, total: int, preview: bytes | None = None) -> None:
    if rid in conn.in_flight:
        conn.send_progress(rid, step, total, preview_png=preview)
