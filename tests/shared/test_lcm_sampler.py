"""The numpy LCM sampler reproduces diffusers' ``LCMScheduler``: timesteps, every step, relays.

LCM re-noises every step but the last; diffusers draws that noise from the pipeline's generator,
the port reads it from its state (``noise.{i}``), which ``export_state`` draws from a clone of the
edge's generator. So the comparisons below run diffusers with a seeded generator and give the
port the state exported from it.

Errors are measured as in tests/shared/test_samplers.py: ``max|numpy - diffusers|`` relative to
``max(1, largest operand)``, bound 1e-5 (an epsilon step at t=999 divides by sqrt(alpha_bar) ~ 0.07,
so samples reach tens to hundreds and round-off scales with them). Measured on this machine over
these cases: worst per step 3.4e-7 (absolute: 1.1e-5 on Dreamshaper's schedule, samples ~34;
9.2e-5 on linear betas, samples ~450), worst free-running trajectory 3.4e-7, worst relay 2.8e-7:
a few float32 ulps, from torch's 0-d sqrt, which is not always correctly rounded (the port's is).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, PNDMScheduler
from diffusers.utils.torch_utils import randn_tensor

from edge_server.scheduler_bridge import diffusers_scheduler, export_state
from lab.hub_families import LCM_SCHEDULER, SD1_SCHEDULER
from shared.errors import ConfigError, HandoffError, SamplerError
from shared.samplers import SAMPLER_NAMES, SamplerState, make_sampler, resolved_config
from shared.samplers.lcm import LCM_DEFAULTS, LCMSampler, LCMStateError, noise_step_indices

TOL = 1e-5
SHAPE = (2, 4, 8, 8)
SEED = 1234

# SimianLuo/LCM_Dreamshaper_v7's scheduler_config.json as published, and SD1.5's PNDM one relabelled
# (LCM's own keys missing): one copy each, in lab/hub_families.py.
DREAMSHAPER: dict[str, Any] = LCM_SCHEDULER
PNDM_AS_LCM: dict[str, Any] = {**SD1_SCHEDULER, "_class_name": "LCMScheduler"}
BETAS_F64 = (np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2).tolist()

CONFIGS: dict[str, dict[str, Any]] = {
    "dreamshaper": DREAMSHAPER,
    "pndm_as_lcm": PNDM_AS_LCM,
    # The config an SD1.5 pipeline's PNDM scheduler holds once loaded (defaults filled, _use_default_values).
    "pndm_loaded": dict(PNDMScheduler.from_config({**PNDM_AS_LCM, "_class_name": "PNDMScheduler"}).config),
    "v_prediction": dict(DREAMSHAPER, prediction_type="v_prediction"),
    "zero_snr_vpred": dict(DREAMSHAPER, prediction_type="v_prediction", rescale_betas_zero_snr=True),
    "sample_clip": dict(DREAMSHAPER, prediction_type="sample", clip_sample=True, clip_sample_range=1.5),
    "epsilon_clip": dict(DREAMSHAPER, clip_sample=True),
    "linear_20_original": dict(DREAMSHAPER, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                               original_inference_steps=20, timestep_scaling=5.0),
    "cosine": dict(DREAMSHAPER, beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(DREAMSHAPER, trained_betas=BETAS_F64, set_alpha_to_one=False),
    "class_defaults": {},
}
STEPS = (1, 2, 4, 8)


def rel_err(ours: np.ndarray, ref: np.ndarray, *operands: np.ndarray) -> float:
    """max |ours - ref|, relative to the largest of ref and the operands once that exceeds 1."""
    assert ours.shape == ref.shape and ours.dtype == np.float32
    scale = max([1.0, float(np.abs(ref).max())] + [float(np.abs(o).max()) for o in operands])
    return float(np.abs(ours.astype(np.float64) - ref).max() / scale)


def fake_model(x_in: np.ndarray, i: int) -> np.ndarray:
    """A deterministic stand-in denoiser: depends on its input (so runs feed back) and the step."""
    noise = np.random.default_rng(1000 + i).standard_normal(x_in.shape).astype(np.float32)
    return (np.float32(0.8) * np.tanh(x_in) + np.float32(0.6) * noise).astype(np.float32)


def start(config: dict[str, Any], n: int) -> tuple[Any, torch.Generator, np.ndarray]:
    """A diffusers LCM scheduler set to N steps, its seeded generator, and latents drawn from it (as the pipeline)."""
    scheduler: Any = diffusers_scheduler("lcm", config, n)
    generator = torch.Generator("cpu").manual_seed(SEED)
    latents = randn_tensor(SHAPE, generator=generator, dtype=torch.float32)
    return scheduler, generator, (latents * scheduler.init_noise_sigma).numpy()


def diffusers_step(scheduler: Any, i: int, x: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Diffusers' step i from x with the stand-in model, drawing noise from generator (as the pipeline)."""
    t = scheduler.timesteps[i]
    x_t = torch.from_numpy(x)
    model_output = fake_model(scheduler.scale_model_input(x_t, t).numpy(), i)
    out: np.ndarray = scheduler.step(torch.from_numpy(model_output), t, x_t, generator=generator).prev_sample.numpy()
    return out


def port_steps(sampler: LCMSampler, x: np.ndarray, begin: int, end: int) -> np.ndarray:
    for i in range(begin, end):
        t = sampler.timesteps[i]
        x = sampler.step(fake_model(sampler.scale_model_input(x, t), i), t, x)
    return x


def loaded_port(config: dict[str, Any], state: SamplerState, n: int) -> LCMSampler:
    port = make_sampler("lcm", config)
    assert isinstance(port, LCMSampler)
    port.set_timesteps(n)
    port.load_state(state)
    return port


# --- schedule ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 25, 50])
@pytest.mark.parametrize("cfg_id", sorted(CONFIGS))
def test_timesteps_match_diffusers(cfg_id: str, n: int) -> None:
    config = CONFIGS[cfg_id]
    ref = LCMScheduler.from_config(config)
    port = make_sampler("lcm", config)
    if n > ref.config.original_inference_steps:
        with pytest.raises(ValueError):
            ref.set_timesteps(n)
        with pytest.raises(ConfigError, match="original_inference_steps"):
            port.set_timesteps(n)
        return
    ref.set_timesteps(n)
    port.set_timesteps(n)
    assert port.timesteps.dtype == ref.timesteps.numpy().dtype == np.int64
    np.testing.assert_array_equal(port.timesteps, ref.timesteps.numpy())
    assert port.init_noise_sigma == ref.init_noise_sigma == 1.0


def test_defaults_are_the_diffusers_class_defaults() -> None:
    signature = inspect.signature(LCMScheduler.__init__)
    assert LCM_DEFAULTS == {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert resolved_config("lcm", PNDM_AS_LCM)["original_inference_steps"] == 50
    assert resolved_config("lcm", PNDM_AS_LCM)["timestep_scaling"] == 10.0


def test_lcm_is_registered_last() -> None:
    assert SAMPLER_NAMES == ("ddim", "euler", "dpmpp_2m", "lcm")
    assert isinstance(make_sampler("lcm", DREAMSHAPER), LCMSampler)
    assert type(diffusers_scheduler("lcm", DREAMSHAPER)) is LCMScheduler


# --- every step, side by side ------------------------------------------------------------------


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("cfg_id", sorted(CONFIGS))
def test_steps_match_diffusers(cfg_id: str, n: int) -> None:
    """Per step, both get diffusers' sample and model output; the port's noise is the exported state's."""
    config = CONFIGS[cfg_id]
    ref, generator, x_ref = start(config, n)
    state = export_state(ref, "lcm", generator=generator, sample_shape=SHAPE)
    assert sorted(state.tensors) == sorted(f"noise.{i}" for i in range(n - 1))
    ours = loaded_port(config, state, n)
    free = loaded_port(config, state, n)  # runs its own trajectory
    x_free = x_ref.copy()
    step_worst = run_worst = 0.0
    ref_path = [x_ref]
    for i in range(n):
        t = ours.timesteps[i]
        model_output = fake_model(x_ref, i)
        np.testing.assert_array_equal(ours.scale_model_input(x_ref, t), x_ref)
        prev_ref = ref.step(torch.from_numpy(model_output), ref.timesteps[i], torch.from_numpy(x_ref),
                            generator=generator).prev_sample.numpy()
        step_worst = max(step_worst, rel_err(ours.step(model_output, t, x_ref), prev_ref, x_ref))
        x_free = free.step(fake_model(x_free, i), t, x_free)
        ref_path.append(prev_ref)
        run_worst = max(run_worst, rel_err(x_free, prev_ref, *ref_path))
        x_ref = prev_ref
    assert step_worst <= TOL, f"worst per-step error {step_worst:.3g}"
    assert run_worst <= TOL, f"worst trajectory error {run_worst:.3g}"
    assert ours.state().step_index == n and not ours.state().tensors
    with pytest.raises(SamplerError, match="past the end"):
        ours.step(x_ref, ours.timesteps[-1], x_ref)


def test_python_int_timesteps_agree_too() -> None:
    """Given an int timestep diffusers computes c_skip/c_out in float64: still within round-off of the port."""
    ref, generator, x = start(DREAMSHAPER, 4)
    ours = loaded_port(DREAMSHAPER, export_state(ref, "lcm", generator=generator, sample_shape=SHAPE), 4)
    for i in range(4):
        t = int(ref.timesteps[i])
        model_output = fake_model(x, i)
        prev = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(x), generator=generator).prev_sample
        assert rel_err(ours.step(model_output, t, x), prev.numpy(), x) <= TOL
        x = prev.numpy()


# --- relays: diffusers runs k steps, the port the rest --------------------------------------------

RELAY_CASES = [(cfg_id, n, k) for cfg_id in ("dreamshaper", "v_prediction", "pndm_loaded") for n in STEPS
               for k in range(n + 1)]


@pytest.mark.parametrize("cfg_id,n,k", RELAY_CASES)
def test_relay_continues_the_diffusers_trajectory(cfg_id: str, n: int, k: int) -> None:
    config = CONFIGS[cfg_id]
    reference, ref_generator, x_ref = start(config, n)
    ref_path = [x_ref]
    for i in range(n):
        x_ref = diffusers_step(reference, i, x_ref, ref_generator)
        ref_path.append(x_ref)

    edge, generator, x = start(config, n)
    for i in range(k):
        x = diffusers_step(edge, i, x, generator)
    state = export_state(edge, "lcm", generator=generator, sample_shape=SHAPE)
    assert state.step_index == k and state.scalars == {"num_inference_steps": n}
    assert sorted(state.tensors) == sorted(f"noise.{i}" for i in noise_step_indices(k, n))
    device = loaded_port(config, state, n)
    x = port_steps(device, x, k, n)
    assert device.state().step_index == n
    err = rel_err(x, x_ref, *ref_path)
    assert err <= TOL, f"relay vs diffusers: {err:.3g}"


def test_export_state_does_not_advance_the_generator_and_draws_what_diffusers_would() -> None:
    edge, generator, x = start(DREAMSHAPER, 8)
    x = diffusers_step(edge, 0, x, generator)
    x = diffusers_step(edge, 1, x, generator)
    before = generator.get_state().clone()
    state = export_state(edge, "lcm", generator=generator, sample_shape=SHAPE)
    assert torch.equal(generator.get_state(), before)
    assert sorted(state.tensors, key=lambda s: int(s.split(".")[1])) == [f"noise.{i}" for i in range(2, 7)]
    replay = torch.Generator("cpu")
    replay.set_state(before)
    for i in range(2, 7):
        drawn = torch.randn(SHAPE, generator=replay, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(state.tensors[f"noise.{i}"], drawn)
        assert state.tensors[f"noise.{i}"].dtype == np.float32
    # Exporting twice gives the same noise; the edge's own next step still draws noise.2.
    again = export_state(edge, "lcm", generator=generator, sample_shape=SHAPE)
    for name, value in state.tensors.items():
        np.testing.assert_array_equal(again.tensors[name], value)


def test_export_state_needs_generator_and_shape_for_lcm_only() -> None:
    edge, generator, _ = start(DREAMSHAPER, 4)
    with pytest.raises(HandoffError, match="generator"):
        export_state(edge, "lcm", sample_shape=SHAPE)
    with pytest.raises(HandoffError, match="sample_shape"):
        export_state(edge, "lcm", generator=generator)
    with pytest.raises(HandoffError, match="sample_shape"):
        export_state(edge, "lcm", generator=generator, sample_shape=(2, 0, 8, 8))
    euler = diffusers_scheduler("euler", DREAMSHAPER, 4)
    state = export_state(euler, "euler", generator=generator, sample_shape=SHAPE)  # ignored
    assert state.tensors == {} and state.step_index == 0
    # Custom timesteps / img2img strength are not ported.
    custom = LCMScheduler.from_config(DREAMSHAPER)
    custom.set_timesteps(timesteps=[999, 759, 499, 259])
    with pytest.raises(ConfigError, match="custom timesteps"):
        export_state(custom, "lcm", generator=generator, sample_shape=SHAPE)
    img2img = LCMScheduler.from_config(DREAMSHAPER)
    img2img.set_timesteps(4, strength=0.5)
    with pytest.raises(ConfigError, match="strength"):
        export_state(img2img, "lcm", generator=generator, sample_shape=SHAPE)
    with pytest.raises(ConfigError, match="LCMScheduler"):
        export_state(euler, "lcm", generator=generator, sample_shape=SHAPE)


# --- state -------------------------------------------------------------------------------------------


def test_noise_step_indices() -> None:
    assert noise_step_indices(0, 4) == range(0, 3)
    assert noise_step_indices(2, 4) == range(2, 3)
    assert list(noise_step_indices(3, 4)) == list(noise_step_indices(4, 4)) == list(noise_step_indices(0, 1)) == []
    for split, n in ((5, 4), (-1, 4), (0, 0), (1.0, 4)):
        with pytest.raises(SamplerError):
            noise_step_indices(split, n)  # type: ignore[arg-type]


def exported(k: int, n: int = 6, config: dict[str, Any] = DREAMSHAPER) -> tuple[SamplerState, np.ndarray]:
    """The state diffusers exports after k of n steps, and the sample there."""
    edge, generator, x = start(config, n)
    for i in range(k):
        x = diffusers_step(edge, i, x, generator)
    return export_state(edge, "lcm", generator=generator, sample_shape=SHAPE), x


@pytest.mark.parametrize("k", [0, 1, 3, 5, 6])
def test_state_round_trip_continues_bit_exactly(k: int) -> None:
    state0, x0 = exported(0)
    a = loaded_port(DREAMSHAPER, state0, 6)
    x = port_steps(a, x0, 0, k)
    state = a.state()
    assert state.step_index == k and state.scalars == {"num_inference_steps": 6}
    assert sorted(state.tensors) == [f"noise.{i}" for i in noise_step_indices(k, 6)]
    for name, value in state.tensors.items():
        np.testing.assert_array_equal(value, state0.tensors[name])
    b = loaded_port(DREAMSHAPER, state, 6)
    np.testing.assert_array_equal(port_steps(a, x, k, 6), port_steps(b, x.copy(), k, 6))


def test_noise_is_required_and_set_timesteps_drops_it() -> None:
    port = make_sampler("lcm", DREAMSHAPER)
    port.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(SamplerError, match=r"step 0 of 4 needs the noise tensor noise\.0"):
        port.step(x, port.timesteps[0], x)
    assert port.state().step_index == 0  # nothing consumed or advanced
    state, _ = exported(0, 4)
    port.load_state(state)
    port.set_timesteps(4)
    with pytest.raises(SamplerError, match=r"noise\.0"):
        port.step(x, port.timesteps[0], x)
    one = make_sampler("lcm", DREAMSHAPER)  # one step draws no noise
    one.set_timesteps(1)
    assert one.step(x, one.timesteps[0], x).dtype == np.float32


def test_noise_of_another_shape_than_the_sample_is_refused_at_its_step() -> None:
    state, x = exported(2)
    port = loaded_port(DREAMSHAPER, state, 6)
    small = x[:1]
    with pytest.raises(SamplerError, match=r"noise\.2 has shape \(2, 4, 8, 8\), the sample \(1, 4, 8, 8\)"):
        port.step(small, port.timesteps[2], small)
    assert port.state().step_index == 2


def test_load_state_rejects_bad_noise_naming_the_tensor() -> None:
    good, _ = exported(2)
    port = make_sampler("lcm", DREAMSHAPER)
    with pytest.raises(SamplerError, match="set_timesteps"):
        port.load_state(good)
    port.set_timesteps(6)
    port.load_state(good)  # sanity
    noise = good.tensors["noise.3"]
    nan = noise.copy()
    nan[0, 0, 0, 0] = np.nan
    without = {k: v for k, v in good.tensors.items() if k != "noise.4"}
    cases: list[tuple[SamplerState, str]] = [
        (SamplerState(2, without, dict(good.scalars)), r"missing \['noise\.4'\]"),
        (SamplerState(2, {**good.tensors, "noise.1": noise}, dict(good.scalars)), r"unexpected \['noise\.1'\]"),
        (SamplerState(2, {**good.tensors, "noise.5": noise}, dict(good.scalars)), r"unknown.*'noise\.5'"),  # last: none
        (SamplerState(2, {**good.tensors, "model_outputs.0": noise}, dict(good.scalars)), "model_outputs.0"),
        (SamplerState(2, {**good.tensors, "noise.3": noise[:1]}, dict(good.scalars)), r"noise\.3 has shape"),
        (SamplerState(2, {**good.tensors, "noise.3": noise.astype(np.float64)}, dict(good.scalars)), r"noise\.3"),
        (SamplerState(2, {**good.tensors, "noise.3": nan}, dict(good.scalars)), r"noise\.3"),
        (SamplerState(2, {}, dict(good.scalars)), r"missing \['noise\.2', 'noise\.3', 'noise\.4'\]"),
        (SamplerState(3, dict(good.tensors), dict(good.scalars)),
         r"step_index 3 of 6 carries exactly noise\.3 \.\. noise\.4.*unexpected \['noise\.2'\]"),
        (SamplerState(2, dict(good.tensors), {"num_inference_steps": 5}), "num_inference_steps"),
        (SamplerState(2, dict(good.tensors), {}), "num_inference_steps"),
        (SamplerState(2, dict(good.tensors), {**good.scalars, "lower_order_nums": 1}), "lower_order_nums"),
        (SamplerState(7, dict(good.tensors), dict(good.scalars)), "step_index"),
    ]
    for bad, match in cases:
        with pytest.raises(LCMStateError, match=match) as info:
            port.load_state(bad)
        assert isinstance(info.value, SamplerError) and isinstance(info.value, HandoffError)
    with pytest.raises(SamplerError):
        port.load_state("not a state")  # type: ignore[arg-type]
    # A failed load leaves the sampler as it was.
    assert port.state().step_index == 2 and sorted(port.state().tensors) == sorted(good.tensors)


@pytest.mark.parametrize("k", [5, 6])
def test_states_at_the_last_steps_carry_no_noise(k: int) -> None:
    state, x = exported(k)
    assert state.tensors == {}
    port = loaded_port(DREAMSHAPER, state, 6)
    port_steps(port, x, k, 6)


# --- strictness --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "patch,key",
    [
        ({"thresholding": True}, "thresholding"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"original_inference_steps": 2000}, "original_inference_steps"),
        ({"original_inference_steps": 0}, "original_inference_steps"),
        ({"original_inference_steps": None}, "original_inference_steps"),
        ({"timestep_scaling": float("nan")}, "timestep_scaling"),
        ({"clip_sample": "no"}, "clip_sample"),
    ],
)
def test_unsupported_configs_raise_on_both_sides(patch: dict[str, Any], key: str) -> None:
    config = dict(DREAMSHAPER, **patch)
    with pytest.raises(ConfigError, match=key):
        make_sampler("lcm", config)
    with pytest.raises(ConfigError, match=key):
        diffusers_scheduler("lcm", config)


def test_step_counts_beyond_the_distillation_schedule_are_refused() -> None:
    with pytest.raises(ConfigError, match="num_inference_steps=51 cannot be larger than original_inference_steps=50"):
        make_sampler("lcm", DREAMSHAPER).set_timesteps(51)
    with pytest.raises(ConfigError, match="num_inference_steps=51"):
        diffusers_scheduler("lcm", DREAMSHAPER, 51)
    with pytest.raises(ValueError, match="num_inference_steps"):  # diffusers: "... smaller than num_inference_steps"
        LCMScheduler.from_config(DREAMSHAPER).set_timesteps(51)
    for bad in (0, 1001, 2.0, True):
        with pytest.raises(ConfigError, match="num_inference_steps"):
            make_sampler("lcm", DREAMSHAPER).set_timesteps(bad)  # type: ignore[arg-type]


def test_step_misuse_raises() -> None:
    state, x = exported(0, 2)
    port = make_sampler("lcm", DREAMSHAPER)
    with pytest.raises(SamplerError, match="set_timesteps"):
        port.step(x, 999, x)
    port.set_timesteps(2)
    port.load_state(state)
    t0, t1 = port.timesteps
    with pytest.raises(SamplerError, match="step 0"):
        port.step(x, t1, x)
    with pytest.raises(SamplerError, match="shape"):
        port.step(x[:1], t0, x)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(SamplerError, match="NaN"):
        port.step(bad, t0, x)
    port.step(x, t0, x)
    port.step(x, t1, x)


def test_unrelated_keys_are_ignored() -> None:
    """Keys LCMScheduler does not read (spacing, offset) or does not take (Euler's Karras flag) change nothing."""
    base = make_sampler("lcm", DREAMSHAPER)
    base.set_timesteps(4)
    other = make_sampler("lcm", dict(DREAMSHAPER, timestep_spacing="trailing", steps_offset=0, use_karras_sigmas=True))
    other.set_timesteps(4)
    np.testing.assert_array_equal(base.timesteps, other.timesteps)
