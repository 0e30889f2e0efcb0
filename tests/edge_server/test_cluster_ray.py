"""Two replicas of the tiny family on a local Ray instance behind the real websocket daemon, with real clients.

One deployment for the module (a replica's start costs ~20 s on two shared cores): the daemon runs on a
loop thread of its own, the clients on the test's. The tiny in-process family stands in for the demo family
(loading the demo family twice on two shared cores costs minutes; the cluster code is the same).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the cluster extra (ray[serve]) is not installed")

from device_app.client import EdgeClient
from device_app.errors import EdgeError
from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.cluster import ClusterConfig, ClusterMetrics, ClusterUnavailable, RayEngine, cluster_planner
from edge_server.daemon import EdgeConfig, EdgeServer
from edge_server.relay import EdgeRelay
from shared.protocol.messages import RETRY_CODES
from shared.relay_plan import RelayPlan

PLANS = [RelayPlan(6, k, sampler, 5.0) for k, sampler in
         ((0, "ddim"), (2, "euler"), (3, "dpmpp_2m"), (6, "ddim"), (1, "dpmpp_2m"), (4, "euler"), (5, "ddim"), (3, "euler"))]
WAIT_S = 240.0  # generous: two shared cores, other test suites running


@dataclass
class Cluster:
    engine: RayEngine
    server: EdgeServer
    port: int
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def cluster(tiny_family_dir) -> Iterator[Cluster]:
    # max_batch_rows=4: two guided requests per UNet call, so a replica holding four has two not yet started.
    # Three logical CPUs: one replica each, one left for the test of a deployment that cannot start.
    config = EdgeConfig(port=0, device="cpu", max_batch_rows=4, max_queue=16)
    engine = RayEngine.start(str(tiny_family_dir), config,
                             ClusterConfig(replicas=2, local_cpus=3, threads=1, health_check_period_s=1.0,
                                           app_name="rise-test"))
    server = EdgeServer(engine, config, planner=cluster_planner(engine, config))
    ClusterMetrics(engine).register(server.metrics.registry)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-daemon", daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)
        yield Cluster(engine, server, port, loop)
    finally:
        try:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(120)  # closes the engine: Ray goes down
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)


async def _generate(port: int, bundle_dir, i: int, plan: RelayPlan):
    bundle = DeviceBundle(bundle_dir, threads=1)
    async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundle) as client:
        return await client.generate(f"request {i}", seed=100 + i, pinned=plan, timeout=WAIT_S)


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def test_two_replicas_serve_eight_clients_the_single_engine_images(cluster, tiny_family, fp32_bundle_dir):
    async def main():
        return await asyncio.gather(*[_generate(cluster.port, fp32_bundle_dir, i, PLANS[i]) for i in range(8)])

    results = asyncio.run(main())
    reference_bundle = DeviceBundle(fp32_bundle_dir, threads=1)
    for i, result in enumerate(results):
        assert result.plan.plan == PLANS[i]
        expected = finish_latents(reference_bundle, EdgeRelay(tiny_family).start(f"request {i}", PLANS[i], 100 + i))
        err = float(np.abs(result.latents - expected).max())
        assert err <= 1e-4, (i, err)  # the batching tolerance of the one-process engine
    stats = cluster.engine.cluster_stats()
    assert stats.replica_count == 2
    assert sum(s.completed for s in stats.replicas.values()) >= 8
    assert all(s.completed > 0 for s in stats.replicas.values()) and len(stats.replicas) == 2  # both served
    scrape = _scrape(cluster)
    assert "rise_edge_cluster_replicas 2.0" in scrape and "rise_edge_replica_batch_rows_total{replica=" in scrape


def test_killing_a_replica_under_load_loses_no_request_and_it_comes_back(cluster, fp32_bundle_dir):
    engine = cluster.engine
    before = engine.cluster_stats()
    plan = RelayPlan(24, 24, "ddim", 5.0)  # long enough that the victim's later requests wait while we look

    async def main():
        tasks = [asyncio.create_task(_generate(cluster.port, fp32_bundle_dir, 20 + i, plan)) for i in range(8)]
        victim = None
        deadline = time.monotonic() + WAIT_S
        while victim is None:  # a replica with steps running and requests admitted that have not started
            assert time.monotonic() < deadline, "no replica got busy"
            for view in engine.board.replicas().values():
                stats = view.stats
                if stats.active + stats.queued >= 3 and any(r < 24 for r in stats.running_steps or ()):
                    victim = view.pid
            await asyncio.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        return await asyncio.gather(*tasks, return_exceptions=True), victim

    results, victim = asyncio.run(main())
    images = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(images) + len(errors) == 8
    for exc in errors:  # an explicit error the client may retry, never a hang or a lost request
        assert isinstance(exc, EdgeError) and exc.code in RETRY_CODES, repr(exc)
    for result in images:
        assert result.image.shape == (32, 32, 3) and result.image.std() > 0
    after = engine.cluster_stats()
    print(f"killed replica pid {victim}: {len(images)} images, {len(errors)} busy errors, "
          f"{after.resubmits - before.resubmits} requests submitted again")
    assert after.restarts > before.restarts
    assert after.resubmits > before.resubmits  # its requests that had not started ran elsewhere
    assert len(images) >= 8 - 4  # at most the victim's started ones failed

    deadline = time.monotonic() + WAIT_S
    while _running_replicas("rise-test") < 2:  # Ray Serve restarts the dead replica
        assert time.monotonic() < deadline, "the deployment did not come back to 2 replicas"
        time.sleep(0.5)
    assert victim not in {v.pid for v in engine.board.replicas().values()}

    async def again():  # the front kept serving: a retried request gets its image
        bundle = DeviceBundle(fp32_bundle_dir, threads=1)
        async with EdgeClient.connect(f"ws://127.0.0.1:{cluster.port}", bundle) as client:
            return await client.generate_with_retry("after the restart", seed=5, pinned=plan, timeout=WAIT_S)

    assert asyncio.run(again()).image.std() > 0


def _scrape(cluster: Cluster) -> str:
    from prometheus_client import generate_latest

    return generate_latest(cluster.server.metrics.registry).decode()


def test_replicas_that_cannot_load_the_family_are_one_line_naming_why(cluster, tmp_path):
    (tmp_path / "not-a-family").mkdir()
    with pytest.raises(ClusterUnavailable, match="need 2 CPU but the Ray cluster has 1 free"):  # never a hang
        RayEngine.start(str(tmp_path / "not-a-family"), EdgeConfig(device="cpu"),
                        ClusterConfig(replicas=2, app_name="rise-test-bad"))
    with pytest.raises(ClusterUnavailable, match="no model_index.json") as caught:  # room for it: its own error
        RayEngine.start(str(tmp_path / "not-a-family"), EdgeConfig(device="cpu"),
                        ClusterConfig(replicas=1, app_name="rise-test-bad"))
    assert len(str(caught.value).splitlines()) == 1
    assert _running_replicas("rise-test") == 2  # the cluster that serves is untouched
