"""DDIM (eta = 0), a numpy port of diffusers' ``DDIMScheduler``.

Supported config: beta_schedule linear / scaled_linear / squaredcos_cap_v2 or trained_betas,
rescale_betas_zero_snr, prediction_type epsilon / v_prediction / sample, clip_sample (with
clip_sample_range), set_alpha_to_one, timestep_spacing leading / trailing / linspace,
steps_offset. Rejected with ``ConfigError``: thresholding=True. Keys of other classes are
ignored and missing keys take ``DDIMScheduler``'s defaults (note: its default clip_sample is
True and its default spacing "leading").

As in diffusers, the previous timestep is ``t - num_train_timesteps // N`` whatever the
spacing (not the next entry of ``timesteps``); the port keeps that.

SamplerState: no tensors (DDIM keeps no history); scalars ``num_inference_steps`` (must
equal this sampler's N). ``step_index`` is the number of steps already taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.samplers.schedule import (
    TIMESTEP_SPACINGS,
    StepIndexState,
    cfg_bool,
    cfg_choice,
    cfg_float,
    cfg_int,
    cfg_require_false,
    check_num_inference_steps,
    check_result,
    check_step_inputs,
    check_timesteps,
    check_turn,
    config_alphas_cumprod,
    resolve_config,
    spaced_timesteps,
)

# ``DDIMScheduler.__init__`` defaults (diffusers 0.39); the keys this port reads.
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


class DDIMSampler(StepIndexState):
    """Deterministic DDIM in numpy; ``step`` matches ``DDIMScheduler.step(eta=0)``."""

    name = "ddim"
    last_x0: np.ndarray | None = None  # the clean latent the last step predicted (the live preview's)

    def __init__(self, scheduler_config: Mapping[str, Any] | None = None) -> None:
        cfg = resolve_config(scheduler_config, DDIM_DEFAULTS)
        self.num_train_timesteps = cfg_int(cfg, "num_train_timesteps", minimum=1)
        self.prediction_type: str = cfg_choice(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"))
        self.timestep_spacing: str = cfg_choice(cfg, "timestep_spacing", TIMESTEP_SPACINGS)
        self.steps_offset = cfg_int(cfg, "steps_offset", minimum=0)
        self.clip_sample = cfg_bool(cfg, "clip_sample")
        self.clip_sample_range = cfg_float(cfg, "clip_sample_range")
        cfg_require_false(cfg, "thresholding")
        set_alpha_to_one = cfg_bool(cfg, "set_alpha_to_one")

        self.alphas_cumprod = config_alphas_cumprod(cfg, self.num_train_timesteps)
        # With set_alpha_to_one the step into t<0 lands on a clean sample (alpha_bar = 1).
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.config = cfg

        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.arange(0, self.num_train_timesteps)[::-1].astype(np.int64)
        self._set = False
        self.step_index = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the N timesteps (int64, descending) and rewind to step 0."""
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        timesteps = spaced_timesteps(self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset)
        timesteps = np.round(timesteps).astype(np.int64)
        check_timesteps(timesteps, n, self.num_train_timesteps, f"timestep_spacing={self.timestep_spacing!r}")
        self.timesteps = timesteps
        self.num_inference_steps = n
        self._set = True
        self.step_index = 0

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """DDIM does not scale the model input."""
        check_turn(self.timesteps if self._set else None, self.step_index, timestep, self.name)
        return sample

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        """One DDIM step from ``timestep`` to ``timestep - T // N``; returns the float32 sample."""
        check_turn(self.timesteps if self._set else None, self.step_index, timestep, self.name)
        model_output, sample = check_step_inputs(model_output, sample)
        assert self.num_inference_steps is not None
        t = int(self.timesteps[self.step_index])
        prev_t = t - self.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        one = np.float32(1.0)
        beta_prod_t = one - alpha_prod_t

        if self.prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        elif self.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - np.sqrt(alpha_prod_t) * pred_original_sample) / np.sqrt(beta_prod_t)
        else:  # v_prediction
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            pred_epsilon = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        if self.clip_sample:
            bound = np.float32(self.clip_sample_range)
            pred_original_sample = np.clip(pred_original_sample, -bound, bound)

        # eta = 0: no noise, so the direction term is sqrt(1 - alpha_bar_prev) * eps.
        pred_sample_direction = np.sqrt(one - alpha_prod_t_prev) * pred_epsilon
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction

        prev_sample = check_result(self.name, prev_sample, self.step_index)
        self.last_x0 = pred_original_sample  # the live preview draws it
        self.step_index += 1
        return prev_sample
