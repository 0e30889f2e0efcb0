"""Device-only generation: what the app does when the edge cannot be reached.

The device encodes the prompt with the bundle's text encoder(s), draws the initial noise in
numpy and runs every step with the small model. It builds a ``k = 0`` handoff locally and
finishes it with :func:`device_app.finish.finish_handoff`, as the relay does, so there is
one way to finish on the device, not two; the answer is the same
:class:`~device_app.results.GenerationResult` a relayed generation gets (``offline=True``).

SDXL bundles get their pooled embedding from the second encoder and the size conditioning
(``time_ids``) from the image size, as diffusers' SDXL pipeline builds them (uncropped); the
unconditional rows are the bundle's constants. LCM bundles run their own sampler and guidance
mode (the manifest's ``samplers`` and ``guidance``; the guidance embedding is :mod:`shared.guidance`'s).

Seeds: the initial noise comes from ``np.random.default_rng(seed)``, then (LCM, a stochastic
sampler) each step's noise from the same generator, in step order; so an offline image is
reproducible on the device but is not the image the edge would make for that seed (the
edge draws torch's noise).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from device_app.finish import StepCallback, finish_handoff
from device_app.results import GenerationResult, Timings
from device_app.runtime import TIMESTEP_COND, DeviceBundle
from shared.errors import ConfigError
from shared.guidance import lcm_guidance_embedding
from shared.handoff import Handoff
from shared.manifest import DEFAULT_SAMPLERS
from shared.protocol import Plan
from shared.relay_plan import RelayPlan
from shared.samplers import SamplerState, make_sampler
from shared.samplers.lcm import noise_step_indices

__all__ = [
    "DEFAULT_OFFLINE_SAMPLER",
    "OFFLINE_SCHEDULER",
    "OFFLINE_WHY",
    "device_only_handoff",
    "generate_offline",
    "offline_plan",
    "offline_sampler",
    "sdxl_time_ids",
]

#: Who chose a device-only configuration, and why (the ``Plan`` of an offline result says so).
OFFLINE_SCHEDULER = "offline"
OFFLINE_WHY = "the edge is unreachable: every step on this device"
DEFAULT_OFFLINE_SAMPLER = "dpmpp_2m"
LCM_STEPS = (4, 8)  # the step range LCM checkpoints are distilled for
_TIME_IDS = "time_ids"


def offline_sampler(samplers: Sequence[str]) -> str:
    """The sampler a device-only plan uses on a bundle that runs ``samplers``: DPM-Solver++ 2M, else its first."""
    if not samplers:
        raise ConfigError("the bundle names no sampler it runs")
    return DEFAULT_OFFLINE_SAMPLER if DEFAULT_OFFLINE_SAMPLER in samplers else samplers[0]


def offline_plan(preference: float, *, min_steps: int = 8, max_steps: int = 25, sampler: str | None = None,
                 guidance_scale: float = 7.5, samplers: Sequence[str] = DEFAULT_SAMPLERS) -> RelayPlan:
    """The device-only configuration for a quality/speed preference (0 = fastest .. 1 = best).

    More steps for a higher preference, linearly from ``min_steps`` to ``max_steps`` (for lcm at
    most :data:`LCM_STEPS`). ``samplers``
    are the ones the bundle runs (``bundle.manifest.samplers``); ``sampler`` defaults to
    :func:`offline_sampler` of them and must be one of them.
    """
    if not 0.0 <= preference <= 1.0:
        raise ConfigError(f"preference must be in [0, 1], got {preference!r}")
    if not 1 <= min_steps <= max_steps:
        raise ConfigError(f"offline steps must satisfy 1 <= min <= max, got {min_steps} and {max_steps}")
    chosen = offline_sampler(samplers) if sampler is None else sampler
    _check_sampler(chosen, samplers)
    if chosen == "lcm":  # a consistency model is distilled for a few steps: more only cost time
        min_steps, max_steps = min(min_steps, LCM_STEPS[0]), min(max_steps, LCM_STEPS[1])
    steps = min_steps + round(preference * (max_steps - min_steps))
    return RelayPlan(steps, 0, chosen, guidance_scale, "device")


def _check_sampler(sampler: str, samplers: Sequence[str]) -> None:
    if sampler not in samplers:
        raise ConfigError(f"sampler {sampler!r} is not one this bundle runs ({', '.join(samplers)})")


def sdxl_time_ids(height: int, width: int, batch: int = 1) -> np.ndarray:
    """SDXL's size conditioning (B, 6) float32: original size, crop top-left (0, 0), target size, in pixels."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], dtype=np.float32), (batch, 1))


def device_only_handoff(bundle: DeviceBundle, prompt: str, plan: RelayPlan, seed: int, *,
                        height: int | None = None, width: int | None = None, request_id: str = "") -> Handoff:
    """The ``k = 0`` handoff for ``prompt``: initial noise, the device's conditioning, the sampler at step 0.

    Raises :class:`~shared.errors.ConfigError` for a split other than 0, a sampler the bundle does
    not run or an image size that is not a multiple of the VAE's factor.
    """
    if plan.split != 0:
        raise ConfigError(f"a device-only plan has split 0, got {plan.split}")
    manifest = bundle.manifest
    _check_sampler(plan.sampler, manifest.samplers)
    factor = manifest.vae_scale_factor
    height = height or manifest.sample_size * factor
    width = width or manifest.sample_size * factor
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % factor:
            raise ConfigError(f"{name} must be a positive multiple of {factor}, got {value}")
    sampler = make_sampler(plan.sampler, manifest.scheduler_config)
    sampler.set_timesteps(plan.num_inference_steps)
    shape = (1, manifest.latent_channels, height // factor, width // factor)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape, dtype=np.float32)
    state = sampler.state()
    if plan.sampler == "lcm":  # a stochastic sampler: its per-step noise travels in the state, drawn after the latent
        tensors = dict(state.tensors)
        for i in noise_step_indices(0, plan.num_inference_steps):
            tensors[f"noise.{i}"] = rng.standard_normal(shape, dtype=np.float32)
        state = SamplerState(step_index=state.step_index, tensors=tensors, scalars=dict(state.scalars))
    cond, added_cond = bundle.encode_conditioning([prompt])
    guidance = manifest.guidance
    added_uncond: dict[str, np.ndarray] = {}
    if _TIME_IDS in manifest.added_cond_names:
        added_cond[_TIME_IDS] = sdxl_time_ids(height, width)
    if guidance == "embedding":  # the edge sends its own (torch's) embedding; alone, the device computes the port's
        assert manifest.time_cond_proj_dim is not None  # the manifest's check: embedded guidance has its width
        added_cond[TIMESTEP_COND] = lcm_guidance_embedding(plan.guidance_scale, manifest.time_cond_proj_dim)
    if guidance == "cfg" and plan.guidance_scale > 1.0 and manifest.added_cond_names:
        added_uncond = {name: added_cond[name] for name in manifest.added_cond_names}
        if bundle.uncond_pooled is not None:
            added_uncond["text_embeds"] = bundle.uncond_pooled
    handoff = Handoff(
        family_id=bundle.family_id,
        sampler=plan.sampler,
        num_inference_steps=plan.num_inference_steps,
        split=0,
        guidance_scale=float(plan.guidance_scale),
        seed=seed,
        timesteps=np.asarray(sampler.timesteps, dtype=np.float32),
        latents=(noise * np.float32(sampler.init_noise_sigma)).astype(np.float32),
        cond_embeddings=cond,
        sampler_state=state,
        request_id=request_id,
        added_cond=added_cond,
        added_uncond=added_uncond,
        guidance=guidance,
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
