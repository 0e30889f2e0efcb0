"""Live previews on both sides: the edge (torch VAE) and the device (ONNX VAE) fit the same projection,
and the device's own steps give previews of what it is finishing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from device_app.finish import finish_latents
from device_app.preview import DevicePreviewer, decode_preview_png
from device_app.runtime import DeviceBundle
from edge_server.family import is_family_folder, load_family
from edge_server.preview import PreviewRenderer
from edge_server.relay import decode_latents, prepare, run_alone
from lab.demo import DEMO_FAMILY_DIR
from shared.relay_plan import RelayPlan


def test_the_device_draws_with_the_projection_the_edge_fitted(tiny_family, fp32_bundle_dir, tmp_path):
    edge = PreviewRenderer(tiny_family).projection
    bundle = DeviceBundle(fp32_bundle_dir)
    assert bundle.manifest.preview_projection is not None  # rise-export ships it in the manifest
    device = DevicePreviewer(bundle).projection
    np.testing.assert_allclose(device.weights, edge.weights, atol=1e-6)
    np.testing.assert_allclose(device.bias, edge.bias, atol=1e-6)
    # A bundle written before previews has none: the device fits its own from its VAE decoder.
    old = tmp_path / "old-bundle"
    shutil.copytree(fp32_bundle_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["preview_projection"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    fallback = DevicePreviewer(DeviceBundle(old)).projection
    assert fallback.weights.shape == edge.weights.shape and np.isfinite(fallback.weights).all()


def test_a_preview_of_a_trained_family_looks_like_its_decode():
    """On the trained demo family (a random tiny family's latents are not a VAE's, so only a trained one says)."""
    if not is_family_folder(DEMO_FAMILY_DIR):
        pytest.skip("the committed demo family is missing")
    family = load_family(DEMO_FAMILY_DIR)
    renderer = PreviewRenderer(family)
    factor = family.vae_scale_factor
    for prompt in ("a red sneaker in the top left and a blue bag on the right", "a white tee in the middle"):
        job = run_alone(family.large_unet, prepare(family, prompt, RelayPlan(10, 10, "dpmpp_2m", 7.5), seed=3))
        assert job.x0 is not None
        preview = decode_preview_png(renderer.png(job.x0)).astype(np.float64)
        decoded = decode_latents(family, job.latents)[0].astype(np.float64)
        h, w = job.latents.shape[2:]
        patches = decoded.reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
        assert preview.shape == patches.shape
        # It tracks the VAE's patch colours: well closer than the best flat colour would be.
        assert np.abs(preview - patches).mean() < 0.7 * np.abs(patches - patches.mean(axis=(0, 1))).mean()


def test_the_device_previews_its_own_steps(tiny_family, fp32_bundle_dir):
    bundle = DeviceBundle(fp32_bundle_dir)
    plan = RelayPlan(6, 2, "dpmpp_2m", 7.5)
    job = run_alone(tiny_family.large_unet, prepare(tiny_family, "a red bag", plan, seed=5))
    handoff = job.to_handoff(tiny_family.family_id, plan, 5)
    frames: list[tuple[str, int, bytes]] = []
    hook = DevicePreviewer(bundle).step_hook(2, lambda stage, step, png: frames.append((stage, step, png)))
    with_previews = finish_latents(bundle, handoff, on_x0=hook)
    assert [(stage, step) for stage, step, _ in frames] == [("device", 4), ("device", 6)]
    assert all(decode_preview_png(png).shape == (*handoff.latents.shape[2:], 3) for _, _, png in frames)
    np.testing.assert_array_equal(with_previews, finish_latents(bundle, handoff))  # previews change nothing
