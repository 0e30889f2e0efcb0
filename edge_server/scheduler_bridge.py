"""The edge half of a sampler: the diffusers scheduler behind each wire name, and its state.

The edge steps a diffusers scheduler for the first ``k`` of ``N`` steps; the device continues
with the numpy port of the same name (``shared.samplers``). This module builds the matching
diffusers scheduler and reads its live state into a :class:`SamplerState` so that::

    sampler = make_sampler(name, config); sampler.set_timesteps(N); sampler.load_state(state)

continues the same trajectory. A config either works on both sides or fails on both:
:func:`diffusers_scheduler` first validates it with the numpy port.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from shared.errors import ConfigError, HandoffError
from shared.samplers import SAMPLER_NAMES, Sampler, SamplerError, SamplerState, make_sampler, resolved_config
from shared.samplers.lcm import noise_name, noise_step_indices
from shared.validation import is_integral


class StepCountingDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` that counts its steps, as Euler and DPM-Solver do, for :func:`export_state`.

    diffusers' DDIM steps by timestep alone and keeps no index. This subclass keeps
    ``step_index`` (None before the first step, like the other schedulers), checks each
    timestep is the next one of the schedule, and refuses ``eta != 0``, which the numpy
    port does not implement.
    """

    _step_index: int | None = None
    # Set by DDIMScheduler; mypy sees diffusers' torch-less placeholder class, which declares neither.
    num_inference_steps: int | None
    timesteps: torch.Tensor

    @property
    def step_index(self) -> int | None:
        """Index of the next step (None before the first), as in the other diffusers schedulers."""
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        super().set_timesteps(num_inference_steps, device)  # type: ignore[misc]  # placeholder base class for mypy
        self._step_index = None

    def step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, *args: Any, **kwargs: Any
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, ...]:
        eta = args[0] if args else kwargs.get("eta", 0.0)
        if eta != 0.0:
            raise ConfigError(f"ddim: eta={eta!r} is not supported (the device's numpy DDIM is deterministic)")
        clipped = args[1] if len(args) > 1 else kwargs.get("use_clipped_model_output", False)
        if clipped:
            raise ConfigError("ddim: use_clipped_model_output=True is not supported by the device's numpy DDIM")
        if self.num_inference_steps is None:
            raise SamplerError("ddim: call set_timesteps(num_inference_steps) before step")
        index = self._step_index or 0
        if index >= len(self.timesteps):
            raise SamplerError(f"ddim: all {len(self.timesteps)} steps are done; cannot step past the end")
        expected = int(self.timesteps[index])
        if int(timestep) != expected:
            raise SamplerError(f"ddim: got timestep {int(timestep)} but step {index} is at {expected}")
        out: DDIMSchedulerOutput | tuple[torch.Tensor, ...] = super().step(  # type: ignore[misc]  # placeholder base
            model_output, timestep, sample, *args, **kwargs
        )
        self._step_index = index + 1
        return out


_CLASSES: dict[str, type[SchedulerMixin]] = {
    "ddim": StepCountingDDIMScheduler,  # type: ignore[dict-item]  # mypy sees diffusers' placeholder classes
    "euler": EulerDiscreteScheduler,  # type: ignore[dict-item]  # (idem)
    "dpmpp_2m": DPMSolverMultistepScheduler,  # type: ignore[dict-item]  # (idem)
    "lcm": LCMScheduler,  # type: ignore[dict-item]  # (idem)
}
# Keys a wire name fixes, whatever the family's config says (the numpy port rejects others).
_OVERRIDES: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
}


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in SAMPLER_NAMES:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")


def diffusers_scheduler(
    name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int | None = None
) -> SchedulerMixin:
    """The diffusers scheduler that the numpy sampler ``name`` ports, built with ``from_config``.

    Raises ``ConfigError`` for an unknown name or a config the numpy port does not support
    (checked here so the edge fails before it runs any step the device could not continue).
    With ``num_inference_steps`` the step count is checked the same way (a few (N, spacing)
    pairs give broken schedules in diffusers) and ``set_timesteps`` is called.
    """
    _check_name(name)
    sampler = make_sampler(name, scheduler_config)  # same ConfigError the device would raise
    scheduler = _CLASSES[name].from_config(  # type: ignore[attr-defined]  # ConfigMixin's, not SchedulerMixin's
        dict(scheduler_config), **_OVERRIDES.get(name, {})
    )
    if num_inference_steps is not None:
        sampler.set_timesteps(num_inference_steps)
        scheduler.set_timesteps(num_inference_steps)
        check_same_schedule(name, scheduler_config, scheduler, sampler)
    return cast(SchedulerMixin, scheduler)  # from_config is untyped: it returns an instance of the class


def check_same_schedule(name: str, scheduler_config: Mapping[str, Any], scheduler: SchedulerMixin,
                        sampler: Sampler) -> None:
    """Refuse, before any step runs, a schedule the device's port would not reproduce.

    The edge's diffusers timesteps (and sigmas, where the sampler has them) must equal the numpy
    port's; otherwise the device would reject the handoff after the edge had spent its steps. The
    error names the config keys whose values the two read differently.
    """
    ours = np.asarray(sampler.timesteps, dtype=np.float64)
    theirs = scheduler.timesteps.detach().cpu().numpy().astype(np.float64)  # type: ignore[attr-defined]  # per class
    what = ""
    if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=0, atol=1e-3):
        what = "timesteps"
    elif hasattr(sampler, "sigmas") and hasattr(scheduler, "sigmas"):
        port_sigmas = np.asarray(sampler.sigmas, dtype=np.float64)
        edge_sigmas = scheduler.sigmas.detach().cpu().numpy().astype(np.float64)
        if port_sigmas.shape != edge_sigmas.shape or not np.allclose(port_sigmas, edge_sigmas, rtol=1e-5, atol=1e-6):
            what = "sigmas"
    if not what:
        return
    port = resolved_config(name, scheduler_config)
    edge = scheduler.config  # type: ignore[attr-defined]  # ConfigMixin's, not SchedulerMixin's
    differ = [f"{key}: edge {edge[key]!r}, device {port[key]!r}"
              for key in sorted(port) if key in edge and edge[key] != port[key]]
    raise ConfigError(
        f"{name}: the edge's {what} differ from the device port's for this family's scheduler config"
        + (f" ({'; '.join(differ)})" if differ else "")
        + "; refused before any step"
    )


def _to_f32(name: str, tensor: torch.Tensor) -> np.ndarray:
    if not isinstance(tensor, torch.Tensor):
        raise HandoffError(f"scheduler state {name} is a {type(tensor).__name__}, expected a tensor")
    array = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().copy()
    if not np.all(np.isfinite(array)):
        raise HandoffError(f"scheduler state {name} has NaN or infinity")
    return array


def _next_index(scheduler: SchedulerMixin, name: str, steps_taken: int | None) -> int:
    """Index of the next step: the scheduler's own counter, else ``steps_taken``."""
    counter_known = hasattr(scheduler, "step_index")
    index = getattr(scheduler, "step_index", None)
    if index is None and counter_known:
        # None before the first step: the first step then starts at begin_index (img2img) or 0.
        index = getattr(scheduler, "begin_index", None) or 0
    if steps_taken is not None:
        if not is_integral(steps_taken):
            raise HandoffError(f"{name}: steps_taken={steps_taken!r} is not an integer")
        if counter_known and index != steps_taken:
            raise HandoffError(f"{name}: steps_taken={steps_taken} but the scheduler is at step {index}")
        index = int(steps_taken)
    if not counter_known and steps_taken is None:
        raise HandoffError(
            f"{name}: {type(scheduler).__name__} does not count its steps; pass steps_taken= "
            "or build it with diffusers_scheduler()"
        )
    assert index is not None  # a counting scheduler's index defaults to 0; else steps_taken was given
    return int(index)


def _lcm_noise(
    scheduler: SchedulerMixin,
    index: int,
    n: int,
    generator: torch.Generator | None,
    sample_shape: tuple[int, ...] | None,
) -> dict[str, np.ndarray]:
    """The noise ``LCMScheduler.step`` would draw from ``generator`` at steps ``index`` .. ``n - 2``.

    Drawn from a clone, so the caller's generator is left where it is.
    """
    lcm: Any = scheduler  # diffusers' LCMScheduler (mypy sees its torch-less placeholder)
    port = make_sampler("lcm", lcm.config)  # the ConfigError the device would raise
    same = not lcm.custom_timesteps and lcm.num_inference_steps == n
    if same:
        port.set_timesteps(n)
        same = np.array_equal(port.timesteps, lcm.timesteps.detach().cpu().numpy())
    if not same:
        raise ConfigError(
            "lcm: only set_timesteps(num_inference_steps) with the config's original_inference_steps and strength 1 "
            "is supported (custom timesteps, another original_inference_steps and img2img strength are not ported "
            "to the device)"
        )
    if not isinstance(generator, torch.Generator):
        raise HandoffError(
            f"lcm: export_state needs generator=, the torch.Generator passed to LCMScheduler.step (got "
            f"{type(generator).__name__}): the device continues with the noise diffusers would draw from it"
        )
    if not (isinstance(sample_shape, tuple) and sample_shape and all(is_integral(d) and d > 0 for d in sample_shape)):
        raise HandoffError(f"lcm: export_state needs sample_shape=, the latents' shape (a tuple), got {sample_shape!r}")
    shape = tuple(int(d) for d in sample_shape)
    clone = torch.Generator(generator.device)
    clone.set_state(generator.get_state())
    tensors: dict[str, np.ndarray] = {}
    for i in noise_step_indices(index, n):
        # LCMScheduler.step's own draw: randn_tensor(model_output.shape, generator, model_output.device, float32).
        noise = randn_tensor(shape, generator=clone, device=generator.device, dtype=torch.float32)
        tensors[noise_name(i)] = _to_f32(noise_name(i), noise)
    return tensors


def export_state(
    scheduler: SchedulerMixin,
    name: str,
    *,
    steps_taken: int | None = None,
    generator: torch.Generator | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> SamplerState:
    """Read a live diffusers scheduler (after ``set_timesteps`` and ``k`` steps) into a SamplerState.

    ``steps_taken`` is needed only for a plain ``DDIMScheduler``, which keeps no step counter;
    when the scheduler counts its steps it must agree. ``generator`` and ``sample_shape`` are
    required for ``lcm`` (ignored otherwise): the state then carries the noise of steps
    ``k`` .. ``N - 2``, drawn as ``LCMScheduler.step`` would draw it from ``generator`` (a float32
    ``randn_tensor`` of ``sample_shape`` per step, on the generator's device), from a clone, so
    ``generator`` does not advance. That is diffusers' draw only for float32 samples: a float16
    UNet output makes diffusers draw float16 noise, other values. Raises ``ConfigError`` when
    the scheduler is not the class (or the config) behind ``name``, ``HandoffError`` when its
    state cannot be continued (set_timesteps not called, index out of range, bad history, no
    generator or sample shape for ``lcm``).
    """
    _check_name(name)
    base = DDIMScheduler if name == "ddim" else _CLASSES[name]
    if not isinstance(scheduler, base):
        raise ConfigError(f"sampler {name!r} is exported from a {base.__name__}, got {type(scheduler).__name__}")
    if scheduler.num_inference_steps is None:  # type: ignore[attr-defined]  # per-class state, as below
        raise HandoffError(f"{name}: call set_timesteps on the diffusers scheduler before export_state")
    n = len(scheduler.timesteps)  # type: ignore[attr-defined]  # (idem)
    index = _next_index(scheduler, name, steps_taken)
    if not 0 <= index <= n:
        raise HandoffError(f"{name}: step index {index} is not in [0, {n}]")
    scalars: dict[str, int | float] = {"num_inference_steps": int(n)}
    tensors: dict[str, np.ndarray] = {}

    if name == "dpmpp_2m":
        config = scheduler.config  # type: ignore[attr-defined]  # ConfigMixin's
        if config.algorithm_type != "dpmsolver++" or config.solver_order != 2:
            raise ConfigError(
                f"dpmpp_2m needs algorithm_type='dpmsolver++' and solver_order=2, the scheduler has "
                f"algorithm_type={config.algorithm_type!r}, solver_order={config.solver_order!r}"
            )
        outputs = list(scheduler.model_outputs)  # type: ignore[attr-defined]  # DPM-Solver's state
        if len(outputs) != 2:
            raise HandoffError(f"dpmpp_2m: expected 2 model_outputs slots, the scheduler has {len(outputs)}")
        for j, output in enumerate(outputs):
            if output is not None:
                tensors[f"model_outputs.{j}"] = _to_f32(f"model_outputs.{j}", output)
        scalars["lower_order_nums"] = int(scheduler.lower_order_nums)  # type: ignore[attr-defined]  # (idem)
    elif name == "lcm":
        tensors.update(_lcm_noise(scheduler, index, n, generator, sample_shape))
    return SamplerState(step_index=index, tensors=tensors, scalars=scalars)
