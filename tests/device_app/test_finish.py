"""The one way the device finishes a handoff (device_app.finish.finish_handoff), on the tiny family."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from device_app.app.offline import device_only_handoff, generate_offline
from device_app.finish import finish_handoff, finish_latents
from device_app.runtime import DeviceBundle
from edge_server.relay import EdgeRelay, decode_latents, run_torch_relay
from shared.errors import HandoffError
from shared.handoff import decode_handoff, encode_handoff
from shared.relay_plan import RelayPlan

PROMPT = "a red sneaker top left and a blue bag bottom right"
SEED = 11
TOLERANCE = 1e-4  # max-abs on the final latent, ORT + numpy sampler against the torch relay


@pytest.fixture(scope="module")
def bundle(fp32_bundle_dir: Path) -> DeviceBundle:
    return DeviceBundle(fp32_bundle_dir, threads=1)


@pytest.mark.parametrize("split", [0, 2, 4])
def test_finish_handoff_is_the_steps_then_the_decode(tiny_family, bundle, split):
    plan = RelayPlan(4, split, "dpmpp_2m", 5.0)
    handoff = EdgeRelay(tiny_family).start(PROMPT, plan, SEED)
    steps: list[tuple[int, int]] = []
    finished = finish_handoff(bundle, handoff, on_step=lambda *s: steps.append(s))

    # Exactly what every caller did by hand before: the device loop, then the bundle's VAE decode.
    latents = finish_latents(bundle, handoff)
    np.testing.assert_array_equal(finished.latents, latents)
    assert finished.image is not None
    np.testing.assert_array_equal(finished.image, bundle.decode(latents)[0])
    assert finished.image.dtype == np.uint8 and finished.image.shape == (32, 32, 3)
    assert steps == [(i, 4) for i in range(split + 1, 5)]
    assert finished.steps_s >= 0 and finished.decode_s > 0

    # And what the one-process torch relay makes of the same request (an independent reference).
    reference = run_torch_relay(tiny_family, PROMPT, plan, SEED)
    assert float(np.abs(finished.latents - reference.numpy()).max()) <= TOLERANCE
    with torch.no_grad():
        torch_image = decode_latents(tiny_family, reference)[0]
    assert np.abs(finished.image.astype(int) - torch_image.astype(int)).max() <= 1  # rounding of one level


def test_finish_handoff_without_decode_and_on_another_clock(tiny_family, bundle):
    handoff = EdgeRelay(tiny_family).start(PROMPT, RelayPlan(3, 1, "euler", 4.0), SEED)
    ticks = iter(range(100))
    finished = finish_handoff(bundle, handoff, decode=False, clock=lambda: float(next(ticks)))
    assert finished.image is None and finished.decode_s == 0.0
    assert finished.steps_s == 1.0  # two readings of the given clock: before and after the steps
    np.testing.assert_array_equal(finished.latents, finish_latents(bundle, handoff))


def test_finish_handoff_refuses_another_familys_handoff(tiny_family, bundle):
    handoff = EdgeRelay(tiny_family).start(PROMPT, RelayPlan(3, 1, "ddim", 4.0), SEED)
    with pytest.raises(HandoffError, match="family"):
        finish_handoff(bundle, dataclasses.replace(handoff, family_id="other-000000000000"))


def test_offline_and_relay_paths_give_identical_pixels_for_k0(bundle):
    """Device-only generation and a relayed k=0 handoff (through bytes, as on the network) finish alike."""
    plan = RelayPlan(4, 0, "dpmpp_2m", 5.0)
    handoff = device_only_handoff(bundle, PROMPT, plan, SEED, request_id="offline")
    offline = generate_offline(bundle, PROMPT, plan, SEED)
    relayed = finish_handoff(bundle, decode_handoff(encode_handoff(handoff), expected_family=bundle.family_id))

    assert relayed.image is not None
    np.testing.assert_array_equal(offline.image, relayed.image)
    np.testing.assert_array_equal(offline.latents, relayed.latents)

    # The offline answer is the same result type as a relayed one, and says where its time went.
    assert offline.offline and offline.report is None and offline.payload_bytes == 0
    assert offline.plan.plan == plan and offline.plan.seed == SEED and offline.plan.scheduler == "offline"
    assert (offline.plan.height, offline.plan.width) == offline.image.shape[:2]
    t = offline.timings
    assert t.text_encode_s > 0 and t.device_compute_s > 0 and t.decode_s > 0
    assert t.total_latency_s == pytest.approx(t.device_s)
    assert t.edge_wait_s == t.transfer_s == t.handoff_decode_s == 0.0 and t.plan_s is None
