"""The edge half of a relay: text encoding, initial noise and the large model's first k steps.

``EdgeRelay.start`` returns the :class:`~shared.handoff.Handoff` the device continues from.
``run_torch_relay`` is the same trajectory in one PyTorch process (one scheduler, UNet
swapped at ``k``): the reference the two-sided relay is checked against, and an in-process
relay for machines that hold both models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from edge_server.family import Family, encode_prompts, uncond_embedding
from edge_server.scheduler_bridge import diffusers_scheduler, export_state
from shared.errors import ConfigError
from shared.handoff import Handoff
from shared.relay_plan import RelayPlan

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class EdgeStart:
    """What the edge prepares before any denoising step."""

    scheduler: SchedulerMixin
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor


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
def prepare(family: Family, prompt: str, plan: RelayPlan, seed: int,
            height: int | None = None, width: int | None = None) -> EdgeStart:
    """Scheduler at step 0, initial noise seeded as diffusers seeds it, and the text embeddings."""
    scheduler = diffusers_scheduler(plan.sampler, family.scheduler_config)
    scheduler.set_timesteps(plan.num_inference_steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    # Same call and order as StableDiffusionPipeline.prepare_latents, so seeds agree with it.
    latents = randn_tensor(latent_shape(family, height, width), generator=generator, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    return EdgeStart(scheduler, latents, encode_prompts(family, [prompt]), uncond_embedding(family))


@torch.no_grad()
def denoise_steps(unet: UNet2DConditionModel, scheduler: SchedulerMixin, latents: torch.Tensor,
                  cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float,
                  step_range: range, on_step: StepCallback | None = None) -> torch.Tensor:
    """Run ``scheduler.timesteps[step_range]`` with classifier-free guidance, as diffusers' SD pipeline does."""
    guided = guidance_scale > 1.0
    embeds = torch.cat([uncond.expand_as(cond), cond]) if guided else cond
    total = len(scheduler.timesteps)
    for i in step_range:
        t = scheduler.timesteps[i]
        model_in = torch.cat([latents] * 2) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        noise = unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if guided:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, total)
    return latents


class EdgeRelay:
    """The edge side for one loaded family."""

    def __init__(self, family: Family) -> None:
        self.family = family

    def start(self, prompt: str, plan: RelayPlan, seed: int, *, height: int | None = None,
              width: int | None = None, request_id: str = "",
              on_step: StepCallback | None = None) -> Handoff:
        """Run the large model's first ``plan.split`` steps; return the handoff for the device."""
        start = prepare(self.family, prompt, plan, seed, height, width)
        latents = denoise_steps(
            self.family.large_unet, start.scheduler, start.latents, start.cond, start.uncond,
            plan.guidance_scale, range(plan.split), on_step,
        )
        return Handoff(
            family_id=self.family.family_id,
            sampler=plan.sampler,
            num_inference_steps=plan.num_inference_steps,
            split=plan.split,
            guidance_scale=float(plan.guidance_scale),
            seed=seed,
            timesteps=start.scheduler.timesteps.numpy().astype(np.float32),
            latents=latents.numpy().astype(np.float32),
            cond_embeddings=start.cond.numpy().astype(np.float32),
            sampler_state=export_state(start.scheduler, plan.sampler),
            request_id=request_id,
        )


@torch.no_grad()
def run_torch_relay(family: Family, prompt: str, plan: RelayPlan, seed: int, *,
                    height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Final latent of the relay in one process: large UNet for steps [0, k), small for [k, N)."""
    start = prepare(family, prompt, plan, seed, height, width)
    latents = denoise_steps(family.large_unet, start.scheduler, start.latents, start.cond, start.uncond,
                            plan.guidance_scale, range(plan.split))
    return denoise_steps(family.small_unet, start.scheduler, latents, start.cond, start.uncond,
                         plan.guidance_scale, range(plan.split, plan.num_inference_steps))


@torch.no_grad()
def decode_latents(family: Family, latents: torch.Tensor) -> np.ndarray:
    """VAE-decode on the edge to uint8 (B, H, W, 3), the same maths as the device's decode."""
    vae = family.pipeline.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    image = vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (image * 255).round().astype(np.uint8)
