"""A bundle is an optimum ONNX pipeline folder: optimum's ORT pipelines open it as it is and agree with the device.

For an SD1.5-, an SDXL- and an LCM-shaped bundle (``lab/hub_families.py``, exported once per
session by ``test_hub_family_export.exported``), ``ORTDiffusionPipeline.from_pretrained(bundle)``
picks the pipeline class the bundle's ``model_index.json`` names, loads its tokenizer(s) and
scheduler with transformers / diffusers, runs without a ``vae_encoder/``, and gives the same
final latent and image as the device path (``device_app.finish.finish_handoff`` on a ``k = 0``
handoff): same initial latent, same conditional text embeddings, same sampler (the ORT pipeline
gets the diffusers scheduler class of the device's numpy sampler; LCM's per-step noise is the
handoff's). The ORT pipeline computes its own unconditional embeddings (and SDXL its own
``time_ids``), so they are checked against the bundle's constants too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler

from device_app.app.offline import device_only_handoff
from device_app.finish import finish_handoff
from device_app.runtime import DeviceBundle
from shared.handoff import Handoff
from shared.relay_plan import RelayPlan
from tests.export.test_hub_family_export import exported

PROMPT = "a red fox in the snow"
SEED = 5
# Max-abs on the final latent, relative to its scale (max |latent|, floored at 1): the same ORT graphs on
# both sides, so only float32 round-off of numpy vs torch scheduler arithmetic (~100 ulp). The random-weight
# LCM family's latents grow to ~45 over its 4 steps (its x0 predictions amplify): 7.6e-5 absolute there.
LATENT_RTOL = 1e-5
PIXEL_TOLERANCE = 1  # uint8 levels: a float difference at round-off can flip one level
MEASURED: dict[str, float] = {}  # printed at the end of the module (pytest -s)

# (hub family, device sampler, its diffusers scheduler class, steps, guidance scale)
CASES = {
    "sd15": ("sd15+bk-sdm-tiny", "ddim", DDIMScheduler, 6, 7.5),
    "sdxl": ("sdxl+ssd-1b", "euler", EulerDiscreteScheduler, 5, 5.0),
    "lcm": ("lcm-dreamshaper", "lcm", LCMScheduler, 4, 8.5),
}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    for case, value in sorted(MEASURED.items()):
        print(f"[optimum vs device] {case}: {value:.3e}")


def _max_abs(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def _ort_pipeline(bundle: Path) -> Any:
    from optimum.onnxruntime import ORTDiffusionPipeline

    pipe = ORTDiffusionPipeline.from_pretrained(bundle)  # the class the bundle's model_index.json names
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_ort(pipe: Any, handoff: Handoff, steps: int, guidance: float, **extra: Any) -> tuple[np.ndarray, np.ndarray]:
    """The ORT pipeline's final latent (via its step callback) and its image (float [0, 1], B H W 3)."""
    final: dict[str, torch.Tensor] = {}

    def keep(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    pipe.scheduler.set_timesteps(steps)  # so that init_noise_sigma is this schedule's, as the pipeline's own call
    sigma = float(pipe.scheduler.init_noise_sigma)
    latents = torch.from_numpy(handoff.latents / np.float32(sigma))  # the pipeline scales by init_noise_sigma
    side = handoff.latents.shape[-1] * pipe.vae_scale_factor
    out = pipe(prompt_embeds=torch.from_numpy(handoff.cond_embeddings), latents=latents, num_inference_steps=steps,
               guidance_scale=guidance, height=side, width=side, output_type="np", callback_on_step_end=keep,
               **extra)
    return final["latents"].numpy(), np.asarray(out.images)


def _agree(case: str, pipe: Any, bundle: DeviceBundle, handoff: Handoff, steps: int, guidance: float,
           **extra: Any) -> None:
    finished = finish_handoff(bundle, handoff)
    ort_latents, ort_image = _run_ort(pipe, handoff, steps, guidance, **extra)
    assert ort_latents.shape == finished.latents.shape and finished.image is not None
    MEASURED[f"{case} final latent max-abs"] = error = _max_abs(ort_latents, finished.latents)
    MEASURED[f"{case} final latent scale"] = scale = max(1.0, float(np.max(np.abs(finished.latents))))
    assert error <= LATENT_RTOL * scale, (error, scale)
    ort_pixels = (np.clip(ort_image[0], 0.0, 1.0) * 255).round()
    MEASURED[f"{case} image max uint8 levels"] = levels = _max_abs(ort_pixels, finished.image)
    assert levels <= PIXEL_TOLERANCE


def _setup(case: str, factory: pytest.TempPathFactory) -> tuple[Any, DeviceBundle, Handoff, int, float]:
    name, sampler, scheduler_class, steps, guidance = CASES[case]
    bundle_dir = exported(name, factory).bundle
    bundle = DeviceBundle(bundle_dir, threads=1)
    pipe = _ort_pipeline(bundle_dir)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    handoff = device_only_handoff(bundle, PROMPT, RelayPlan(steps, 0, sampler, guidance), SEED)
    return pipe, bundle, handoff, steps, guidance


def test_sd15_bundle_is_an_ort_stable_diffusion_pipeline(tmp_path_factory: pytest.TempPathFactory) -> None:
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    pipe, bundle, handoff, steps, guidance = _setup("sd15", tmp_path_factory)
    assert isinstance(pipe, ORTStableDiffusionPipeline) and pipe.vae_encoder is None
    # Its own text encoding (the bundle's tokenizer files, through transformers) is the device's.
    embeds, _ = pipe.encode_prompt([PROMPT, ""], "cpu", 1, False)
    MEASURED["sd15 prompt embeds (ORT encode_prompt) max-abs"] = _max_abs(embeds[:1], handoff.cond_embeddings)
    MEASURED["sd15 uncond embeds (ORT encode_prompt) max-abs"] = _max_abs(embeds[1:], bundle.uncond)
    assert MEASURED["sd15 prompt embeds (ORT encode_prompt) max-abs"] <= 1e-5
    assert MEASURED["sd15 uncond embeds (ORT encode_prompt) max-abs"] <= 1e-5
    _agree("sd15 ddim", pipe, bundle, handoff, steps, guidance)


def test_sdxl_bundle_is_an_ort_stable_diffusion_xl_pipeline(tmp_path_factory: pytest.TempPathFactory) -> None:
    from optimum.onnxruntime import ORTStableDiffusionXLPipeline

    pipe, bundle, handoff, steps, guidance = _setup("sdxl", tmp_path_factory)
    assert isinstance(pipe, ORTStableDiffusionXLPipeline) and pipe.vae_encoder is None
    assert pipe.config.force_zeros_for_empty_prompt is True
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    MEASURED["sdxl prompt embeds (ORT encode_prompt) max-abs"] = _max_abs(embeds, handoff.cond_embeddings)
    MEASURED["sdxl pooled embeds (ORT encode_prompt) max-abs"] = _max_abs(pooled, handoff.added_cond["text_embeds"])
    assert MEASURED["sdxl prompt embeds (ORT encode_prompt) max-abs"] <= 1e-5
    assert MEASURED["sdxl pooled embeds (ORT encode_prompt) max-abs"] <= 1e-5
    # The pipeline zeroes the negative embeddings itself (force_zeros_for_empty_prompt), as the bundle's are.
    assert bundle.uncond_pooled is not None and not bundle.uncond.any() and not bundle.uncond_pooled.any()
    _agree("sdxl euler", pipe, bundle, handoff, steps, guidance,
           pooled_prompt_embeds=torch.from_numpy(handoff.added_cond["text_embeds"]))


def test_lcm_bundle_is_an_ort_latent_consistency_pipeline(tmp_path_factory: pytest.TempPathFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers.schedulers import scheduling_lcm
    from optimum.onnxruntime import ORTLatentConsistencyModelPipeline

    pipe, bundle, handoff, steps, guidance = _setup("lcm", tmp_path_factory)
    assert isinstance(pipe, ORTLatentConsistencyModelPipeline) and pipe.vae_encoder is None
    # LCM re-noises after every step but the last: the scheduler draws the handoff's noise, in step order.
    state = handoff.sampler_state.tensors
    noise = [torch.from_numpy(state[f"noise.{i}"]) for i in range(steps - 1)]
    drawn: list[int] = []

    def handoff_noise(shape: Any, **_: Any) -> torch.Tensor:
        drawn.append(len(drawn))
        return noise[len(drawn) - 1].reshape(shape)

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", handoff_noise)
    _agree("lcm", pipe, bundle, handoff, steps, guidance)
    assert len(drawn) == steps - 1


def test_tokenizer_folders_load_with_transformers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The bundle's tokenizer folders (the original files + our tokenizer.json) load slow and fast alike."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    bundle_dir = exported("sdxl+ssd-1b", tmp_path_factory).bundle
    for folder in ("tokenizer", "tokenizer_2"):
        reference = Tokenizer.from_file(str(bundle_dir / folder / "tokenizer.json"))
        for use_fast in (False, True):
            tokenizer = AutoTokenizer.from_pretrained(bundle_dir / folder, use_fast=use_fast, local_files_only=True)
            for prompt in ("", PROMPT, "a very long prompt " * 20):
                ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length,
                                truncation=True).input_ids
                assert ids == reference.encode(prompt).ids, (folder, use_fast, prompt)
