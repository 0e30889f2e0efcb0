"""``rise-edge serve``: the edge daemon, a thin asyncio adapter around the pure parts.

Per websocket connection a :class:`shared.protocol.ServerConnection` turns frames into
events and queues the answers; one writer task per connection sends them in order. The
events go to the :class:`~edge_server.service.RequestService`, which plans, applies
defaults, submits to the :class:`~edge_server.engine.Engine` the server is given (by
default a :class:`~edge_server.engine.BatchingEngine`, batching everyone's large-model
steps off the event loop) and keeps the bookkeeping and metrics. Each ``generate`` becomes
a task that awaits its outcome and sends the handoff (or the PNG, encoded here). SIGTERM
stops taking new work, lets in-flight requests finish (or fails them cleanly after a grace
period), closes every connection with ``shutting_down`` and saves the planner's state.

Floods. The protocol object counts and decides (``shared.protocol.connection``: frame rate,
refusals, outbox, hello deadline); this module enforces with sockets:

* the websocket connection class (:class:`_EdgeWebSocket`) reports the frames the library
  answers itself (pings, pongs, fragments) to the protocol object, drops a peer that has
  taken none of the bytes waiting for it for ``send_timeout_s`` (the library's keepalive
  cannot: its ping waits behind the blocked write), and drops TCP connections beyond twice
  ``max_connections`` (or beyond ``max_connections_per_peer`` mid-handshake from one address)
  before they cost a handshake: the process stays under its descriptor limit;
* ``max_connections`` / ``max_connections_per_peer`` refuse the upgrade with HTTP 503 / 429;
* every close the protocol decides is bounded: a flooding or non-reading peer
  (:attr:`~shared.protocol.connection.Close.abort`) stops being read at once and is dropped
  after ``ABORT_GRACE_S``; any other close gets ``CLOSE_TIMEOUT_S``; SIGTERM's goodbyes too;
* ``socket.accept() out of system resource`` (the descriptor limit) is logged once per
  ``ACCEPT_LOG_INTERVAL_S`` with a count, instead of once per failed accept; so are refused
  and dropped connections (and websockets' own per-connection lines are kept to warnings),
  so a flood cannot write the log at its rate.

Start-up (:class:`Daemon`, what ``rise-edge serve`` runs) goes in the order an operator needs: the
config checked and its warnings said (an exposed host without a token or TLS, a token file others
can read), the websocket port and ``--metrics-port`` bound (a port in use is one line and exit 2,
before any weights load), ``/healthz`` and ``/readyz`` answering (503 while the family loads), the
family loaded, then requests served. This module imports no torch at its top: ``rise-edge serve
--help`` and a bind error come back before torch and diffusers load; the serving parts import them
when they are first needed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import logging
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from websockets.asyncio.server import Server, serve
from websockets.asyncio.server import ServerConnection as WebSocket
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from edge_server.config import (
    DTYPE_CHOICES,
    ENGINE_CHOICES,
    FAMILY_PROFILE,
    LOAD_FAMILIES,
    SCHEDULER_HELP,
    EdgeConfig,
    FamilySpec,
    add_flood_flags,
    config_from_args,
    default_text,
    needs_profile,
    profile_missing,
)
from edge_server.listen import listen
from edge_server.logs import silence_library_noise
from edge_server.metrics import EdgeMetrics
from edge_server.png import encode_png
from shared.bandit.planner import DEFAULT_ALPHA
from shared.errors import RiseError
from shared.planning import Planner
from shared.protocol import (
    Cancel,
    FrameRejected,
    Generate,
    ProtocolLimits,
    Rating,
    Report,
    ServerConnection,
    ServerEvent,
)
from shared.protocol.connection import Close
from shared.samplers import SAMPLER_NAMES

if TYPE_CHECKING:  # the serving parts import torch: loaded when first used (see the module's docstring)
    import numpy as np
    from numpy.typing import NDArray

    from edge_server.engine import Engine
    from edge_server.family import Family, FamilyInfo
    from edge_server.family_pool import FamilyPool
    from edge_server.service import PromptReader, RequestService, Session

__all__ = ["Daemon", "EdgeConfig", "EdgeServer", "build_parser", "config_from_args", "encode_png", "main"]

log = logging.getLogger("rise.edge")

#: Seconds a closing connection gets for its goodbye and closing handshake before its TCP connection is dropped.
CLOSE_TIMEOUT_S = 5.0
#: ... and a flooding or non-reading one (it is no longer read: no handshake can complete).
ABORT_GRACE_S = 1.0
#: At most one log line per this many seconds for accept errors, refused and dropped connections, refused tokens
#: (with a count).
ACCEPT_LOG_INTERVAL_S = 10.0
#: File descriptors kept for everything but connections (models, logs, the metrics server...).
FD_RESERVE = 128
_CONTROL = frozenset({Opcode.PING, Opcode.PONG, Opcode.CONT})  # frames the library handles without the daemon
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LogThrottle:
    """At most one log line per ``interval_s``: :meth:`ready` says when one may go and how many were held back."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._held = 0

    def ready(self) -> int | None:
        """``None``: hold this one back (counted); else log now, mentioning the returned count held back."""
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            self._held += 1
            return None
        held, self._held, self._last = self._held, 0, now
        return held


class _EdgeWebSocket(WebSocket):
    """The websockets connection with what the library leaves to its user: counted control frames, a send
    timeout, connection caps. Subclassed per :class:`EdgeServer` (``edge``) in :meth:`EdgeServer.start`."""

    edge: ClassVar[EdgeServer]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Called for each ping, pong or continuation frame once the daemon's handler runs ...
        self.on_control: Callable[[], None] | None = None
        self.early_frames = 0  # ... and counted here before it does
        self.address = ""  # the peer's IP address
        self.pending = False  # counted among its address's connections still in the opening handshake
        self.peer: str | None = None  # set once admitted (process_request): counted in the per-peer caps
        self._stall_size = 0
        self._stall_since = 0.0
        self._stall_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        edge, config = self.edge, self.edge.config
        edge._tcp.add(self)
        self.address = _address(transport.get_extra_info("peername"))
        if len(edge._tcp) > 2 * config.max_connections:
            why = f"{len(edge._tcp)} TCP connections (at most {2 * config.max_connections} with those mid-handshake)"
        elif edge._pending[self.address] >= config.max_connections_per_peer:
            why = f"too many connections mid-handshake from {self.address}"
        else:
            edge._pending[self.address] += 1
            self.pending = True
            return
        edge._note_refused(why)
        self.transport.abort()  # not even an HTTP answer: the handshake would cost more than the flood

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.edge._release(self)

    def process_event(self, event: Any) -> None:
        super().process_event(event)
        if isinstance(event, WsFrame) and event.opcode in _CONTROL:
            if self.on_control is not None:
                self.on_control()
            else:
                self.early_frames += 1

    # A peer that stops reading pauses our writes; the send timeout drops it if it takes nothing more.

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall_size = self.transport.get_write_buffer_size()
        self._stall_since = self.loop.time()
        self._watch()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _watch(self) -> None:
        if self._stall_timer is None:
            period = self.edge.config.send_timeout_s / 4
            self._stall_timer = self.loop.call_later(period, self._check_stall)

    def _check_stall(self) -> None:
        self._stall_timer = None
        if not self.paused or self.transport.is_closing():
            return
        size, now = self.transport.get_write_buffer_size(), self.loop.time()
        if size < self._stall_size:  # the peer took some: it is slow, not gone
            self._stall_size, self._stall_since = size, now
        elif now - self._stall_since >= self.edge.config.send_timeout_s:
            self.edge._note_dropped(self.address, f"it took none of {size} bytes for {now - self._stall_since:.0f} s")
            self.transport.abort()
            return
        self._watch()


class _Client:
    """One websocket connection: its protocol state, writer wake-up, request tasks and service session."""

    def __init__(self, ws: _EdgeWebSocket, conn: ServerConnection, session: Session) -> None:
        self.ws = ws
        self.conn = conn
        self.session = session
        self.wake = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.writer: asyncio.Task[None] | None = None
        self.closing: asyncio.Task[None] | None = None  # enforces the close the protocol decided
        self.timer: asyncio.TimerHandle | None = None  # the hello deadline


class EdgeServer:
    """The websocket daemon around a :class:`RequestService` on the engine it is given.

    The server owns the engine: :meth:`stop` closes it. :meth:`with_batching_engine` builds the
    default engine from a family (or a loader, which then runs on the engine's thread).
    """

    def __init__(self, engine: Engine, config: EdgeConfig, *, planner: Planner | None = None,
                 metrics: EdgeMetrics | None = None, read_prompt: PromptReader | None = None) -> None:
        from edge_server.service import RequestService  # torch: see the module's docstring

        self.config = config
        self.service: RequestService = RequestService(engine, config, planner=planner, metrics=metrics,
                                                      read_prompt=read_prompt)
        #: Every family's service, by family id; the first is :attr:`service`, the default. An edge serving several
        #: families (:meth:`with_family_pool`) has one each; a connection is served by the one its hello named.
        self.services: dict[str, RequestService] = {self.service.family_id: self.service}
        self.pool: FamilyPool | None = None
        self.token = config.token()
        self.clients: set[_Client] = set()
        self._server: Server | None = None
        self._tcp: set[_EdgeWebSocket] = set()  # every TCP connection, mid-handshake or open
        self._open = 0  # admitted websocket connections
        self._peers: Counter[str] = Counter()  # ... per IP address
        self._pending: Counter[str] = Counter()  # TCP connections still in the opening handshake, per IP address
        self._accept_log = LogThrottle(ACCEPT_LOG_INTERVAL_S)
        self._refused_log = LogThrottle(ACCEPT_LOG_INTERVAL_S)
        self._dropped_log = LogThrottle(ACCEPT_LOG_INTERVAL_S)
        self._unauthorized_log = LogThrottle(ACCEPT_LOG_INTERVAL_S)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    @classmethod
    def with_batching_engine(cls, family: Family | Callable[[], Family], config: EdgeConfig, *,
                             planner: Planner | None = None, metrics: EdgeMetrics | None = None) -> EdgeServer:
        """A server on a :class:`~edge_server.engine.BatchingEngine` configured by ``config``.

        ``family`` may be a loader: the engine's thread then loads it (see BatchingEngine), as ``rise-edge`` does.
        """
        from edge_server.service import make_engine, make_planner

        metrics = metrics or EdgeMetrics()
        config.token()  # a bad token file is named before any weights load
        if planner is None and (config.profile is not None or not needs_profile(config.scheduler)):
            make_planner(config)  # a config error surfaces before any weights load (a shipped profile: after)
        engine = make_engine(family, config, metrics=metrics)
        try:
            loaded = engine.family
            if config.sampler is not None:
                loaded.check_sampler(config.sampler)  # e.g. dpmpp_2m named for an LCM family: refused at start
            shipped = Path(loaded.folder) / FAMILY_PROFILE
            measured = dataclasses.replace(config, max_batch_rows=engine.max_batch_rows)  # auto: what it resolved to
            planner = planner or make_planner(measured, default_sampler=loaded.default_sampler,
                                              family_profile=shipped if shipped.is_file() else None)
            log.info("scheduler: %s", planner.name)
            return cls(engine, config, planner=planner, metrics=metrics, read_prompt=loaded.read_prompt)
        except BaseException:
            engine.close(drain=False, timeout=10.0)
            raise

    @classmethod
    def with_family_pool(cls, pool: FamilyPool, config: EdgeConfig, *,
                         metrics: EdgeMetrics | None = None) -> EdgeServer:
        """A server for every family of ``pool``, each with its own engine, scheduler and prompt reader."""
        from edge_server.service import family_planners

        metrics = metrics or EdgeMetrics()
        config.token()
        described = {fid: (pool.spec(fid), pool.info(fid)) for fid in pool.family_ids}
        server = cls.for_families({fid: pool.engine(fid) for fid in pool.family_ids},
                                  family_planners(config, described), described, config, metrics=metrics)
        server.pool = pool
        return server

    @classmethod
    def for_families(cls, engines: dict[str, Engine], planners: dict[str, Planner],
                     described: dict[str, tuple[FamilySpec, FamilyInfo]], config: EdgeConfig, *,
                     metrics: EdgeMetrics) -> EdgeServer:
        """A server with one request service per family (by family id, the first the default): its engine, its
        planner and the prompt reader of its description; the queue and activity gauges sum over them."""
        from edge_server.service import RequestService, family_prompt_reader

        first, *rest = engines
        server = cls(engines[first], config, planner=planners[first], metrics=metrics,
                     read_prompt=family_prompt_reader(described[first][1]))
        for fid in rest:
            server.services[fid] = RequestService(engines[fid], config, planner=planners[fid], metrics=metrics,
                                                  read_prompt=family_prompt_reader(described[fid][1]))
        services = list(server.services.values())
        metrics.queue_depth.set_function(lambda: sum(s.engine.stats().queued for s in services))
        metrics.active.set_function(lambda: sum(s.engine.stats().active for s in services))
        return server

    def service_for(self, family_id: str) -> RequestService:
        """The service of a connection whose hello named ``family_id`` (the default one before a hello)."""
        return self.services.get(family_id, self.service)

    @property
    def engine(self) -> Engine:
        return self.service.engine

    @property
    def planner(self) -> Planner:
        return self.service.planner

    @property
    def metrics(self) -> EdgeMetrics:
        return self.service.metrics

    @property
    def limits(self) -> ProtocolLimits:
        return self.service.limits

    @property
    def draining(self) -> bool:
        return self.service.draining

    # ------------------------------------------------------------------ lifecycle

    def why_not_ready(self) -> str | None:
        """``/readyz``: None while the server takes requests, else why not (not listening yet, draining)."""
        if self.draining:
            return "the edge is shutting down"
        if self._server is None:
            return "the websocket server is not listening yet"
        return None

    async def start(self, sock: socket.socket | None = None) -> int:
        """Listen (on ``sock`` when given, bound already: see :class:`Daemon`, else on config.host:port);
        return the bound port (config.port 0 = any free port)."""
        _ensure_descriptors(2 * self.config.max_connections + FD_RESERVE, self.config.max_connections)
        self._loop = asyncio.get_running_loop()
        self._previous_handler = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._loop_exception)

        class EdgeWebSocket(_EdgeWebSocket):  # bound to this server, for its caps and settings
            pass

        EdgeWebSocket.edge = self
        where: dict[str, Any] = {"sock": sock} if sock is not None else {
            "host": self.config.host, "port": self.config.port}
        self._server = await serve(
            self._handle, **where,
            max_size=self.limits.max_message_bytes,  # clients send only small text frames
            compression=None,  # tensors do not deflate; it only costs time
            ssl=self.config.ssl_context(), ping_interval=self.config.ping_interval_s,
            ping_timeout=self.config.ping_timeout_s, close_timeout=CLOSE_TIMEOUT_S,
            max_queue=4,  # messages read ahead of the handler (each <= max_message_bytes); then reading pauses
            write_limit=2**16,  # bytes buffered before a send waits (the send timeout watches it)
            process_request=self._admit, create_connection=EdgeWebSocket,
        )
        port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.config.port
        if self.config.metrics_port is not None and self.metrics.server is None:
            self.metrics.serve(self.config.metrics_port, self.config.host, readiness=self.why_not_ready)
        served = ", ".join(self.services) if self.pool is None else ", ".join(
            f"{self.pool.spec(fid).name} ({fid})" for fid in self.services)
        log.info("rise-edge serving famil%s %s on %s:%s", "ies" if len(self.services) > 1 else "y", served,
                 self.config.host, port)
        return int(port)

    async def stop(self) -> None:
        """Graceful stop: no new work, in-flight requests finish (or fail after the grace), state saved.

        Bounded whatever the peers do: after the grace each connection gets ``CLOSE_TIMEOUT_S`` for its
        goodbye, then its TCP connection is dropped (a peer that does not read cannot hold the edge up).
        """
        for service in self.services.values():
            service.draining = True
        tasks = [t for c in self.clients for t in c.tasks.values()]
        if tasks:
            log.info("draining %d in-flight requests (grace %.0f s)", len(tasks), self.config.shutdown_grace_s)
            await asyncio.wait(tasks, timeout=self.config.shutdown_grace_s)
        for service in self.services.values():
            await asyncio.to_thread(service.close, drain=False, timeout=10.0)
        if self.pool is not None:
            await asyncio.to_thread(self.pool.close, drain=False, timeout=10.0)
        for client in list(self.clients):
            client.conn.send_error(None, "shutting_down", "the edge server is shutting down")
            self._poke(client)
        closing = [c.closing for c in self.clients if c.closing is not None]
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_TIMEOUT_S + ABORT_GRACE_S)
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT_S)
            except TimeoutError:  # a handshake or close stuck behind a peer that does not read
                for ws in list(self._tcp):
                    ws.transport.abort()
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT_S)
        if self._loop is not None and self._loop.get_exception_handler() == self._loop_exception:
            self._loop.set_exception_handler(self._previous_handler)
        for service in self.services.values():
            service.save()
        self.metrics.close()
        log.info("rise-edge stopped")

    # ------------------------------------------------------------------ admission and floods

    def _admit(self, ws: WebSocket, request: Request) -> Response | None:
        """``process_request``: refuse the upgrade beyond the connection caps (or while draining)."""
        assert isinstance(ws, _EdgeWebSocket)
        status, why = HTTPStatus.SERVICE_UNAVAILABLE, None
        peer = ws.address
        self._unpend(ws)
        if self.draining:
            why = "the edge server is shutting down"
        elif self._open >= self.config.max_connections:
            why = f"the edge is at its connection limit ({self.config.max_connections})"
        elif self._peers[peer] >= self.config.max_connections_per_peer:
            status = HTTPStatus.TOO_MANY_REQUESTS
            why = f"too many connections from {peer} (at most {self.config.max_connections_per_peer})"
        if why is not None:
            self._note_refused(why)
            response = ws.respond(status, why + "\n")
            response.headers["Retry-After"] = "5"
            return response
        ws.peer = peer
        self._open += 1
        self._peers[peer] += 1
        return None

    def _unpend(self, ws: _EdgeWebSocket) -> None:
        if ws.pending:
            ws.pending = False
            self._pending[ws.address] -= 1
            if self._pending[ws.address] <= 0:
                del self._pending[ws.address]

    def _release(self, ws: _EdgeWebSocket) -> None:
        """A TCP connection is gone: it no longer counts in the caps."""
        self._tcp.discard(ws)
        self._unpend(ws)
        if ws.peer is not None:
            self._open -= 1
            self._peers[ws.peer] -= 1
            if self._peers[ws.peer] <= 0:
                del self._peers[ws.peer]
            ws.peer = None

    def _note_dropped(self, address: str, why: str) -> None:
        held = self._dropped_log.ready()
        if held is not None:
            log.info("dropped a connection from %s: %s (%d more dropped in the last %.0f s)", address, why, held,
                     ACCEPT_LOG_INTERVAL_S)

    def _note_refused(self, why: str) -> None:
        held = self._refused_log.ready()
        if held is not None:
            log.warning("refusing connections: %s (%d more refused in the last %.0f s)", why, held,
                        ACCEPT_LOG_INTERVAL_S)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's exception handler: accept errors at the descriptor limit are logged once per interval."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS and "accept" in str(context.get("message", "")):
            held = self._accept_log.ready()
            if held is not None:
                log.error("cannot accept connections: %s (%d more in the last %.0f s); raise the descriptor limit "
                          "(ulimit -n) or lower --max-connections", exc, held, ACCEPT_LOG_INTERVAL_S)
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: WebSocket) -> None:
        assert isinstance(ws, _EdgeWebSocket)
        conn = ServerConnection(family_id=self.service.family_id, token=self.token, limits=self.limits,
                                opened_at=time.monotonic(), families=tuple(self.services))
        client = _Client(ws, conn, self.service.open_session(ws.address))
        self.clients.add(client)
        writer = client.writer = asyncio.create_task(self._writer(client))
        ws.on_control = lambda: self._control(client)
        if ws.early_frames:
            self._control(client, ws.early_frames)
        self._arm_deadline(client)
        try:
            async for frame in ws:
                now = time.monotonic()
                events = conn.receive_text(frame, now) if isinstance(frame, str) else conn.receive_bytes(frame, now)
                for event in events:
                    self._dispatch(client, event)
                self._poke(client)
                if conn.close is not None:
                    break
        except ConnectionClosed:
            pass
        finally:
            ws.on_control = None
            if client.timer is not None:
                client.timer.cancel()
            self.service_for(conn.family_id).close_session(client.session, conn.connection_closed())
            for task in client.tasks.values():
                task.cancel()
            client.wake.set()
            if conn.close is None:
                writer.cancel()
            # A protocol close (bad hello, wrong token...) first flushes its error frame; _enforce_close bounds it.
            await asyncio.wait({writer}, timeout=CLOSE_TIMEOUT_S + ABORT_GRACE_S)
            if ws.protocol.state is not State.CLOSED:
                # Returning now would leave websockets closing it, waiting on a peer that may never read.
                ws.transport.abort()
            writer.cancel()
            if client.closing is not None:
                client.closing.cancel()
            self.clients.discard(client)

    async def _writer(self, client: _Client) -> None:
        """The one task that sends a connection's frames, in the order they were queued."""
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                for frame in client.conn.data_to_send():
                    await client.ws.send(frame)
                if client.conn.close is not None:
                    await client.ws.close(client.conn.close.code, client.conn.close.reason)
                    return
        except ConnectionClosed:
            return

    def _poke(self, client: _Client) -> None:
        """Wake the writer; if the protocol decided to close, see that the close happens in bounded time."""
        client.wake.set()
        close = client.conn.close
        if close is not None and client.closing is None:
            if close.abort:
                client.ws.transport.pause_reading()  # a flood stops here: nothing more is read (or answered)
            client.closing = asyncio.get_running_loop().create_task(self._enforce_close(client, close))

    async def _enforce_close(self, client: _Client, close: Close) -> None:
        """Give the writer its grace to send the goodbye and close; then drop the TCP connection."""
        grace = ABORT_GRACE_S if close.abort else CLOSE_TIMEOUT_S + ABORT_GRACE_S
        if client.writer is not None:
            await asyncio.wait({client.writer}, timeout=grace)
        if client.ws.protocol.state is not State.CLOSED:
            if close.abort:
                self._note_dropped(client.ws.address, close.reason)
            client.ws.transport.abort()

    def _control(self, client: _Client, frames: int = 1) -> None:
        """Pings, pongs and fragments the library handled: counted against the connection's frame rate."""
        events = client.conn.receive_control(time.monotonic(), frames)
        for event in events:
            self._dispatch(client, event)
        if events:
            self._poke(client)

    def _arm_deadline(self, client: _Client) -> None:
        deadline = client.conn.deadline
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            client.timer = asyncio.get_running_loop().call_later(delay, self._on_deadline, client)

    def _on_deadline(self, client: _Client) -> None:
        client.timer = None
        for event in client.conn.tick(time.monotonic()):
            self._dispatch(client, event)
        if client.conn.close is not None:
            self._poke(client)
        else:
            self._arm_deadline(client)  # the hello came meanwhile (nothing due) or the timer fired early

    def _dispatch(self, client: _Client, event: ServerEvent) -> None:
        service = self.service_for(client.conn.family_id)
        if isinstance(event, Generate):
            refusal = service.refusal(client.session, event.request_id)
            if refusal is not None:
                client.conn.send_error(event.request_id, refusal.code, refusal.message)
                return
            rid = event.request_id
            task = asyncio.create_task(self._serve_request(client, event))
            client.tasks[rid] = task
            task.add_done_callback(lambda _task: client.tasks.pop(rid, None))
        elif isinstance(event, Cancel):
            service.cancel(client.session, event.request_id)
        elif isinstance(event, Report):
            service.report(client.session, event)
        elif isinstance(event, Rating):
            service.rating(event, client.session)  # counted once per request
        elif isinstance(event, FrameRejected):  # its Error is already queued
            service.rejected(event.error.code)
            if event.error.code == "unauthorized":
                held = self._unauthorized_log.ready()
                if held is not None:
                    log.warning("refused a missing or wrong token from %s (%d more refused in the last %.0f s)",
                                client.ws.address, held, ACCEPT_LOG_INTERVAL_S)

    # ------------------------------------------------------------------ one request

    async def _serve_request(self, client: _Client, request: Generate) -> None:
        rid, conn, session = request.request_id, client.conn, client.session
        service = self.service_for(conn.family_id)
        loop = asyncio.get_running_loop()
        try:
            hello = conn.hello
            ticket = service.plan(session, request, device_step_s=hello.device_step_s if hello else None,
                                  relay_modes=conn.relay_modes)
            conn.send_plan(rid, ticket.plan, seed=ticket.seed, height=ticket.height, width=ticket.width,
                           scheduler=ticket.scheduler, why=ticket.why, notice=ticket.notice,
                           loading_s=ticket.loading_s)
            self._poke(client)

            def on_progress(step: int, total: int) -> None:  # engine thread -> event loop
                loop.call_soon_threadsafe(self._progress, client, rid, step, total)

            def on_preview(step: int, total: int, rgb: NDArray[np.uint8]) -> None:  # engine thread -> event loop
                loop.call_soon_threadsafe(self._preview, client, rid, step, total, rgb)

            future = service.submit(ticket, on_progress, on_preview)
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), self.config.request_timeout_s)
            if outcome.image is not None:
                conn.send_result(rid, encode_png(outcome.image), edge_compute_s=outcome.edge_compute_s,
                                 queue_s=outcome.queue_s)
            else:
                assert outcome.handoff is not None
                conn.send_handoff(rid, outcome.handoff, edge_compute_s=outcome.edge_compute_s, queue_s=outcome.queue_s)
            service.delivered(session, ticket, outcome)
        except asyncio.CancelledError:
            service.cancel(session, rid)
            raise
        except Exception as exc:
            failure = service.failed(session, rid, exc)
            conn.send_error(rid, failure.code, failure.message, retry_after_s=failure.retry_after_s)
        finally:
            self._poke(client)

    def _progress(self, client: _Client, rid: str, step: int, total: int) -> None:
        client.conn.send_progress(rid, step, total, stage="edge")
        self._poke(client)

    def _preview(self, client: _Client, rid: str, step: int, total: int, rgb: NDArray[np.uint8]) -> None:
        """A step's progress carrying its live preview (only a request that asked gets one)."""
        client.conn.send_progress(rid, step, total, stage="edge", preview_png=encode_png(rgb))
        self._poke(client)


# ---------------------------------------------------------------------- start-up


class _Readiness:
    """``/readyz`` while the daemon starts: why it is not ready yet, then whatever its server says.

    Read on the metrics server's thread, set on the main thread: each read sees one whole attribute.
    """

    def __init__(self) -> None:
        self.why = "starting"
        self.server: EdgeServer | None = None

    def __call__(self) -> str | None:
        server = self.server
        return self.why if server is None else server.why_not_ready()


FamilyLoader = Callable[[], "Family"]


class Daemon:
    """``rise-edge serve`` from start to exit, in the order an operator needs (see the module's docstring).

    ``load`` loads the family (on the engine's thread: :meth:`EdgeServer.with_batching_engine`). The steps are
    separate so tests can stand between them: :meth:`prepare` (checks, warnings, sockets bound, health served),
    :meth:`load`, :meth:`serve` (until ``stop`` is set); :meth:`close` releases whatever is left.
    """

    def __init__(self, config: EdgeConfig, load: FamilyLoader, *, family_folder: str | Path | None = None,
                 small: str | None = None, families: list[FamilySpec] | None = None) -> None:
        self.config = config
        self._load = load
        #: Several families (``--family NAME=DIR`` more than once, or ``[families.NAME]``): one pool serves them all
        #: (edge_server.family_pool); ``load`` is then unused.
        self.families = families if families is not None and len(families) > 1 else None
        self.family_folder = family_folder  # where load() reads from, for the checks before it
        self.small = small  # --small, for the replicas of --engine ray (they load the family themselves)
        self.metrics = EdgeMetrics()
        self.readiness = _Readiness()
        self.sock: socket.socket | None = None
        self.server: EdgeServer | None = None
        self.port: int | None = None  # the websocket port bound by prepare() (config.port 0: the system's choice)
        self.started = threading.Event()  # set once serve() listens (the server is ready)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.server.port if self.metrics.server is not None else None

    def prepare(self) -> None:
        """Check what can be checked without the model, say the warnings, bind both ports, serve the health.

        Raises a :class:`~shared.errors.RiseError` (one line): a bad token file or TLS pair, a port in use.
        """
        config = self.config
        config.token()  # a bad token file is named before anything else
        config.ssl_context()
        folder = self.family_folder
        if (folder is not None and needs_profile(config.scheduler) and config.profile is None
                and not (Path(folder) / FAMILY_PROFILE).is_file()):
            raise profile_missing(config.scheduler)
        for warning in config.warnings():
            log.warning("%s", warning)
        if self.families is None and (config.memory_budget_mb is not None or config.load_families != "start"):
            log.warning("--memory-budget-mb and --load-families apply to an edge serving several families; "
                        "this one serves one and loads it at start")
        self.sock = listen(config.host, config.port, "websocket")
        self.port = int(self.sock.getsockname()[1])
        if config.metrics_port is not None:
            self.metrics.serve(config.metrics_port, config.host, readiness=self.readiness)
            log.info("health and metrics on http://%s:%d/ (/healthz, /readyz, /metrics)", config.host,
                     self.metrics_port)

    def load(self) -> EdgeServer:
        """Load the family and build the server (``/readyz`` says so meanwhile). Blocks for the load."""
        self.readiness.why = "loading the model family"
        if self.config.threads is not None:
            import torch

            torch.set_num_threads(self.config.threads)
        if self.families is not None:
            self.server = self._load_families(self.families)
        elif self.config.engine == "ray":  # replicas on Ray Serve (edge_server.cluster): only the engine changes
            from edge_server.cluster import cluster_parts

            if self.family_folder is None:
                raise RiseError("--engine ray needs the family folder (its replicas load it themselves)")
            engine, planner = cluster_parts(str(self.family_folder), self.config, small=self.small,
                                            registry=self.metrics.registry)
            self.server = EdgeServer(engine, self.config, planner=planner, metrics=self.metrics)
        else:
            self.server = EdgeServer.with_batching_engine(self._load, self.config, metrics=self.metrics)
        self.readiness.server = self.server
        log.info("config: %s", self.config.described())
        return self.server

    def _load_families(self, specs: list[FamilySpec]) -> EdgeServer:
        """Several families: a pool of engines, each family loaded at start or on first use (``load_families``)."""
        from edge_server.family import load_family
        from edge_server.family_pool import FamilyPool
        from edge_server.placement import resolve_placement
        from edge_server.service import make_engine

        config = self.config
        if config.engine == "ray":  # one deployment; each replica holds the families (edge_server.cluster)
            return self._ray_families(specs)
        placement = resolve_placement(config.device, config.dtype)
        log.info("computing on %s", placement.describe())

        def factory(spec: FamilySpec, info: FamilyInfo) -> Engine:
            def load() -> Family:  # on the engine's own thread (BatchingEngine)
                return load_family(spec.folder, spec.small, variant=spec.variant, placement=placement, info=info)

            return make_engine(load, config, metrics=self.metrics)

        budget = None if config.memory_budget_mb is None else int(config.memory_budget_mb * 1e6)
        pool = FamilyPool(specs, factory, memory_budget_bytes=budget, placement=placement,
                          on_event=self.metrics.observe_family)
        server = EdgeServer.with_family_pool(pool, config, metrics=self.metrics)
        if config.load_families == "start":
            try:
                pool.load_at_start()
            except BaseException:
                pool.close(drain=False, timeout=10.0)
                raise
        return server

    def _ray_families(self, specs: list[FamilySpec]) -> EdgeServer:
        """``--engine ray`` with several families: one deployment whose replicas hold them (each loading one at
        start, the others on demand), and per family a request service with its own planner and prompt reader."""
        from edge_server.cluster import cluster_family_parts
        from edge_server.family import describe_family
        from edge_server.service import family_planners

        config = self.config
        described = {}
        for spec in specs:  # read here, without loading: what each family's planner and reader need
            info = describe_family(spec.folder, spec.small, variant=spec.variant)
            described[info.family_id] = (spec, info)
        planners = family_planners(config, described)  # a config error is said before Ray starts
        cluster, engines = cluster_family_parts(specs, config, registry=self.metrics.registry)
        try:
            server = EdgeServer.for_families(dict(engines), planners, described, config, metrics=self.metrics)
        except BaseException:
            cluster.close(drain=False, timeout=10.0)
            raise
        return server

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve on the bound socket until ``stop`` is set, then stop gracefully."""
        assert self.server is not None and self.sock is not None, "prepare() and load() come first"
        sock, self.sock = self.sock, None  # the server owns it from here
        await self.server.start(sock)
        self.started.set()
        print("rise-edge: ready", flush=True)
        await stop.wait()
        log.info("shutting down")
        await self.server.stop()

    def close(self) -> None:
        """Release what :meth:`serve` did not (a socket never served, the health server; idempotent)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.metrics.close()


def run(config: EdgeConfig, load: FamilyLoader, *, family_folder: str | Path | None = None,
        small: str | None = None, families: list[FamilySpec] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT: 0, or 2 after one line on stderr for a RiseError (a port in use,
    a bad token file, a family that does not load...)."""
    daemon = Daemon(config, load, family_folder=family_folder, small=small, families=families)
    try:
        daemon.prepare()
        daemon.load()
        asyncio.run(_serve_until_signalled(daemon))
    except RiseError as exc:
        print(f"rise-edge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place (while the family loads)
        print("rise-edge: interrupted", file=sys.stderr)
        return 130
    finally:
        daemon.close()
    return 0


async def _serve_until_signalled(daemon: Daemon) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.serve(stop)


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = default_text
    parser = argparse.ArgumentParser(prog="rise-edge", description="RISE edge server")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model family over websockets",
                       description="Serve a model family over websockets. Flags override --config edge.toml.")
    s.add_argument("--family", action="append", metavar="[NAME=]DIR",
                   help="family folder (the large model's pipeline folder); again for several families on one edge "
                        "(a device's hello picks its bundle's), e.g. --family sd15=DIR --family demo=DIR "
                        "(default: [families.NAME] tables in --config)")
    s.add_argument("--small", default=None, help="small denoiser: a subfolder or a path (default: unet_small)")
    s.add_argument("--variant", default=None,
                   help="weights variant to load, e.g. fp16 (default: detected for variant-only folders)")
    s.add_argument("--device", help="auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N "
                                    f"{d('device')}")
    s.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help=f"what the models compute in (auto: fp16 on CUDA, fp32 on a CPU) {d('dtype')}")
    s.add_argument("--config", default=None, help="edge.toml (flags override it)")
    s.add_argument("--host", help=f"address to listen on; 0.0.0.0 for every interface {d('host')}")
    s.add_argument("--port", type=int, help=f"websocket port (0: any free one) {d('port')}")
    s.add_argument("--token-file", help="file holding the token devices must present (default: none, no token)")
    s.add_argument("--tls-cert", help="TLS certificate (PEM), with --tls-key (default: none, plain ws://)")
    s.add_argument("--tls-key", help="TLS private key (PEM), with --tls-cert")
    s.add_argument("--metrics-port", type=int,
                   help="serve Prometheus /metrics, /healthz and /readyz on this port (default: none)")
    s.add_argument("--max-batch-rows", metavar="auto|N",
                   help="UNet rows per call, 2 per guided request (auto: 16 on a CPU; on a GPU as many as its free "
                        "memory holds, at most 64; a number is a ceiling, trimmed on a GPU to what fits) "
                        f"{d('max_batch_rows')}")
    s.add_argument("--max-queue", type=int, help=f"requests queued + running before 'busy' {d('max_queue')}")
    s.add_argument("--no-batching", action="store_true", help="one request at a time (baseline)")
    s.add_argument("--threads", type=int, help="torch intra-op threads for the large model (default: torch's)")
    s.add_argument("--engine", choices=ENGINE_CHOICES,
                   help="local: the engine in this process; ray: replicas of it on Ray Serve, one per accelerator "
                        f"or per CPU slice of --threads CPUs (pip install '.[cluster]') {d('engine')}")
    s.add_argument("--replicas", type=int, help=f"--engine ray: replicas of the engine {d('replicas')}")
    s.add_argument("--ray-address", dest="ray_address",
                   help="--engine ray: join this Ray cluster (auto, or ray://HEAD:10001) (default: start a local "
                        "Ray instance)")
    s.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_s",
                   help=f"seconds in-flight requests get to finish on SIGTERM {d('shutdown_grace_s')}")
    s.add_argument("--ping-interval", type=float, dest="ping_interval_s",
                   help=f"websocket keepalive ping interval in seconds {d('ping_interval_s')}")
    s.add_argument("--ping-timeout", type=float, dest="ping_timeout_s",
                   help=f"close a connection whose pong is this many seconds late {d('ping_timeout_s')}")
    add_flood_flags(s)
    s.add_argument("--scheduler", help=f"{SCHEDULER_HELP} {d('scheduler')}")
    s.add_argument("--profile", help="measured profile JSON for the bandit scheduler (default: the family's "
                                     "profile.json if it ships one)")
    s.add_argument("--bandit-state", help="file the scheduler's learned state persists to (default: none)")
    s.add_argument("--alpha", type=float, help=f"LinUCB exploration weight (default: {DEFAULT_ALPHA})")
    s.add_argument("--load-families", choices=LOAD_FAMILIES, dest="load_families",
                   help=f"several families: load them all at start (as many as the budget holds) or each on its "
                        f"first request {d('load_families')}")
    s.add_argument("--memory-budget-mb", type=float, dest="memory_budget_mb",
                   help="several families: the megabytes their weights may take together; the least recently used "
                        "idle family is evicted to load another (default: no budget)")
    s.add_argument("--speculative-ratio", type=float, dest="speculative_ratio",
                   help="speculative relay: the device starts alone at once when the predicted wait for the "
                        "handoff is at least this times k of its steps, e.g. 0.25 (default: off)")
    s.add_argument("--steps", type=int, help=f"default total steps N, at most the limits' max_steps {d('steps')}")
    s.add_argument("--split-fraction", type=float, help=f"default share of steps on the edge {d('split_fraction')}")
    s.add_argument("--sampler", choices=SAMPLER_NAMES,
                   help="default sampler (default: the family's own: lcm for LCM families, else dpmpp_2m)")
    s.add_argument("--guidance", type=float, help=f"default guidance scale {d('guidance')}")
    return parser


def configure_logging() -> None:
    """The daemon's log: INFO to stderr, one line per record, websockets' own per-connection lines kept to warnings."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs every connection opened and closed at INFO: a connection flood would write the log at its rate.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    silence_library_noise()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args)
        families = config.family_specs(args.family, small=args.small)
    except RiseError as exc:
        print(f"rise-edge: error: {exc}", file=sys.stderr)
        return 2
    first = families[0]

    def load() -> Family:  # runs on the engine's thread, so all of the edge's torch work shares one OpenMP pool
        from edge_server.family import load_family
        from edge_server.placement import resolve_placement

        placement = resolve_placement(config.device, config.dtype)
        log.info("computing on %s", placement.describe())
        return load_family(first.folder, first.small, variant=first.variant, placement=placement)

    if config.engine == "ray":  # without the cluster extra: one line, before any port is bound
        from edge_server.cluster import require_ray

        try:
            require_ray()
        except RiseError as exc:
            print(f"rise-edge: error: {exc}", file=sys.stderr)
            return 2
    return run(config, load, family_folder=first.folder, small=first.small, families=families)


def _address(peername: object) -> str:
    """The IP address of a transport's ``peername`` (a ``(host, port, ...)`` tuple; anything else as text)."""
    return str(peername[0]) if isinstance(peername, (tuple, list)) and peername else str(peername)


def _ensure_descriptors(need: int, max_connections: int) -> None:
    """Raise the soft descriptor limit towards ``need`` (up to the hard limit); warn in one line if it stays short."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < need:
        log.warning("max_connections=%d needs about %d file descriptors but the limit is %d (ulimit -n): lower "
                    "--max-connections or raise the limit", max_connections, need, soft)


if __name__ == "__main__":
    sys.exit(main())
