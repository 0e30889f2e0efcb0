"""The bridge: diffusers runs k steps, export_state, numpy finishes N-k == diffusers running all N.

Error measure as in tests/shared/test_samplers.py: ``max|relay - diffusers|`` relative to
``max(1, largest sample on the reference trajectory)``, bound 1e-5. Measured over all cases:
3.3e-7 (DDIM), 3.9e-8 (Euler), 4.2e-7 (DPM-Solver++).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

from edge_server.scheduler_bridge import StepCountingDDIMScheduler, diffusers_scheduler, export_state
from shared.errors import ConfigError, HandoffError
from shared.samplers import SAMPLER_NAMES as _ALL_SAMPLERS
from shared.samplers import SamplerError, SamplerState, make_sampler

# The deterministic ports; LCM draws noise every step and has its own file (tests/shared/test_lcm_sampler.py).
SAMPLER_NAMES = tuple(n for n in _ALL_SAMPLERS if n != "lcm")

TOL = 1e-5
SHAPE = (2, 4, 8, 8)
N = 10

SD15: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "leading",
}
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": SD15,
    "karras": dict(SD15, use_karras_sigmas=True),
    "zero_snr_vpred": dict(SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    # N >= 15 and a non-zero final sigma: DPM-Solver++ keeps second order on the last step.
    "sigma_min_final": dict(SD15, final_sigmas_type="sigma_min"),
}
CASES = [
    (name, cfg_id, n, k)
    for name in SAMPLER_NAMES
    for cfg_id, n in (("sd15", N), ("karras", N), ("zero_snr_vpred", N), ("sigma_min_final", 16))
    if not (name == "ddim" and cfg_id in ("karras", "sigma_min_final"))
    for k in sorted({0, 1, 2, n - 1, n})
]


def fake_model(x_in: np.ndarray, i: int) -> np.ndarray:
    """Deterministic stand-in denoiser (numpy on both sides, so both see the same function)."""
    noise = np.random.default_rng(1000 + i).standard_normal(x_in.shape).astype(np.float32)
    return (np.float32(0.8) * np.tanh(x_in) + np.float32(0.6) * noise).astype(np.float32)


def diffusers_steps(scheduler: Any, x: np.ndarray, start: int, stop: int, path: list[np.ndarray]) -> np.ndarray:
    """Run diffusers steps start..stop-1 from x (float32 numpy), appending each sample to path."""
    for i in range(start, stop):
        t = scheduler.timesteps[i]
        x_t = torch.from_numpy(x)
        model_output = fake_model(scheduler.scale_model_input(x_t, t).numpy(), i)
        x = scheduler.step(torch.from_numpy(model_output), t, x_t).prev_sample.numpy()
        path.append(x)
    return x


def initial_latent(scheduler: Any) -> np.ndarray:
    x = np.random.default_rng(11).standard_normal(SHAPE).astype(np.float32)
    return x * np.float32(float(scheduler.init_noise_sigma))


@pytest.mark.parametrize("name,cfg_id,n,k", CASES)
def test_relay_continues_the_diffusers_trajectory(name: str, cfg_id: str, n: int, k: int) -> None:
    config = CONFIGS[cfg_id]
    reference = diffusers_scheduler(name, config)
    reference.set_timesteps(n)
    ref_path: list[np.ndarray] = []
    x_start = initial_latent(reference)
    ref_path.append(x_start)
    x_ref = diffusers_steps(reference, x_start, 0, n, ref_path)

    edge = diffusers_scheduler(name, config)
    edge.set_timesteps(n)
    x = diffusers_steps(edge, initial_latent(edge), 0, k, [])
    state = export_state(edge, name)
    assert state.step_index == k

    device = make_sampler(name, config)
    device.set_timesteps(n)
    device.load_state(state)
    device_steps = 0
    for i in range(k, n):
        t = device.timesteps[i]
        x = device.step(fake_model(device.scale_model_input(x, t), i), t, x)
        device_steps += 1
    assert k + device_steps == n > 0  # every step ran, on one side or the other
    assert device.state().step_index == n

    scale = max(1.0, max(float(np.abs(p).max()) for p in ref_path))
    err = float(np.abs(x.astype(np.float64) - x_ref).max()) / scale
    assert err <= TOL, f"relay vs diffusers: {err:.3g}"


@pytest.mark.parametrize("k", [0, 1, 2, 5])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_exported_state_matches_the_numpy_state(name: str, k: int) -> None:
    """export_state reads the same names and values the numpy port keeps after the same k steps."""
    edge = diffusers_scheduler(name, SD15)
    edge.set_timesteps(6)
    ours = make_sampler(name, SD15)
    ours.set_timesteps(6)
    x = x_ours = initial_latent(edge)
    for i in range(k):
        t = edge.timesteps[i]
        model_output = fake_model(edge.scale_model_input(torch.from_numpy(x), t).numpy(), i)
        x = edge.step(torch.from_numpy(model_output), t, torch.from_numpy(x)).prev_sample.numpy()
        x_ours = ours.step(fake_model(ours.scale_model_input(x_ours, ours.timesteps[i]), i), ours.timesteps[i], x_ours)
    exported, own = export_state(edge, name), ours.state()
    assert exported.step_index == own.step_index == k
    assert exported.scalars == own.scalars
    assert sorted(exported.tensors) == sorted(own.tensors)
    if name == "dpmpp_2m":
        assert len(exported.tensors) == min(k, 2)
    for key, value in exported.tensors.items():
        assert value.dtype == np.float32 and value.shape == SHAPE
        scale = max(1.0, float(np.abs(value).max()))
        assert float(np.abs(value - own.tensors[key]).max()) / scale <= TOL


def test_builds_the_matching_diffusers_classes() -> None:
    assert type(diffusers_scheduler("ddim", SD15)) is StepCountingDDIMScheduler
    assert isinstance(diffusers_scheduler("ddim", SD15), DDIMScheduler)
    assert type(diffusers_scheduler("euler", SD15)) is EulerDiscreteScheduler
    dpm = diffusers_scheduler("dpmpp_2m", dict(SD15, _class_name="PNDMScheduler", skip_prk_steps=True))
    assert type(dpm) is DPMSolverMultistepScheduler
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    # Missing keys take each class's defaults: Euler and DPM space "linspace" without the key.
    config = {k: v for k, v in SD15.items() if k != "timestep_spacing"}
    assert diffusers_scheduler("euler", config).config.timestep_spacing == "linspace"
    assert diffusers_scheduler("ddim", config).config.timestep_spacing == "leading"


@pytest.mark.parametrize(
    "name,patch",
    [
        ("dpmpp_2m", {"solver_order": 3}),
        ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}),
        ("ddim", {"thresholding": True}),
        ("euler", {"use_exponential_sigmas": True}),
    ],
)
def test_configs_the_device_cannot_run_fail_on_the_edge_too(name: str, patch: dict[str, Any]) -> None:
    key = next(iter(patch))
    with pytest.raises(ConfigError, match=key):
        diffusers_scheduler(name, dict(SD15, **patch))
    with pytest.raises(ConfigError, match=key):
        make_sampler(name, dict(SD15, **patch))


def test_step_count_is_checked_and_set_when_given() -> None:
    scheduler = diffusers_scheduler("dpmpp_2m", SD15, 12)
    assert len(scheduler.timesteps) == 12
    # trailing with N=61 gives diffusers 62 timesteps ending at -1: refused up front, like the device.
    with pytest.raises(ConfigError, match="num_inference_steps=61"):
        diffusers_scheduler("euler", dict(SD15, timestep_spacing="trailing"), 61)
    with pytest.raises(ConfigError, match="num_inference_steps"):
        diffusers_scheduler("ddim", SD15, 0)


def test_unknown_names_raise() -> None:
    with pytest.raises(ConfigError, match="dpmpp_2m"):
        diffusers_scheduler("heun", SD15)
    with pytest.raises(ConfigError, match="ddim"):
        export_state(diffusers_scheduler("euler", SD15), "lms")


def test_export_state_checks_class_and_progress() -> None:
    euler = diffusers_scheduler("euler", SD15)
    with pytest.raises(ConfigError, match="DPMSolverMultistepScheduler"):
        export_state(euler, "dpmpp_2m")
    with pytest.raises(ConfigError):
        export_state(PNDMScheduler.from_config(SD15), "ddim")
    with pytest.raises(HandoffError, match="set_timesteps"):
        export_state(euler, "euler")
    euler.set_timesteps(4)
    assert export_state(euler, "euler").step_index == 0  # step_index is None before the first step
    with pytest.raises(HandoffError, match="steps_taken=2"):
        export_state(euler, "euler", steps_taken=2)
    dpm = DPMSolverMultistepScheduler.from_config(SD15, solver_order=3)
    dpm.set_timesteps(4)
    with pytest.raises(ConfigError, match="solver_order"):
        export_state(dpm, "dpmpp_2m")


def test_plain_ddim_scheduler_needs_steps_taken() -> None:
    plain = DDIMScheduler.from_config(SD15)
    plain.set_timesteps(4)
    x = initial_latent(plain)
    with pytest.raises(HandoffError, match="steps_taken"):
        export_state(plain, "ddim")
    x = diffusers_steps(plain, x, 0, 2, [])
    state = export_state(plain, "ddim", steps_taken=2)
    assert state.step_index == 2
    device = make_sampler("ddim", SD15)
    device.set_timesteps(4)
    device.load_state(state)
    t = device.timesteps[2]
    device.step(fake_model(x, 2), t, x)


def test_step_counting_ddim_is_strict() -> None:
    ddim = diffusers_scheduler("ddim", SD15)
    x = torch.zeros(SHAPE)
    with pytest.raises(SamplerError, match="set_timesteps"):
        ddim.step(x, 1, x)
    ddim.set_timesteps(2)
    assert ddim.step_index is None
    t0, t1 = ddim.timesteps
    with pytest.raises(ConfigError, match="eta"):
        ddim.step(x, t0, x, eta=0.5)
    with pytest.raises(ConfigError, match="use_clipped_model_output"):
        ddim.step(x, t0, x, use_clipped_model_output=True)
    with pytest.raises(SamplerError, match="step 0"):
        ddim.step(x, t1, x)
    ddim.step(x, t0, x)
    assert ddim.step_index == 1
    ddim.step(x, t1, x)
    with pytest.raises(SamplerError, match="past the end"):
        ddim.step(x, t1, x)
    ddim.set_timesteps(2)
    assert ddim.step_index is None


def test_exported_state_is_refused_for_another_step_count() -> None:
    edge = diffusers_scheduler("dpmpp_2m", SD15)
    edge.set_timesteps(8)
    diffusers_steps(edge, initial_latent(edge), 0, 3, [])
    state = export_state(edge, "dpmpp_2m")
    assert isinstance(state, SamplerState) and state.scalars["lower_order_nums"] == 2
    device = make_sampler("dpmpp_2m", SD15)
    device.set_timesteps(9)
    with pytest.raises(HandoffError, match="num_inference_steps"):
        device.load_state(state)
