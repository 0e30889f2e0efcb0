"""DPM-Solver++(2M), a numpy port of diffusers' ``DPMSolverMultistepScheduler``.

Fixed by the wire name: algorithm_type "dpmsolver++", solver_order 2. Supported config:
beta_schedule linear / scaled_linear / squaredcos_cap_v2 or trained_betas,
rescale_betas_zero_snr, prediction_type epsilon / v_prediction / sample, solver_type midpoint /
heun (diffusers maps the legacy "logrho", "bh1", "bh2" to midpoint, and so does this port),
lower_order_final, euler_at_final, use_karras_sigmas, final_sigmas_type zero / sigma_min,
lambda_min_clipped, timestep_spacing leading / trailing / linspace, steps_offset.
Rejected with ``ConfigError``: any other algorithm_type or solver_order, thresholding,
variance_type learned / learned_range, prediction_type flow_prediction, use_exponential_sigmas,
use_beta_sigmas, use_lu_lambdas, use_flow_sigmas, use_dynamic_shifting. Keys of other classes
are ignored and missing keys take ``DPMSolverMultistepScheduler``'s defaults (spacing
"linspace"). One quirk kept: ``from_config`` also registers keys the class does not take, and
its Karras conversion reads ``sigma_min`` / ``sigma_max`` from the config when present (e.g. in
an Euler config), so this port does too.

Scalar ``sqrt``/``log``/``exp`` are correctly rounded here and may be an ulp off in torch
(see ``schedule``); the subtraction of two lambdas amplifies that to ~1e-6 relative in h.

SamplerState: tensors ``model_outputs.0`` (the data prediction x0 of the step before last;
present only when ``lower_order_nums`` == 2) and ``model_outputs.1`` (x0 of the last step;
present only when ``lower_order_nums`` >= 1); scalars ``lower_order_nums`` (0, 1 or 2: how
many history entries are filled) and ``num_inference_steps`` (must equal this sampler's N).
``step_index`` is the number of steps already taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.errors import ConfigError, HandoffError, SamplerError
from shared.samplers.base import SamplerState
from shared.samplers.schedule import (
    TIMESTEP_SPACINGS,
    cfg_bool,
    cfg_choice,
    cfg_float,
    cfg_int,
    cfg_positive_or_none,
    cfg_require_false,
    check_num_inference_steps,
    check_result,
    check_state_common,
    check_step_inputs,
    check_timesteps,
    check_turn,
    config_alphas_cumprod,
    exp_f32,
    karras_sigmas,
    log_f32,
    resolve_config,
    sigma_to_t,
    train_sigmas,
)

# ``DPMSolverMultistepScheduler.__init__`` defaults (diffusers 0.39); the keys this port reads.
DPMPP_2M_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

# Legacy solver types (DEIS / UniPC names) that diffusers' __init__ rewrites to "midpoint".
_MIDPOINT_ALIASES = ("logrho", "bh1", "bh2")
# Number of steps below which lower_order_final also lowers the last step's order.
_LOWER_ORDER_FINAL_BELOW = 15


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VP coefficients of a VE sigma: alpha = 1/sqrt(sigma^2+1), sigma_vp = sigma*alpha (float32)."""
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
    return alpha, sigma * alpha


def _lambda(alpha: np.float32, sigma: np.float32) -> np.float32:
    """Half log-SNR, ``log(alpha) - log(sigma)``; +inf at sigma = 0 as in torch."""
    return log_f32(alpha) - log_f32(sigma)


class DPMSolverPP2MSampler:
    """DPM-Solver++(2M) in numpy; ``step`` matches ``DPMSolverMultistepScheduler.step``."""

    name = "dpmpp_2m"
    last_x0: np.ndarray | None = None  # the clean latent the last step predicted (the live preview's)

    def __init__(self, scheduler_config: Mapping[str, Any] | None = None) -> None:
        cfg = resolve_config(scheduler_config, DPMPP_2M_DEFAULTS)
        self.num_train_timesteps = cfg_int(cfg, "num_train_timesteps", minimum=2)
        cfg_choice(cfg, "algorithm_type", ("dpmsolver++",), why="the dpmpp_2m sampler is DPM-Solver++")
        if cfg_int(cfg, "solver_order") != 2:
            raise ConfigError(
                f"scheduler config solver_order={cfg['solver_order']!r} is not supported "
                "(the dpmpp_2m sampler is second order); supported: 2"
            )
        self.prediction_type: str = cfg_choice(cfg, "prediction_type", ("epsilon", "v_prediction", "sample"))
        solver_type = cfg_choice(cfg, "solver_type", ("midpoint", "heun", *_MIDPOINT_ALIASES))
        self.solver_type: str = "midpoint" if solver_type in _MIDPOINT_ALIASES else solver_type
        cfg_require_false(cfg, "thresholding")
        cfg_choice(cfg, "variance_type", (None,))
        for flag in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
            cfg_require_false(cfg, flag)
        cfg_require_false(cfg, "use_dynamic_shifting")
        self.lower_order_final = cfg_bool(cfg, "lower_order_final")
        self.euler_at_final = cfg_bool(cfg, "euler_at_final")
        self.use_karras_sigmas = cfg_bool(cfg, "use_karras_sigmas")
        self.final_sigmas_type: str = cfg_choice(cfg, "final_sigmas_type", ("zero", "sigma_min"))
        self.lambda_min_clipped = cfg_float(cfg, "lambda_min_clipped", allow_inf=True)
        self.timestep_spacing: str = cfg_choice(cfg, "timestep_spacing", TIMESTEP_SPACINGS)
        self.steps_offset = cfg_int(cfg, "steps_offset", minimum=0)
        self.beta_schedule = cfg["beta_schedule"]

        # Not __init__ parameters of this class: see the module docstring.
        raw = scheduler_config or {}
        self.sigma_min = cfg_positive_or_none(raw, "sigma_min")
        self.sigma_max = cfg_positive_or_none(raw, "sigma_max")

        rescale = cfg_bool(cfg, "rescale_betas_zero_snr")
        self.alphas_cumprod = config_alphas_cumprod(cfg, self.num_train_timesteps, self.beta_schedule)
        if rescale:
            # Zero terminal SNR would give sigma = inf; diffusers nudges it to 2**-24.
            self.alphas_cumprod[-1] = np.float32(2.0**-24)
        self.config = cfg

        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: np.ndarray = np.linspace(0, self.num_train_timesteps - 1, self.num_train_timesteps)[
            ::-1
        ].astype(np.int64)
        self.sigmas: np.ndarray = train_sigmas(self.alphas_cumprod)
        self._set = False
        self._reset()

    def _reset(self) -> None:
        self.step_index = 0
        self.model_outputs: list[np.ndarray | None] = [None, None]  # [older, newer]
        self.lower_order_nums = 0

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """DPM-Solver's own spacing: N+1 points over the (lambda-clipped) range, last dropped."""
        t = self.num_train_timesteps
        one = np.float32(1.0)
        lambda_t = np.log(np.sqrt(self.alphas_cumprod)) - np.log(np.sqrt(one - self.alphas_cumprod))
        clipped_idx = int(np.searchsorted(lambda_t[::-1], self.lambda_min_clipped))
        last = t - clipped_idx
        if last < 1:
            raise ConfigError(f"scheduler config lambda_min_clipped={self.lambda_min_clipped!r} clips every timestep")
        if self.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + self.steps_offset
        # trailing
        return np.arange(last, 0, -t / n).round().astype(np.int64) - 1

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the N timesteps (int64, descending) and N+1 sigmas; clear the history."""
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        timesteps = self._spaced_timesteps(n)
        check_timesteps(timesteps, n, self.num_train_timesteps, f"timestep_spacing={self.timestep_spacing!r}")

        train = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(train)
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(np.flip(train).copy(), n, self.sigma_min, self.sigma_max)
            t_float = sigma_to_t(sigmas, log_sigmas)
            if self.beta_schedule != "squaredcos_cap_v2":
                t_float = t_float.round()
            # diffusers casts with torch .to(int64), which truncates (matters for unrounded cosine).
            timesteps = t_float.astype(np.int64)
            check_timesteps(timesteps, n, self.num_train_timesteps, "use_karras_sigmas=True")
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train)), train)

        sigma_last = train[0] if self.final_sigmas_type == "sigma_min" else np.float32(0.0)
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.timesteps = timesteps
        self.num_inference_steps = n
        self._set = True
        self._reset()

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        """DPM-Solver does not scale the model input."""
        check_turn(self.timesteps if self._set else None, self.step_index, timestep, self.name)
        return sample

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x0 predicted from the model output at the current sigma (DPM-Solver++ works on x0)."""
        if self.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[self.step_index])
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def _first_order(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """DPM-Solver++ first order (= DDIM) from sigmas[i] to sigmas[i+1]."""
        i = self.step_index
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s, sigma_s = _alpha_sigma(self.sigmas[i])
        h = _lambda(alpha_t, sigma_t) - _lambda(alpha_s, sigma_s)
        return (sigma_t / sigma_s) * sample - (alpha_t * (exp_f32(-h) - np.float32(1.0))) * x0

    def _second_order(self, m0: np.ndarray, m1: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Multistep second order from the last two data predictions (m0 newest)."""
        i = self.step_index
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[i - 1])
        lambda_t = _lambda(alpha_t, sigma_t)
        lambda_s0 = _lambda(alpha_s0, sigma_s0)
        lambda_s1 = _lambda(alpha_s1, sigma_s1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        # h is 0 on a last step from sigma_min to sigma_min (Karras + final sigma_min); torch
        # then computes r0 = inf and D1 = 0 without a warning, and so does this.
        with np.errstate(divide="ignore", invalid="ignore"):
            r0 = h_0 / h
            d0, d1 = m0, (np.float32(1.0) / r0) * (m0 - m1)
            expm1 = exp_f32(-h) - np.float32(1.0)
            heun_coeff = alpha_t * (expm1 / h + np.float32(1.0))
        x_t = (sigma_t / sigma_s0) * sample - (alpha_t * expm1) * d0
        out: np.ndarray
        if self.solver_type == "midpoint":
            out = x_t - (np.float32(0.5) * (alpha_t * expm1)) * d1
        else:  # heun
            out = x_t + heun_coeff * d1
        return out

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        """One DPM-Solver++(2M) step; returns the float32 sample at the next timestep."""
        check_turn(self.timesteps if self._set else None, self.step_index, timestep, self.name)
        model_output, sample = check_step_inputs(model_output, sample)
        previous = self.model_outputs[1]
        if previous is not None and previous.shape != sample.shape:
            raise HandoffError(
                f"dpmpp_2m: history model_outputs.1 has shape {previous.shape}, the sample {sample.shape}"
            )
        n = len(self.timesteps)
        last_step = self.step_index == n - 1
        # The last step drops to first order when asked to, or when it ends at sigma 0.
        lower_order_final = last_step and (
            self.euler_at_final
            or (self.lower_order_final and n < _LOWER_ORDER_FINAL_BELOW)
            or self.final_sigmas_type == "zero"
        )

        x0 = self._data_prediction(model_output, sample)
        self.last_x0 = x0  # the live preview draws it
        self.model_outputs = [self.model_outputs[1], x0]
        if self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(x0, sample)
        else:
            older = self.model_outputs[0]
            assert older is not None  # lower_order_nums >= 1 means a previous x0 exists
            prev_sample = self._second_order(x0, older, sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        prev_sample = check_result(self.name, prev_sample, self.step_index)
        self.step_index += 1
        return prev_sample

    def state(self) -> SamplerState:
        """Step index, N, and the data-prediction history the next second-order step needs."""
        if not self._set:
            raise SamplerError("dpmpp_2m: call set_timesteps(num_inference_steps) before state()")
        assert self.num_inference_steps is not None
        tensors = {
            f"model_outputs.{j}": value.copy() for j, value in enumerate(self.model_outputs) if value is not None
        }
        scalars: dict[str, int | float] = {
            "lower_order_nums": self.lower_order_nums,
            "num_inference_steps": self.num_inference_steps,
        }
        return SamplerState(step_index=self.step_index, tensors=tensors, scalars=scalars)

    def load_state(self, state: SamplerState) -> None:
        """Continue from an exported state (after ``set_timesteps`` with the same N)."""
        check_state_common(
            state,
            sampler=self.name,
            num_inference_steps=self.num_inference_steps if self._set else None,
            tensor_names=("model_outputs.0", "model_outputs.1"),
            scalar_names=("lower_order_nums", "num_inference_steps"),
        )
        lon = state.scalars.get("lower_order_nums")
        limit = min(int(state.step_index), 2)
        if lon is None or isinstance(lon, float) or not 0 <= int(lon) <= limit:
            raise HandoffError(
                f"dpmpp_2m: state lower_order_nums={lon!r} must be an integer in [0, {limit}] "
                f"at step_index {state.step_index}"
            )
        lon = int(lon)
        older, newer = state.tensors.get("model_outputs.0"), state.tensors.get("model_outputs.1")
        if (newer is not None) != (lon >= 1) or (older is not None) != (lon == 2):
            raise HandoffError(
                f"dpmpp_2m: with lower_order_nums={lon} the state needs "
                f"{['model_outputs.0', 'model_outputs.1'][2 - lon:] if lon else 'no history'}; "
                f"it has {sorted(state.tensors)}"
            )
        if older is not None and newer is not None and older.shape != newer.shape:
            raise HandoffError(f"dpmpp_2m: model_outputs.0 {older.shape} and model_outputs.1 {newer.shape} differ")
        self.step_index = int(state.step_index)
        self.model_outputs = [
            None if older is None else older.copy(),
            None if newer is None else newer.copy(),
        ]
        self.lower_order_nums = lon
