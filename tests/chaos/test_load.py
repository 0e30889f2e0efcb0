"""Load (``-m chaos``): 64 simulated devices against one ``rise-edge serve`` for 2 minutes.

Each device is a real :class:`~device_app.client.EdgeClient` (one websocket each, one
shared ONNX bundle) generating back to back with a small relay (N=4, k=2) on the tiny
family. ``busy`` answers are retried after the edge's ``retry_after_s`` (and counted);
every request must end with an image or an explicit error within 120 s (else it counts
as hung). Every few seconds the daemon's RSS (psutil) and its queue depth (Prometheus
metrics) are sampled. Asserted: zero lost or hung requests, RSS growth < 10 % after the
warm-up, queue depth <= max_queue. Figures are printed (``-s``).

``RISE_CHAOS_LOAD_S`` (default 120) and ``RISE_CHAOS_DEVICES`` (default 64) change the size.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import Counter

import pytest

from device_app.client import EdgeClient
from device_app.errors import EdgeError
from shared.relay_plan import RelayPlan
from tests.chaos.helpers import TOKEN, EdgeProcess

PLAN = RelayPlan(4, 2, "ddim", 5.0)
MAX_QUEUE = 48


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@pytest.mark.chaos
@pytest.mark.slow
def test_64_devices_for_two_minutes_no_lost_requests_bounded_memory_and_queue(
    tiny_family_dir, device_bundle, tmp_path
):
    duration = float(os.environ.get("RISE_CHAOS_LOAD_S", "120"))
    devices = int(os.environ.get("RISE_CHAOS_DEVICES", "64"))
    warm_up = max(15.0, 0.25 * duration)
    config = tmp_path / "edge.toml"
    # Per-connection limits raised so the rate limit does not dominate; the queue stays bounded.
    config.write_text(f"[engine]\nmax_queue = {MAX_QUEUE}\nmax_batch_rows = 16\n"
                      "[limits]\nrequests_per_minute = 100000\nburst = 1000\nmax_in_flight = 4\n")
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    retries: Counter[str] = Counter()
    samples: list[tuple[float, int, float, float, float]] = []  # (t, rss, queue, active, connections)

    with EdgeProcess(tiny_family_dir, tmp_path, "--config", str(config)) as edge:
        async def device(i: int, stop_at: float) -> None:
            rng = random.Random(i)
            try:
                client = await EdgeClient.open(edge.url, device_bundle, token=TOKEN, open_timeout=60,
                                               client_name=f"sim-{i}", warm_up=False)
            except EdgeError as exc:
                outcomes["connect:" + exc.code] += 1
                return
            try:
                await asyncio.sleep(rng.uniform(0, 2))  # do not start in lockstep
                n = 0
                while time.monotonic() < stop_at:
                    n += 1
                    started = time.monotonic()
                    try:
                        await asyncio.wait_for(client.generate_with_retry(
                            f"device {i} item {n}", seed=n, pinned=PLAN, timeout=90, attempts=20, max_wait_s=10,
                            on_retry=lambda exc, delay: retries.update([exc.code])), 120)
                        outcomes["result"] += 1
                        latencies.append(time.monotonic() - started)
                    except TimeoutError:
                        outcomes["hung"] += 1
                    except EdgeError as exc:
                        outcomes["error:" + exc.code] += 1
                    except Exception as exc:
                        outcomes["exception:" + type(exc).__name__] += 1
                    await asyncio.sleep(rng.uniform(0, 0.2))  # the user looks at the picture
            finally:
                await client.close()

        async def sampler(stop: asyncio.Event, t0: float) -> None:
            while not stop.is_set():
                def sample() -> tuple[float, int, float, float, float]:
                    return (time.monotonic() - t0, edge.rss_bytes(), edge.metric("rise_edge_queue_depth"),
                            edge.metric("rise_edge_active_requests"), edge.metric("rise_edge_connections"))
                samples.append(await asyncio.to_thread(sample))
                try:
                    await asyncio.wait_for(stop.wait(), 3.0)
                except TimeoutError:
                    pass

        async def main() -> float:
            t0 = time.monotonic()
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler(stop, t0))
            await asyncio.gather(*[device(i, t0 + duration) for i in range(devices)])
            stop.set()
            await sampling
            return time.monotonic() - t0

        elapsed = asyncio.run(main())
        edge.wait_idle(30)
        served = edge.metric("rise_edge_requests_total", 'decode_on="device",sampler="ddim",split="2",steps="4"')
        busy_sent = edge.metric("rise_edge_errors_total", 'code="busy"')
        rss_end = edge.rss_bytes()

    after = [s for s in samples if s[0] >= warm_up]
    base = after[0][1]
    growth = (max(s[1] for s in after) - base) / base
    max_queue_seen = max(s[2] for s in samples)
    max_waiting = max(s[2] + s[3] for s in samples)
    total = sum(v for k, v in outcomes.items())
    print(
        f"\n[chaos] load: {devices} devices x {elapsed:.0f} s, plan {PLAN.num_inference_steps}/{PLAN.split}: "
        f"{total} requests: {dict(outcomes)}; busy retries {dict(retries)} (edge sent busy {busy_sent:.0f}); "
        f"edge served {served:.0f}; throughput {outcomes['result'] / elapsed:.1f} req/s; "
        f"latency p50 {_percentile(latencies, 0.5):.2f} s p95 {_percentile(latencies, 0.95):.2f} s "
        f"p99 {_percentile(latencies, 0.99):.2f} s max {max(latencies, default=float('nan')):.2f} s; "
        f"RSS after warm-up ({warm_up:.0f} s) {base / 2**20:.0f} MiB -> max {max(s[1] for s in after) / 2**20:.0f} MiB "
        f"(growth {100 * growth:.1f} %), end {rss_end / 2**20:.0f} MiB; queue depth max {max_queue_seen:.0f}, "
        f"queued+active max {max_waiting:.0f} (max_queue {MAX_QUEUE}); {len(samples)} samples; "
        f"mean connections {statistics.mean(s[4] for s in samples):.0f}"
    )
    assert outcomes["hung"] == 0
    assert set(outcomes) <= {"result"} | {f"error:{c}" for c in ("busy", "rate_limited", "too_many_in_flight")}, outcomes
    assert outcomes["result"] >= devices  # every device got images
    assert outcomes["result"] == served  # nothing delivered was lost on the way
    assert growth < 0.10
    assert max_waiting <= MAX_QUEUE
