"""Step-level batching: one UNet call advances several requests by one denoising step each.

Requests at different steps (and with different samplers, step counts, guidance scales) share
a call: each contributes its latent (twice under classifier-free guidance) with its own
timestep, since diffusers' UNet takes one timestep per sample, and its extra conditioning
(SDXL's ``added_cond_kwargs``, an LCM UNet's ``timestep_cond``) row by row; afterwards every
request's own scheduler takes its step, with the request's own generator (LCM draws noise).
Batching changes only float round-off (tested against one request at a time). Torch compute
only: the asyncio daemon drives this from a worker thread.

Every step also leaves the job's predicted clean latent in ``DenoiseJob.x0`` (what the scheduler
computed on the way: DDIM's and Euler's ``pred_original_sample``, LCM's ``denoised``, the newest
entry of DPM-Solver++'s data-prediction history), which the live preview draws and an adaptive
handoff (``shared.relay_modes``) watches: such a job stops at the first step of its window whose
x0 changed by less than its ``tau``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from edge_server.scheduler_bridge import export_state
from edge_server.torch_types import SchedulerLike, as_scheduler, as_unet
from shared.handoff import Handoff
from shared.relay_modes import HandoffRule, relative_change
from shared.relay_plan import RelayPlan


@dataclass
class DenoiseJob:
    """One request's edge trajectory: its scheduler, latent and embeddings, and how far it is."""

    scheduler: SchedulerMixin
    latents: torch.Tensor  # (1, C, h, w)
    cond: torch.Tensor  # (1, L, D)
    uncond: torch.Tensor  # (1, L, D)
    guidance_scale: float
    stop_at: int  # run steps [next_step, stop_at)
    next_step: int = 0
    request_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # the adapter's own bookkeeping (plan, seed, timings)
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds (1, P), time_ids (1, 6)
    added_uncond: dict[str, torch.Tensor] = field(default_factory=dict)  # the same names for the uncond row
    timestep_cond: torch.Tensor | None = None  # LCM-distilled UNets: the guidance embedding (1, time_cond_proj_dim)
    generator: torch.Generator | None = None  # the request's generator, which stochastic samplers (LCM) draw from
    settle_rule: HandoffRule | None = None  # adaptive handoff: stop once x0 settles (None: stop at stop_at)
    x0: torch.Tensor | None = None  # float32, like latents: the clean latent the last step predicted
    x0_change: float | None = None  # adaptive jobs: the relative change of x0 at the last step
    settled_at: int | None = None  # adaptive jobs: the step the rule handed off at (None: not, or not yet)
    _schedule_key: tuple[Any, ...] | None = field(default=None, repr=False)

    @property
    def sched(self) -> SchedulerLike:
        """``scheduler`` typed as the calls we make on it (see :mod:`edge_server.torch_types`)."""
        return as_scheduler(self.scheduler)

    @property
    def guidance(self) -> str:
        """``"embedding"`` when the UNet takes the guidance scale as ``timestep_cond`` (LCM), else ``"cfg"``."""
        return "cfg" if self.timestep_cond is None else "embedding"

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: an unconditional row beside the conditional one (never with an embedding)."""
        return self.guidance == "cfg" and self.guidance_scale > 1.0

    @property
    def done(self) -> bool:
        return self.next_step >= self.stop_at

    @property
    def unet_rows(self) -> int:
        """Rows this job adds to a UNet batch (2 under classifier-free guidance)."""
        return 2 if self.guided else 1

    def step_group(self) -> tuple[Any, ...] | None:
        """Jobs with the same key can take their sampler step as one call (see ``_sampler_step``).

        The same scheduler class and config, step count and next step. Not LCM: each request's step
        draws its own noise from its own generator.
        """
        if isinstance(self.scheduler, LCMScheduler):
            return None
        if self._schedule_key is None:
            config = json.dumps(dict(self.scheduler.config), sort_keys=True, default=str)  # type: ignore[attr-defined]
            self._schedule_key = (type(self.scheduler).__name__, config, len(self.sched.timesteps))
        return (*self._schedule_key, self.next_step)

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs can share a UNet call only with equal latent, embedding and extra-conditioning shapes."""
        added = tuple(sorted((name, tuple(t.shape[1:])) for name, t in self.added_cond.items()))
        cond_shape = None if self.timestep_cond is None else tuple(self.timestep_cond.shape[1:])
        return (tuple(self.latents.shape[1:]), tuple(self.cond.shape[1:]), added, cond_shape)

    def _extra_inputs(self) -> dict[str, np.ndarray]:
        """The UNet's extra inputs for the conditional rows, by the names the device's ONNX graph has.

        The guidance embedding travels too: the device's numpy port of it differs from torch's by
        a few 1e-4 (torch's ``exp`` is one ulp off at times, times ``sin`` of up to 1000 w), so the
        device continues with the edge's exact one and computes its own only when it runs alone.
        """
        extra = {name: _f32(t) for name, t in self.added_cond.items()}
        if self.timestep_cond is not None:
            extra["timestep_cond"] = _f32(self.timestep_cond)
        return extra

    def to_handoff(self, family_id: str, plan: RelayPlan, seed: int) -> Handoff:
        """The handoff after this job's steps; the edge's generator is left where it is."""
        state = export_state(self.scheduler, plan.sampler, generator=self.generator,
                             sample_shape=tuple(self.latents.shape))
        return Handoff(
            family_id=family_id,
            sampler=plan.sampler,
            num_inference_steps=plan.num_inference_steps,
            split=self.next_step,
            guidance_scale=float(plan.guidance_scale),
            seed=seed,
            timesteps=_f32(self.sched.timesteps),
            latents=_f32(self.latents),
            cond_embeddings=_f32(self.cond),
            sampler_state=state,
            request_id=self.request_id,
            added_cond=self._extra_inputs(),
            added_uncond={name: _f32(t) for name, t in self.added_uncond.items()} if self.guided else {},
            guidance=self.guidance,
        )


def _f32(tensor: torch.Tensor) -> np.ndarray:
    """A tensor as the wire carries it: CPU float32."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).numpy()


@torch.no_grad()
def batched_step(unet: UNet2DConditionModel, jobs: Sequence[DenoiseJob]) -> None:
    """Advance every job by one step with a single UNet call (all jobs share one batch_key)."""
    if jobs:
        take_step(jobs, unet_noise(unet, jobs))


@torch.no_grad()
def unet_noise(unet: UNet2DConditionModel, jobs: Sequence[DenoiseJob]) -> torch.Tensor:
    """The UNet's noise prediction for every job's rows at its next step, in one call (float32, on the UNet's
    device). No job changes: a call that fails (out of memory) can be retried, in smaller batches."""
    if len({job.batch_key() for job in jobs}) != 1:
        raise ValueError("batched_step needs jobs of one latent and embedding shape")
    inputs: list[torch.Tensor] = []
    timesteps: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    added: dict[str, list[torch.Tensor]] = {name: [] for name in jobs[0].added_cond}
    timestep_conds: list[torch.Tensor] = []
    for job in jobs:
        t = job.sched.timesteps[job.next_step]
        model_in = torch.cat([job.latents] * 2) if job.guided else job.latents
        inputs.append(job.sched.scale_model_input(model_in, t))
        timesteps.append(t.reshape(1).expand(job.unet_rows))
        embeds.append(torch.cat([job.uncond, job.cond]) if job.guided else job.cond)
        for name, rows in added.items():  # the uncond row first, as the pipelines concatenate
            cond = job.added_cond[name]
            rows.append(torch.cat([job.added_uncond[name], cond]) if job.guided else cond)
        if job.timestep_cond is not None:
            timestep_conds.append(job.timestep_cond.expand(job.unet_rows, -1))
    # The network runs in its own dtype on its device; latents and the sampler stay float32.
    model = as_unet(unet)
    device, dtype = model.device, model.dtype
    kwargs: dict[str, Any] = {}
    if added:
        kwargs["added_cond_kwargs"] = {name: torch.cat(rows).to(device, dtype) for name, rows in added.items()}
    if timestep_conds:
        kwargs["timestep_cond"] = torch.cat(timestep_conds).to(device, dtype)
    noise: torch.Tensor = model(
        torch.cat(inputs).to(device, dtype), torch.cat(timesteps).to(device),
        encoder_hidden_states=torch.cat(embeds).to(device, dtype), return_dict=False, **kwargs,
    )[0].float()
    return noise


@torch.no_grad()
def take_step(jobs: Sequence[DenoiseJob], noise: torch.Tensor) -> None:
    """Each job's guidance and sampler step from :func:`unet_noise`'s rows for it (in the jobs' order)."""
    guided_noise: list[torch.Tensor] = []
    for job, job_noise in zip(jobs, torch.split(noise, [job.unet_rows for job in jobs]), strict=True):
        if job.guided:
            noise_uncond, noise_cond = job_noise.chunk(2)
            job_noise = noise_uncond + job.guidance_scale * (noise_cond - noise_uncond)
        guided_noise.append(job_noise)
    previous = [(job, job.x0) for job in jobs]  # what an adaptive job's x0 change is measured against
    groups: dict[tuple[Any, ...] | int, list[tuple[DenoiseJob, torch.Tensor]]] = {}
    for i, (job, job_noise) in enumerate(zip(jobs, guided_noise, strict=True)):
        key = job.step_group()
        groups.setdefault(i if key is None else key, []).append((job, job_noise))
    for group in groups.values():
        _sampler_step(group)
    _settle(previous)


#: What a grouped sampler step hands back to each job's own scheduler: the step counter, and
#: DPM-Solver's order counter and history (split by rows). Nothing else changes in a step of
#: the classes we group (DDIM, Euler, DPM-Solver++ 2M).
_COUNTERS = ("_step_index", "lower_order_nums")


def _predicted_x0(scheduler: Any, out: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The clean latent a step predicted, as the scheduler computed it (no extra arithmetic).

    DDIM and Euler return ``(prev_sample, pred_original_sample)``, LCM ``(prev_sample, denoised)``;
    DPM-Solver++ returns the sample alone, its x0 being the newest entry of ``model_outputs``.
    """
    if len(out) > 1:
        return out[1].float()
    history = getattr(scheduler, "model_outputs", None)
    if not history or history[-1] is None:
        raise TypeError(f"{type(scheduler).__name__}: cannot read the predicted clean latent of its step")
    return history[-1].float()


def _settle(previous: Sequence[tuple[DenoiseJob, torch.Tensor | None]]) -> None:
    """Adaptive jobs: the x0 change of the step just taken, and the handoff where it settled.

    The norms of all adaptive jobs come back in one transfer (one device sync per UNet call).
    """
    watched = [(job, prev) for job, prev in previous
               if job.settle_rule is not None and job.settled_at is None and job.x0 is not None and prev is not None
               and job.settle_rule.first_split <= job.next_step <= job.settle_rule.last_split]
    if not watched:
        return
    norms = torch.stack([torch.stack([torch.linalg.vector_norm(job.x0 - prev), torch.linalg.vector_norm(job.x0)])
                         for job, prev in watched if job.x0 is not None]).double().cpu().tolist()
    for (job, _), (diff_norm, norm) in zip(watched, norms, strict=True):
        rule = job.settle_rule
        assert rule is not None
        job.x0_change = relative_change(diff_norm, norm)
        if rule.settled(job.next_step, job.x0_change):
            job.settled_at = job.next_step
            job.stop_at = min(job.stop_at, job.next_step)


def _sampler_step(group: Sequence[tuple[DenoiseJob, torch.Tensor]]) -> None:
    """One scheduler step for jobs at the same step of the same schedule: one call on their stacked rows.

    On a GPU this is one set of kernel launches instead of one per request. The arithmetic is
    elementwise per row, so each job gets what its own scheduler would have given; the leader's
    state after the step (counters, history rows) is handed back to every job's scheduler.
    """
    if len(group) == 1:
        job, noise = group[0]
        t = job.sched.timesteps[job.next_step]
        out = job.sched.step(noise, t, job.latents, generator=job.generator, return_dict=False)
        job.latents, job.x0 = out[0], _predicted_x0(job.scheduler, out)
        job.next_step += 1
        return
    jobs = [job for job, _ in group]
    leader: Any = jobs[0].scheduler  # diffusers' scheduler state is per class: untyped for mypy
    rows = [job.latents.shape[0] for job in jobs]
    history = getattr(leader, "model_outputs", None)
    if history is not None:
        leader.model_outputs = [
            None if slot is None else torch.cat([job.scheduler.model_outputs[i] for job in jobs])  # type: ignore[attr-defined]
            for i, slot in enumerate(history)
        ]
    t = jobs[0].sched.timesteps[jobs[0].next_step]
    out = jobs[0].sched.step(torch.cat([n for _, n in group]), t, torch.cat([job.latents for job in jobs]),
                             return_dict=False)
    stacked, stacked_x0 = out[0], _predicted_x0(leader, out)
    counters = {name: getattr(leader, name) for name in _COUNTERS if hasattr(leader, name)}
    slots = [None if slot is None else torch.split(slot, rows) for slot in leader.model_outputs] if history else []
    parts = zip(torch.split(stacked, rows), torch.split(stacked_x0, rows), strict=True)
    for i, (job, (latents, x0)) in enumerate(zip(jobs, parts, strict=True)):
        job.latents, job.x0 = latents, x0
        job.next_step += 1
        target: Any = job.scheduler
        for name, value in counters.items():
            setattr(target, name, value)
        if history is not None:
            target.model_outputs = [None if rows_of is None else rows_of[i] for rows_of in slots]


def pick_batch(jobs: Sequence[DenoiseJob], max_rows: int) -> list[DenoiseJob]:
    """The next UNet call's jobs: oldest unfinished first, same shapes, at most ``max_rows`` rows.

    Oldest first keeps latency fair: a request admitted earlier is never starved by later ones.
    """
    pending = [job for job in jobs if not job.done]
    if not pending:
        return []
    key = pending[0].batch_key()
    batch: list[DenoiseJob] = []
    rows = 0
    for job in pending:
        if job.batch_key() == key and rows + job.unet_rows <= max(max_rows, pending[0].unet_rows):
            batch.append(job)
            rows += job.unet_rows
    return batch
