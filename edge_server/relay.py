"""The edge half of a relay: text encoding, initial noise and the large model's first k steps.

``EdgeRelay.start`` returns the :class:`~shared.handoff.Handoff` the device continues from.
``run_torch_relay`` is the same trajectory in one PyTorch process (one scheduler, UNet
swapped at ``k``): the reference the two-sided relay is checked against, and an in-process
relay for machines that hold both models.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from edge_server.batching import DenoiseJob, batched_step
from edge_server.family import Conditioning, Family, encode_prompts, guidance_embedding, time_ids, uncond_conditioning
from edge_server.scheduler_bridge import diffusers_scheduler
from edge_server.torch_types import as_pipeline, as_scheduler
from shared.errors import ConfigError
from shared.handoff import Handoff
from shared.relay_modes import HandoffRule
from shared.relay_plan import RelayPlan

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def latent_shape(family: Family, height: int | None, width: int | None, batch: int = 1) -> tuple[int, ...]:
    """Latent shape for an image size (default: the UNet's sample size), checked up front."""
    factor = family.vae_scale_factor
    height = height or family.default_latent_size * factor
    width = width or family.default_latent_size * factor
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            raise ConfigError(f"{name} must be a positive multiple of {factor}, got {value}")
    return (batch, family.latent_channels, height // factor, width // factor)


@torch.no_grad()
def prepare(family: Family, prompt: str, plan: RelayPlan, seed: int, *,
            height: int | None = None, width: int | None = None, request_id: str = "",
            conditioning: Conditioning | None = None) -> DenoiseJob:
    """A job at step 0: scheduler, initial noise seeded as diffusers seeds it, text embeddings.

    It stops at the plan's split; the caller runs it (alone, or batched with others). The
    conditioning is what the family's own pipeline feeds its UNet: SDXL's pooled embeddings and
    size ``time_ids``, an LCM-distilled UNet's guidance embedding. ``conditioning`` is the
    prompt's, when the caller encoded several prompts at once (:func:`encode_prompts`).
    """
    family.check_sampler(plan.sampler)
    shape = latent_shape(family, height, width)
    scheduler = diffusers_scheduler(plan.sampler, family.scheduler_config, plan.num_inference_steps)
    cond = conditioning if conditioning is not None else encode_prompts(family, [prompt])
    uncond = uncond_conditioning(family)
    added_cond, added_uncond = dict(cond.added), dict(uncond.added)
    if family.kind == "sdxl":
        factor = family.vae_scale_factor
        ids = time_ids(family, shape[2] * factor, shape[3] * factor)
        added_cond["time_ids"] = added_uncond["time_ids"] = ids
    generator = torch.Generator("cpu").manual_seed(seed)
    # Same call and order as the pipelines' prepare_latents, so seeds agree with them; the same
    # generator then gives a stochastic sampler (LCM) its per-step noise, as the pipelines pass it.
    latents = randn_tensor(shape, generator=generator, dtype=torch.float32).to(family.placement.device)
    return DenoiseJob(
        scheduler=scheduler,
        latents=latents * as_scheduler(scheduler).init_noise_sigma,
        cond=cond.embeds,
        uncond=uncond.embeds,
        guidance_scale=float(plan.guidance_scale),
        stop_at=plan.split,
        request_id=request_id,
        added_cond=added_cond,
        added_uncond=added_uncond,
        timestep_cond=guidance_embedding(family, float(plan.guidance_scale)),
        generator=generator,
        settle_rule=HandoffRule.of(plan),  # adaptive plans stop early once x0 settles
    )


def run_alone(unet: UNet2DConditionModel, job: DenoiseJob, on_step: StepCallback | None = None) -> DenoiseJob:
    """Run a job's remaining steps on its own (the batch of one)."""
    total = len(job.sched.timesteps)
    while not job.done:
        batched_step(unet, [job])
        if on_step is not None:
            on_step(job.next_step, total)
    return job


class EdgeRelay:
    """The edge side for one loaded family, one request at a time (the daemon batches)."""

    def __init__(self, family: Family) -> None:
        self.family = family

    def start(self, prompt: str, plan: RelayPlan, seed: int, *, height: int | None = None,
              width: int | None = None, request_id: str = "",
              on_step: StepCallback | None = None) -> Handoff:
        """Run the large model's first ``plan.split`` steps; return the handoff for the device."""
        job = prepare(self.family, prompt, plan, seed, height=height, width=width, request_id=request_id)
        run_alone(self.family.large_unet, job, on_step)
        return job.to_handoff(self.family.family_id, plan, seed)


def run_torch_relay(family: Family, prompt: str, plan: RelayPlan, seed: int, *,
                    height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Final latent of the relay in one process: large UNet for steps [0, k), small for [k, N)."""
    job = run_alone(family.large_unet, prepare(family, prompt, plan, seed, height=height, width=width))
    job.stop_at = plan.num_inference_steps
    return run_alone(family.small_unet, job).latents


@torch.no_grad()
def decode_latents(family: Family, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode on the edge to uint8 (B, H, W, 3), the same maths as the device's decode."""
    vae = as_pipeline(family.pipeline).vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scaled = (latents.float() / vae.config.scaling_factor + shift).to(device=vae.device, dtype=vae.dtype)
    decoded = vae.decode(scaled, return_dict=False)[0].float().cpu()
    image = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)
