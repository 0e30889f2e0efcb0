"""Numpy pieces the sampler ports share: config reading, noise schedules, Karras sigmas.

Everything here mirrors what diffusers computes, in the same dtypes and order, so the ports
agree with diffusers to float32 round-off:

- betas/alphas are float32 (diffusers builds them as float32 torch tensors; ``torch.linspace``
  and ``torch.cumprod`` are emulated bit for bit as the CPU kernels compute them);
- timestep spacing, interpolation and Karras sigmas are float64 numpy (diffusers does these in
  numpy), cast to float32/int64 where diffusers casts;
- float32 ``sqrt``/``log``/``exp`` are correctly rounded here, while torch's (MKL/SLEEF on
  CPU, CUDA on GPU) may be one ulp off: the one source of differences, ~1e-7 relative.

The step arithmetic itself lives in each sampler module (one self-contained file per scheduler,
as in diffusers). No torch here: the device has none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from shared.errors import ConfigError, HandoffError, SamplerError
from shared.samplers.base import SamplerState
from shared.validation import is_integral, is_real

BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


# --- config reading --------------------------------------------------------------------


def resolve_config(config: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``config`` over a diffusers class's ``__init__`` defaults, as ``from_config`` does.

    Keys the class does not take (another scheduler's keys, ``_class_name``,
    ``_diffusers_version``) are ignored; missing keys take the class's defaults. So do the keys
    listed in ``_use_default_values``: a loaded scheduler's config holds every key of *its* class,
    the ones its file omitted filled with that class's defaults and listed there, and diffusers
    drops them when another class is built from it (a hub SD1.5 ``PNDMScheduler`` config stores
    ``timestep_spacing="leading"`` that DPM-Solver++ replaces by its own ``"linspace"``).
    """
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"scheduler_config must be a mapping, got {type(config).__name__}")
    used_defaults = config.get("_use_default_values", [])
    if not isinstance(used_defaults, (list, tuple)) or not all(isinstance(k, str) for k in used_defaults):
        raise ConfigError(f"scheduler config _use_default_values={used_defaults!r}: expected a list of key names")
    given = {key: value for key, value in config.items() if key not in used_defaults}
    return {key: given.get(key, default) for key, default in defaults.items()}


def _show(key: str, value: Any) -> str:
    return f"{key}={value!r}"


def cfg_int(cfg: Mapping[str, Any], key: str, *, minimum: int | None = None) -> int:
    """An integer config value (bools are not integers here)."""
    value = cfg[key]
    if not is_integral(value):
        raise ConfigError(f"scheduler config {_show(key, value)}: expected an integer")
    if minimum is not None and value < minimum:
        raise ConfigError(f"scheduler config {_show(key, value)}: must be >= {minimum}")
    return int(value)


def cfg_float(cfg: Mapping[str, Any], key: str, *, allow_inf: bool = False) -> float:
    """A real config value; NaN is always rejected, infinities only with ``allow_inf``."""
    value = cfg[key]
    if not is_real(value):
        raise ConfigError(f"scheduler config {_show(key, value)}: expected a number")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ConfigError(f"scheduler config {_show(key, value)}: must be finite")
    return value


def cfg_positive_or_none(cfg: Mapping[str, Any], key: str) -> float | None:
    """An optional positive real (e.g. a Karras ``sigma_min``); None means "use the schedule's"."""
    if cfg.get(key) is None:
        return None
    value = cfg_float(cfg, key)
    if value <= 0:
        raise ConfigError(f"scheduler config {_show(key, value)}: must be > 0")
    return value


def cfg_bool(cfg: Mapping[str, Any], key: str, *, none_is_false: bool = False) -> bool:
    """A boolean config value; ``None`` counts as False only where diffusers types it ``bool | None``."""
    value = cfg[key]
    if value is None and none_is_false:
        return False
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"scheduler config {_show(key, value)}: expected true or false")
    return bool(value)


def cfg_choice(cfg: Mapping[str, Any], key: str, choices: tuple[Any, ...], *, why: str = "") -> Any:
    """A config value that must be one of ``choices`` (the values this port supports)."""
    value = cfg[key]
    if not any(value is c or (type(value) is type(c) and value == c) for c in choices):
        supported = ", ".join(repr(c) for c in choices)
        extra = f" ({why})" if why else ""
        raise ConfigError(f"scheduler config {_show(key, value)} is not supported{extra}; supported: {supported}")
    return value


def cfg_require_false(cfg: Mapping[str, Any], key: str, *, none_is_false: bool = False) -> None:
    """A feature flag this port does not implement: it must be off."""
    if cfg_bool(cfg, key, none_is_false=none_is_false):
        raise ConfigError(f"scheduler config {_show(key, True)} is not supported by the numpy port")


# --- float32 emulation of the torch ops diffusers uses ----------------------------------


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as the CPU kernel computes it.

    The kernel fills the first half as ``start + step*i`` and the second half as
    ``end - step*(steps-1-i)`` in float32, and compilers contract each into one fused
    multiply-add; float64 arithmetic rounded once to float32 reproduces that bit for bit.
    """
    if steps < 1:
        raise ConfigError(f"linspace needs at least one point, got {steps}")
    s, e = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    step = np.float64(np.float32((e - s) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(s) + step * i
    high = np.float64(e) - step * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The ``squaredcos_cap_v2`` (cosine) schedule: python floats, then float32, as diffusers."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any = None,
) -> np.ndarray:
    """The float32 betas diffusers' schedulers build in ``__init__``."""
    if trained_betas is not None:
        try:
            betas = np.asarray(trained_betas, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"scheduler config trained_betas is not a list of numbers: {exc}") from None
        if betas.shape != (num_train_timesteps,):
            raise ConfigError(
                f"scheduler config trained_betas has shape {betas.shape}, expected ({num_train_timesteps},) "
                "to match num_train_timesteps"
            )
        betas = betas.astype(np.float32)
    elif beta_schedule == "linear":
        betas = torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        # Specific to the latent diffusion model: linear in sqrt(beta).
        root = torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        betas = root * root
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise ConfigError(
            f"scheduler config beta_schedule={beta_schedule!r} is not supported; supported: "
            + ", ".join(repr(b) for b in BETA_SCHEDULES)
        )
    if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
        raise ConfigError(
            f"scheduler config gives betas outside (0, 1) (beta_schedule={beta_schedule!r}, "
            f"beta_start={beta_start!r}, beta_end={beta_end!r}, trained_betas given: {trained_betas is not None})"
        )
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 betas to zero terminal SNR (arXiv 2305.08891, Algorithm 1), in float32."""
    alphas_cumprod = cumprod_f32(np.float32(1.0) - betas)
    root = np.sqrt(alphas_cumprod)
    root_0, root_t = root[0], root[-1]
    root = root - root_t
    root = root * (root_0 / (root_0 - root_t))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """``torch.cumprod`` of a float32 CPU tensor: it accumulates in float64, rounds each output."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """float32 cumulative product of ``1 - betas``."""
    return cumprod_f32(np.float32(1.0) - betas)


def config_alphas_cumprod(cfg: Mapping[str, Any], num_train_timesteps: int, beta_schedule: str | None = None
                          ) -> np.ndarray:
    """float32 ``alphas_cumprod`` of a resolved config: its betas, zero-terminal-SNR rescaled if it says so."""
    betas = make_betas(
        num_train_timesteps,
        cfg_float(cfg, "beta_start"),
        cfg_float(cfg, "beta_end"),
        cfg["beta_schedule"] if beta_schedule is None else beta_schedule,
        cfg["trained_betas"],
    )
    if cfg_bool(cfg, "rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return alphas_cumprod_from_betas(betas)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 ``((1 - a) / a) ** 0.5`` over the training timesteps (ascending in t)."""
    one = np.float32(1.0)
    sigmas: np.ndarray = np.sqrt((one - alphas_cumprod) / alphas_cumprod).astype(np.float32)
    return sigmas


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int) -> np.ndarray:
    """DDIM/Euler-style timestep spacing, descending, float64; ``linspace`` is left unrounded.

    DDIM rounds the result to int64, Euler casts it to float32 (its linspace timesteps are
    fractional). ``leading`` and ``trailing`` values are whole numbers either way.
    """
    t, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, t - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (t // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(t, 0, -t / n)) - 1
    raise ConfigError(
        f"scheduler config timestep_spacing={spacing!r} is not supported; supported: "
        + ", ".join(repr(s) for s in TIMESTEP_SPACINGS)
    )


def check_timesteps(timesteps: np.ndarray, num_inference_steps: int, num_train_timesteps: int, how: str) -> None:
    """Reject the few (N, spacing) pairs where diffusers' own schedule goes wrong.

    E.g. ``trailing`` with N=61 of 1000 yields 62 timesteps ending at -1 (float round-off in
    ``np.arange``), ``leading`` with N=1000 and steps_offset=1 reaches t=1000, and when the
    first timestep repeats (DPM-Solver's Karras timesteps on a cosine schedule) diffusers
    starts at index 1, skipping a step. Diffusers would run these silently. ``how`` names the
    setting that produced the schedule, for the message.
    """
    where = f"{how} with num_inference_steps={num_inference_steps}"
    if len(timesteps) != num_inference_steps:
        raise ConfigError(f"{where} gives {len(timesteps)} timesteps in diffusers, not {num_inference_steps}")
    if np.any(timesteps < 0) or np.any(timesteps > num_train_timesteps - 1):
        raise ConfigError(f"{where} gives timesteps outside [0, {num_train_timesteps - 1}]: {timesteps.tolist()}")
    if num_inference_steps > 1 and np.count_nonzero(timesteps == timesteps[0]) > 1:
        raise ConfigError(f"{where} repeats the first timestep {timesteps[0]}; diffusers would skip a step")


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int) -> int:
    """N must be an integer in [1, num_train_timesteps]."""
    if not is_integral(num_inference_steps):
        raise ConfigError(f"num_inference_steps={num_inference_steps!r}: expected an integer")
    num_inference_steps = int(num_inference_steps)
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ConfigError(
            f"num_inference_steps={num_inference_steps} must be in [1, num_train_timesteps={num_train_timesteps}]"
        )
    return int(num_inference_steps)


# --- sigmas ------------------------------------------------------------------------------


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by linear interpolation in log-sigma (float64).

    Done one sigma at a time with numpy scalars, exactly as diffusers' ``_sigma_to_t`` loop,
    so the float32/float64 mix (``low - high`` is float32) and the scalar ``np.log`` match.
    """
    out = []
    last = log_sigmas.shape[0] - 2
    for sigma in sigmas:
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=last)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        out.append(((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma)))
    return np.array(out)


def karras_sigmas(
    in_sigmas: np.ndarray, num_inference_steps: int, sigma_min: float | None, sigma_max: float | None
) -> np.ndarray:
    """Karras et al. (2022) rho=7 sigmas from ``sigma_max`` down to ``sigma_min``, float64.

    ``in_sigmas`` is descending; its ends are the defaults for the range, as in diffusers.
    """
    lo = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    hi = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = lo ** (1 / rho)
    max_inv_rho = hi ** (1 / rho)
    sigmas: np.ndarray = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return sigmas


def log_f32(x: np.float32) -> np.float32:
    """float32 natural log of a scalar (``-inf`` at 0, like ``torch.log``), correctly rounded.

    torch computes this with SLEEF (<= 1 ulp), so results may differ from diffusers by an ulp.
    """
    value = float(x)
    return np.float32(-np.inf) if value == 0.0 else np.float32(math.log(value))


def exp_f32(x: np.float32) -> np.float32:
    """float32 exp of a scalar, correctly rounded (torch: SLEEF, <= 1 ulp)."""
    return np.float32(math.exp(float(x)))


# --- checking inputs and states ----------------------------------------------------------


def as_f32_array(name: str, value: Any) -> np.ndarray:
    """A finite float32 array from a floating numpy array (float16/64 are converted)."""
    if not isinstance(value, np.ndarray):
        raise SamplerError(f"{name} must be a numpy array, got {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.floating):
        raise SamplerError(f"{name} must be a floating-point array, got dtype {value.dtype}")
    if value.ndim == 0:
        raise SamplerError(f"{name} must not be a 0-d array")
    if not np.all(np.isfinite(value)):
        raise SamplerError(f"{name} contains NaN or infinity")
    return value.astype(np.float32, copy=False)


def check_step_inputs(model_output: Any, sample: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ``step()`` call's arrays: floating, finite, same shape; returns float32 views."""
    model_output = as_f32_array("model_output", model_output)
    sample = as_f32_array("sample", sample)
    if model_output.shape != sample.shape:
        raise SamplerError(f"model_output shape {model_output.shape} differs from sample shape {sample.shape}")
    return model_output, sample


def check_result(sampler: str, prev_sample: np.ndarray, step_index: int) -> np.ndarray:
    """A step's output must be finite (diffusers would hand NaN on to the decoder silently)."""
    if not np.all(np.isfinite(prev_sample)):
        raise SamplerError(f"{sampler}: step {step_index} produced NaN or infinity")
    return prev_sample.astype(np.float32, copy=False)


def check_turn(timesteps: np.ndarray | None, step_index: int, timestep: Any, sampler: str) -> None:
    """The timestep passed to ``step``/``scale_model_input`` must be ``timesteps[step_index]``."""
    if timesteps is None:
        raise SamplerError(f"{sampler}: call set_timesteps(num_inference_steps) first")
    if step_index >= len(timesteps):
        raise SamplerError(f"{sampler}: all {len(timesteps)} steps are done; cannot step past the end")
    if isinstance(timestep, np.ndarray) and timestep.size == 1:
        timestep = timestep.reshape(()).item()
    if not is_real(timestep):
        raise SamplerError(f"{sampler}: timestep must be a number, got {type(timestep).__name__}")
    expected = timesteps[step_index]
    if float(timestep) != float(expected):
        raise SamplerError(
            f"{sampler}: got timestep {timestep!r} but step {step_index} of {len(timesteps)} is at {expected!r}"
        )


def check_state_common(
    state: Any,
    *,
    sampler: str,
    num_inference_steps: int | None,
    tensor_names: tuple[str, ...],
    scalar_names: tuple[str, ...],
) -> None:
    """Shared ``load_state`` checks: set_timesteps done, step index and N, only known names, finite."""
    if num_inference_steps is None:
        raise SamplerError(f"{sampler}: call set_timesteps(num_inference_steps) before load_state")
    if not isinstance(state, SamplerState):
        raise HandoffError(f"{sampler}: expected a SamplerState, got {type(state).__name__}")
    index = state.step_index
    if not is_integral(index) or not 0 <= index <= num_inference_steps:
        raise HandoffError(f"{sampler}: state step_index={index!r} is not in [0, {num_inference_steps}]")
    unknown_t = sorted(set(state.tensors) - set(tensor_names))
    unknown_s = sorted(set(state.scalars) - set(scalar_names))
    if unknown_t or unknown_s:
        raise HandoffError(
            f"{sampler}: state has unknown entries (tensors {unknown_t}, scalars {unknown_s}); "
            f"expected tensors from {list(tensor_names)}, scalars from {list(scalar_names)}"
        )
    for name, scalar in state.scalars.items():
        if not is_real(scalar) or not math.isfinite(scalar):
            raise HandoffError(f"{sampler}: state scalar {name}={scalar!r} is not a finite number")
    for name, value in state.tensors.items():
        if not isinstance(value, np.ndarray) or value.dtype != np.float32:
            kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise HandoffError(f"{sampler}: state tensor {name} must be a float32 array, got {kind}")
        if value.ndim == 0 or not np.all(np.isfinite(value)):
            raise HandoffError(f"{sampler}: state tensor {name} is 0-d or has NaN/infinity")
    steps = state.scalars.get("num_inference_steps")
    if steps is None or isinstance(steps, float) or int(steps) != num_inference_steps:
        raise HandoffError(
            f"{sampler}: state is for num_inference_steps={steps!r}, this sampler was set to {num_inference_steps}"
        )


class StepIndexState:
    """``state`` / ``load_state`` for a sampler whose only state is the step index (DDIM, Euler).

    Mixed into the sampler class, which sets ``name``, ``_set``, ``step_index`` and ``num_inference_steps``.
    """

    name: str
    _set: bool
    step_index: int
    num_inference_steps: int | None

    def state(self) -> SamplerState:
        """The step index (the sampler has no other state) and N."""
        if not self._set or self.num_inference_steps is None:
            raise SamplerError(f"{self.name}: call set_timesteps(num_inference_steps) before state()")
        return SamplerState(step_index=self.step_index, scalars={"num_inference_steps": self.num_inference_steps})

    def load_state(self, state: SamplerState) -> None:
        """Continue from an exported state (after ``set_timesteps`` with the same N)."""
        check_state_common(
            state,
            sampler=self.name,
            num_inference_steps=self.num_inference_steps if self._set else None,
            tensor_names=(),
            scalar_names=("num_inference_steps",),
        )
        self.step_index = int(state.step_index)
