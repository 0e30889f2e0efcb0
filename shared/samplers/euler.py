"""Euler (deterministic), a numpy port of diffusers' ``EulerDiscreteScheduler``.

Supported config: beta_schedule linear / scaled_linear / squaredcos_cap_v2 or trained_betas,
rescale_betas_zero_snr, prediction_type epsilon / v_prediction / sample, interpolation_type
linear, use_karras_sigmas (with optional sigma_min / sigma_max), timestep_spacing leading /
trailing / linspace, steps_offset, final_sigmas_type zero / sigma_min, timestep_type discrete.
Rejected with ``ConfigError``: interpolation_type log_linear, timestep_type continuous,
use_exponential_sigmas / use_beta_sigmas True. Keys of other classes are ignored and missing
keys take ``EulerDiscreteScheduler``'s defaults (note: its default spacing is "linspace").
``step`` is the s_churn = 0 (deterministic) step every diffusers pipeline uses.

``timesteps`` is float32, not int64: diffusers' Euler timesteps are fractional for linspace
spacing (999 / (N-1) apart) and for Karras sigmas, and the denoiser must be fed exactly these.

SamplerState: no tensors (Euler keeps no history); scalars ``num_inference_steps`` (must equal
this sampler's N). ``step_index`` is the number of steps already taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.samplers.schedule import (
    TIMESTEP_SPACINGS,
    StepIndexState,
    as_f32_array,
    cfg_bool,
    cfg_choice,
    cfg_int,
    cfg_positive_or_none,
    cfg_require_false,
    check_num_inference_steps,
    check_result,
    check_step_inputs,
    check_timesteps,
    check_turn,
    config_alphas_cumprod,
    karras_sigmas,
    resolve_config,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)

# ``EulerDiscreteScheduler.__init__`` defaults (diffusers 0.39); the keys this port reads.
EULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


class EulerSampler(StepIndexState):
    """Euler in numpy; ``scale_model_input``/``step`` match ``EulerDiscreteScheduler``."""

    name = "euler"
    last_x0: np.ndarray | None = None  # the clean latent the last step predicted (the live preview's)

    def __init__(self, scheduler_config: Mapping[str, Any] | None = None) -> None:
        cfg = resolve_config(scheduler_config, EULER_DEFAULTS)
        self.num_train_timesteps = cfg_int(cfg, "num_train_timesteps", minimum=2)
        self.prediction_type: str = cfg_choice(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"))
        self.timestep_spacing: str = cfg_choice(cfg, "timestep_spacing", TIMESTEP_SPACINGS)
        self.steps_offset = cfg_int(cfg, "steps_offset", minimum=0)
        cfg_choice(cfg, "interpolation_type", ("linear",))
        cfg_choice(cfg, "timestep_type", ("discrete",))
        self.final_sigmas_type: str = cfg_choice(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        self.use_karras_sigmas = cfg_bool(cfg, "use_karras_sigmas", none_is_false=True)
        cfg_require_false(cfg, "use_exponential_sigmas", none_is_false=True)
        cfg_require_false(cfg, "use_beta_sigmas", none_is_false=True)
        self.sigma_min = cfg_positive_or_none(cfg, "sigma_min")
        self.sigma_max = cfg_positive_or_none(cfg, "sigma_max")

        rescale = cfg_bool(cfg, "rescale_betas_zero_snr")
        self.alphas_cumprod = config_alphas_cumprod(cfg, self.num_train_timesteps)
        if rescale:
            # Zero terminal SNR would give sigma = inf; diffusers nudges it to 2**-24.
            self.alphas_cumprod[-1] = np.float32(2.0**-24)
        self.config = cfg

        train = train_sigmas(self.alphas_cumprod)
        self.sigmas: np.ndarray = np.concatenate([train[::-1], np.zeros(1, np.float32)])
        self.timesteps: np.ndarray = np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps)[
            ::-1
        ].astype(np.float32)
        self.init_noise_sigma = self._init_noise_sigma()
        self.num_inference_steps: int | None = None
        self._set = False
        self.step_index = 0

    def _init_noise_sigma(self) -> float:
        max_sigma = self.sigmas.max()
        if self.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float(np.sqrt(max_sigma * max_sigma + np.float32(1.0)))

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the N timesteps (float32, descending) and N+1 sigmas; rewind to step 0."""
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        spaced = spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        check_timesteps(spaced, n, self.num_train_timesteps, f"timestep_spacing={self.timestep_spacing!r}")
        timesteps: np.ndarray = spaced.astype(np.float32)

        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas, n, self.sigma_min, self.sigma_max)
            timesteps = sigma_to_t(sigmas, log_sigmas)

        if self.final_sigmas_type == "sigma_min":
            sigma_last = train[0]
        else:
            sigma_last = np.float32(0.0)
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self.num_inference_steps = n
        self.init_noise_sigma = self._init_noise_sigma()
        self._set = True
        self.step_index = 0

    def _check_turn(self, timestep: float) -> None:
        check_turn(self.timesteps if self._set else None, self.step_index, timestep, self.name)

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """Divide by ``sqrt(sigma**2 + 1)`` so the denoiser sees a unit-variance input."""
        self._check_turn(timestep)
        sample = as_f32_array("sample", sample)
        sigma = self.sigmas[self.step_index]
        scaled: np.ndarray = sample / np.sqrt(sigma * sigma + np.float32(1.0))
        return scaled

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        """One Euler step from ``sigmas[i]`` to ``sigmas[i+1]``; returns the float32 sample."""
        self._check_turn(timestep)
        model_output, sample = check_step_inputs(model_output, sample)
        sigma = self.sigmas[self.step_index]
        sigma_hat = sigma  # s_churn = 0: no noise is added, so sigma_hat == sigma

        if self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        elif self.prediction_type == "v_prediction":
            var = sigma * sigma + np.float32(1.0)
            pred_original_sample = model_output * (-sigma / np.sqrt(var)) + sample / var
        else:  # sample
            pred_original_sample = model_output

        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = sample + derivative * dt

        prev_sample = check_result(self.name, prev_sample, self.step_index)
        self.last_x0 = pred_original_sample  # the live preview draws it
        self.step_index += 1
        return prev_sample
