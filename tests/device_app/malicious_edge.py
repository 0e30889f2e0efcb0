"""A malicious edge for the device's tests: the real protocol, the payloads an attacker picks.

The hello and welcome go through the real :class:`shared.protocol.ServerConnection` (so the
device meets a well-formed edge, whose welcome may claim generous limits); each ``generate``
is answered by a script the test writes, on a real websocket (127.0.0.1, a free port)::

    async def attack(turn: Turn) -> None:
        turn.conn.send_plan(turn.rid, RelayPlan(500, 0), seed=1, height=32, width=32, scheduler="evil", why="")
        await turn.flush()

    async with MaliciousEdge(bundle.family_id, attack) as edge:
        async with EdgeClient.connect(edge.url, bundle) as client:
            ...

Also: :func:`handoff_of_shape` (a valid handoff with any latent shape) and :func:`png_bomb`.
No torch: this stands for an edge, but the device's tests need none.
"""

from __future__ import annotations

import asyncio
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, serve
from websockets.asyncio.server import ServerConnection as WebSocket
from websockets.exceptions import ConnectionClosed

from device_app.runtime import DeviceBundle
from shared.handoff import Handoff
from shared.protocol import PNG_SIGNATURE, Cancel, Error, Generate, ProtocolLimits, Report, ServerConnection
from shared.relay_plan import RelayPlan
from shared.samplers import make_sampler

#: Limits a malicious welcome claims: anything goes (the device must not take them as its own).
GENEROUS = ProtocolLimits(max_steps=1000, allowed_sizes=(), requests_per_minute=6000, burst=100)


@dataclass
class Turn:
    """One generate the script answers: the request, the connection to send with, and what the device did."""

    request: Generate
    conn: ServerConnection
    ws: WebSocket
    flush: Callable[[], Awaitable[None]]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # the device sent a cancel

    @property
    def rid(self) -> str:
        return self.request.request_id


Script = Callable[[Turn], Coroutine[Any, Any, None]]


@dataclass
class MaliciousEdge:
    """A websocket server speaking the protocol, answering every generate with ``script``."""

    family_id: str
    script: Script
    limits: ProtocolLimits = GENEROUS
    cancels: list[Cancel] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)  # the device's Error frames (e.g. bad_handoff)
    reports: list[Report] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"ws://{host}:{port}"

    async def __aenter__(self) -> MaliciousEdge:
        self._server = await serve(self._handle, "127.0.0.1", 0, max_size=self.limits.max_message_bytes,
                                   compression=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for task in list(self._tasks):
            task.cancel()
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, ws: WebSocket) -> None:
        conn = ServerConnection(family_id=self.family_id, server_name="evil-edge", limits=self.limits)
        lock = asyncio.Lock()
        turns: dict[str, Turn] = {}

        async def flush() -> None:
            async with lock:  # one writer: an announcement and its binary frame stay adjacent
                try:
                    for frame in conn.data_to_send():
                        await ws.send(frame)
                except ConnectionClosed:
                    pass

        try:
            async for frame in ws:
                now = time.monotonic()
                events = conn.receive_text(frame, now) if isinstance(frame, str) else conn.receive_bytes(frame, now)
                await flush()
                for event in events:
                    if isinstance(event, Generate):
                        turn = turns[event.request_id] = Turn(event, conn, ws, flush)
                        task = asyncio.get_running_loop().create_task(self.script(turn))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    elif isinstance(event, Cancel):
                        self.cancels.append(event)
                        if event.request_id in turns:
                            turns[event.request_id].cancelled.set()
                    elif isinstance(event, Error):
                        self.errors.append(event)
                    elif isinstance(event, Report):
                        self.reports.append(event)
        except ConnectionClosed:
            pass
        finally:
            conn.connection_closed()


def handoff_of_shape(bundle: DeviceBundle, plan: RelayPlan, shape: tuple[int, ...], *, request_id: str,
                     seed: int = 1) -> Handoff:
    """A handoff that passes the wire decoder, at step 0 of ``plan`` (split 0), with a latent of ``shape``."""
    if plan.split != 0:
        raise ValueError("handoff_of_shape builds step-0 handoffs (plan.split == 0)")
    manifest = bundle.manifest
    sampler = make_sampler(plan.sampler, manifest.scheduler_config)
    sampler.set_timesteps(plan.num_inference_steps)
    rng = np.random.default_rng(seed)
    return Handoff(
        family_id=bundle.family_id, sampler=plan.sampler, num_inference_steps=plan.num_inference_steps, split=0,
        guidance_scale=plan.guidance_scale, seed=seed, timesteps=np.asarray(sampler.timesteps, dtype=np.float32),
        latents=rng.standard_normal(shape, dtype=np.float32),
        cond_embeddings=np.repeat(bundle.uncond, shape[0], axis=0).astype(np.float32),
        sampler_state=sampler.state(), request_id=request_id, guidance=manifest.guidance,
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A valid all-black RGB PNG of ``width`` x ``height`` (12000 x 12000: 432 MB of pixels in about 420 KB)."""
    row = b"\x00" * (1 + 3 * width)  # filter byte 0, then the pixels
    z = zlib.compressobj(9)
    block = row * 400
    parts = [z.compress(block) for _ in range(height // 400)] + [z.compress(row) for _ in range(height % 400)]
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
