"""Device-only generation: what the app does when the edge cannot be reached.

The device encodes the prompt with the bundle's text encoder, draws the initial noise in
numpy and runs every step with the small model. It reuses the relay's device loop
(:func:`device_app.relay.finish_latents`) by building a ``k = 0`` handoff locally, so
there is one denoising loop on the device, not two.

Seeds: the initial noise comes from ``np.random.default_rng(seed)``, so an offline image
is reproducible on the device but is not the image the edge would make for that seed
(the edge draws torch's noise).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from device_app.relay import finish_latents
from device_app.runtime import DeviceBundle
from shared.errors import ConfigError
from shared.handoff import Handoff
from shared.relay_plan import RelayPlan
from shared.samplers import make_sampler

__all__ = ["OfflineResult", "device_only_handoff", "generate_offline", "offline_plan"]

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def offline_plan(preference: float, *, min_steps: int = 8, max_steps: int = 25, sampler: str = "dpmpp_2m",
                 guidance_scale: float = 7.5) -> RelayPlan:
    """The device-only configuration for a quality/speed preference (0 = fastest .. 1 = best).

    More steps for a higher preference, linearly from ``min_steps`` to ``max_steps``.
    """
    if not 0.0 <= preference <= 1.0:
        raise ConfigError(f"preference must be in [0, 1], got {preference!r}")
    if not 1 <= min_steps <= max_steps:
        raise ConfigError(f"offline steps must satisfy 1 <= min <= max, got {min_steps} and {max_steps}")
    steps = min_steps + round(preference * (max_steps - min_steps))
    return RelayPlan(steps, 0, sampler, guidance_scale, "device")


def device_only_handoff(bundle: DeviceBundle, prompt: str, plan: RelayPlan, seed: int, *,
                        height: int | None = None, width: int | None = None, request_id: str = "") -> Handoff:
    """The ``k = 0`` handoff for ``prompt``: initial noise, the device's text embedding, the sampler at step 0."""
    if plan.split != 0:
        raise ConfigError(f"a device-only plan has split 0, got {plan.split}")
    manifest = bundle.manifest
    factor = manifest.vae_scale_factor
    height = height or manifest.sample_size * factor
    width = width or manifest.sample_size * factor
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            raise ConfigError(f"{name} must be a positive multiple of {factor}, got {value}")
    sampler = make_sampler(plan.sampler, manifest.scheduler_config)
    sampler.set_timesteps(plan.num_inference_steps)
    shape = (1, manifest.latent_channels, height // factor, width // factor)
    noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    handoff = Handoff(
        family_id=bundle.family_id,
        sampler=plan.sampler,
        num_inference_steps=plan.num_inference_steps,
        split=0,
        guidance_scale=float(plan.guidance_scale),
        seed=seed,
        timesteps=np.asarray(sampler.timesteps, dtype=np.float32),
        latents=(noise * np.float32(sampler.init_noise_sigma)).astype(np.float32),
        cond_embeddings=bundle.encode_text([prompt]),
        sampler_state=sampler.state(),
        request_id=request_id,
    )
    handoff.validate()
    return handoff


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no truth value
class OfflineResult:
    """One device-only image (uint8 (H, W, 3)) and where its time went, in seconds."""

    image: np.ndarray = field(repr=False)
    latents: np.ndarray = field(repr=False)
    plan: RelayPlan
    seed: int
    encode_s: float
    device_compute_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.encode_s + self.device_compute_s + self.decode_s


def generate_offline(bundle: DeviceBundle, prompt: str, plan: RelayPlan, seed: int, *,
                     on_step: StepCallback | None = None, request_id: str = "") -> OfflineResult:
    """Generate ``prompt`` on the device alone (blocking: call it from a worker thread)."""
    started = time.perf_counter()
    handoff = device_only_handoff(bundle, prompt, plan, seed, request_id=request_id)
    encoded = time.perf_counter()
    latents = finish_latents(bundle, handoff, on_step)
    stepped = time.perf_counter()
    image = bundle.decode(latents)[0]
    return OfflineResult(
        image=image, latents=latents, plan=plan, seed=seed, encode_s=encoded - started,
        device_compute_s=stepped - encoded, decode_s=time.perf_counter() - stepped,
    )
