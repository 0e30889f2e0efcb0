"""Typed views of the diffusers objects the edge calls, for mypy: our boundary with diffusers.

diffusers' annotations do not describe what we call: ``SchedulerMixin`` declares none of
``timesteps``/``step``/``scale_model_input``/``init_noise_sigma`` (each scheduler class defines
them), mypy resolves ``UNet2DConditionModel`` to diffusers' torch-less placeholder class (no
``__call__``, no ``nn.Module`` methods), and a pipeline's modules (``vae``, ``scheduler``) are
set at runtime. These protocols state the calls we make, and the ``as_*`` helpers are the one
place the diffusers objects are cast to them. No runtime effect.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol, cast, overload

import torch


class SchedulerLike(Protocol):
    """What the edge calls on a diffusers scheduler (after ``set_timesteps``)."""

    timesteps: torch.Tensor

    @property
    def init_noise_sigma(self) -> float | torch.Tensor: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor, *,
             generator: torch.Generator | None = None, return_dict: Literal[False]) -> tuple[torch.Tensor, ...]: ...


class SampleOutput(Protocol):
    """``UNet2DConditionOutput`` (the noise prediction) or ``DecoderOutput`` (the decoded image)."""

    sample: torch.Tensor


class UNetLike(Protocol):
    """What the edge calls on a diffusers ``UNet2DConditionModel`` (an ``nn.Module``)."""

    @overload
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                 *, return_dict: Literal[False], timestep_cond: torch.Tensor | None = None,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]: ...

    @overload
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor | float, encoder_hidden_states: torch.Tensor,
                 *, return_dict: Literal[True] = ..., timestep_cond: torch.Tensor | None = None,
                 added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> SampleOutput: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


class VAEConfigLike(Protocol):
    scaling_factor: float


class LatentDistLike(Protocol):
    def mode(self) -> torch.Tensor: ...


class EncoderOutputLike(Protocol):
    latent_dist: LatentDistLike


class VAELike(Protocol):
    """What the edge calls on a diffusers ``AutoencoderKL``."""

    config: VAEConfigLike

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode(self, x: torch.Tensor) -> EncoderOutputLike: ...

    @overload
    def decode(self, z: torch.Tensor, *, return_dict: Literal[False]) -> tuple[torch.Tensor, ...]: ...

    @overload
    def decode(self, z: torch.Tensor, *, return_dict: Literal[True] = ...) -> SampleOutput: ...


class SchedulerConfigLike(Protocol):
    num_train_timesteps: int


class ConfiguredLike(Protocol):
    config: SchedulerConfigLike


class PipelineLike(Protocol):
    """The modules of a ``StableDiffusionPipeline`` we read (set on it at runtime)."""

    vae: VAELike
    scheduler: ConfiguredLike


def as_pipeline(pipeline: object) -> PipelineLike:
    """``pipeline`` (a diffusers ``StableDiffusionPipeline``) as the modules we read from it."""
    # cast: diffusers registers a pipeline's modules as attributes at runtime, invisible to mypy
    return cast(PipelineLike, pipeline)


def as_scheduler(scheduler: object) -> SchedulerLike:
    """``scheduler`` (a diffusers scheduler instance) as the calls we make on it."""
    # cast: diffusers' SchedulerMixin omits these members; every scheduler class we build defines them
    return cast(SchedulerLike, scheduler)


def as_unet(unet: object) -> UNetLike:
    """``unet`` (a diffusers ``UNet2DConditionModel``) as the calls we make on it."""
    # cast: mypy sees diffusers' torch-less placeholder class; the runtime object is the nn.Module
    return cast(UNetLike, unet)
