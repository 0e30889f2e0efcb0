"""``rise-edge serve``: the edge daemon, a thin asyncio adapter around the pure parts.

Per websocket connection a :class:`shared.protocol.ServerConnection` turns frames into
events and queues the answers; one writer task per connection sends them in order. Each
``generate`` becomes a task: the planner chooses the configuration, the
:class:`~edge_server.engine.BatchingEngine` runs the large model's steps (batched with
everyone else's, off the event loop), and the handoff goes back. SIGTERM stops taking new
work, lets in-flight requests finish (or fails them cleanly after a grace period),
closes every connection with ``shutting_down`` and saves the planner's state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from websockets.asyncio.server import Server, serve
from websockets.asyncio.server import ServerConnection as WebSocket
from websockets.exceptions import ConnectionClosed

from edge_server.config import EdgeConfig, config_from_args
from edge_server.engine import (
    BatchingEngine,
    EdgeRequest,
    EngineBusy,
    EngineClosed,
    RequestCancelled,
)
from edge_server.family import Family, load_family
from edge_server.metrics import EdgeMetrics
from shared.errors import ConfigError, RiseError
from shared.planning import FixedPlanner, PlanContext, Planner
from shared.protocol import Cancel, Generate, ProtocolLimits, Rating, Report, ServerConnection

log = logging.getLogger("rise.edge")


def make_planner(config: EdgeConfig) -> Planner:
    """The scheduler the config names: the fixed policy, or a bandit/baseline over a measured profile."""
    if config.scheduler == "fixed":
        return FixedPlanner(config.steps, config.split_fraction, config.sampler, config.guidance)
    if config.profile is None:
        raise ConfigError(
            f"--scheduler {config.scheduler} needs --profile PROFILE.json "
            "(made by: python -m shared.bandit.profile --eval EVAL.json ... --out PROFILE.json)"
        )
    from shared.bandit.planner import BanditPlanner
    from shared.bandit.profile import load_profile

    return BanditPlanner.from_profile(
        load_profile(config.profile), config.scheduler, config.bandit_state,
        sampler=config.sampler, guidance_scale=config.guidance,
        edge_capacity=max(1, config.max_batch_rows // 2), alpha=config.alpha,
    )


class _Client:
    """One websocket connection: its protocol state, writer wake-up, and request tasks."""

    ids = itertools.count(1)

    def __init__(self, ws: WebSocket, conn: ServerConnection) -> None:
        self.id = next(self.ids)
        self.ws = ws
        self.conn = conn
        self.wake = asyncio.Event()
        self.tasks: dict[str, asyncio.Task] = {}
        self.delivered: dict[str, tuple[Any, Generate]] = {}  # request id -> (plan, request) awaiting a report

    def key(self, request_id: str) -> str:
        return f"{self.id}:{request_id}"


class EdgeServer:
    def __init__(self, family: Family | Callable[[], Family], config: EdgeConfig, *, planner: Planner | None = None,
                 metrics: EdgeMetrics | None = None) -> None:
        """``family`` may be a loader: the engine's thread then loads it (see BatchingEngine), as ``rise-edge`` does."""
        self.config = config
        self.metrics = metrics or EdgeMetrics()
        self.planner: Planner = planner or make_planner(config)
        self.limits = ProtocolLimits.from_dict({"allowed_sizes": (), **config.limits})
        self.token = config.token()
        self.engine = BatchingEngine(family, max_batch_rows=config.max_batch_rows, max_queue=config.max_queue,
                                     batching=config.batching, on_batch=self._on_batch)
        self.family = self.engine.family
        self.default_size = self.family.default_latent_size * self.family.vae_scale_factor
        # Read at scrape time: set only after a UNet call, they would go stale once the edge is idle.
        self.metrics.queue_depth.set_function(lambda: self.engine.stats().queued)
        self.metrics.active.set_function(lambda: self.engine.stats().active)
        self.clients: set[_Client] = set()
        self.draining = False
        self._server: Server | None = None

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
        log.info("rise-edge serving family %s on %s:%s", self.family.family_id, self.config.host, port)
        return port

    async def stop(self) -> None:
        """Graceful stop: no new work, in-flight requests finish (or fail after the grace), state saved."""
        self.draining = True
        tasks = [t for c in self.clients for t in c.tasks.values()]
        if tasks:
            log.info("draining %d in-flight requests (grace %.0f s)", len(tasks), self.config.shutdown_grace_s)
            await asyncio.wait(tasks, timeout=self.config.shutdown_grace_s)
        await asyncio.to_thread(self.engine.close, drain=False, timeout=10.0)
        for client in list(self.clients):
            client.conn.send_error(None, "shutting_down", "the edge server is shutting down")
            client.wake.set()
        await asyncio.sleep(0.05)  # let the writers flush the goodbyes
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.planner.save()
        log.info("rise-edge stopped")

    # ------------------------------------------------------------------ connections

    async def _handle(self, ws: WebSocket) -> None:
        conn = ServerConnection(family_id=self.family.family_id, token=self.token, limits=self.limits)
        client = _Client(ws, conn)
        self.clients.add(client)
        self.metrics.connections.inc()
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
            for request_id in conn.connection_closed():
                self.engine.cancel(client.key(request_id))
            for task in client.tasks.values():
                task.cancel()
            client.wake.set()
            if conn.close is None:
                writer.cancel()
            # A protocol close (bad hello, wrong token...) first flushes its error frame.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, ConnectionClosed):
                await asyncio.wait_for(writer, 5)
            self.clients.discard(client)
            self.metrics.connections.dec()

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

    def _dispatch(self, client: _Client, event: Any) -> None:
        if isinstance(event, Generate):
            if self.draining:
                client.conn.send_error(event.request_id, "shutting_down", "the edge server is shutting down")
                self.metrics.errors.labels("shutting_down").inc()
                return
            task = asyncio.create_task(self._serve_request(client, event))
            client.tasks[event.request_id] = task
            task.add_done_callback(lambda _t, rid=event.request_id: client.tasks.pop(rid, None))
        elif isinstance(event, Cancel):
            self.engine.cancel(client.key(event.request_id))
        elif isinstance(event, Report):
            self.metrics.reports.inc()
            if event.rating is not None:
                self.metrics.ratings.labels(str(event.rating)).inc()
            for stage, value in (("device", event.device_compute_s), ("transfer", event.transfer_s),
                                 ("total", event.total_latency_s)):
                self.metrics.stage_seconds.labels(stage).observe(value)
            delivered = client.delivered.pop(event.request_id, None)
            if delivered is not None:
                plan, request = delivered
                self.planner.feedback(plan, request, event)
        elif isinstance(event, Rating):
            # A rating after the report is counted, not learned from: the scheduler's update for that
            # request already happened with the report (ratings inside a report do feed it).
            self.metrics.ratings.labels(str(event.rating)).inc()
        elif hasattr(event, "error"):  # FrameRejected: its Error is already queued
            self.metrics.errors.labels(event.error.code).inc()

    # ------------------------------------------------------------------ one request

    async def _serve_request(self, client: _Client, request: Generate) -> None:
        rid, conn = request.request_id, client.conn
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        def error(code: str, message: str, **kw: Any) -> None:
            conn.send_error(rid, code, message, **kw)
            self.metrics.errors.labels(code).inc()

        try:
            stats = self.engine.stats()
            hello = conn.hello
            context = PlanContext(stats.queued, stats.active, request.device_load, request.rtt_s, request.bandwidth_bps,
                                  hello.device_step_s if hello is not None else None)
            plan, why = self.planner.choose(request, context)
            seed = request.seed if request.seed is not None else secrets.randbelow(2**63)
            height = request.height or self.default_size
            width = request.width or self.default_size
            conn.send_plan(rid, plan, seed=seed, height=height, width=width, scheduler=self.planner.name, why=why)
            client.wake.set()

            def on_progress(step: int, total: int) -> None:  # worker thread -> event loop
                loop.call_soon_threadsafe(self._progress, client, rid, step, total)

            future = self.engine.submit(EdgeRequest(client.key(rid), rid, request.prompt, plan, seed,
                                                    height, width, on_progress))
            outcome = await asyncio.wait_for(asyncio.wrap_future(future), self.config.request_timeout_s)
            if outcome.kind == "png":
                conn.send_result(rid, outcome.payload, edge_compute_s=outcome.edge_compute_s, queue_s=outcome.queue_s)
            else:
                conn.send_handoff(rid, outcome.payload, edge_compute_s=outcome.edge_compute_s, queue_s=outcome.queue_s)
            client.delivered[rid] = (plan, request)
            while len(client.delivered) > 256:  # devices that never report are forgotten
                client.delivered.pop(next(iter(client.delivered)))
            self.metrics.requests.labels(plan.num_inference_steps, plan.split, plan.sampler, plan.decode_on).inc()
            self.metrics.stage_seconds.labels("queue").observe(outcome.queue_s)
            self.metrics.stage_seconds.labels("edge").observe(outcome.edge_compute_s)
            self.metrics.stage_seconds.labels("edge_total").observe(time.perf_counter() - started)
        except EngineBusy as exc:
            error("busy", str(exc), retry_after_s=exc.retry_after_s)
        except EngineClosed as exc:
            error("shutting_down", str(exc))
        except RequestCancelled as exc:
            error("cancelled", str(exc))
        except TimeoutError:
            self.engine.cancel(client.key(rid))
            error("internal", f"the edge did not finish within {self.config.request_timeout_s:.0f} s")
        except RiseError as exc:  # a request the edge cannot serve as asked (size, steps, config)
            error("invalid_request", str(exc))
        except asyncio.CancelledError:
            self.engine.cancel(client.key(rid))
            raise
        except Exception:
            log.exception("request %s failed", rid)
            error("internal", "internal error on the edge (logged)")
        finally:
            client.wake.set()

    def _progress(self, client: _Client, rid: str, step: int, total: int) -> None:
        client.conn.send_progress(rid, step, total, stage="edge")
        client.wake.set()

    def _on_batch(self, requests: int, rows: int) -> None:  # worker thread; prometheus is thread-safe
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_rows.observe(rows)


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rise-edge", description="RISE edge server")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model family over websockets")
    s.add_argument("--family", required=True, help="family folder (the large model's pipeline folder)")
    s.add_argument("--small", default=None, help="small denoiser (subfolder or path; default unet_small)")
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
    s.add_argument("--scheduler", help="fixed (default), linucb, epsilon_greedy, random, edge_only, "
                                       "device_only or one arm such as N20k10")
    s.add_argument("--profile", help="measured profile JSON for the bandit scheduler")
    s.add_argument("--bandit-state", help="file the scheduler's learned state persists to")
    s.add_argument("--alpha", type=float, help="LinUCB exploration weight (default 0.1)")
    s.add_argument("--steps", type=int, help="default total steps N")
    s.add_argument("--split-fraction", type=float, help="default share of steps on the edge")
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
        # Loaded on the engine's thread, so all of the edge's torch work shares one OpenMP pool.
        server = EdgeServer(lambda: load_family(args.family, args.small), config)
        log.info("config: %s", config.described())
        asyncio.run(_serve_until_signalled(server))
    except RiseError as exc:
        print(f"rise-edge: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
