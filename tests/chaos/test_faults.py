"""Faults with real processes: ``rise-edge serve`` in a subprocess, real websocket clients on 127.0.0.1.

In the normal suite (fast): a device that vanishes mid-request frees its slot; an edge
killed mid-request fails the device's request at once (``connection_lost``), the device
can finish on its own, and a retry after the restart succeeds. Under ``-m chaos``
(also ``slow``): a disconnect storm with RSS bounds, SIGTERM with requests in flight,
restarts that keep the scheduler's state (also after ``kill -9``), a slow link (delay +
bandwidth cap) and a dead link (stall) tripping the request timeout and the keepalive.
Figures are printed (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from device_app.client import EdgeClient
from device_app.errors import EdgeConnectionError, EdgeError, EdgeTimeout
from shared.protocol import ClientConnection, Error, Generate, Progress, Welcome
from shared.relay_plan import RelayPlan
from tests.chaos.helpers import TOKEN, EdgeProcess, LinkProxy

LONG = RelayPlan(100, 100, "ddim", 5.0)  # ~3 s of edge steps on the tiny family: long enough to interrupt
SHORT = RelayPlan(4, 2, "ddim", 5.0)
chaos = [pytest.mark.chaos, pytest.mark.slow]


def report(title: str, **figures: object) -> None:
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\n[chaos] {title}: {shown}")


async def start_then_vanish(url: str, family_id: str, plan: RelayPlan = LONG) -> None:
    """A device that sends a generate, waits until the edge is stepping it, then drops the TCP connection."""
    ws = await connect(url, max_size=2**26, compression=None)
    conn = ClientConnection(family_id=family_id, token=TOKEN)
    for frame in conn.data_to_send():
        await ws.send(frame)
    while True:
        frame = await asyncio.wait_for(ws.recv(), 60)
        events = conn.receive_text(frame, time.monotonic())
        if any(isinstance(e, Welcome) for e in events):
            conn.send_generate(Generate(request_id="r1", prompt="gone soon", seed=1, pinned=plan))
            for out in conn.data_to_send():
                await ws.send(out)
        if any(isinstance(e, Progress) for e in events):
            break
        assert not any(isinstance(e, Error) for e in events), events
    ws.transport.abort()  # no close frame: the device just disappears


async def one_request(url: str, bundle, plan: RelayPlan = SHORT, **kwargs) -> object:
    async with EdgeClient.connect(url, bundle, token=TOKEN, **kwargs) as client:
        return await client.generate("a red sneaker", seed=3, pinned=plan, timeout=60)


# --------------------------------------------------------------------------- device disconnects


def test_device_disconnect_mid_request_frees_the_slot(tiny_family_dir, tiny_family, device_bundle, tmp_path):
    with EdgeProcess(tiny_family_dir, tmp_path) as edge:
        asyncio.run(one_request(edge.url, device_bundle))  # warm-up
        idle_s = []
        for _ in range(3):
            asyncio.run(start_then_vanish(edge.url, tiny_family.family_id))
            idle_s.append(edge.wait_idle(timeout=20))  # the engine dropped the vanished device's request
        result = asyncio.run(one_request(edge.url, device_bundle))  # and serves the next device
        deadline = time.monotonic() + 10
        while edge.metric("rise_edge_connections") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert edge.metric("rise_edge_connections") == 0
        assert edge.metric("rise_edge_requests_total", 'decode_on="device",sampler="ddim",split="2",steps="4"') == 2
        assert edge.metric("rise_edge_active_requests") == 0 and edge.metric("rise_edge_queue_depth") == 0
        assert result.image.shape == (32, 32, 3)
        assert edge.alive()
    report("device disconnect mid-request", repeats=3, max_seconds_to_idle=max(idle_s))


@pytest.mark.chaos
@pytest.mark.slow
def test_disconnect_storm_keeps_rss_and_slots_bounded(tiny_family_dir, tiny_family, device_bundle, tmp_path):
    rounds, per_round = int(os.environ.get("RISE_CHAOS_ROUNDS", "20")), 4
    with EdgeProcess(tiny_family_dir, tmp_path) as edge:
        async def vanish_together() -> None:
            await asyncio.wait_for(asyncio.gather(*[start_then_vanish(edge.url, tiny_family.family_id)
                                                    for _ in range(per_round)]), 120)

        for _ in range(3):  # warm-up: allocator, torch caches, first connections
            asyncio.run(vanish_together())
            edge.wait_idle(30)
        base = edge.rss_bytes()
        samples = []
        for _ in range(rounds):
            asyncio.run(vanish_together())
            edge.wait_idle(30)
            samples.append(edge.rss_bytes())
        asyncio.run(one_request(edge.url, device_bundle))
        growth = (max(samples[-5:]) - base) / base
        report("disconnect storm", vanished=rounds * per_round, rss_base_mb=base / 2**20,
               rss_last_mb=samples[-1] / 2**20, rss_growth_pct=100 * growth)
        assert growth < 0.10
        assert edge.metric("rise_edge_active_requests") == 0


# --------------------------------------------------------------------------- edge killed / restarted


def test_edge_killed_mid_request_fails_fast_then_device_only_and_retry_after_restart(
    tiny_family_dir, device_bundle, tmp_path
):
    edge = EdgeProcess(tiny_family_dir, tmp_path).start()
    killed_at: list[float] = []

    def kill_on_first_step(stage: str, step: int, total: int) -> None:
        if stage == "edge" and not killed_at:
            os.kill(edge.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

    async def doomed() -> tuple[EdgeError, float, EdgeClient]:
        client = await EdgeClient.open(edge.url, device_bundle, token=TOKEN)
        try:
            await client.generate("a red sneaker", seed=3, pinned=LONG, timeout=60, on_progress=kill_on_first_step)
        except EdgeError as exc:
            return exc, time.monotonic() - killed_at[0], client
        raise AssertionError("the request survived its edge being killed")

    try:
        error, seconds, client = asyncio.run(doomed())
        assert isinstance(error, EdgeConnectionError) and error.code == "connection_lost", error
        assert seconds < 5.0  # noticed at once: the socket closed, no timeout needed
        assert client.closed
        with pytest.raises(EdgeConnectionError):  # a closed client refuses new work at once
            asyncio.run(client.generate("again"))

        # Fallback: the device finishes a device-only generation by itself, and says so.
        fallback = None
        try:
            from device_app.app.offline import generate_offline, offline_plan
        except ImportError:  # the app's offline backend is not there yet
            pass
        else:
            started = time.monotonic()
            fallback = generate_offline(device_bundle, "a red sneaker", offline_plan(0.0, min_steps=4, max_steps=4), 3)
            assert fallback.image.shape == (32, 32, 3)
            fallback_s = time.monotonic() - started

        edge.proc.wait(10)
        started = time.monotonic()
        edge.start()  # same port
        restart_s = time.monotonic() - started
        result = asyncio.run(one_request(edge.url, device_bundle))
        assert result.image.shape == (32, 32, 3)
    finally:
        edge.kill()
    report("edge SIGKILLed mid-request", error=error.code, seconds_to_error=seconds, restart_s=restart_s,
           device_only_fallback_s=fallback_s if fallback is not None else "n/a")


def _profile(tmp_path: Path) -> Path:
    from shared.bandit.profile import save_profile
    from tests.helpers import synthetic_profile

    path = tmp_path / "profile.json"
    save_profile(path, synthetic_profile())
    return path


async def _reported_requests(url: str, bundle, n: int) -> list[object]:
    async with EdgeClient.connect(url, bundle, token=TOKEN) as client:
        results = [await client.generate(f"a red bag and a blue shoe {i}", seed=i, steps=10, timeout=60)
                   for i in range(n)]
        await asyncio.sleep(0.3)  # let the last report arrive before the connection closes
        return results


@pytest.mark.chaos
@pytest.mark.slow
def test_restarts_keep_the_scheduler_state_even_after_kill_9(tiny_family_dir, device_bundle, tmp_path):
    state = tmp_path / "state" / "bandit.json"
    flags = ("--scheduler", "linucb", "--profile", str(_profile(tmp_path)), "--bandit-state", str(state))

    def updates() -> int:
        return json.loads(state.read_text())["policy"]["updates"]

    edge = EdgeProcess(tiny_family_dir, tmp_path, *flags).start()
    try:
        asyncio.run(_reported_requests(edge.url, device_bundle, 4))
        assert edge.terminate() == 0  # SIGTERM: graceful, saves the state
        first = updates()
        assert first == 4

        edge.start()
        assert f"({first} updates)" in edge.output()  # loaded, not started afresh
        asyncio.run(_reported_requests(edge.url, device_bundle, 3))
        assert edge.terminate() == 0
        assert updates() == first + 3

        edge.start()
        asyncio.run(_reported_requests(edge.url, device_bundle, 2))
        edge.kill()  # kill -9: no goodbye, no save; the file must still be a complete earlier state
        after_kill = updates()
        assert first + 3 <= after_kill <= first + 5
        edge.start()
        assert f"({after_kill} updates)" in edge.output()
        result = asyncio.run(one_request(edge.url, device_bundle, plan=None))
        assert result.plan.scheduler == "linucb"
    finally:
        edge.kill()
    report("restart with LinUCB state", updates_after_sigterm=first, after_restart_and_3=first + 3,
           after_kill_9=after_kill)


@pytest.mark.chaos
@pytest.mark.slow
def test_sigterm_answers_or_cleanly_fails_every_in_flight_request(tiny_family_dir, device_bundle, tmp_path):
    # Each device has a short request (finishes within the grace) and a long one (cannot) in flight.
    grace = 4.0
    edge = EdgeProcess(tiny_family_dir, tmp_path, "--shutdown-grace", str(grace)).start()
    plans = (RelayPlan(10, 10, "ddim", 5.0), RelayPlan(100, 100, "ddim", 5.0))
    outcomes: dict[str, int] = {}

    async def device(i: int, signalled: asyncio.Event) -> list[str]:
        async with EdgeClient.connect(edge.url, device_bundle, token=TOKEN) as client:
            async def one(plan: RelayPlan, tag: str = "") -> str:
                try:
                    await client.generate(f"p{i}", seed=i, pinned=plan, timeout=60)
                    return tag + "result"
                except EdgeError as exc:
                    return tag + exc.code
            first = await asyncio.gather(*[one(plan) for plan in plans])
            await signalled.wait()
            return [*first, await one(plans[0], "late:")]  # sent while the edge drains (or after it left)

    async def main() -> tuple[list[list[str]], float]:
        signalled = asyncio.Event()
        tasks = [asyncio.create_task(device(i, signalled)) for i in range(6)]
        deadline = time.monotonic() + 60
        while edge.metric("rise_edge_active_requests") < 12 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        started = time.monotonic()
        edge.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        signalled.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks), 90)  # nothing hangs
        return done, time.monotonic() - started

    try:
        done, seconds = asyncio.run(main())
        code = edge.proc.wait(60)
    finally:
        edge.kill()
    for line in done:
        for outcome in line:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    report("SIGTERM with requests in flight", grace_s=grace, seconds_to_all_answered=seconds, exit_code=code,
           **outcomes)
    assert code == 0 and "rise-edge stopped" in edge.output()
    allowed = {"result", "shutting_down", "late:shutting_down", "late:connection_lost"}
    assert set(outcomes) <= allowed, outcomes
    # Short in-flight requests finished within the grace (not necessarily all six: the engine steps
    # the oldest max_batch_rows/2 requests first, so a short one behind long ones may wait past it).
    assert outcomes.get("result", 0) >= 1
    assert outcomes.get("shutting_down", 0) >= 1  # the long ones failed cleanly, with a code
    assert sum(outcomes.values()) == 6 * 3  # every request answered or explicitly failed
    assert seconds < grace + 15


# --------------------------------------------------------------------------- slow and dead links


@pytest.mark.chaos
@pytest.mark.slow
def test_slow_link_requests_succeed_with_correct_transfer_estimates(tiny_family_dir, device_bundle, tmp_path):
    delay_s, rate = 0.05, 40_000.0  # 50 ms one way, 40 kB/s (320 kbit/s): a poor mobile link
    with EdgeProcess(tiny_family_dir, tmp_path) as edge:
        async def main():
            proxy = await LinkProxy(edge.port, delay_s=delay_s, bytes_per_s=rate).start()
            try:
                async with EdgeClient.connect(proxy.url, device_bundle, token=TOKEN, rtt_interval_s=None) as client:
                    results = [await client.generate("a red sneaker", seed=i, pinned=SHORT, timeout=60)
                               for i in range(4)]
                    rtt = await client.measure_rtt()
                    return results, rtt, client.link.snapshot()
            finally:
                await proxy.close()

        results, rtt, link = asyncio.run(main())
    size = results[0].payload_bytes
    expected = size / rate
    transfers = [r.timings.transfer_s for r in results]
    report("slow link", one_way_delay_s=delay_s, bytes_per_s=rate, payload_bytes=size, expected_transfer_s=expected,
           measured_transfer_s=min(transfers), rtt_s=rtt, link_rtt_s=link.rtt_s, link_bandwidth_bps=link.bandwidth_bps)
    assert all(0.5 * expected <= t <= 2.5 * expected for t in transfers), (expected, transfers)
    assert 2 * delay_s * 0.8 <= rtt <= 2 * delay_s + 0.5
    assert link.bandwidth_bps is not None and 0.5 * 8 * rate <= link.bandwidth_bps <= 1.5 * 8 * rate  # bit/s


@pytest.mark.chaos
@pytest.mark.slow
def test_dead_link_trips_request_timeout_client_keepalive_and_server_keepalive(
    tiny_family_dir, device_bundle, tmp_path
):
    with EdgeProcess(tiny_family_dir, tmp_path, "--ping-interval", "1", "--ping-timeout", "1") as edge:
        async def stalled(request_timeout: float = 60.0, **kwargs) -> tuple[EdgeError, float]:
            proxy = await LinkProxy(edge.port).start()
            try:
                client = await EdgeClient.open(proxy.url, device_bundle, token=TOKEN, rtt_interval_s=None, **kwargs)
                stalled_at: list[float] = []

                def stall(stage: str, step: int, total: int) -> None:
                    if not stalled_at:
                        proxy.stall()
                        stalled_at.append(time.monotonic())

                try:
                    await client.generate("x", pinned=LONG, timeout=request_timeout, on_progress=stall)
                except EdgeError as exc:
                    return exc, time.monotonic() - stalled_at[0]
                finally:
                    await asyncio.wait_for(client.close(), 30)
                raise AssertionError("a stalled link went unnoticed")
            finally:
                await proxy.close()

        async def main():
            # 1. The request timeout (no keepalive on the client): silence for 2 s fails the request.
            timeout_error, timeout_s = await stalled(ping_interval=None, request_timeout=2.0)
            # 2. The client's keepalive (long request timeout): no pong within 0.5 + 0.5 s drops the link
            #    (plus up to close_timeout for the closing handshake a dead link never completes).
            keepalive_error, keepalive_s = await stalled(ping_interval=0.5, ping_timeout=0.5, close_timeout=1.0)
            return timeout_error, timeout_s, keepalive_error, keepalive_s

        timeout_error, timeout_s, keepalive_error, keepalive_s = asyncio.run(main())
        # 3. The server's keepalive (1 s + 1 s) dropped both stalled connections and their requests.
        server_s = edge.wait_idle(timeout=15)
        deadline = time.monotonic() + 15
        while edge.metric("rise_edge_connections") != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert edge.metric("rise_edge_connections") == 0
        asyncio.run(one_request(edge.url, device_bundle))  # and it still serves
    report("dead link", request_timeout_error=timeout_error.code, after_s=timeout_s,
           client_keepalive_error=keepalive_error.code, keepalive_after_s=keepalive_s,
           server_idle_after_s=server_s)
    assert isinstance(timeout_error, EdgeTimeout) and 2.0 <= timeout_s < 4.0
    assert isinstance(keepalive_error, EdgeConnectionError) and keepalive_error.code == "connection_lost"
    assert keepalive_s < 4.0
