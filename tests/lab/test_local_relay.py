"""The relay's central contract: edge (PyTorch) + handoff bytes + device (ORT, numpy sampler)
reproduces diffusers' own pipelines at the ends and a one-process torch relay in between."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.relay import EdgeRelay, run_torch_relay
from edge_server.scheduler_bridge import diffusers_scheduler
from lab.local_relay import main as relay_main
from lab.local_relay import relay_once
from shared.errors import HandoffError
from shared.handoff import decode_handoff, encode_handoff
from shared.relay_plan import RelayPlan
from shared.samplers import SAMPLER_NAMES as _ALL_SAMPLERS

# The tiny family is SD-shaped: it runs every sampler but lcm (LCM families: tests/edge_server/test_real_families.py).
SAMPLER_NAMES = tuple(n for n in _ALL_SAMPLERS if n != "lcm")

PROMPT = "a red sneaker top left and a blue bag bottom right"
STEPS = 6
GUIDANCE = 5.0
SEED = 1234
TOLERANCE = 1e-4  # max-abs on the final latent (the bound)


@pytest.fixture(scope="module")
def bundle(fp32_bundle_dir: Path) -> DeviceBundle:
    return DeviceBundle(fp32_bundle_dir, threads=1)


def _relay_latents(family, bundle: DeviceBundle, plan: RelayPlan) -> np.ndarray:
    handoff = EdgeRelay(family).start(PROMPT, plan, SEED)
    received = decode_handoff(encode_handoff(handoff), expected_family=bundle.family_id)
    return finish_latents(bundle, received)


def _diffusers_latents(family, sampler: str, unet) -> np.ndarray:
    p = family.pipeline
    pipe = StableDiffusionPipeline(
        vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=unet,
        scheduler=diffusers_scheduler(sampler, family.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent")
    return out.images.numpy()


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_edge_only_equals_large_pipeline(tiny_family, bundle, sampler):
    ours = _relay_latents(tiny_family, bundle, RelayPlan(STEPS, STEPS, sampler, GUIDANCE))
    ref = _diffusers_latents(tiny_family, sampler, tiny_family.large_unet)
    err = float(np.abs(ours - ref).max())
    print(f"{sampler} k=N vs StableDiffusionPipeline(large): max-abs {err:.2e}")
    assert ours.shape == ref.shape and err <= TOLERANCE


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_device_only_equals_small_pipeline(tiny_family, bundle, sampler):
    ours = _relay_latents(tiny_family, bundle, RelayPlan(STEPS, 0, sampler, GUIDANCE))
    ref = _diffusers_latents(tiny_family, sampler, tiny_family.small_unet)
    err = float(np.abs(ours - ref).max())
    print(f"{sampler} k=0 vs StableDiffusionPipeline(small): max-abs {err:.2e}")
    assert err <= TOLERANCE


@pytest.mark.parametrize("split", [1, STEPS // 2, STEPS - 1])
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_split_relay_equals_torch_relay(tiny_family, bundle, sampler, split):
    plan = RelayPlan(STEPS, split, sampler, GUIDANCE)
    ours = _relay_latents(tiny_family, bundle, plan)
    ref = run_torch_relay(tiny_family, PROMPT, plan, SEED).numpy()
    err = float(np.abs(ours - ref).max())
    print(f"{sampler} k={split} vs one-process torch relay: max-abs {err:.2e}")
    assert err <= TOLERANCE
    # The relay is not trivially the large-only or small-only trajectory.
    large_only = run_torch_relay(tiny_family, PROMPT, RelayPlan(STEPS, STEPS, sampler, GUIDANCE), SEED).numpy()
    assert np.abs(ours - large_only).max() > 100 * TOLERANCE


def test_no_guidance_path(tiny_family, bundle):
    plan = RelayPlan(STEPS, 2, "euler", guidance_scale=1.0)
    ours = _relay_latents(tiny_family, bundle, plan)
    ref = run_torch_relay(tiny_family, PROMPT, plan, SEED).numpy()
    assert np.abs(ours - ref).max() <= TOLERANCE


def test_relay_once_reports_stages_and_image(tiny_family, bundle):
    result = relay_once(tiny_family, bundle, PROMPT, RelayPlan(4, 2, "dpmpp_2m", GUIDANCE), SEED)
    assert result.image.dtype == np.uint8 and result.image.shape == (32, 32, 3)
    assert result.image.std() > 0  # a real decode, not a constant
    assert set(result.timings) == {"edge_s", "handoff_encode_s", "handoff_decode_s", "device_s", "decode_s", "total_s"}
    latent_bytes = result.latents.nbytes
    assert latent_bytes < result.handoff_bytes < 4 * latent_bytes + 32 * 32 * 4 + 4096


def test_device_refuses_handoff_for_another_family(tiny_family, bundle):
    handoff = EdgeRelay(tiny_family).start(PROMPT, RelayPlan(4, 2, "ddim", GUIDANCE), SEED)
    payload = encode_handoff(handoff)
    with pytest.raises(HandoffError, match="family"):
        decode_handoff(payload, expected_family="some-other-family-000000000000")
    import dataclasses

    with pytest.raises(HandoffError, match="family"):
        finish_latents(bundle, dataclasses.replace(handoff, family_id="other-000000000000"))


def test_rise_relay_cli_writes_png_and_prints_timings(tiny_family_dir, fp32_bundle_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = relay_main(["--family", str(tiny_family_dir), "--bundle", str(fp32_bundle_dir), "--prompt", PROMPT,
                       "--steps", "4", "--split", "2", "--seed", "3", "--sampler", "euler", "--guidance", "4",
                       "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    from PIL import Image

    assert Image.open(out).size == (32, 32)
    assert "handoff size:" in printed and "small-model steps (ONNX Runtime)" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--split", "9"], "split must be"), (["--steps", "0"], "steps must be"), (["--guidance", "-1"], "guidance")],
)
def test_rise_relay_cli_bad_arguments(tiny_family_dir, fp32_bundle_dir, tmp_path, capsys, extra, message):
    args = ["--family", str(tiny_family_dir), "--bundle", str(fp32_bundle_dir), "--prompt", "x",
            "--steps", "4", "--out", str(tmp_path / "x.png"), *extra]
    assert relay_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rise-relay: error:") and message in err[0]
