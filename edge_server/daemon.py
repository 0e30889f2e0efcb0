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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from websockets.asyncio.server import Server, serve
from websockets.asyncio.server import ServerConnection as WebSocket
from websockets.exceptions import ConnectionClosed

from edge_server.config import EdgeConfig, config_from_args
from edge_server.engine import Engine
from edge_server.family import Family, load_family
from edge_server.metrics import EdgeMetrics
from edge_server.placement import DTYPE_CHOICES, resolve_placement
from edge_server.png import encode_png
from edge_server.service import FAMILY_PROFILE, RequestService, Session, make_engine, make_planner
from shared.errors import ConfigError, RiseError
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
from shared.samplers import SAMPLER_NAMES

__all__ = ["EdgeConfig", "EdgeServer", "build_parser", "config_from_args", "encode_png", "main", "make_planner"]

log = logging.getLogger("rise.edge")


class _Client:
    """One websocket connection: its protocol state, writer wake-up, request tasks and service session."""

    def __init__(self, ws: WebSocket, conn: ServerConnection, session: Session) -> None:
        self.ws = ws
        self.conn = conn
        self.session = session
        self.wake = asyncio.Event()
        self.tasks: dict[str, asyncio.Task[None]] = {}


class EdgeServer:
    """The websocket daemon around a :class:`RequestService` on the engine it is given.

    The server owns the engine: :meth:`stop` closes it. :meth:`with_batching_engine` builds the
    default engine from a family (or a loader, which then runs on the engine's thread).
    """

    def __init__(self, engine: Engine, config: EdgeConfig, *, planner: Planner | None = None,
                 metrics: EdgeMetrics | None = None) -> None:
        self.config = config
        self.service = RequestService(engine, config, planner=planner, metrics=metrics)
        self.token = config.token()
        self.clients: set[_Client] = set()
        self._server: Server | None = None

    @classmethod
    def with_batching_engine(cls, family: Family | Callable[[], Family], config: EdgeConfig, *,
                             planner: Planner | None = None, metrics: EdgeMetrics | None = None) -> EdgeServer:
        """A server on a :class:`~edge_server.engine.BatchingEngine` configured by ``config``.

        ``family`` may be a loader: the engine's thread then loads it (see BatchingEngine), as ``rise-edge`` does.
        """
        metrics = metrics or EdgeMetrics()
        if planner is None:
            make_planner(config)  # a config error surfaces before any weights load
        engine = make_engine(family, config, on_batch=metrics.observe_batch)
        try:
            loaded = engine.family
            if config.sampler is not None:
                loaded.check_sampler(config.sampler)  # e.g. dpmpp_2m named for an LCM family: refused at start
            shipped = Path(loaded.folder) / FAMILY_PROFILE
            planner = planner or make_planner(config, default_sampler=loaded.default_sampler,
                                              family_profile=shipped if shipped.is_file() else None)
            log.info("scheduler: %s", planner.name)
            return cls(engine, config, planner=planner, metrics=metrics)
        except BaseException:
            engine.close(drain=False, timeout=10.0)
            raise

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

    async def start(self) -> int:
        """Listen; return the bound port (config.port 0 = any free port)."""
        self._server = await serve(
            self._handle, self.config.host, self.config.port,
            max_size=self.limits.max_message_bytes,  # clients send only small text frames
            compression=None,  # tensors do not deflate; it only costs time
            ssl=self.config.ssl_context(), ping_interval=self.config.ping_interval_s,
            ping_timeout=self.config.ping_timeout_s, close_timeout=5,
        )
        port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self.config.port
        if self.config.metrics_port is not None:
            self.metrics.serve(self.config.metrics_port, self.config.host)
        log.info("rise-edge serving family %s on %s:%s", self.service.family_id, self.config.host, port)
        return int(port)

    async def stop(self) -> None:
        """Graceful stop: no new work, in-flight requests finish (or fail after the grace), state saved."""
        self.service.draining = True
        tasks = [t for c in self.clients for t in c.tasks.values()]
        if tasks:
            log.info("draining %d in-flight requests (grace %.0f s)", len(tasks), self.config.shutdown_grace_s)
            await asyncio.wait(tasks, timeout=self.config.shutdown_grace_s)
        await asyncio.to_thread(self.service.close, drain=False, timeout=10.0)
        for client in list(self.clients):
            client.conn.send_error(None, "shutting_down", "the edge server is shutting down")
            client.wake.set()
        await asyncio.sleep(0.05)  # let the writers flush the goodbyes
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.service.save()
        log.info("rise-edge stopped")

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: WebSocket) -> None:
        conn = ServerConnection(family_id=self.service.family_id, token=self.token, limits=self.limits)
        client = _Client(ws, conn, self.service.open_session())
        self.clients.add(client)
        writer = asyncio.create_task(self._writer(client))
        try:
            async for frame in ws:
                now = time.monotonic()
                events = conn.receive_text(frame, now) if isinstance(frame, str) else conn.receive_bytes(frame, now)
                for event in events:
                    self._dispatch(client, event)
                client.wake.set()
                if conn.close is not None:
                    break
        except ConnectionClosed:
            pass
        finally:
            self.service.close_session(client.session, conn.connection_closed())
            for task in client.tasks.values():
                task.cancel()
            client.wake.set()
            if conn.close is None:
                writer.cancel()
            # A protocol close (bad hello, wrong token...) first flushes its error frame.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, ConnectionClosed):
                await asyncio.wait_for(writer, 5)
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

    def _dispatch(self, client: _Client, event: ServerEvent) -> None:
        if isinstance(event, Generate):
            refusal = self.service.refusal()
            if refusal is not None:
                client.conn.send_error(event.request_id, refusal.code, refusal.message)
                return
            rid = event.request_id
            task = asyncio.create_task(self._serve_request(client, event))
            client.tasks[rid] = task
            task.add_done_callback(lambda _task: client.tasks.pop(rid, None))
        elif isinstance(event, Cancel):
            self.service.cancel(client.session, event.request_id)
        elif isinstance(event, Report):
            self.service.report(client.session, event)
        elif isinstance(event, Rating):
            self.service.rating(event.rating)
        elif isinstance(event, FrameRejected):  # its Error is already queued
            self.service.rejected(event.error.code)

    # ------------------------------------------------------------------ one request

    async def _serve_request(self, client: _Client, request: Generate) -> None:
        rid, conn, session = request.request_id, client.conn, client.session
        loop = asyncio.get_running_loop()
        try:
            hello = conn.hello
            ticket = self.service.plan(session, request, device_step_s=hello.device_step_s if hello else None)
            conn.send_plan(rid, ticket.plan, seed=ticket.seed, height=ticket.height, width=ticket.width,
                           scheduler=ticket.scheduler, why=ticket.why)
            client.wake.set()

            def on_progress(step: int, total: int) -> None:  # engine thread -> event loop
                loop.call_soon_threadsafe(self._progress, client, rid, step, total)

            future = self.service.submit(ticket, on_progress)
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), self.config.request_timeout_s)
            if outcome.image is not None:
                conn.send_result(rid, encode_png(outcome.image), edge_compute_s=outcome.edge_compute_s,
                                 queue_s=outcome.queue_s)
            else:
                assert outcome.handoff is not None
                conn.send_handoff(rid, outcome.handoff, edge_compute_s=outcome.edge_compute_s, queue_s=outcome.queue_s)
            self.service.delivered(session, ticket, outcome)
        except asyncio.CancelledError:
            self.service.cancel(session, rid)
            raise
        except Exception as exc:
            failure = self.service.failed(session, rid, exc)
            conn.send_error(rid, failure.code, failure.message, retry_after_s=failure.retry_after_s)
        finally:
            client.wake.set()

    def _progress(self, client: _Client, rid: str, step: int, total: int) -> None:
        client.conn.send_progress(rid, step, total, stage="edge")
        client.wake.set()


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rise-edge", description="RISE edge server")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model family over websockets")
    s.add_argument("--family", required=True, help="family folder (the large model's pipeline folder)")
    s.add_argument("--small", default=None, help="small denoiser (subfolder or path; default unet_small)")
    s.add_argument("--variant", default=None,
                   help="weights variant to load, e.g. fp16 (default: detected for variant-only folders)")
    s.add_argument("--device", help="auto (default: the first CUDA device, else the CPU), cpu, cuda or cuda:N")
    s.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="what the models compute in: auto (default: fp16 on CUDA, fp32 on a CPU), fp32, fp16, bf16")
    s.add_argument("--config", default=None, help="edge.toml (flags override it)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--token-file")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    s.add_argument("--max-batch-rows", type=int, help="UNet rows per call (2 per guided request)")
    s.add_argument("--max-queue", type=int, help="requests queued + running before 'busy'")
    s.add_argument("--no-batching", action="store_true", help="one request at a time (baseline)")
    s.add_argument("--threads", type=int, help="torch intra-op threads for the large model")
    s.add_argument("--shutdown-grace", type=float, dest="shutdown_grace_s",
                   help="seconds in-flight requests get to finish on SIGTERM (default 30)")
    s.add_argument("--ping-interval", type=float, dest="ping_interval_s",
                   help="websocket keepalive ping interval in seconds (default 20)")
    s.add_argument("--ping-timeout", type=float, dest="ping_timeout_s",
                   help="close a connection whose pong is this many seconds late (default 20)")
    s.add_argument("--scheduler", help="auto (default: linucb over the family's profile.json or --profile, else "
                                       "fixed), fixed, linucb, linucb_disjoint, epsilon_greedy, random, edge_only, "
                                       "device_only or one arm such as N20k10")
    s.add_argument("--profile", help="measured profile JSON for the bandit scheduler")
    s.add_argument("--bandit-state", help="file the scheduler's learned state persists to")
    s.add_argument("--alpha", type=float, help="LinUCB exploration weight (default 0.1)")
    s.add_argument("--steps", type=int, help="default total steps N")
    s.add_argument("--split-fraction", type=float, help="default share of steps on the edge")
    s.add_argument("--sampler", choices=SAMPLER_NAMES,
                   help="default sampler (default: the family's own: lcm for LCM families, else dpmpp_2m)")
    s.add_argument("--guidance", type=float, help="default guidance scale (default 7.5)")
    return parser


async def _serve_until_signalled(server: EdgeServer) -> None:
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("rise-edge: ready", flush=True)
    await stop.wait()
    log.info("signal received: shutting down")
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        if config.threads is not None:
            if config.threads < 1:
                raise ConfigError(f"--threads must be >= 1, got {config.threads}")
            torch.set_num_threads(config.threads)
        placement = resolve_placement(config.device, config.dtype)
        log.info("computing on %s", placement.describe())
        # Loaded on the engine's thread, so all of the edge's torch work shares one OpenMP pool.
        server = EdgeServer.with_batching_engine(
            lambda: load_family(args.family, args.small, variant=config.variant, placement=placement), config
        )
        log.info("config: %s", config.described())
        asyncio.run(_serve_until_signalled(server))
    except RiseError as exc:
        print(f"rise-edge: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
