"""LCM (latent consistency model) sampling, a numpy port of diffusers' ``LCMScheduler``.

Supported config: beta_schedule linear / scaled_linear / squaredcos_cap_v2 or trained_betas,
rescale_betas_zero_snr, prediction_type epsilon / v_prediction / sample, clip_sample (with
clip_sample_range), set_alpha_to_one, original_inference_steps, timestep_scaling. Rejected with
``ConfigError``: thresholding=True, original_inference_steps > num_train_timesteps, and (at
``set_timesteps``) num_inference_steps > original_inference_steps, which diffusers refuses too
(the LCM schedule is a subset of the ``original_inference_steps`` distillation schedule). Not
ported: ``set_timesteps``' custom ``timesteps``, ``original_inference_steps`` override and
``strength`` < 1 (img2img); the schedule is always ``set_timesteps(N)`` with the config's
``original_inference_steps`` and strength 1. ``timestep_spacing`` and ``steps_offset`` are
``LCMScheduler.__init__`` keys that its schedule does not read; the port ignores them too. Keys
of other classes are ignored and missing keys take ``LCMScheduler``'s defaults (note: its
defaults are SD's scaled_linear betas 0.00085..0.012, clip_sample False).

LCM is stochastic: every step but the last re-noises its denoised sample,
``prev = sqrt(alpha_bar_prev) * denoised + sqrt(1 - alpha_bar_prev) * noise``, where diffusers
draws ``noise = randn_tensor(sample.shape, generator=generator)``. The port draws nothing: the
noise of step ``i`` is the state tensor ``noise.{i}``, which the edge draws from a clone of its
generator (``edge_server.scheduler_bridge.export_state``), exactly the values diffusers' step
``i`` would draw; so a relay continues diffusers' trajectory with the same seed.
``c_skip`` / ``c_out`` are computed in float32 from the integer timestep, as diffusers does
for the tensor timesteps its pipelines pass (a python-int timestep makes diffusers compute
them in float64, within an ulp of these).

SamplerState: ``step_index`` = k, the number of steps already taken; tensors ``noise.{i}`` for
every ``i`` in ``noise_step_indices(k, N)`` = ``range(k, N - 1)`` (none when k >= N - 1), float32,
finite, all the sample's shape; scalars ``num_inference_steps`` (must equal this sampler's N).
``state()`` returns the noise not yet consumed (steps ``step_index`` .. N - 2). ``load_state``
refuses a state whose noise set is not exactly that one with :class:`LCMStateError`, a
``SamplerError`` that is also a ``HandoffError`` (which the other ports raise for bad states);
a step whose noise is missing or has another shape than the sample raises ``SamplerError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.errors import ConfigError, HandoffError, SamplerError
from shared.samplers.base import SamplerState
from shared.samplers.schedule import (
    cfg_bool,
    cfg_choice,
    cfg_float,
    cfg_int,
    cfg_require_false,
    check_num_inference_steps,
    check_result,
    check_state_common,
    check_step_inputs,
    check_timesteps,
    check_turn,
    config_alphas_cumprod,
    resolve_config,
)
from shared.validation import is_integral

# ``LCMScheduler.__init__`` defaults (diffusers 0.39): every key it takes, read or not.
LCM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}

_SIGMA_DATA_SQ = np.float32(0.25)  # diffusers' sigma_data = 0.5, squared


class LCMStateError(SamplerError, HandoffError):
    """An LCM state whose noise tensors are not exactly those its step index needs."""


def noise_name(step: int) -> str:
    """The state tensor holding the noise of step ``step``."""
    return f"noise.{step}"


def noise_step_indices(split: int, num_inference_steps: int) -> range:
    """The steps whose noise a handoff at ``split`` (of N) must carry: ``range(split, N - 1)``.

    Every step but the last draws noise; the steps before ``split`` ran on the edge. Empty when
    ``split >= N - 1``. Raises ``SamplerError`` unless ``1 <= N`` and ``0 <= split <= N``.
    """
    if not is_integral(num_inference_steps) or int(num_inference_steps) < 1:
        raise SamplerError(f"lcm: num_inference_steps={num_inference_steps!r} must be an integer >= 1")
    n = int(num_inference_steps)
    if not is_integral(split) or not 0 <= int(split) <= n:
        raise SamplerError(f"lcm: split={split!r} must be an integer in [0, num_inference_steps={n}]")
    return range(int(split), n - 1)


class LCMSampler:
    """Multistep LCM in numpy; ``step`` matches ``LCMScheduler.step`` given the same noise."""

    name = "lcm"
    last_x0: np.ndarray | None = None  # the clean latent the last step predicted (the live preview's)

    def __init__(self, scheduler_config: Mapping[str, Any] | None = None) -> None:
        cfg = resolve_config(scheduler_config, LCM_DEFAULTS)
        self.num_train_timesteps = cfg_int(cfg, "num_train_timesteps", minimum=1)
        self.original_inference_steps = cfg_int(cfg, "original_inference_steps", minimum=1)
        if self.original_inference_steps > self.num_train_timesteps:
            raise ConfigError(
                f"scheduler config original_inference_steps={self.original_inference_steps}: must be <= "
                f"num_train_timesteps={self.num_train_timesteps} (diffusers refuses it too)"
            )
        self.prediction_type: str = cfg_choice(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"))
        self.clip_sample = cfg_bool(cfg, "clip_sample")
        self.clip_sample_range = cfg_float(cfg, "clip_sample_range")
        cfg_require_false(cfg, "thresholding")
        self.timestep_scaling = cfg_float(cfg, "timestep_scaling")
        set_alpha_to_one = cfg_bool(cfg, "set_alpha_to_one")

        self.alphas_cumprod = config_alphas_cumprod(cfg, self.num_train_timesteps)
        # As in diffusers; LCM's timesteps are all >= 0, so this is never used with the default schedule.
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.config = cfg

        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.arange(0, self.num_train_timesteps)[::-1].astype(np.int64)
        self._set = False
        self.step_index = 0
        self._noise: dict[int, np.ndarray] = {}

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the N timesteps (int64, descending) as ``LCMScheduler.set_timesteps(N)``; rewind to step 0.

        Drops any loaded noise. Raises ``ConfigError`` for N outside [1, num_train_timesteps] or
        N > original_inference_steps.
        """
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        original = self.original_inference_steps
        if n > original:
            raise ConfigError(
                f"num_inference_steps={n} cannot be larger than original_inference_steps={original}: LCM's "
                f"schedule is a subset of its {original}-step distillation schedule (diffusers refuses it too)"
            )
        skip = self.num_train_timesteps // original  # the paper's skipping step k
        origin = (np.arange(1, original + 1, dtype=np.int64) * skip - 1)[::-1].copy()
        indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        timesteps = origin[indices].astype(np.int64)
        check_timesteps(timesteps, n, self.num_train_timesteps, f"original_inference_steps={original}")
        self.timesteps = timesteps
        self.num_inference_steps = n
        self._set = True
        self.step_index = 0
        self._noise = {}

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """LCM does not scale the model input."""
        check_turn(self.timesteps if self._set else None, self.step_index, timestep, self.name)
        return sample

    def _boundary_scalings(self, timestep: int) -> tuple[np.float32, np.float32]:
        """``c_skip``, ``c_out`` of the consistency boundary condition, in float32 as diffusers computes them."""
        scaled = np.float32(timestep) * np.float32(self.timestep_scaling)
        denominator = scaled * scaled + _SIGMA_DATA_SQ
        # torch computes 0.25 / x as reciprocal(x) * 0.25: the same float32, 0.25 being a power of two.
        c_skip = np.float32(_SIGMA_DATA_SQ / denominator)
        c_out = np.float32(scaled / np.sqrt(denominator))
        return c_skip, c_out

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        """One LCM step at ``timestep``; returns the float32 sample for the next timestep.

        Every step but the last consumes the loaded noise ``noise.{step_index}``; the last
        returns the denoised sample itself. Raises ``SamplerError`` when that noise is missing
        or its shape differs from the sample's.
        """
        check_turn(self.timesteps if self._set else None, self.step_index, timestep, self.name)
        model_output, sample = check_step_inputs(model_output, sample)
        assert self.num_inference_steps is not None
        index, n = self.step_index, self.num_inference_steps
        last = index == n - 1
        noise = None
        if not last:
            noise = self._noise.get(index)
            if noise is None:
                raise SamplerError(
                    f"lcm: step {index} of {n} needs the noise tensor {noise_name(index)}, which was not loaded "
                    "(load_state with the edge's exported state; every step but the last draws noise)"
                )
            if noise.shape != sample.shape:
                raise SamplerError(
                    f"lcm: state tensor {noise_name(index)} has shape {noise.shape}, the sample {sample.shape}"
                )

        t = int(self.timesteps[index])
        prev_t = t if last else int(self.timesteps[index + 1])
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        one = np.float32(1.0)
        beta_prod_t = one - alpha_prod_t
        beta_prod_t_prev = one - alpha_prod_t_prev
        c_skip, c_out = self._boundary_scalings(t)

        if self.prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        elif self.prediction_type == "sample":
            pred_original_sample = model_output
        else:  # v_prediction
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output

        if self.clip_sample:
            bound = np.float32(self.clip_sample_range)
            pred_original_sample = np.clip(pred_original_sample, -bound, bound)

        denoised = c_out * pred_original_sample + c_skip * sample
        self.last_x0 = denoised  # the live preview draws it
        if noise is None:
            prev_sample = denoised
        else:
            prev_sample = np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(beta_prod_t_prev) * noise

        prev_sample = check_result(self.name, prev_sample, index)
        self._noise.pop(index, None)
        self.step_index += 1
        return prev_sample

    def state(self) -> SamplerState:
        """Step index, N, and the noise of the steps not yet taken (``noise.{step_index}`` .. ``noise.{N-2}``)."""
        if not self._set or self.num_inference_steps is None:
            raise SamplerError("lcm: call set_timesteps(num_inference_steps) before state()")
        tensors = {noise_name(i): self._noise[i].copy() for i in sorted(self._noise) if i >= self.step_index}
        return SamplerState(
            step_index=self.step_index, tensors=tensors, scalars={"num_inference_steps": self.num_inference_steps}
        )

    def load_state(self, state: SamplerState) -> None:
        """Continue from an exported state (after ``set_timesteps`` with the same N).

        The state must carry exactly ``noise.{i}`` for ``i`` in ``noise_step_indices(step_index, N)``,
        float32, finite, of one shape; otherwise :class:`LCMStateError` names the tensors at fault.
        """
        n = self.num_inference_steps if self._set else None
        try:
            check_state_common(
                state,
                sampler=self.name,
                num_inference_steps=n,
                tensor_names=tuple(noise_name(i) for i in range(n - 1)) if n is not None else (),
                scalar_names=("num_inference_steps",),
            )
        except HandoffError as exc:
            raise LCMStateError(str(exc)) from exc
        assert n is not None
        index = int(state.step_index)
        wanted = [noise_name(i) for i in noise_step_indices(index, n)]
        missing = [name for name in wanted if name not in state.tensors]
        extra = sorted(set(state.tensors) - set(wanted), key=lambda name: int(name.split(".")[1]))
        if missing or extra:
            need = f"{wanted[0]} .. {wanted[-1]}" if wanted else "no noise tensor"
            problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise LCMStateError(
                f"lcm: a state at step_index {index} of {n} carries exactly {need} (the noise of every remaining "
                f"step but the last); this one has {'; '.join(problems)}"
            )
        if wanted:
            first = state.tensors[wanted[0]].shape
            for name in wanted[1:]:
                shape = state.tensors[name].shape
                if shape != first:
                    raise LCMStateError(
                        f"lcm: state tensor {name} has shape {shape}, {wanted[0]} has {first}; "
                        "all noise tensors have the sample's shape"
                    )
        self.step_index = index
        self._noise = {i: state.tensors[noise_name(i)].copy() for i in noise_step_indices(index, n)}
