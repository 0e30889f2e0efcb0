"""Device runtime: integrity before loading, on-device text encoding, and low-precision bundles
judged on what a user sees (the generated image), against the fp32 bundle."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.family import encode_prompts
from edge_server.relay import EdgeRelay
from shared.errors import IntegrityError, RiseError
from shared.relay_plan import RelayPlan

PROMPTS = ["a red sneaker top left", "two things: a blue bag and a white shirt", ""]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_tampered_bundle_is_refused_before_loading(fp32_bundle_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(fp32_bundle_dir, copy)
    graph = copy / "unet" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="unet/model.onnx"):
        DeviceBundle(copy)
    assert issubclass(IntegrityError, RiseError)


def test_device_text_encoder_matches_the_edge(tiny_family, fp32_bundle_dir):
    bundle = DeviceBundle(fp32_bundle_dir, threads=1)
    on_device = bundle.encode_text(PROMPTS)
    on_edge = encode_prompts(tiny_family, PROMPTS).embeds.numpy()
    assert on_device.shape == on_edge.shape
    assert np.abs(on_device - on_edge).max() <= 1e-4
    np.testing.assert_allclose(bundle.encode_text([""]), bundle.uncond, atol=1e-4)


@pytest.mark.parametrize(("kind", "min_psnr"), [("fp16", 45.0), ("int8", 30.0)])
def test_low_precision_bundle_images_against_fp32(tiny_family, fp32_bundle_dir, request, kind, min_psnr):
    low = DeviceBundle(request.getfixturevalue(f"{kind}_bundle").bundle_dir, threads=1)
    ref = DeviceBundle(fp32_bundle_dir, threads=1)
    edge = EdgeRelay(tiny_family)
    errors, psnrs = [], []
    for seed, split in ((0, 0), (1, 4)):  # device-only and a relay: 8 and 4 small-model steps
        handoff = edge.start(PROMPTS[0], RelayPlan(8, split, "dpmpp_2m", 5.0), seed)
        lat_low, lat_ref = finish_latents(low, handoff), finish_latents(ref, handoff)
        errors.append(float(np.abs(lat_low - lat_ref).max()))
        psnrs.append(psnr(low.decode(lat_low), ref.decode(lat_ref)))
    print(f"[{kind} bundle vs fp32] final latent max-abs {max(errors):.3e}; image PSNR "
          f"{min(psnrs):.1f} dB (k=0: {psnrs[0]:.1f}, k=N/2: {psnrs[1]:.1f})")
    assert min(psnrs) >= min_psnr
    assert max(errors) > 0  # it really ran the low-precision graphs
