"""The device half of a relay: continue a handoff with the small model on ONNX Runtime.

The numpy sampler is rebuilt from the bundle's scheduler config, checked to produce the
edge's timesteps, loaded with the edge's sampler state and run for the remaining steps
with classifier-free guidance (the unconditional embedding is the bundle's constant).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from device_app.runtime import DeviceBundle
from shared.errors import HandoffError
from shared.handoff import Handoff
from shared.samplers import make_sampler

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def finish_latents(bundle: DeviceBundle, handoff: Handoff, on_step: StepCallback | None = None) -> np.ndarray:
    """Run steps [k, N) of the handoff's trajectory; return the final latent (B, C, H, W) float32."""
    if handoff.family_id != bundle.family_id:
        raise HandoffError(
            f"handoff is for family {handoff.family_id!r} but this bundle is {bundle.family_id!r}"
        )
    sampler = make_sampler(handoff.sampler, bundle.manifest.scheduler_config)
    sampler.set_timesteps(handoff.num_inference_steps)
    handoff.check_timesteps(sampler.timesteps)  # both sides' scheduler configs must agree
    sampler.load_state(handoff.sampler_state)
    latents = handoff.latents
    cond = handoff.cond_embeddings
    guided = handoff.uses_cfg
    if guided:
        uncond = np.broadcast_to(bundle.uncond, cond.shape)
        embeds = np.concatenate([uncond, cond]).astype(np.float32)
    else:
        embeds = cond
    total = handoff.num_inference_steps
    for i in range(handoff.split, total):
        t = sampler.timesteps[i]  # Euler's may be fractional: keep the sampler's own value
        model_in = np.concatenate([latents, latents]) if guided else latents
        model_in = sampler.scale_model_input(model_in, t)
        noise = bundle.unet(model_in, t, embeds)
        if guided:
            noise_uncond, noise_cond = np.split(noise, 2)
            noise = noise_uncond + np.float32(handoff.guidance_scale) * (noise_cond - noise_uncond)
        latents = sampler.step(noise.astype(np.float32), t, latents)
        if on_step is not None:
            on_step(i + 1, total)
    return latents
