"""The edge daemon against real websocket connections on 127.0.0.1 (a bare protocol client here;
the device client's own end-to-end tests live in tests/device_app)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect

from edge_server.daemon import EdgeConfig, EdgeServer
from edge_server.relay import EdgeRelay
from shared.protocol import (
    PROTOCOL_VERSIONS,
    ClientConnection,
    Error,
    Generate,
    HandoffReceived,
    Plan,
    Progress,
    ResultReceived,
    Welcome,
)
from shared.relay_plan import RelayPlan

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token"


class BareClient:
    """A minimal protocol client: send frames, collect events (tests only)."""

    def __init__(self, ws, conn: ClientConnection) -> None:
        self.ws, self.conn, self.events = ws, conn, []
        self.frames: list[str | bytes] = []  # every frame received, as it came

    @classmethod
    async def open(cls, port: int, family_id: str, token: str | None = TOKEN,
                   versions: tuple[int, ...] = PROTOCOL_VERSIONS) -> BareClient:
        ws = await connect(f"ws://127.0.0.1:{port}", max_size=2**26, compression=None)
        client = cls(ws, ClientConnection(family_id=family_id, token=token, versions=versions))
        await client.flush()
        return client

    async def flush(self) -> None:
        for frame in self.conn.data_to_send():
            await self.ws.send(frame)

    async def next_event(self, timeout: float = 60):
        while not self.events:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
            self.frames.append(frame)
            now = time.monotonic()
            new = self.conn.receive_text(frame, now) if isinstance(frame, str) else self.conn.receive_bytes(frame, now)
            self.events.extend(new)
            await self.flush()
        return self.events.pop(0)

    async def until(self, kind, timeout: float = 60):
        seen = []
        while True:
            event = await self.next_event(timeout)
            seen.append(event)
            if isinstance(event, kind) or isinstance(event, Error):
                return event, seen

    async def generate(self, **fields) -> tuple[object, list]:
        await self.until(Welcome) if self.conn.welcome is None else None
        rid = self.conn.new_request_id()
        self.conn.send_generate(Generate(request_id=rid, **fields))
        await self.flush()
        return await self.until((HandoffReceived, ResultReceived))


def run(coro):
    return asyncio.run(coro)


async def _with_server(family, body, **config):
    server = EdgeServer.with_batching_engine(family, EdgeConfig(port=0, **config))
    server.token = config.pop("token", TOKEN)
    port = await server.start()
    try:
        return await body(server, port)
    finally:
        await server.stop()


def test_one_request_end_to_end_matches_in_process_edge(tiny_family):
    plan = RelayPlan(6, 3, "dpmpp_2m", 5.0)

    async def body(server, port):
        client = await BareClient.open(port, tiny_family.family_id)
        event, seen = await client.generate(prompt="a red sneaker", seed=11, pinned=plan)
        await client.ws.close()
        return event, seen

    event, seen = run(_with_server(tiny_family, body))
    assert isinstance(event, HandoffReceived), event
    plans = [e for e in seen if isinstance(e, Plan)]
    steps = [e.step for e in seen if isinstance(e, Progress)]
    assert plans[0].plan == plan and (plans[0].why, plans[0].scheduler) == ("pinned by the client", "pinned")
    assert steps == [1, 2, 3]
    expected = EdgeRelay(tiny_family).start("a red sneaker", plan, 11)
    assert np.abs(event.handoff.latents - expected.latents).max() <= 1e-5 * max(1, np.abs(expected.latents).max())


def test_eight_concurrent_clients_are_batched_and_correct(tiny_family):
    plans = [RelayPlan(6, 2 + i % 4, ("ddim", "euler", "dpmpp_2m")[i % 3], 5.0) for i in range(8)]

    async def body(server, port):
        clients = [await BareClient.open(port, tiny_family.family_id) for _ in range(8)]
        results = await asyncio.gather(*[
            c.generate(prompt=f"item {i}", seed=i, pinned=plans[i]) for i, c in enumerate(clients)])
        for c in clients:
            await c.ws.close()
        return results, server.engine.stats()

    results, stats = run(_with_server(tiny_family, body))
    for i, (event, _) in enumerate(results):
        assert isinstance(event, HandoffReceived), event
        expected = EdgeRelay(tiny_family).start(f"item {i}", plans[i], i)
        scale = max(1.0, float(np.abs(expected.latents).max()))
        assert np.abs(event.handoff.latents - expected.latents).max() <= 1e-5 * scale
    assert stats.completed == 8
    # 8 requests x (2..5) steps; batching made far fewer UNet calls than steps
    assert stats.unet_calls < sum(p.split for p in plans) / 2


def test_no_token_or_wrong_token_is_refused(tiny_family):
    async def body(server, port):
        outcomes = []
        for token in (None, "wrong"):
            client = await BareClient.open(port, tiny_family.family_id, token=token)
            event = await client.next_event()
            outcomes.append(event)
        return outcomes

    for event in run(_with_server(tiny_family, body)):
        assert isinstance(event, Error) and event.code == "unauthorized"


def test_malformed_and_oversized_frames_get_errors_and_others_keep_being_served(tiny_family):
    async def body(server, port):
        good = await BareClient.open(port, tiny_family.family_id)
        await good.until(Welcome)
        bad = await connect(f"ws://127.0.0.1:{port}", max_size=2**20, compression=None)
        hello = ClientConnection(family_id=tiny_family.family_id, token=TOKEN)
        for frame in hello.data_to_send():
            await bad.send(frame)
        await bad.recv()  # welcome
        await bad.send("{this is not json")
        malformed = json.loads(await bad.recv())
        await bad.send(json.dumps({"type": "generate", "request_id": "x1", "prompt": "p", "steps": "many"}))
        wrong_type = json.loads(await bad.recv())
        oversized_closed = False
        await bad.send("x" * (server.limits.max_message_bytes + 10))
        try:
            await asyncio.wait_for(bad.recv(), 10)
            await asyncio.wait_for(bad.recv(), 10)
        except Exception:  # the server closes a connection that sends a too-big frame
            oversized_closed = True
        event, _ = await good.generate(prompt="still served", seed=1, pinned=RelayPlan(4, 2, "ddim", 5.0))
        return malformed, wrong_type, oversized_closed, event

    malformed, wrong_type, oversized_closed, event = run(_with_server(tiny_family, body))
    assert malformed["type"] == "error" and malformed["code"] == "bad_message"
    assert wrong_type["type"] == "error" and wrong_type["code"] in {"bad_message", "invalid_request"}
    assert "steps" in wrong_type["message"]
    assert oversized_closed
    assert isinstance(event, HandoffReceived)


def test_full_queue_answers_busy_with_retry_after(tiny_family):
    async def body(server, port):
        client = await BareClient.open(port, tiny_family.family_id)
        await client.until(Welcome)
        ids = []
        for i in range(4):
            rid = client.conn.new_request_id()
            ids.append(rid)
            client.conn.send_generate(Generate(request_id=rid, prompt="p", seed=i, pinned=RelayPlan(8, 8, "ddim", 5.0)))
        await client.flush()
        finals = {}
        while len(finals) < 4:
            event = await client.next_event()
            if isinstance(event, (HandoffReceived, Error)) and event.request_id in ids:
                finals[event.request_id] = event
        return list(finals.values())

    finals = run(_with_server(tiny_family, body, max_queue=1))
    busy = [e for e in finals if isinstance(e, Error)]
    done = [e for e in finals if isinstance(e, HandoffReceived)]
    assert done and busy
    assert all(e.code == "busy" and e.retry_after_s > 0 for e in busy)


def test_sigterm_finishes_in_flight_work_and_exits_cleanly(tiny_family_dir, tiny_family, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_server.daemon", "serve", "--family", str(tiny_family_dir), "--port", "0",
         "--token-file", str(token_file), "--shutdown-grace", "120"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    port = None
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "serving family" in line:
                port = int(line.rsplit(":", 1)[1])
            if "rise-edge: ready" in line:
                break
        assert port, "".join(lines)

        async def body():
            client = await BareClient.open(port, tiny_family.family_id)
            await client.until(Welcome)
            rid = client.conn.new_request_id()
            client.conn.send_generate(Generate(request_id=rid, prompt="p", seed=1, pinned=RelayPlan(8, 8, "ddim", 5.0)))
            await client.flush()
            await client.until(Progress)  # the request is in flight
            proc.send_signal(signal.SIGTERM)
            event, _ = await client.until(HandoffReceived)
            return event

        event = run(body())
        assert isinstance(event, HandoffReceived)  # in-flight work was finished, not dropped
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "rise-edge stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_config_file_sections_flags_and_errors(tmp_path):
    from edge_server.daemon import build_parser, config_from_args
    from shared.errors import ConfigError

    cfg = tmp_path / "edge.toml"
    cfg.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[engine]\nmax_batch_rows = 4\n'
                   '[limits]\nmax_steps = 50\nburst = 2\n')
    config = config_from_args(build_parser().parse_args(
        ["serve", "--family", "f", "--config", str(cfg), "--port", "9100", "--no-batching"]))
    assert (config.port, config.host, config.max_batch_rows, config.batching) == (9100, "0.0.0.0", 4, False)
    assert config.limits == {"max_steps": 50, "burst": 2}
    cfg.write_text("[engine]\nmax_btach_rows = 4\n")
    with pytest.raises(ConfigError, match="unknown setting 'max_btach_rows'"):
        EdgeConfig.from_toml(cfg)
    cfg.write_text("port = \n")
    with pytest.raises(ConfigError, match="cannot read config"):
        EdgeConfig.from_toml(cfg)


def test_metrics_endpoint_reports_requests_and_batches(tiny_family):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]

    async def body(server, port):
        from shared.protocol import Report

        client = await BareClient.open(port, tiny_family.family_id)
        event, _ = await client.generate(prompt="p", seed=1, pinned=RelayPlan(4, 2, "ddim", 5.0))
        client.conn.send_report(Report(request_id=event.request_id, device_compute_s=0.01, transfer_s=0.001,
                                       total_latency_s=0.2, rating=1))
        client.conn.send_rating(event.request_id, -1)  # the user changed their mind: one request, one rating
        await client.flush()
        # frames are handled in order: once this second request is served, the rating above was handled
        await client.generate(prompt="p", seed=2, pinned=RelayPlan(4, 2, "ddim", 5.0))
        bad = await BareClient.open(port, tiny_family.family_id, token="nope")
        await bad.next_event()
        for _ in range(600):  # the report and ratings are on their way: scrape until they are in (60 s at most)
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode())
            if 'rise_edge_errors_total{code="unauthorized"} 1.0' in text and "rise_edge_reports_total 1.0" in text:
                break
            await asyncio.sleep(0.1)
        return text

    text = run(_with_server(tiny_family, body, metrics_port=metrics_port))
    assert 'rise_edge_requests_total{decode_on="device",sampler="ddim",split="2",steps="4"} 2.0' in text
    assert 'rise_edge_errors_total{code="unauthorized"} 1.0' in text
    assert "rise_edge_batch_requests_count 4.0" in text  # two UNet calls each (k=2)
    assert 'rise_edge_stage_seconds_count{stage="edge"} 2.0' in text
    assert "rise_edge_queue_depth" in text
    # the report's +1; the same request's later -1 does not count again (one request, one rating)
    assert 'rise_edge_ratings_total{rating="1"} 1.0' in text and 'rating="-1"' not in text


def test_bandit_scheduler_plans_learns_from_reports_and_persists(tiny_family, tmp_path):
    from shared.bandit.profile import save_profile
    from shared.protocol import Report
    from tests.helpers import synthetic_profile

    profile_path, state_path = tmp_path / "profile.json", tmp_path / "state" / "bandit.json"
    save_profile(profile_path, synthetic_profile())

    async def body(server, port):
        client = await BareClient.open(port, tiny_family.family_id)
        plans = []
        for i in range(3):
            event, seen = await client.generate(prompt="a red bag top left and a blue sneaker center", seed=i, steps=10)
            assert isinstance(event, (HandoffReceived, ResultReceived)), event
            plans.append([e for e in seen if isinstance(e, Plan)][0])
            client.conn.send_report(Report(request_id=event.request_id, device_compute_s=0.05, transfer_s=0.001,
                                           total_latency_s=0.5))
            await client.flush()
        await asyncio.sleep(0.2)
        return plans, server.planner

    plans, planner = run(_with_server(tiny_family, body, scheduler="linucb", profile=str(profile_path),
                                      bandit_state=str(state_path)))
    assert all(p.scheduler == planner.name and "linucb" in p.why.lower() for p in plans), plans
    assert all(p.plan.num_inference_steps == 10 for p in plans)
    assert state_path.is_file()  # saved on stop
    assert json.loads(state_path.read_text())  # a valid document


def test_bandit_scheduler_without_profile_is_a_clear_config_error(tiny_family):
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --profile"):
        EdgeServer.with_batching_engine(tiny_family, EdgeConfig(port=0, scheduler="linucb"))
