"""What an operator meets running ``rise-edge serve``: a port in use is one line before the model loads,
/healthz and /readyz follow the start-up, one log line per request, refused tokens logged with the peer,
warnings for an exposed host, --help without torch, and no duplicate-optimum notice.

Real sockets on 127.0.0.1; every wait is on an event (a loader entering, a response arriving) bounded by
WAIT_S, which only a broken daemon reaches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from edge_server.config import EdgeConfig
from edge_server.daemon import Daemon, EdgeServer, LogThrottle, main, run
from edge_server.listen import BindError, listen, port_holder
from edge_server.logs import REQUEST_LOGGER
from shared.errors import FamilyError
from shared.planning import FixedPlanner
from shared.protocol import Generate, Hello, Report, encode
from shared.relay_plan import RelayPlan
from tests.edge_server.test_daemon_floods import TOKEN, ImageEngine, edge_config, hello_frame

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 60.0


class RecordingLoader:
    """A family loader that records being called (and, if given events, waits to be released)."""

    def __init__(self, family: object = None, *, release: threading.Event | None = None) -> None:
        self.family = family
        self.calls = 0
        self.entered = threading.Event()
        self.release = release

    def __call__(self) -> object:
        self.calls += 1
        self.entered.set()
        if self.release is not None:
            assert self.release.wait(WAIT_S), "the test never released the loader"
        if self.family is None:
            raise AssertionError("the family was loaded")
        return self.family


def _http(port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


# --------------------------------------------------------------------------- a port in use


@pytest.mark.parametrize("which", ["websocket", "metrics"])
def test_a_port_in_use_is_one_line_and_exit_2_before_the_family_loads(which: str, capsys) -> None:
    held = socket.create_server(("127.0.0.1", 0))
    port = held.getsockname()[1]
    loader = RecordingLoader()
    config = EdgeConfig(port=port) if which == "websocket" else EdgeConfig(port=0, metrics_port=port)
    try:
        code = run(config, loader)
    finally:
        held.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"rise-edge: error: cannot listen on 127.0.0.1:{port} ({which}): address already in use")
    assert ("--metrics-port PORT" if which == "metrics" else "--port PORT") in err[0]
    if Path("/proc/net/tcp").is_file():  # Linux: the holder is named (this very process holds it)
        assert f"by pid {os.getpid()} (" in err[0], err[0]
    assert loader.calls == 0  # never loaded: the error came first


def test_rise_edge_names_the_port_before_it_even_imports_torch(tmp_path: Path) -> None:
    """The command line, in a fresh process: the bind error comes before the (missing) family and before torch."""
    held = socket.create_server(("127.0.0.1", 0))
    port = held.getsockname()[1]
    script = ("import sys; from edge_server.daemon import main; "
              f"code = main(['serve', '--family', {str(tmp_path / 'no-such-family')!r}, '--port', '{port}']); "
              "print('torch' in sys.modules, 'diffusers' in sys.modules, code)")
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                              timeout=WAIT_S, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        held.close()
    assert done.stdout.split() == ["False", "False", "2"], (done.stdout, done.stderr)
    [line] = done.stderr.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{port} (websocket): address already in use" in line


def test_listen_names_the_holder_and_other_failures_in_one_line() -> None:
    sock = listen("127.0.0.1", 0, "websocket")
    try:
        port = sock.getsockname()[1]
        if Path("/proc/net/tcp").is_file():
            assert port_holder(port) is not None and port_holder(port).startswith(f"pid {os.getpid()} ")  # type: ignore[union-attr]
        with pytest.raises(BindError) as info:
            listen("127.0.0.1", port, "websocket")
        assert "\n" not in str(info.value)
    finally:
        sock.close()
    with pytest.raises(BindError, match=r"cannot listen on no-such-host\.invalid:1 \(metrics\): unknown host"):
        listen("no-such-host.invalid", 1, "metrics")


def test_a_family_that_fails_to_load_is_one_line_and_frees_the_ports(capsys) -> None:
    def broken() -> object:
        raise FamilyError("/models/x is not a family folder (no model_index.json)")

    assert run(EdgeConfig(port=0, metrics_port=0), broken) == 2  # type: ignore[arg-type]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rise-edge: error: /models/x is not a family folder (no model_index.json)"]
    daemon = Daemon(EdgeConfig(port=0, metrics_port=0), broken)  # type: ignore[arg-type]
    daemon.prepare()
    ports = (daemon.port, daemon.metrics_port)
    with pytest.raises(FamilyError):
        daemon.load()
    daemon.close()
    for port in ports:  # released: each binds again
        assert port is not None
        listen("127.0.0.1", port, "test").close()


# --------------------------------------------------------------------------- /healthz and /readyz


def test_readyz_is_503_while_the_family_loads_and_200_once_serving(tiny_family) -> None:
    release = threading.Event()
    loader = RecordingLoader(tiny_family, release=release)
    daemon = Daemon(EdgeConfig(port=0, metrics_port=0), loader)
    daemon.prepare()
    loading = threading.Thread(target=daemon.load)
    try:
        metrics_port = daemon.metrics_port
        assert metrics_port is not None
        assert _http(metrics_port, "/healthz") == (200, "ok\n")
        assert _http(metrics_port, "/readyz") == (503, "not ready: starting\n")
        loading.start()
        assert loader.entered.wait(WAIT_S)
        assert _http(metrics_port, "/readyz") == (503, "not ready: loading the model family\n")
        assert _http(metrics_port, "/healthz")[0] == 200  # alive while it loads
        release.set()
        loading.join(WAIT_S)
        assert not loading.is_alive() and daemon.server is not None
        assert _http(metrics_port, "/readyz") == (503, "not ready: the websocket server is not listening yet\n")

        async def serve_and_probe() -> list[tuple[int, str]]:
            stop = asyncio.Event()
            serving = asyncio.create_task(daemon.serve(stop))
            await asyncio.to_thread(daemon.started.wait, WAIT_S)
            seen = [await asyncio.to_thread(_http, metrics_port, "/readyz")]
            async with connect(f"ws://127.0.0.1:{daemon.port}") as ws:
                await ws.send(encode(Hello(versions=(1,), family_id=tiny_family.family_id, client="t")))
                assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))["type"] == "welcome"
            daemon.server.service.draining = True  # type: ignore[union-attr]  # what SIGTERM sets first
            seen.append(await asyncio.to_thread(_http, metrics_port, "/readyz"))
            stop.set()
            await asyncio.wait_for(serving, WAIT_S)
            return seen

        ready, draining = asyncio.run(serve_and_probe())
        assert ready == (200, "ready\n")
        assert draining == (503, "not ready: the edge is shutting down\n")
    finally:
        release.set()
        daemon.close()


# --------------------------------------------------------------------------- the log


def _request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    lines = []
    for record in caplog.records:
        if record.name == REQUEST_LOGGER:
            _, *pairs = shlex.split(record.getMessage())
            lines.append(dict(pair.split("=", 1) for pair in pairs))
    return lines


async def _served(engine: ImageEngine, body) -> object:
    server = EdgeServer(engine, edge_config(), planner=FixedPlanner(4, 1.0, "ddim"))
    server.token = TOKEN
    port = await server.start()
    try:
        return await body(server, port)
    finally:
        await asyncio.wait_for(server.stop(), WAIT_S)


async def _generate(ws, rid: str) -> dict:
    """Send a pinned generate; the final text frame (result or error), the PNG read past."""
    plan = None
    await ws.send(encode(Generate(request_id=rid, prompt="p", seed=1, pinned=RelayPlan(4, 4, "ddim", 5.0,
                                                                                        decode_on="edge"))))
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        if message["type"] == "plan":
            plan = message
        if message["type"] in ("result", "error"):
            if message["type"] == "result":
                assert isinstance(await asyncio.wait_for(ws.recv(), WAIT_S), bytes)
            return {**message, "plan_frame": plan if message["type"] == "result" else None}


def test_each_request_is_one_log_line_with_the_peer_through_the_daemon(caplog) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)

    async def body(server: EdgeServer, port: int) -> list[dict]:
        finals = []
        async with connect(f"ws://127.0.0.1:{port}", max_size=2**24) as ws:
            await ws.send(hello_frame())
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))["type"] == "welcome"
            finals.append(await _generate(ws, "ok1"))
            await ws.send(encode(Report(request_id="ok1", device_compute_s=0.0, transfer_s=0.003,
                                        total_latency_s=0.05)))
            server.engine.busy = True  # type: ignore[attr-defined]  # the next one is refused
            finals.append(await _generate(ws, "busy1"))
        return finals

    ok, busy = asyncio.run(_served(ImageEngine(), body))
    assert ok["type"] == "result" and busy["type"] == "error" and busy["code"] == "busy"
    assert ok["plan_frame"]["scheduler"] == "pinned"  # not "fixed": the client chose it
    lines = {line["id"]: line for line in _request_lines(caplog)}
    assert set(lines) == {"ok1", "busy1"}
    assert (lines["ok1"]["outcome"], lines["ok1"]["peer"], lines["ok1"]["scheduler"], lines["ok1"]["steps"]) == (
        "ok", "127.0.0.1", "pinned", "4")
    assert lines["ok1"]["transfer_s"] == "0.003" and lines["ok1"]["edge_s"] == "0.001"
    assert (lines["busy1"]["outcome"], lines["busy1"]["code"], lines["busy1"]["peer"]) == (
        "error", "busy", "127.0.0.1")


def test_refused_tokens_are_logged_with_the_peer_at_most_once_per_interval(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="rise.edge")
    now = [0.0]

    async def wrong_token(port: int) -> None:
        async with connect(f"ws://127.0.0.1:{port}") as ws:
            await ws.send(hello_frame(token="wrong-token"))
            assert json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))["code"] == "unauthorized"

    async def body(server: EdgeServer, port: int) -> None:
        server._unauthorized_log = LogThrottle(10.0, clock=lambda: now[0])  # the interval on a clock we move
        for _ in range(3):  # a burst: one line
            await wrong_token(port)
        now[0] = 11.0
        await wrong_token(port)  # the next interval: a line counting what was held back

    asyncio.run(_served(ImageEngine(), body))
    refused = [r.getMessage() for r in caplog.records if "refused a missing or wrong token" in r.getMessage()]
    assert refused == ["refused a missing or wrong token from 127.0.0.1 (0 more refused in the last 10 s)",
                       "refused a missing or wrong token from 127.0.0.1 (2 more refused in the last 10 s)"]
    assert all("wrong-token" not in r.getMessage() for r in caplog.records)  # the token itself is never logged


def test_start_warns_about_an_exposed_host_and_a_readable_token_file(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="rise.edge")
    token_file = tmp_path / "edge.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o644)
    daemon = Daemon(EdgeConfig(host="0.0.0.0", port=0, token_file=str(token_file)), RecordingLoader())
    try:
        daemon.prepare()
    finally:
        daemon.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("0.0.0.0:0" in w and "without TLS" in w for w in warnings), warnings
    assert f"token file {token_file} is readable by its group and every user (chmod 600 {token_file})" in warnings


# --------------------------------------------------------------------------- the command line


def test_help_loads_no_model_library_and_shows_defaults() -> None:
    script = ("import sys, contextlib, io; from edge_server.daemon import main\n"
              "out = io.StringIO()\n"
              "with contextlib.redirect_stdout(out):\n"
              "    try: main(['serve', '--help'])\n"
              "    except SystemExit as e: code = e.code\n"
              "print(code, [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])\n"
              "print(' '.join(out.getvalue().split()))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=WAIT_S,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    status, help_text = done.stdout.split("\n", 1)
    assert status == "0 []", (done.stdout, done.stderr)
    assert "--port PORT websocket port (0: any free one) (default: 8765)" in help_text
    assert "(default: 127.0.0.1)" in help_text and "/healthz and /readyz" in help_text


def test_no_duplicate_optimum_notice_when_the_edge_imports_diffusers() -> None:
    from importlib.metadata import packages_distributions

    if len(packages_distributions().get("optimum", [])) < 2:
        pytest.skip("only one distribution provides optimum here: diffusers has nothing to say")
    done = subprocess.run([sys.executable, "-c", "import edge_server.family"], cwd=REPO, capture_output=True,
                          text=True, timeout=WAIT_S * 2, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "Multiple distributions found" not in done.stderr + done.stdout


def test_the_filter_drops_only_the_duplicate_optimum_record() -> None:
    from edge_server.logs import silence_library_noise

    silence_library_noise()
    silence_library_noise()  # idempotent
    logger = logging.getLogger("diffusers.utils.import_utils")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("Multiple distributions found for package optimum. Picked distribution: optimum-onnx")
        logger.warning("Multiple distributions found for package other. Picked distribution: other-a")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Multiple distributions found for package other. Picked distribution: other-a"]
    assert sum(type(f).__module__ == "edge_server.logs" for f in logger.filters) == 1  # installed once


def test_main_without_a_bad_port_still_refuses_a_bad_flag_in_one_line(capsys) -> None:
    assert main(["serve", "--family", "f", "--scheduler", "foo"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rise-edge: error: --scheduler: expected one of auto, fixed, linucb")
    assert "needs --profile" not in line


def test_a_scheduler_that_needs_a_profile_is_refused_before_loading_unless_the_family_ships_one(
        tmp_path: Path, capsys) -> None:
    bare = tmp_path / "bare-family"
    bare.mkdir()
    assert main(["serve", "--family", str(bare), "--port", "0", "--scheduler", "linucb"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("rise-edge: error: --scheduler linucb needs --profile PROFILE.json or a family folder "
                           "that ships profile.json")  # and not the folder's missing model_index.json: before load
    shipping = tmp_path / "shipping-family"
    shipping.mkdir()
    (shipping / "profile.json").write_text("{}")
    daemon = Daemon(EdgeConfig(port=0, scheduler="linucb"), RecordingLoader(), family_folder=shipping)
    try:
        daemon.prepare()  # the shipped profile will do: no "needs --profile" (it is read once the family loads)
    finally:
        daemon.close()
