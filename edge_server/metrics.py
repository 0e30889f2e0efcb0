"""Prometheus metrics of the edge daemon (prometheus-client), on a registry of their own, and their HTTP server.

The HTTP server (``--metrics-port``) answers three paths, GET or HEAD: ``/metrics`` (Prometheus),
``/healthz`` (200 while the process runs: it is alive) and ``/readyz`` (200 once the family is
loaded and the engine takes requests; 503 with the reason while the family loads, while draining
on SIGTERM, or once the engine stopped). Any other path is 404.

:class:`MetricsServer` replaces ``prometheus_client.start_http_server``, which starts a thread per
connection and never times a read out (1,000 half-open connections made 1,000 threads that lived
for ever). Here one thread runs an asyncio loop of its own (so a stalled daemon loop does not stall
scrapes, and a flood of scrapers does not stall the daemon): a request head must arrive within
``read_timeout_s``, at most ``max_connections`` are open at once and a new one closes the oldest
(so a scraper still gets in while idle sockets hold every slot), and each connection serves one
request. :func:`http_response` is the request-to-response part, pure and tested without sockets.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, gzip_accepted

from edge_server.listen import listen

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: Longest request head (request line and headers) read; a longer one closes the connection.
MAX_HEAD_BYTES = 8192

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
PATHS = ("/metrics", "/healthz", "/readyz")

#: Why the edge does not take requests now, or None when it does (``/readyz``); called on the server's thread.
ReadinessProbe = Callable[[], str | None]


def _not_told() -> str | None:
    return "readiness is not reported by this server"


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("rise_edge_queue_depth", "Requests waiting for the large model", registry=r)
        self.active = Gauge("rise_edge_active_requests", "Requests in the large model's steps", registry=r)
        self.connections = Gauge("rise_edge_connections", "Open websocket connections", registry=r)
        self.batch_requests = Histogram("rise_edge_batch_requests", "Requests per UNet call",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.batch_rows = Histogram("rise_edge_batch_rows", "UNet batch rows per call (2 per guided request)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        # edge_server.row_budget: the rows a call may take (auto: what fits the GPU), lowered by out-of-memory errors
        self.max_batch_rows = Gauge("rise_edge_max_batch_rows", "UNet rows a call may take at the family's default "
                                    "size (auto: what fits the GPU's free memory)", ["family"], registry=r)
        self.out_of_memory = Counter("rise_edge_out_of_memory", "UNet calls that ran out of device memory (retried in "
                                     "smaller calls; a request that alone does not fit fails)", ["family"], registry=r)
        self.stage_seconds = Histogram("rise_edge_stage_seconds", "Latency per stage", ["stage"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("rise_edge_requests", "Requests served per relay configuration",
                                ["steps", "split", "sampler", "decode_on"], registry=r)
        self.errors = Counter("rise_edge_errors", "Errors sent, by code", ["code"], registry=r)
        self.reports = Counter("rise_edge_reports", "Device reports received", registry=r)
        self.ratings = Counter("rise_edge_ratings", "User ratings received (in reports or later)", ["rating"],
                               registry=r)
        # Several families on one edge (edge_server.family_pool): which are loaded, what loading costs.
        self.families_loaded = Gauge("rise_edge_families_loaded", "Model families loaded (1) or not (0)",
                                     ["family"], registry=r)
        self.family_loads = Counter("rise_edge_family_loads", "Model family loads (cold starts)", ["family"],
                                    registry=r)
        self.family_evictions = Counter("rise_edge_family_evictions", "Families evicted under the memory budget",
                                        ["family"], registry=r)
        self.family_load_seconds = Histogram("rise_edge_family_load_seconds", "Seconds a family took to load",
                                             buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.server: MetricsServer | None = None

    def observe_family(self, family: str, event: str, seconds: float) -> None:
        """A family loaded (``event`` "load", in ``seconds``) or evicted ("evict"); a pool's ``on_event``."""
        if event == "load":
            self.family_loads.labels(family).inc()
            self.family_load_seconds.observe(seconds)
            self.families_loaded.labels(family).set(1)
        else:
            self.family_evictions.labels(family).inc()
            self.families_loaded.labels(family).set(0)

    def observe_row_limit(self, family: str, rows: int, out_of_memory: bool) -> None:
        """A family's engine set its rows per call (at start), or lowered them after a call ran out of memory
        (an engine's ``on_row_limit``; thread-safe)."""
        self.max_batch_rows.labels(family).set(rows)
        if out_of_memory:
            self.out_of_memory.labels(family).inc()

    def observe_batch(self, requests: int, rows: int) -> None:
        """One UNet call of ``requests`` requests and ``rows`` rows (an engine's ``on_batch``; thread-safe)."""
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)

    def serve(self, port: int, host: str = "127.0.0.1", *, read_timeout_s: float = 5.0,
              max_connections: int = 32, readiness: ReadinessProbe | None = None) -> MetricsServer:
        """Expose /metrics, /healthz and /readyz over HTTP on one background thread (port 0: any free one);
        :meth:`close` stops it. ``readiness`` answers /readyz (None: always 503, nobody says it is ready).

        The port is bound before this returns, so a port in use raises :class:`~edge_server.listen.BindError`.
        """
        if self.server is not None:
            raise RuntimeError(f"metrics are already served on port {self.server.port}")
        self.server = MetricsServer(self.registry, port, host, read_timeout_s=read_timeout_s,
                                    max_connections=max_connections, readiness=readiness)
        return self.server

    def close(self) -> None:
        """Stop the HTTP server :meth:`serve` started, if any (idempotent)."""
        if self.server is not None:
            self.server.stop()
            self.server = None


def http_response(head: bytes, registry: CollectorRegistry, readiness: ReadinessProbe = _not_told) -> bytes:
    """The whole HTTP/1.1 response to one request head (request line and headers, up to the blank line).

    ``/metrics`` as ``start_http_server`` did: the format the ``Accept`` header asks for (OpenMetrics for a
    Prometheus that asks, else the text format), gzipped when ``Accept-Encoding`` allows. ``/healthz``: 200.
    ``/readyz``: 200, or 503 with what ``readiness()`` says is missing. Anything else: 404.
    """
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response(400, b"bad request line\n")
    method, target, _ = parts
    path = urlsplit(target).path
    if path not in PATHS:
        return _response(404, f"not found; served here: {', '.join(PATHS)}\n".encode())
    if method not in ("GET", "HEAD"):
        return _response(405, b"use GET\n", extra=("Allow: GET, HEAD",))
    send_body = method == "GET"
    if path == "/healthz":
        return _response(200, b"ok\n", send_body=send_body)
    if path == "/readyz":
        try:
            why_not = readiness()
        except Exception as exc:  # a broken probe reads as not ready, never as a dead server
            why_not = f"the readiness check failed: {exc}"
        if why_not is None:
            return _response(200, b"ready\n", send_body=send_body)
        return _response(503, f"not ready: {why_not}\n".encode(), send_body=send_body)
    headers: dict[str, str] = {}
    extra: tuple[str, ...]
    for line in header_lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    body, extra = encoder(registry), ()
    if gzip_accepted(headers.get("accept-encoding", "")):
        body, extra = gzip.compress(body), ("Content-Encoding: gzip",)
    return _response(200, body, content_type=content_type, extra=extra, send_body=send_body)


def _response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              extra: tuple[str, ...] = (), send_body: bool = True) -> bytes:
    lines = (f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", *extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if send_body else b"")


class MetricsServer:
    """HTTP ``/metrics`` of ``registry`` (and ``/healthz``, ``/readyz``) on ``host:port``, served by one
    thread whatever the clients do.

    The socket is bound in the constructor (``port`` 0: any free one, see :attr:`port`); a port in use is a
    :class:`~edge_server.listen.BindError`. :meth:`stop` closes it and every open connection and joins the
    thread. ``readiness`` answers ``/readyz`` (see :func:`http_response`).
    """

    def __init__(self, registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1", *,
                 read_timeout_s: float = 5.0, max_connections: int = 32,
                 readiness: ReadinessProbe | None = None) -> None:
        if not read_timeout_s > 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self.registry = registry
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self.readiness: ReadinessProbe = readiness or _not_told
        self._sock = listen(host, port, "metrics", backlog=128)
        self.port: int = self._sock.getsockname()[1]
        # Insertion order is age: the first key is the oldest connection, the one a new one closes.
        self._open: dict[asyncio.StreamWriter, None] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"rise-metrics-{self.port}", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    @property
    def open_connections(self) -> int:
        """Connections open now (read from another thread: a snapshot)."""
        return len(self._open)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listening socket and every connection, and join the thread (idempotent)."""
        with self._lock:
            if self._thread.is_alive() and self._stopping is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the server's thread

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:
            if self._started.is_set():
                raise
            self._failure = e  # before start-up: the constructor raises it
            self._started.set()
        finally:
            with self._lock:
                self._loop.close()
            self._sock.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=self._sock, limit=MAX_HEAD_BYTES, backlog=128)
        self._started.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._open) >= self.max_connections:
            # Close the oldest rather than the newcomer: idle sockets cannot keep a scraper out.
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.transport.abort()
        self._open[writer] = None
        task = asyncio.current_task()
        if task is not None:  # so that stop() can wait for it
            self._handlers.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
            writer.write(http_response(head, self.registry, self.readiness))
            await asyncio.wait_for(writer.drain(), self.read_timeout_s)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # slow, silent, gone or oversized: closed below without an answer
        finally:
            self._open.pop(writer, None)
            if task is not None:
                self._handlers.discard(task)
            writer.close()
