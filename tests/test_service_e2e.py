"""The whole service over loopback: the real edge daemon (batching on) and real device clients."""

from __future__ import annotations

import asyncio

import numpy as np

from device_app.client import EdgeClient
from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.daemon import EdgeConfig, EdgeServer
from edge_server.relay import EdgeRelay
from shared.relay_plan import RelayPlan

PLANS = [RelayPlan(6, k, sampler, 5.0) for k, sampler in
         ((0, "ddim"), (2, "euler"), (3, "dpmpp_2m"), (6, "ddim"), (1, "dpmpp_2m"), (4, "euler"), (5, "ddim"), (3, "euler"))]


def test_eight_device_clients_against_the_batching_daemon(tiny_family, fp32_bundle_dir, tmp_path):
    token = "e2e-token"
    (tmp_path / "token").write_text(token)

    async def main():
        server = EdgeServer.with_batching_engine(tiny_family, EdgeConfig(port=0, token_file=str(tmp_path / "token")))
        port = await server.start()
        try:
            async def one(i: int):
                bundle = DeviceBundle(fp32_bundle_dir, threads=1)
                async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundle, token=token) as client:
                    return await client.generate(f"request {i}", seed=100 + i, pinned=PLANS[i], timeout=240)

            results = await asyncio.gather(*[one(i) for i in range(8)])
            for _ in range(1200):  # the last reports are still on their way: wait for them (60 s at most)
                if server.metrics.reports._value.get() >= 8:
                    break
                await asyncio.sleep(0.05)
            return results, server.engine.stats(), server.metrics
        finally:
            await server.stop()

    results, stats, metrics = asyncio.run(main())
    reference_bundle = DeviceBundle(fp32_bundle_dir, threads=1)
    for i, result in enumerate(results):
        assert result.plan.plan == PLANS[i]
        handoff = EdgeRelay(tiny_family).start(f"request {i}", PLANS[i], 100 + i)
        expected = finish_latents(reference_bundle, handoff)
        err = float(np.abs(result.latents - expected).max())
        assert err <= 1e-4, (i, err)  # the relay engine's tolerance: batching changed only round-off
        assert result.image.shape == (32, 32, 3) and result.image.std() > 0
        assert result.report is not None and result.report.total_latency_s > 0
    assert stats.completed == 8
    assert stats.unet_calls < sum(p.split for p in PLANS)  # requests shared UNet calls
    assert metrics.reports._value.get() == 8
