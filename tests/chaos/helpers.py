"""Real processes and real sockets for the fault, load and security checks.

* :class:`EdgeProcess`: ``rise-edge serve`` as a subprocess (``python -m edge_server.daemon``),
  its output drained by a thread, its Prometheus metrics scraped, its RSS read (psutil);
* :class:`LinkProxy`: an asyncio TCP proxy on 127.0.0.1 that delays and rate-limits bytes
  (a slow link without root or network namespaces) and can stall (a dead link that
  still holds its TCP connection open);
* :func:`self_signed_cert`: a throw-away certificate and key for 127.0.0.1 (openssl CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TOKEN = "chaos-Token_9f8e7d"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EdgeProcess:
    """``rise-edge serve --family ... --port P --metrics-port M --token-file T [extra]`` in a subprocess."""

    def __init__(self, family_dir: Path, workdir: Path, *extra: str, port: int | None = None,
                 token: str | None = TOKEN, threads: int = 1) -> None:
        self.family_dir, self.workdir, self.extra = Path(family_dir), Path(workdir), list(extra)
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.token = token
        self.threads = threads
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.started_s = 0.0  # seconds from spawn to "ready"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "edge_server.daemon", "serve", "--family", str(self.family_dir),
               "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--threads", str(self.threads)]
        if self.token is not None:
            token_file = self.workdir / "edge.token"
            token_file.write_text(self.token + "\n")
            token_file.chmod(0o600)
            cmd += ["--token-file", str(token_file)]
        return cmd + self.extra

    def start(self, timeout: float = 180.0) -> EdgeProcess:
        self.lines = []
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(self.threads)},
        )
        ready = threading.Event()

        def drain() -> None:  # keep reading: a full pipe would block the daemon's logging
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "rise-edge: ready" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            out = self.output()
            self.kill()
            raise RuntimeError(f"rise-edge did not start:\n{out[-4000:]}")
        self.started_s = time.monotonic() - started
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """One sample's value (``labels`` as written in the exposition, e.g. ``code="busy"``); 0 if absent."""
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else r"(?:\{\})?") + r" (\S+)"
        match = re.search("^" + pattern + "$", self.metrics_text(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def wait_idle(self, timeout: float = 30.0) -> float:
        """Wait until the engine holds no request (queue and active both 0); return the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.metric("rise_edge_queue_depth") == 0 and self.metric("rise_edge_active_requests") == 0:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"edge still busy after {timeout} s: queue={self.metric('rise_edge_queue_depth')} "
                             f"active={self.metric('rise_edge_active_requests')}")

    def terminate(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> EdgeProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class LinkProxy:
    """A TCP proxy on 127.0.0.1 emulating a slow link, both directions.

    Every chunk is delivered ``delay_s`` after it was read (one-way latency) and the
    throughput of each direction is capped at ``bytes_per_s`` bytes per second. ``stall()``
    stops forwarding (the TCP connections stay open: a link that went dead, which only a
    timeout or a keepalive notices); ``resume()`` restarts it.
    """

    PIECE = 512  # bytes per write on a rate-limited link

    def __init__(self, target_port: int, *, delay_s: float = 0.0, bytes_per_s: float | None = None) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.bytes_per_s = bytes_per_s
        self.port = 0
        self.bytes_down = 0  # server -> client
        self._running = asyncio.Event()
        self._running.set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stall(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        for reader, writer, down in ((client_r, server_w, False), (server_r, client_w, True)):
            task = asyncio.create_task(self._pipe(reader, writer, down))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, down: bool) -> None:
        # A reader task stamps chunks with their arrival; a sender delivers them at arrival + delay,
        # no faster than the rate. The delay is latency, not a per-chunk pause: chunks pipeline.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            while True:
                chunk = await reader.read(16384)
                await queue.put((loop.time(), chunk))
                if not chunk:
                    return

        reading = asyncio.create_task(read())
        free_at = 0.0  # when the rate-limited "wire" is next free
        try:
            while True:
                arrived, chunk = await queue.get()
                await self._running.wait()
                if not chunk:
                    break
                # Rate-limited, bytes trickle out in small pieces as on a real link (frames sent
                # back to back then arrive apart, by their size over the rate).
                step = self.PIECE if self.bytes_per_s else len(chunk)
                for i in range(0, len(chunk), step):
                    piece = chunk[i : i + step]
                    now = loop.time()
                    start = max(now, arrived + self.delay_s, free_at)
                    if self.bytes_per_s:
                        free_at = start + len(piece) / self.bytes_per_s
                        start = free_at  # the piece's last byte leaves at free_at
                    if start > now:
                        await asyncio.sleep(start - now)
                    await self._running.wait()
                    writer.write(piece)
                    if down:
                        self.bytes_down += len(piece)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(Exception):
                writer.close()


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 / localhost (RSA 2048, 1 day), made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        import pytest

        pytest.skip("needs the openssl command line tool to make a test certificate")
    cert, key = folder / "edge.crt", folder / "edge.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    key.chmod(0o600)
    return cert, key
