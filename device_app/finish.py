"""The device half of a relay: finish a handoff with the small model on ONNX Runtime, then decode it.

:func:`finish_handoff` is the one way the device finishes a generation, whoever asked: the
network client (:mod:`device_app.client`), the device-only path (:mod:`device_app.app.offline`,
a ``k = 0`` handoff built locally), ``rise-relay`` and ``rise-eval``. :func:`finish_latents`
is its denoising loop alone.

The numpy sampler is rebuilt from the bundle's scheduler config, checked to produce the
edge's timesteps, loaded with the edge's sampler state and run for the remaining steps.
Under classifier-free guidance the unconditional rows come first, as in diffusers' pipelines:
the bundle's constant unconditional embedding and the handoff's ``added_uncond`` (SDXL); with
an embedded guidance scale (LCM) the UNet gets ``timestep_cond`` and there is no unconditional pass.
That embedding is the handoff's own ``added_cond["timestep_cond"]`` where the edge sent it (torch's,
which the numpy port in :mod:`shared.guidance` matches only to a few 1e-4), else the port's.
No torch here: this is the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from device_app.results import Finished, LatentArray
from device_app.runtime import TIMESTEP_COND, DeviceBundle
from shared.errors import HandoffError
from shared.guidance import lcm_guidance_embedding
from shared.handoff import Handoff, HandoffInvalid
from shared.relay_plan import RelayPlan
from shared.samplers import make_sampler

__all__ = [
    "Clock", "DeviceStepCount", "Finished", "StepCallback", "X0Callback", "check_handoff_fits",
    "finish_handoff", "finish_latents",
]

StepCallback = Callable[[int, int], None]  # (steps done, total steps)
X0Callback = Callable[[int, int, np.ndarray], None]  # (steps done, total steps, predicted clean latent)


class DeviceStepCount:
    """This device's steps as a user counts them (from 1), from the ``(i, N)`` a finish reports.

    A finish counts from ``k + 1`` to ``N``, ``k`` where the handoff happened: the plan's split,
    or, for an adaptive plan, wherever the edge handed off (seen on the first step); a speculative
    run's own steps count from 1, and a switch to the handoff starts the count again.
    """

    def __init__(self) -> None:
        self.plan: RelayPlan | None = None
        self.start = 0  # the step the count starts after (where the handoff happened)
        self._seen = False
        self._last = 0

    def reset(self, plan: RelayPlan) -> None:
        self.plan, self.start, self._seen, self._last = plan, plan.split, False, 0

    def count(self, step: int, total: int) -> tuple[int, int]:
        """``(done, of)`` after the finish reported step ``step`` of ``total``."""
        plan = self.plan
        if plan is None or not (plan.adaptive or plan.speculative):
            self.start = plan.split if plan is not None else 0
        elif not self._seen or step <= self._last:  # the first step, or a switch to the handoff
            self.start = max(step - 1, 0)
        self._seen, self._last = True, step
        of = max(total - self.start, 1)
        return min(max(step - self.start, 0), of), of
Clock = Callable[[], float]  # seconds, e.g. time.perf_counter (wall) or time.process_time (CPU)


def check_handoff_fits(bundle: DeviceBundle, handoff: Handoff) -> None:
    """Raise :class:`~shared.errors.HandoffError` unless this bundle can continue ``handoff``.

    Same family, the bundle's latent channels, its guidance mode, a sampler the bundle runs and exactly the extra
    conditioning its UNet takes (``added_cond_names``; in ``"embedding"`` mode ``timestep_cond``
    may come too, of shape (B, ``time_cond_proj_dim``)).
    """
    manifest = bundle.manifest
    if handoff.family_id != bundle.family_id:
        raise HandoffError(
            f"handoff is for family {handoff.family_id!r} but this bundle is {bundle.family_id!r}"
        )
    if handoff.latents.shape[1] != manifest.latent_channels:
        raise HandoffInvalid(f"latents: expected {manifest.latent_channels} channels (this bundle's), got shape "
                             f"{tuple(handoff.latents.shape)}", field="latents")
    if handoff.guidance != manifest.guidance:
        raise HandoffInvalid(f"guidance: expected {manifest.guidance!r} (this bundle's UNet), got {handoff.guidance!r}",
                             field="guidance")
    if handoff.sampler not in manifest.samplers:
        raise HandoffInvalid(f"sampler: expected one this bundle runs ({', '.join(manifest.samplers)}), "
                             f"got {handoff.sampler!r}", field="sampler")
    embedded = manifest.guidance == "embedding"
    expected = sorted(manifest.added_cond_names)
    got = sorted(name for name in handoff.added_cond if not (embedded and name == TIMESTEP_COND))
    if got != expected:
        also = f" (and optionally {TIMESTEP_COND!r})" if embedded else ""
        raise HandoffInvalid(f"added_cond: expected {expected}{also} for this bundle's UNet, got {got}",
                             field="added_cond")
    if TIMESTEP_COND in handoff.added_cond:
        shape = tuple(handoff.added_cond[TIMESTEP_COND].shape)
        want = (handoff.latents.shape[0], manifest.time_cond_proj_dim)
        if shape != want:
            raise HandoffInvalid(f"added_cond.{TIMESTEP_COND}: expected shape {want}, got {shape}",
                                 field="added_cond")
    if handoff.uses_cfg and sorted(handoff.added_uncond) != expected:
        raise HandoffInvalid(f"added_uncond: expected {expected} under classifier-free guidance, "
                             f"got {sorted(handoff.added_uncond)}", field="added_uncond")


def finish_latents(bundle: DeviceBundle, handoff: Handoff, on_step: StepCallback | None = None, *,
                   on_x0: X0Callback | None = None) -> LatentArray:
    """Run steps [k, N) of the handoff's trajectory; return the final latent (B, C, H, W) float32.

    ``on_step(i, N)`` is called after each step ``i`` (counting from ``k + 1`` to ``N``);
    ``on_x0(i, N, x0)`` too, with the clean latent the step predicted (the live preview's).
    Raises :class:`~shared.errors.HandoffError` for a handoff this bundle cannot continue
    (:func:`check_handoff_fits`) or with timesteps this bundle's scheduler would not produce.
    """
    check_handoff_fits(bundle, handoff)
    manifest = bundle.manifest
    sampler = make_sampler(handoff.sampler, manifest.scheduler_config)
    sampler.set_timesteps(handoff.num_inference_steps)
    handoff.check_timesteps(sampler.timesteps)  # both sides' scheduler configs must agree
    sampler.load_state(handoff.sampler_state)
    latents = handoff.latents
    cond = handoff.cond_embeddings
    guided = handoff.uses_cfg
    if guided:
        uncond = np.broadcast_to(bundle.uncond, cond.shape)
        embeds = np.concatenate([uncond, cond]).astype(np.float32)
        added = {name: np.concatenate([handoff.added_uncond[name], handoff.added_cond[name]]).astype(np.float32)
                 for name in manifest.added_cond_names}
    else:
        embeds = cond
        added = {name: handoff.added_cond[name] for name in manifest.added_cond_names}
    timestep_cond = handoff.added_cond.get(TIMESTEP_COND)
    if timestep_cond is None and handoff.guidance == "embedding":
        assert manifest.time_cond_proj_dim is not None  # the manifest's check: embedded guidance has its width
        timestep_cond = lcm_guidance_embedding(handoff.guidance_scale, manifest.time_cond_proj_dim, latents.shape[0])
    total = handoff.num_inference_steps
    for i in range(handoff.split, total):
        t = sampler.timesteps[i]  # Euler's may be fractional: keep the sampler's own value
        model_in = np.concatenate([latents, latents]) if guided else latents
        model_in = sampler.scale_model_input(model_in, t)
        noise = bundle.unet(model_in, t, embeds, added=added, timestep_cond=timestep_cond)
        if guided:
            noise_uncond, noise_cond = np.split(noise, 2)
            noise = noise_uncond + np.float32(handoff.guidance_scale) * (noise_cond - noise_uncond)
        latents = sampler.step(noise.astype(np.float32), t, latents)
        if on_step is not None:
            on_step(i + 1, total)
        if on_x0 is not None and sampler.last_x0 is not None:
            on_x0(i + 1, total, sampler.last_x0)
    return latents


def finish_handoff(
    bundle: DeviceBundle,
    handoff: Handoff,
    *,
    on_step: StepCallback | None = None,
    on_x0: X0Callback | None = None,
    decode: bool = True,
    clock: Clock = time.perf_counter,
) -> Finished:
    """Finish ``handoff`` on ``bundle``: the small model's remaining steps, then (``decode``) the VAE decode.

    Blocking (ORT runs here): call it from a worker thread where an event loop or a UI
    must keep running. ``on_step`` is called from this thread, as in :func:`finish_latents`.
    Each stage is timed with ``clock``.
    """
    started = clock()
    latents = finish_latents(bundle, handoff, on_step, on_x0=on_x0)
    stepped = clock()
    if not decode:
        return Finished(latents=latents, image=None, steps_s=stepped - started, decode_s=0.0)
    image = bundle.decode(latents)[0]
    return Finished(latents=latents, image=image, steps_s=stepped - started, decode_s=clock() - stepped)
