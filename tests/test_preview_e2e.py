"""The live preview over the network: the real daemon renders the edge's steps, this device its own,
in order and before the image; a client that asks for none gets none, and previews change no pixel."""

from __future__ import annotations

import asyncio
import io

import numpy as np
from PIL import Image

from device_app.client import EdgeClient
from device_app.runtime import DeviceBundle
from edge_server.daemon import EdgeConfig, EdgeServer
from edge_server.preview import PreviewRenderer
from shared.protocol.messages import MAX_PREVIEW_BYTES
from shared.relay_plan import RelayPlan

PLAN = RelayPlan(8, 4, "dpmpp_2m", 7.5)


def test_previews_from_both_sides_arrive_in_order_before_the_image(tiny_family, fp32_bundle_dir):
    frames: list[tuple[str, int, bytes]] = []
    events: list[str] = []

    async def main():
        server = EdgeServer.with_batching_engine(tiny_family, EdgeConfig(port=0))
        port = await server.start()
        try:
            bundle = DeviceBundle(fp32_bundle_dir, threads=1)
            async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundle) as client:
                def on_preview(stage: str, step: int, png: bytes) -> None:
                    frames.append((stage, step, png))
                    events.append(f"preview {stage} {step}")

                with_previews = await client.generate(
                    "a red bag", seed=4, pinned=PLAN, preview_every=2, on_preview=on_preview,
                    on_progress=lambda stage, step, total: events.append(f"progress {stage} {step}"),
                )
                events.append("image")
                before = len(frames)
                plain = await client.generate("a red bag", seed=4, pinned=PLAN, on_preview=on_preview)
                return with_previews, plain, before
        finally:
            await server.stop()

    with_previews, plain, before = asyncio.run(asyncio.wait_for(main(), 180))
    assert [(stage, step) for stage, step, _ in frames] == [("edge", 2), ("edge", 4), ("device", 6), ("device", 8)]
    assert len(frames) == before  # the request that asked for none got none
    assert events.index("preview device 8") < events.index("image")
    assert events.index("progress edge 2") < events.index("preview edge 2")  # each after its step's progress
    edge_steps = [e for e in events if e.startswith("progress edge")]
    assert edge_steps == [f"progress edge {s}" for s in range(1, 5)]  # a preview rides its step's one message
    np.testing.assert_array_equal(with_previews.image, plain.image)  # previews change no pixel
    latent_side = with_previews.image.shape[0] // tiny_family.vae_scale_factor
    for _stage, _step, png in frames:
        assert len(png) <= MAX_PREVIEW_BYTES
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (latent_side, latent_side, 3)
    # The edge's frame is its projection of its own x0: the same maths in-process gives the same picture.
    renderer = PreviewRenderer(tiny_family)
    from edge_server.relay import prepare, run_alone

    job = run_alone(tiny_family.large_unet, prepare(tiny_family, "a red bag", RelayPlan(8, 2, "dpmpp_2m", 7.5), 4))
    assert job.x0 is not None
    edge_first = np.asarray(Image.open(io.BytesIO(frames[0][2])), dtype=np.int16)
    assert np.abs(edge_first - renderer.render(job.x0).astype(np.int16)).max() <= 1
