from __future__ import annotations

import numpy as np

from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.relay import EdgeRelay
from lab.loopback import generate_over_loopback
from shared.relay_plan import RelayPlan


def test_loopback_service_generates_what_the_in_process_relay_does(tiny_family, fp32_bundle_dir):
    bundle = DeviceBundle(fp32_bundle_dir, threads=1)
    plan = RelayPlan(6, 3, "dpmpp_2m", 5.0)
    seen = []
    results = generate_over_loopback(tiny_family, bundle, ["a red bag", "a blue sneaker"], plan, [5, 6],
                                     on_result=lambda i, r: seen.append(i))
    assert seen == [0, 1]
    for result, (prompt, seed) in zip(results, [("a red bag", 5), ("a blue sneaker", 6)], strict=False):
        expected = finish_latents(bundle, EdgeRelay(tiny_family).start(prompt, plan, seed))
        assert np.abs(result.latents - expected).max() <= 1e-4
        assert result.timings.total_latency_s > 0 and result.plan.plan == plan
