"""The device half of a relay: finish a handoff with the small model on ONNX Runtime, then decode it.

:func:`finish_handoff` is the one way the device finishes a generation, whoever asked: the
network client (:mod:`device_app.client`), the device-only path (:mod:`device_app.app.offline`,
a ``k = 0`` handoff built locally), ``rise-relay`` and ``rise-eval``. :func:`finish_latents`
is its denoising loop alone.

The numpy sampler is rebuilt from the bundle's scheduler config, checked to produce the
edge's timesteps, loaded with the edge's sampler state and run for the remaining steps
with classifier-free guidance (the unconditional embedding is the bundle's constant).
No torch here: this is the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from device_app.results import Finished, LatentArray
from device_app.runtime import DeviceBundle
from shared.errors import HandoffError
from shared.handoff import Handoff
from shared.samplers import make_sampler

__all__ = ["Clock", "Finished", "StepCallback", "finish_handoff", "finish_latents"]

StepCallback = Callable[[int, int], None]  # (steps done, total steps)
Clock = Callable[[], float]  # seconds, e.g. time.perf_counter (wall) or time.process_time (CPU)


def finish_latents(bundle: DeviceBundle, handoff: Handoff, on_step: StepCallback | None = None) -> LatentArray:
    """Run steps [k, N) of the handoff's trajectory; return the final latent (B, C, H, W) float32.

    ``on_step(i, N)`` is called after each step ``i`` (counting from ``k + 1`` to ``N``).
    Raises :class:`~shared.errors.HandoffError` for a handoff of another family or with
    timesteps this bundle's scheduler would not produce.
    """
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


def finish_handoff(
    bundle: DeviceBundle,
    handoff: Handoff,
    *,
    on_step: StepCallback | None = None,
    decode: bool = True,
    clock: Clock = time.perf_counter,
) -> Finished:
    """Finish ``handoff`` on ``bundle``: the small model's remaining steps, then (``decode``) the VAE decode.

    Blocking (ORT runs here): call it from a worker thread where an event loop or a UI
    must keep running. ``on_step`` is called from this thread, as in :func:`finish_latents`.
    Each stage is timed with ``clock``.
    """
    started = clock()
    latents = finish_latents(bundle, handoff, on_step)
    stepped = clock()
    if not decode:
        return Finished(latents=latents, image=None, steps_s=stepped - started, decode_s=0.0)
    image = bundle.decode(latents)[0]
    return Finished(latents=latents, image=image, steps_s=stepped - started, decode_s=clock() - stepped)
