"""Device-only generation: what the app does when the edge cannot be reached.

The device encodes the prompt with the bundle's text encoder, draws the initial noise in
numpy and runs every step with the small model. It builds a ``k = 0`` handoff locally and
finishes it with :func:`device_app.finish.finish_handoff`, as the relay does, so there is
one way to finish on the device, not two; the answer is the same
:class:`~device_app.results.GenerationResult` a relayed generation gets (``offline=True``).

Seeds: the initial noise comes from ``np.random.default_rng(seed)``, so an offline image
is reproducible on the device but is not the image the edge would make for that seed
(the edge draws torch's noise).
"""

from __future__ import annotations

import time

import numpy as np

from device_app.finish import StepCallback, finish_handoff
from device_app.results import GenerationResult, Timings
from device_app.runtime import DeviceBundle
from shared.errors import ConfigError
from shared.handoff import Handoff
from shared.protocol import Plan
from shared.relay_plan import RelayPlan
from shared.samplers import make_sampler

__all__ = ["OFFLINE_SCHEDULER", "OFFLINE_WHY", "device_only_handoff", "generate_offline", "offline_plan"]

#: Who chose a device-only configuration, and why (the ``Plan`` of an offline result says so).
OFFLINE_SCHEDULER = "offline"
OFFLINE_WHY = "the edge is unreachable: every step on this device"


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


def generate_offline(bundle: DeviceBundle, prompt: str, plan: RelayPlan, seed: int, *,
                     on_step: StepCallback | None = None, request_id: str = "offline") -> GenerationResult:
    """Generate ``prompt`` on the device alone (blocking: call it from a worker thread).

    The result's timings: ``text_encode_s`` (prompt encoding and initial noise),
    ``device_compute_s`` (every step), ``decode_s``; ``total_latency_s`` is their sum.
    """
    started = time.perf_counter()
    handoff = device_only_handoff(bundle, prompt, plan, seed, request_id=request_id)
    encode_s = time.perf_counter() - started
    finished = finish_handoff(bundle, handoff, on_step=on_step)
    assert finished.image is not None  # decoded: finish_handoff's default
    factor = bundle.manifest.vae_scale_factor
    announced = Plan(
        request_id=request_id, plan=plan, seed=seed, height=handoff.latents.shape[2] * factor,
        width=handoff.latents.shape[3] * factor, scheduler=OFFLINE_SCHEDULER, why=OFFLINE_WHY,
    )
    timings = Timings(
        total_latency_s=encode_s + finished.steps_s + finished.decode_s, plan_s=None, edge_wait_s=0.0,
        transfer_s=0.0, handoff_decode_s=0.0, device_compute_s=finished.steps_s, decode_s=finished.decode_s,
        text_encode_s=encode_s,
    )
    return GenerationResult(
        request_id=request_id, image=finished.image, latents=finished.latents, plan=announced, timings=timings,
        payload_bytes=0, offline=True,
    )
