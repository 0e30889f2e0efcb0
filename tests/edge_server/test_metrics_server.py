"""The metrics server stays bounded: one thread whatever clients do, idle sockets closed, /metrics still answered.

Real sockets on 127.0.0.1. Every wait is on an event (a socket closing, a response arriving) bounded by
:data:`WAIT_S`, which only a broken server reaches; nothing sleeps.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time

import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from edge_server.listen import BindError
from edge_server.metrics import MAX_HEAD_BYTES, EdgeMetrics, MetricsServer, http_response

#: Upper bound on waiting for something that must happen (a response, a close): generous, never reached when it works.
WAIT_S = 60.0


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)


def _read_to_eof(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT_S)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; the server closes it after the response."""
    with _connect(port) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        return _parse(_read_to_eof(sock))


def _parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _closed_without_answer(sock: socket.socket) -> bool:
    """Wait (up to WAIT_S) for the server to close ``sock``; True if it did so without sending anything."""
    sock.settimeout(WAIT_S)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset, still closed
        return True


def test_half_open_connections_take_no_threads_and_a_scrape_still_answers():
    metrics = EdgeMetrics()
    metrics.requests.labels(steps="4", split="2", sampler="ddim", decode_on="device").inc()
    threads_before = threading.active_count()
    # A read timeout far past WAIT_S: whatever closes here is closed by the cap, not by the timeout.
    server = metrics.serve(0, read_timeout_s=10 * WAIT_S, max_connections=16)
    idle: list[socket.socket] = []
    try:
        for _ in range(10):  # 200 that connect and send nothing, 20 at a time, with a scrape after each 20
            idle += [_connect(server.port) for _ in range(20)]
            # Accepted after those (one listen queue, first in first out, never full at 21): when it answers,
            # the server has seen them all.
            status, headers, body = _get(server.port)
            assert status == 200
            assert threading.active_count() - threads_before <= 2  # the server's one thread, plus slack
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4  # as start_http_server answered
        assert int(headers["content-length"]) == len(body)
        assert b'rise_edge_requests_total{decode_on="device",sampler="ddim",split="2",steps="4"} 1.0' in body
        # Each newcomer past 16 closed the oldest at once (the last scrape took the slot of idle[184]).
        assert all(_closed_without_answer(sock) for sock in idle[:200 - 16 + 1])
        assert server.open_connections <= 16
    finally:
        for sock in idle:
            sock.close()
        metrics.close()
    assert threading.active_count() <= threads_before


def test_silent_slow_and_oversized_requests_are_closed_after_the_read_timeout():
    metrics = EdgeMetrics()
    started = time.monotonic()
    server = metrics.serve(0, read_timeout_s=0.2, max_connections=16)
    try:
        silent = _connect(server.port)
        partial = _connect(server.port)
        partial.sendall(b"GET /metrics HTTP/1.1\r\nHost: test\r\n")  # the blank line never comes
        oversized = _connect(server.port)
        oversized.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD_BYTES + 64))
        for sock in (silent, partial, oversized):
            with sock:
                assert _closed_without_answer(sock)
        assert time.monotonic() - started >= 0.2  # a lower bound: a loaded machine only adds to it
        assert _get(server.port)[0] == 200  # and the server still answers
    finally:
        metrics.close()


def test_stop_closes_open_connections_and_the_port():
    metrics = EdgeMetrics()
    server = metrics.serve(0, read_timeout_s=10 * WAIT_S)
    idle = _connect(server.port)
    assert _get(server.port)[0] == 200  # idle was accepted before this answered
    metrics.close()
    metrics.close()  # idempotent
    with idle:
        assert _closed_without_answer(idle)
    with pytest.raises(ConnectionRefusedError):
        _connect(server.port).close()


def test_serve_binds_before_returning_and_refuses_bad_settings():
    metrics = EdgeMetrics()
    server = metrics.serve(0)
    try:
        with pytest.raises(BindError, match=f"cannot listen on 127.0.0.1:{server.port} \\(metrics\\): address "
                                            "already in use"):
            EdgeMetrics().serve(server.port)  # the port is taken by the time serve() returned
        with pytest.raises(RuntimeError, match="already served"):
            metrics.serve(0)
    finally:
        metrics.close()
    with pytest.raises(ValueError, match="read_timeout_s"):
        MetricsServer(metrics.registry, read_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        MetricsServer(metrics.registry, max_connections=0)


def test_http_response_routes_without_sockets():
    metrics = EdgeMetrics()
    metrics.reports.inc()
    status, headers, body = _parse(http_response(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n", metrics.registry))
    assert (status, headers["content-type"], headers["connection"]) == (200, CONTENT_TYPE_PLAIN_0_0_4, "close")
    assert b"rise_edge_reports_total 1.0" in body
    # What a Prometheus server sends: OpenMetrics, gzipped.
    asks = b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0\r\nAccept-Encoding: gzip\r\n\r\n"
    status, headers, body = _parse(http_response(asks, metrics.registry))
    assert (status, headers["content-encoding"]) == (200, "gzip")
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert int(headers["content-length"]) == len(body) and gzip.decompress(body).endswith(b"# EOF\n")
    status, headers, body = _parse(http_response(b"HEAD /metrics HTTP/1.1\r\n\r\n", metrics.registry))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, _, body = _parse(http_response(b"GET / HTTP/1.1\r\n\r\n", metrics.registry))
    assert (status, body) == (404, b"not found; served here: /metrics, /healthz, /readyz\n")
    assert _parse(http_response(b"GET /metricsx HTTP/1.1\r\n\r\n", metrics.registry))[0] == 404
    status, headers, _ = _parse(http_response(b"POST /metrics HTTP/1.1\r\n\r\n", metrics.registry))
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert _parse(http_response(b"\x16\x03\x01 nonsense\r\n\r\n", metrics.registry))[0] == 400


def test_healthz_is_alive_and_readyz_says_what_the_probe_says_without_sockets():
    registry = EdgeMetrics().registry
    why_not: list[str | None] = ["loading the model family"]

    def get(path: str, method: str = "GET") -> tuple[int, bytes]:
        status, _, body = _parse(http_response(f"{method} {path} HTTP/1.1\r\n\r\n".encode(), registry,
                                               lambda: why_not[0]))
        return status, body

    assert get("/healthz") == (200, b"ok\n")
    assert get("/readyz") == (503, b"not ready: loading the model family\n")
    assert get("/readyz", "HEAD") == (503, b"")
    why_not[0] = None
    assert get("/readyz") == (200, b"ready\n") and get("/healthz?verbose=1") == (200, b"ok\n")
    assert get("/readyz", "POST")[0] == 405
    # Without a probe nobody said it is ready; a probe that raises reads as not ready, and the server lives on.
    assert _parse(http_response(b"GET /readyz HTTP/1.1\r\n\r\n", registry))[0] == 503

    def broken() -> str | None:
        raise RuntimeError("boom")

    status, _, body = _parse(http_response(b"GET /readyz HTTP/1.1\r\n\r\n", registry, broken))
    assert status == 503 and b"boom" in body


def test_readyz_over_http_follows_the_probe():
    state: dict[str, str | None] = {"why": "draining"}
    metrics = EdgeMetrics()
    server = metrics.serve(0, readiness=lambda: state["why"])
    try:
        assert _get(server.port, "/healthz")[0] == 200
        status, _, body = _get(server.port, "/readyz")
        assert (status, body) == (503, b"not ready: draining\n")
        state["why"] = None
        assert _get(server.port, "/readyz")[0] == 200
        assert _get(server.port, "/nope")[0] == 404
    finally:
        metrics.close()
