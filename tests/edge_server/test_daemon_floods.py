"""Floods against the edge daemon on real sockets (127.0.0.1): each test is one hole of the security review.

No model is loaded: an engine that answers at once (an edge-decoded image, or ``busy``) stands in. The
flooding peers are plain sockets that speak just enough websocket to upgrade and then never read
(:class:`RawPeer`), or the websockets client when the flooder reads. No test sleeps for timing: they wait
for a condition (the server dropped the connection, a close arrived) with a generous timeout, so a slow
machine makes them slower, not flaky. The 60-second floods with RSS figures are in tests/chaos/test_floods.py (and :class:`RawPeer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Opcode

from edge_server.config import EdgeConfig
from edge_server.daemon import EdgeServer, main
from edge_server.engine import EdgeOutcome, EdgeRequest, EngineBusy, EngineStats
from shared.errors import ConfigError
from shared.planning import FixedPlanner
from shared.protocol import Generate, Hello, encode
from shared.relay_plan import RelayPlan
from shared.validation import read_token_file
from tests.chaos.test_floods import RawPeer

TOKEN = "fl00d-Token_1"
FAMILY = "fake-family"
EDGE_PLAN = RelayPlan(4, 4, "ddim", 5.0, decode_on="edge")
WAIT_S = 30.0  # generous: what a test waits for a condition before it fails


class ImageEngine:
    """An Engine that answers every request at once with the same edge-decoded image (or ``busy``)."""

    family_id = FAMILY

    def __init__(self, side: int = 64, *, busy: bool = False) -> None:
        self.default_size = side
        self.busy = busy
        self.submitted = 0
        self.image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)  # incompressible

    def submit(self, request: EdgeRequest) -> Future[EdgeOutcome]:
        self.submitted += 1
        if self.busy:
            raise EngineBusy("edge queue is full (1 requests)", 1.5)
        future: Future[EdgeOutcome] = Future()
        future.set_result(EdgeOutcome("image", 0.0, 0.001, image=self.image))
        return future

    def cancel(self, key: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, self.submitted)

    def close(self, *, drain: bool = True, timeout: float = 30.0) -> None:
        pass


def edge_config(limits: dict[str, Any] | None = None, **settings: Any) -> EdgeConfig:
    config = EdgeConfig(port=0, limits=dict(limits or {}))
    for name, value in settings.items():  # set one by one: a setting the daemon lacks is ignored, not a TypeError
        setattr(config, name, value)
    return config


@contextlib.asynccontextmanager
async def serving(engine: ImageEngine | None = None, limits: dict[str, Any] | None = None,
                  **settings: Any) -> AsyncIterator[tuple[EdgeServer, int]]:
    server = EdgeServer(engine or ImageEngine(), edge_config(limits, **settings), planner=FixedPlanner(4, 1.0, "ddim"))
    server.token = TOKEN
    port = await server.start()
    try:
        yield server, port
    finally:
        await asyncio.wait_for(server.stop(), 60)


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Wait (polling) until ``condition()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


def hello_frame(token: str = TOKEN) -> str:
    return encode(Hello(versions=(1,), family_id=FAMILY, client="flood", token=token))


def generate_frame(rid: str, plan: RelayPlan | None = EDGE_PLAN) -> str:
    return encode(Generate(request_id=rid, prompt="p", seed=1, pinned=plan))


async def raw_peer(port: int, **kwargs: Any) -> RawPeer:
    return await asyncio.to_thread(RawPeer, port, **kwargs)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def served_ok(port: int) -> None:
    """A well-behaved device still connects and gets its image."""
    async with connect(f"ws://127.0.0.1:{port}", max_size=2**24, compression=None, open_timeout=WAIT_S) as ws:
        await ws.send(hello_frame())
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))["type"] == "welcome"
        await ws.send(generate_frame("ok1"))
        kinds = []
        while "result" not in kinds:
            message = await asyncio.wait_for(ws.recv(), WAIT_S)
            if isinstance(message, str):
                kinds.append(json.loads(message)["type"])
                assert kinds[-1] != "error", message
        assert isinstance(await asyncio.wait_for(ws.recv(), WAIT_S), bytes)  # the PNG


# --------------------------------------------------------------------------- hole 1: refused generates are free


MAX_REFUSALS = 32  # ProtocolLimits' default


def test_refused_generates_close_a_flooder_that_reads():
    # One request per minute, so every generate but the first is refused with rate_limited.
    limits = {"requests_per_minute": 1.0, "burst": 1}

    async def body() -> None:
        async with serving(limits=limits) as (server, port):
            async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
                await ws.send(hello_frame())
                for i in range(60):
                    await ws.send(generate_frame(f"f{i}"))
                codes = []
                with contextlib.suppress(Exception):
                    while True:
                        message = await asyncio.wait_for(ws.recv(), WAIT_S)
                        if isinstance(message, str) and json.loads(message)["type"] == "error":
                            codes.append(json.loads(message)["code"])
                await asyncio.wait_for(ws.wait_closed(), WAIT_S)
                assert (ws.close_code, ws.close_reason) == (1008, "too many refused requests"), codes
                # The first refusal is free (nothing was advised yet), the next MAX_REFUSALS are charged,
                # the one after closes.
                assert codes.count("rate_limited") == 1 + MAX_REFUSALS + 1, codes
            await until(lambda: not server.clients, "the flooder's connection is gone")
            await served_ok(port)

    run(body())


def test_busy_refusals_that_do_not_wait_close_the_connection():
    limits = {"requests_per_minute": 1e5, "burst": 1000}

    async def body() -> None:
        engine = ImageEngine(busy=True)
        async with serving(engine, limits=limits) as (server, port):
            async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
                await ws.send(hello_frame())
                await ws.recv()  # welcome
                busy = 0
                with contextlib.suppress(Exception):
                    for i in range(60):  # retry at once after each busy: never the 1.5 s advised
                        await ws.send(generate_frame(f"b{i}"))
                        while True:
                            message = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                            if message["type"] == "error":
                                assert message["code"] == "busy" and message["retry_after_s"] == 1.5
                                busy += 1
                                break
                await asyncio.wait_for(ws.wait_closed(), WAIT_S)
                assert ws.close_code == 1008 and ws.close_reason == "too many refused requests"
                assert busy == 1 + MAX_REFUSALS + 1  # free, charged..., the one over the budget
            assert engine.submitted == busy

    run(body())


def test_a_non_reading_flooder_of_refused_generates_is_dropped():
    async def body() -> None:
        async with serving(limits={"requests_per_minute": 1.0, "burst": 1}) as (server, port):
            peer = await raw_peer(port)
            try:
                hello = peer.frame(hello_frame())
                peer.flood(hello if i < 0 else peer.frame(generate_frame(f"g{i}")) for i in range(-1, 10**7))
                await until(lambda: peer.dropped, "the non-reading flooder was dropped")
                await until(lambda: not server.clients, "its connection and outbox were freed")
                await served_ok(port)
            finally:
                peer.close()

    run(body())


def test_the_outbox_of_a_peer_that_does_not_read_is_capped(caplog):
    # Legitimate generates, each answered with a ~790 KB PNG the peer never reads: 40 of them are ~32 MB,
    # twice the default max_outbox_bytes once the socket buffers (~4 MB) are full.
    limits = {"requests_per_minute": 1e5, "burst": 1000, "max_in_flight": 1000}

    async def body() -> None:
        async with serving(ImageEngine(side=512), limits=limits, send_timeout_s=3600.0) as (server, port):
            peer = await raw_peer(port)
            try:
                peer.send(hello_frame(), *[generate_frame(f"o{i}") for i in range(40)])
                await until(lambda: not server.clients, "the non-reading peer was dropped at the outbox cap")
            finally:
                peer.close()

    with caplog.at_level(logging.INFO, logger="rise.edge"):
        run(body())
    assert any("peer is not reading" in r.getMessage() for r in caplog.records), caplog.text


def test_a_peer_that_stops_reading_is_dropped_after_the_send_timeout(caplog):
    # Three 1024x1024 PNGs (~3 MB each) fill the socket buffers; the keepalive's ping would wait behind them.
    async def body() -> None:
        async with serving(ImageEngine(side=1024), send_timeout_s=0.5, ping_interval_s=0.2,
                           ping_timeout_s=0.2) as (server, port):
            peer = await raw_peer(port)
            try:
                peer.send(hello_frame(), *[generate_frame(f"s{i}") for i in range(3)])
                await until(lambda: not server.clients, "the stalled peer was dropped")
            finally:
                peer.close()

    with caplog.at_level(logging.INFO, logger="rise.edge"):
        run(body())
    assert any("it took none of" in r.getMessage() for r in caplog.records), caplog.text


def test_sigterm_drain_is_bounded_under_floods():
    async def body() -> float:
        server = EdgeServer(ImageEngine(side=1024), edge_config(shutdown_grace_s=0.5, send_timeout_s=3600.0),
                            planner=FixedPlanner(4, 1.0, "ddim"))
        server.token = TOKEN
        port = await server.start()
        stalled, silent = await raw_peer(port), await raw_peer(port)
        try:
            stalled.send(hello_frame(), *[generate_frame(f"d{i}") for i in range(3)])  # ~9 MB it never reads
            await until(lambda: any(c.ws.transport.get_write_buffer_size() > 2**16 for c in server.clients),
                        "the stalled peer's write buffer filled")
            started = time.monotonic()
            await asyncio.wait_for(server.stop(), WAIT_S)  # before the fix: hangs on the stalled close
            return time.monotonic() - started
        finally:
            stalled.close()
            silent.close()

    elapsed = run(body())
    assert elapsed < WAIT_S


# --------------------------------------------------------------------------- hole 2: ping floods


def test_a_ping_flood_before_hello_is_cut_off():
    async def body() -> None:
        async with serving() as (server, port):
            peer = await raw_peer(port)
            try:
                ping = peer.frame(b"p" * 125, Opcode.PING)  # each answered by a 127-byte pong it never reads
                peer.flood(ping for _ in range(10**7))  # until the server drops it (1.3 GB of pings if it never does)
                await until(lambda: peer.dropped, "the ping flooder was dropped")
                await until(lambda: not server.clients, "its connection was freed")
                await served_ok(port)
            finally:
                peer.close()

    run(body())


def test_a_ping_flood_from_a_reading_peer_gets_a_clear_close():
    async def body() -> tuple[int | None, str | None]:
        async with serving() as (server, port):  # default: 20 frames/s, 100 at once
            async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None) as ws:
                await ws.send(hello_frame())
                with contextlib.suppress(Exception):
                    for _ in range(300):
                        await ws.ping()
                await asyncio.wait_for(ws.wait_closed(), WAIT_S)
                return ws.close_code, ws.close_reason

    assert run(body()) == (1008, "too many frames")


# --------------------------------------------------------------------------- hole 3: idle connections, caps, accept


def test_connections_that_never_say_hello_are_closed_at_the_deadline():
    async def body() -> None:
        async with serving(limits={"hello_timeout_s": 0.3}) as (server, port):
            silent = [await connect(f"ws://127.0.0.1:{port}", compression=None) for _ in range(20)]
            for ws in silent:
                message = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
                assert (message["type"], message["code"]) == ("error", "bad_message") and "hello" in message["message"]
                await asyncio.wait_for(ws.wait_closed(), WAIT_S)
                assert (ws.close_code, ws.close_reason) == (1008, "no hello in time")
            await until(lambda: not server.clients, "the silent connections are gone")
            await served_ok(port)  # a device that says hello at once is not affected

    run(body())


def test_connection_caps_refuse_the_upgrade_with_503_and_429():
    async def body() -> list[int]:
        async with serving(max_connections=3, max_connections_per_peer=2) as (server, port):
            url = f"ws://127.0.0.1:{port}"
            a = await connect(url, compression=None)
            b = await connect(url, compression=None)
            statuses = []
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, compression=None)  # a third from 127.0.0.1
            statuses.append(refused.value.response.status_code)
            c = await connect(url, compression=None, local_addr=("127.0.0.2", 0))
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, compression=None, local_addr=("127.0.0.3", 0))  # a fourth in all
            statuses.append(refused.value.response.status_code)
            await a.close()
            await until(lambda: len(server.clients) == 2, "the closed connection was released")
            d = await connect(url, compression=None)  # its slot is free again
            for ws in (b, c, d):
                await ws.close()
            return statuses

    assert run(body()) == [429, 503]


def recv_or_reset(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1)
    except ConnectionResetError:
        return b""


def test_tcp_connections_beyond_the_caps_are_dropped_before_the_handshake():
    def held(port: int, n: int) -> list[socket.socket]:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) for _ in range(n)]
        return socks

    async def body() -> tuple[bytes, bytes]:
        async with serving(max_connections=10, max_connections_per_peer=2) as (server, port):
            a, b, c = await asyncio.to_thread(held, port, 3)  # no HTTP request yet: mid-handshake
            try:
                dropped = await asyncio.to_thread(recv_or_reset, c)  # the third from one address: dropped at once
                # The first two were held, not dropped: they can still upgrade.
                await asyncio.to_thread(a.sendall, b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                        b"Sec-WebSocket-Version: 13\r\n\r\n")
                reply = await asyncio.to_thread(a.recv, 12)
                return dropped, reply
            finally:
                for sock in (a, b, c):
                    sock.close()

    dropped, reply = run(body())
    assert dropped == b"" and reply == b"HTTP/1.1 101", reply


def test_accept_errors_at_the_descriptor_limit_are_logged_once_per_interval(caplog):
    async def body() -> None:
        async with serving():
            loop = asyncio.get_running_loop()
            for _ in range(3000):  # what asyncio's accept loop reports at EMFILE, once per failed accept
                loop.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                })

    with caplog.at_level(logging.DEBUG):
        run(body())
    lines = [r for r in caplog.records if "accept" in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage()[:120] for r in lines[:5]]
    assert "Too many open files" in lines[0].getMessage() and lines[0].exc_info is None


def test_log_throttle_counts_what_it_held_back():
    from edge_server.daemon import LogThrottle

    now = [0.0]
    throttle = LogThrottle(10.0, clock=lambda: now[0])
    assert throttle.ready() == 0
    assert [throttle.ready() for _ in range(5)] == [None] * 5
    now[0] = 10.0
    assert throttle.ready() == 5 and throttle.ready() is None


def test_other_loop_errors_still_reach_the_default_handler(caplog):
    async def body() -> None:
        async with serving():
            asyncio.get_running_loop().call_exception_handler({"message": "something else broke"})

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run(body())
    assert "something else broke" in caplog.text


# --------------------------------------------------------------------------- hole 4: token files


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("two words\n", "whitespace inside (character 4)"),
        ("tab\tinside", "whitespace inside"),
        ("x" * 513, "513 characters long; at most 512"),
        ("caf\u00e9-token", "non-printable or non-ASCII character (character 4)"),
        ("bell\x07", "non-printable or non-ASCII"),
        ("  \n\n", "the token is empty"),
    ],
)
def test_a_bad_token_file_is_one_clear_line_at_start(tmp_path: Path, content: str, fragment: str):
    path = tmp_path / "edge.token"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        read_token_file(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message
    assert content.strip() not in message or not content.strip()  # the token itself is never shown
    with pytest.raises(ConfigError, match="token file"):  # at construction, not at every connection
        EdgeServer(ImageEngine(), EdgeConfig(port=0, token_file=str(path)), planner=FixedPlanner())


def test_rise_edge_names_a_bad_token_file_before_loading_anything(tmp_path: Path, capsys):
    path = tmp_path / "edge.token"
    path.write_text("has a space\n")
    code = main(["serve", "--family", str(tmp_path / "no-such-family"), "--token-file", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("rise-edge: error: token file") and "whitespace inside" in err[0], err


def test_a_good_token_file_still_loads(tmp_path: Path):
    path = tmp_path / "edge.token"
    path.write_text(" " + TOKEN + "\n")
    assert read_token_file(path)[0] == TOKEN
