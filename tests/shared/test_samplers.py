"""The numpy samplers reproduce diffusers' schedulers: timesteps, sigmas, every step, whole runs.

Errors are measured as ``max|numpy - diffusers| / max(1, max|operands|)`` where the operands
are the step's input and output samples (for a whole run: the reference trajectory so far).
Samples of some schedules are far beyond 1 (Euler's are scaled by sigma, ~15 for SD and 4096
with zero terminal SNR; a DDIM/DPM x0 prediction divides by sqrt(alpha_bar) ~ 0.07 at t=999),
and float32 round-off scales with them; so the bound is an absolute 1e-5 for unit-sized
samples and relative for large ones. Measured on this machine (worst per step / worst whole
run, over the matrix and the variants): DDIM 4.7e-7 / 9.5e-7, Euler 4.9e-7 / 1.5e-7,
DPM-Solver++ 9.7e-7 / 1.1e-6. The port computes sqrt/log/exp correctly rounded; torch's float32
versions (MKL/SLEEF) are within an ulp of that, which is where the differences come from.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from lab.hub_families import SD1_SCHEDULER, SDXL_SCHEDULER
from shared.errors import ConfigError, HandoffError
from shared.samplers import SAMPLER_NAMES as _ALL_SAMPLERS
from shared.samplers import SamplerError, SamplerState, make_sampler
from shared.samplers.ddim import DDIM_DEFAULTS
from shared.samplers.dpmpp_2m import DPMPP_2M_DEFAULTS
from shared.samplers.euler import EULER_DEFAULTS

# The deterministic ports; LCM draws noise every step and has its own file (tests/shared/test_lcm_sampler.py).
SAMPLER_NAMES = tuple(n for n in _ALL_SAMPLERS if n != "lcm")

TOL = 1e-5
SHAPE = (2, 4, 8, 8)

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
# Stable Diffusion 1.5's (a PNDM config: no spacing key) and SDXL base's scheduler_config.json as
# published: one copy each, in lab/hub_families.py.
PNDM_SD15: dict[str, Any] = SD1_SCHEDULER
SDXL_EULER: dict[str, Any] = SDXL_SCHEDULER

DIFFUSERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}
DEFAULTS = {"ddim": DDIM_DEFAULTS, "euler": EULER_DEFAULTS, "dpmpp_2m": DPMPP_2M_DEFAULTS}
KARRAS = {"ddim": (False,), "euler": (False, True), "dpmpp_2m": (False, True)}


def diffusers_for(name: str, config: Mapping[str, Any]):
    """The diffusers scheduler a port mirrors, built the way the edge builds it."""
    overrides = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "dpmpp_2m" else {}
    return DIFFUSERS[name].from_config(dict(config), **overrides)


def rel_err(ours: np.ndarray, ref: np.ndarray, *operands: np.ndarray) -> float:
    """max |ours - ref|, relative to the largest of ref and the operands once that exceeds 1.

    float32 round-off scales with the largest operand: an Euler step from sigma 4096 (zero
    terminal SNR) to sigma 3 cancels samples of ~1e4 down to ~10.
    """
    assert ours.shape == ref.shape and ours.dtype == np.float32
    scale = max([1.0, float(np.abs(ref).max())] + [float(np.abs(o).max()) for o in operands])
    return float(np.abs(ours.astype(np.float64) - ref).max() / scale)


def fake_model(x_in: np.ndarray, i: int) -> np.ndarray:
    """A deterministic stand-in denoiser: depends on its input (so runs feed back) and the step."""
    noise = np.random.default_rng(1000 + i).standard_normal(x_in.shape).astype(np.float32)
    return (np.float32(0.8) * np.tanh(x_in) + np.float32(0.6) * noise).astype(np.float32)


def diffusers_quirk(timesteps: np.ndarray, n: int) -> bool:
    """True where diffusers' own schedule is broken (wrong length, or a repeated first timestep)."""
    return len(timesteps) != n or (n > 1 and int(np.count_nonzero(timesteps == timesteps[0])) > 1)


def compare_schedules(name: str, config: Mapping[str, Any], n: int) -> tuple[Any, Any] | None:
    """Build both, set N steps, check timesteps/sigmas/init_noise_sigma; None on a diffusers quirk."""
    ref = diffusers_for(name, config)
    ref.set_timesteps(n)
    ref_t = ref.timesteps.numpy()
    ours = make_sampler(name, config)
    if diffusers_quirk(ref_t, n):
        with pytest.raises(ConfigError):
            ours.set_timesteps(n)
        return None
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == ref_t.dtype == (np.float32 if name == "euler" else np.int64)
    assert ours.timesteps.shape == (n,)
    if name == "euler" and config.get("use_karras_sigmas"):
        # Karras timesteps are fractional: torch's sqrt (1 ulp off here) moves them by <= 1 float32 ulp.
        np.testing.assert_allclose(ours.timesteps, ref_t, rtol=0, atol=1e-3)
    else:
        np.testing.assert_array_equal(ours.timesteps, ref_t)
    if name != "ddim":
        # 1.2e-7 (one ulp) measured for plain schedules; 1.8e-6 with rescale_betas_zero_snr, whose
        # 1 - alpha re-derivation amplifies torch's 1-ulp sqrt differences.
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=TOL, atol=0)
    assert math.isclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6)
    return ref, ours


def run_and_compare(name: str, config: Mapping[str, Any], n: int) -> tuple[int, float, float]:
    """Step diffusers and the port side by side; return (steps, worst per-step err, worst run err).

    Per step, both get identical inputs (diffusers' sample and model output); a second port
    instance runs its own trajectory, compared with diffusers' after every step.
    """
    built = compare_schedules(name, config, n)
    if built is None:
        pytest.skip("diffusers' schedule is broken here; the port's ConfigError is asserted above")
    ref, ours = built
    free = make_sampler(name, config)
    free.set_timesteps(n)
    x0 = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    x_ref = x0 * np.float32(float(ref.init_noise_sigma))
    x_free = x0 * np.float32(free.init_noise_sigma)
    step_worst = run_worst = 0.0
    steps = 0
    ref_path = [x_ref]  # the reference trajectory so far: the scale of the run's round-off
    for i, t in enumerate(ours.timesteps):
        t_ref = ref.timesteps[i]
        x_in_ref = ref.scale_model_input(torch.from_numpy(x_ref), t_ref).numpy()
        assert rel_err(ours.scale_model_input(x_ref, t), x_in_ref) <= TOL
        model_output = fake_model(x_in_ref, i)
        prev_ref = ref.step(torch.from_numpy(model_output), t_ref, torch.from_numpy(x_ref)).prev_sample.numpy()
        step_worst = max(step_worst, rel_err(ours.step(model_output, t, x_ref), prev_ref, x_ref))

        x_free = free.step(fake_model(free.scale_model_input(x_free, t), i), t, x_free)
        run_worst = max(run_worst, rel_err(x_free, prev_ref, *ref_path))
        ref_path.append(prev_ref)
        x_ref = prev_ref
        steps += 1
    assert steps == n > 0
    assert ours.state().step_index == free.state().step_index == n
    return steps, step_worst, run_worst


# --- the full matrix: sampler x beta schedule x prediction x spacing x karras x N --------------

MATRIX = [
    (name, beta_schedule, prediction, spacing, karras)
    for name in SAMPLER_NAMES
    for beta_schedule, prediction, spacing, karras in itertools.product(
        ("linear", "scaled_linear", "squaredcos_cap_v2"),
        ("epsilon", "v_prediction"),
        ("leading", "trailing", "linspace"),
        KARRAS[name],
    )
]


def matrix_config(beta_schedule: str, prediction: str, spacing: str, karras: bool) -> dict[str, Any]:
    config = dict(SD15, beta_schedule=beta_schedule, prediction_type=prediction, timestep_spacing=spacing)
    if beta_schedule == "linear":
        config.update(beta_start=0.0001, beta_end=0.02)
    if karras:
        config["use_karras_sigmas"] = True
    return config


@pytest.mark.parametrize("n", [1, 4, 25])
@pytest.mark.parametrize("name,beta_schedule,prediction,spacing,karras", MATRIX)
def test_timesteps_match_diffusers(name: str, beta_schedule: str, prediction: str, spacing: str, karras: bool, n: int) -> None:
    compare_schedules(name, matrix_config(beta_schedule, prediction, spacing, karras), n)


@pytest.mark.parametrize("n", [1, 4, 25])
@pytest.mark.parametrize("name,beta_schedule,prediction,spacing,karras", MATRIX)
def test_steps_match_diffusers(name: str, beta_schedule: str, prediction: str, spacing: str, karras: bool, n: int) -> None:
    steps, step_worst, run_worst = run_and_compare(name, matrix_config(beta_schedule, prediction, spacing, karras), n)
    assert steps == n
    assert step_worst <= TOL, f"worst per-step error {step_worst:.3g}"
    assert run_worst <= TOL, f"worst trajectory error {run_worst:.3g}"


def test_dpm_karras_cosine_quirk_is_refused() -> None:
    """diffusers' DPM-Solver Karras timesteps on a cosine schedule repeat 998, so it skips step 0."""
    config = matrix_config("squaredcos_cap_v2", "epsilon", "leading", karras=True)
    ref = diffusers_for("dpmpp_2m", config)
    ref.set_timesteps(25)
    assert diffusers_quirk(ref.timesteps.numpy(), 25)
    with pytest.raises(ConfigError, match="repeats the first timestep"):
        make_sampler("dpmpp_2m", config).set_timesteps(25)


# --- configuration variants ------------------------------------------------------------------

BETAS_F64 = (np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2).tolist()

VARIANTS: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    ("pndm_sd15_json", SAMPLER_NAMES, PNDM_SD15),
    ("sdxl_euler_json", SAMPLER_NAMES, SDXL_EULER),
    ("class_defaults", SAMPLER_NAMES, {}),
    ("zero_snr_vpred_trailing", SAMPLER_NAMES, dict(SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    ("sample_prediction", SAMPLER_NAMES, dict(SD15, prediction_type="sample")),
    ("trained_betas", SAMPLER_NAMES, dict(SD15, trained_betas=BETAS_F64)),
    ("ddim_clip_alpha_one", ("ddim",), dict(SD15, clip_sample=True, clip_sample_range=1.5, set_alpha_to_one=True)),
    ("final_sigma_min", ("euler", "dpmpp_2m"), dict(SD15, final_sigmas_type="sigma_min")),
    ("final_sigma_min_karras", ("euler", "dpmpp_2m"), dict(SD15, final_sigmas_type="sigma_min", use_karras_sigmas=True)),
    ("karras_sigma_range", ("euler", "dpmpp_2m"), dict(SD15, use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0)),
    ("dpm_euler_at_final", ("dpmpp_2m",), dict(SD15, euler_at_final=True, final_sigmas_type="sigma_min")),
    ("dpm_no_lower_order_final", ("dpmpp_2m",), dict(SD15, lower_order_final=False, final_sigmas_type="sigma_min")),
    ("dpm_heun", ("dpmpp_2m",), dict(SD15, solver_type="heun")),
    ("dpm_unipc_solver_type", ("dpmpp_2m",), dict(SD15, solver_type="bh2")),
    ("dpm_lambda_min_clipped", ("dpmpp_2m",), dict(SD15, lambda_min_clipped=-5.1, timestep_spacing="linspace")),
]
VARIANT_CASES = [(vid, name, cfg) for vid, names, cfg in VARIANTS for name in names]


@pytest.mark.parametrize("n", [1, 4, 20])
@pytest.mark.parametrize("vid,name,config", VARIANT_CASES, ids=[f"{v}-{n}" for v, n, _ in VARIANT_CASES])
def test_variants_match_diffusers(vid: str, name: str, config: dict[str, Any], n: int) -> None:
    steps, step_worst, run_worst = run_and_compare(name, config, n)
    assert steps == n
    assert step_worst <= TOL and run_worst <= TOL, (step_worst, run_worst)


def test_variants_really_differ() -> None:
    """The variants exercise different code paths: their 20-step DPM schedules are not all the same."""
    sigmas = set()
    for _, names, config in VARIANTS:
        if "dpmpp_2m" in names:
            s = make_sampler("dpmpp_2m", config)
            s.set_timesteps(20)
            sigmas.add(s.sigmas.tobytes())
    assert len(sigmas) >= 5


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_defaults_are_the_diffusers_class_defaults(name: str) -> None:
    """Missing keys take the mirrored class's own __init__ defaults (e.g. Euler: linspace)."""
    signature = inspect.signature(DIFFUSERS[name].__init__)
    expected = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert DEFAULTS[name] == expected


def test_mixed_dtypes_are_computed_in_float32() -> None:
    s = make_sampler("euler", SD15)
    s.set_timesteps(4)
    x = np.ones(SHAPE, np.float16)
    out = s.step(np.zeros(SHAPE, np.float64), s.timesteps[0], x)
    assert out.dtype == np.float32 and out.shape == SHAPE


# --- state round trip --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 5, 6])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_state_round_trip_continues_bit_exactly(name: str, k: int) -> None:
    n = 6
    config = dict(SD15, use_karras_sigmas=name != "ddim")
    a, b = make_sampler(name, config), make_sampler(name, config)
    a.set_timesteps(n)
    b.set_timesteps(n)
    x = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32) * np.float32(a.init_noise_sigma)
    for i in range(k):
        t = a.timesteps[i]
        x = a.step(fake_model(a.scale_model_input(x, t), i), t, x)
    state = a.state()
    assert state.step_index == k and state.scalars["num_inference_steps"] == n
    if name == "dpmpp_2m":
        assert state.scalars["lower_order_nums"] == min(k, 2)
        assert sorted(state.tensors) == ["model_outputs.0", "model_outputs.1"][2 - min(k, 2) :]
    b.load_state(state)
    xa, xb = x, x.copy()
    for i in range(k, n):
        t = a.timesteps[i]
        xa = a.step(fake_model(a.scale_model_input(xa, t), i), t, xa)
        xb = b.step(fake_model(b.scale_model_input(xb, t), i), t, xb)
    np.testing.assert_array_equal(xa, xb)
    with pytest.raises(SamplerError, match="past the end"):
        b.step(xb, 0, xb)


# --- strictness --------------------------------------------------------------------------------

BAD_CONFIGS: list[tuple[str, dict[str, Any], str]] = [
    ("ddim", {"thresholding": True}, "thresholding"),
    ("dpmpp_2m", {"thresholding": True}, "thresholding"),
    ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule"),
    ("euler", {"beta_schedule": "exp"}, "beta_schedule"),
    ("ddim", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("euler", {"prediction_type": "original_sample"}, "prediction_type"),
    ("dpmpp_2m", {"prediction_type": "flow_prediction"}, "prediction_type"),
    ("dpmpp_2m", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpmpp_2m", {"algorithm_type": "deis"}, "algorithm_type"),
    ("dpmpp_2m", {"solver_order": 1}, "solver_order"),
    ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
    ("dpmpp_2m", {"solver_type": "bogus"}, "solver_type"),
    ("dpmpp_2m", {"variance_type": "learned"}, "variance_type"),
    ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type"),
    ("dpmpp_2m", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("dpmpp_2m", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
    ("dpmpp_2m", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ("dpmpp_2m", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ("dpmpp_2m", {"final_sigmas_type": "one"}, "final_sigmas_type"),
    ("euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ("euler", {"use_beta_sigmas": True}, "use_beta_sigmas"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"timestep_type": "continuous"}, "timestep_type"),
    ("euler", {"sigma_min": -1.0}, "sigma_min"),
    ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
    ("euler", {"timestep_spacing": None}, "timestep_spacing"),
    ("ddim", {"num_train_timesteps": "1000"}, "num_train_timesteps"),
    ("ddim", {"steps_offset": 1.5}, "steps_offset"),
    ("ddim", {"beta_end": float("nan")}, "beta_end"),
    ("ddim", {"clip_sample": "no"}, "clip_sample"),
    ("dpmpp_2m", {"use_karras_sigmas": None}, "use_karras_sigmas"),
    ("ddim", {"trained_betas": [0.1] * 10}, "trained_betas"),  # 10 betas for 1000 timesteps
    ("euler", {"beta_start": 0.0, "beta_schedule": "linear"}, "betas"),
]


@pytest.mark.parametrize("name,patch,key", BAD_CONFIGS)
def test_unsupported_config_values_raise(name: str, patch: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_sampler(name, dict(SD15, **patch))
    message = str(info.value)
    assert key in message
    if key not in ("betas", "trained_betas"):
        assert repr(patch[key])[:20] in message or str(patch[key]) in message


def test_unknown_keys_are_ignored_and_none_flags_follow_diffusers() -> None:
    config = dict(PNDM_SD15, skip_prk_steps=True, some_future_key=[1, 2], _use_default_values=["x"])
    for name in SAMPLER_NAMES:
        make_sampler(name, config).set_timesteps(5)
    # EulerDiscreteScheduler types its sigma flags ``bool | None``: None means off, as in diffusers.
    make_sampler("euler", dict(SD15, use_karras_sigmas=None, use_beta_sigmas=None))


def test_unknown_sampler_name_lists_the_names() -> None:
    with pytest.raises(ConfigError) as info:
        make_sampler("pndm", SD15)
    for name in SAMPLER_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("n", [0, -1, 1001, 2.0, True])
def test_bad_step_counts_raise(name: str, n: Any) -> None:
    with pytest.raises(ConfigError, match="num_inference_steps"):
        make_sampler(name, SD15).set_timesteps(n)


@pytest.mark.parametrize(
    "name,config,n",
    [
        ("ddim", dict(SD15, timestep_spacing="trailing"), 61),  # np.arange round-off: 62 timesteps
        ("euler", dict(SD15, timestep_spacing="trailing"), 61),
        ("dpmpp_2m", dict(SD15, timestep_spacing="trailing"), 61),
        ("ddim", SD15, 1000),  # leading + steps_offset reaches t = 1000
        ("dpmpp_2m", dict(SD15, timestep_spacing="leading"), 1000),  # all timesteps equal
    ],
)
def test_broken_diffusers_schedules_raise(name: str, config: dict[str, Any], n: int) -> None:
    with pytest.raises(ConfigError, match="num_inference_steps=" + str(n)):
        make_sampler(name, config).set_timesteps(n)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_step_misuse_raises(name: str) -> None:
    s = make_sampler(name, SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(SamplerError, match="set_timesteps"):
        s.step(x, 1, x)
    s.set_timesteps(2)
    t0, t1 = s.timesteps
    with pytest.raises(SamplerError, match="step 0"):
        s.step(x, t1, x)  # out of turn
    with pytest.raises(SamplerError, match="step 0"):
        s.scale_model_input(x, t1)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(SamplerError, match="NaN"):
        s.step(bad, t0, x)
    with pytest.raises(SamplerError, match="NaN"):
        s.step(x, t0, np.full(SHAPE, np.inf, np.float32))
    with pytest.raises(SamplerError, match="shape"):
        s.step(x[:1], t0, x)
    with pytest.raises(SamplerError, match="floating"):
        s.step(x.astype(np.int32), t0, x)
    with pytest.raises(SamplerError, match="number"):
        s.step(x, "999", x)
    s.step(x, t0, x)
    s.step(x, t1, x)
    with pytest.raises(SamplerError, match="past the end"):
        s.step(x, t1, x)


def _state(name: str, **changes: Any) -> SamplerState:
    s = make_sampler(name, SD15)
    s.set_timesteps(6)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for i in range(3):
        x = s.step(fake_model(x, i), s.timesteps[i], x)
    state = s.state()
    for key, value in changes.items():
        setattr(state, key, value)
    return state


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_load_state_rejects_bad_states(name: str) -> None:
    good = _state(name)
    fresh = make_sampler(name, SD15)
    with pytest.raises(SamplerError, match="set_timesteps"):
        fresh.load_state(good)
    fresh.set_timesteps(6)
    fresh.load_state(good)  # sanity: the good one loads
    cases: list[SamplerState] = [
        _state(name, step_index=7),
        _state(name, step_index=-1),
        _state(name, step_index=2.0),
        _state(name, scalars={**good.scalars, "num_inference_steps": 5}),
        _state(name, scalars={k: v for k, v in good.scalars.items() if k != "num_inference_steps"}),
        _state(name, scalars={**good.scalars, "surprise": 1}),
        _state(name, scalars={**good.scalars, "num_inference_steps": float("nan")}),
        _state(name, tensors={**good.tensors, "model_outputs.7": np.zeros(SHAPE, np.float32)}),
    ]
    for bad in cases:
        with pytest.raises(HandoffError):
            fresh.load_state(bad)
    with pytest.raises(HandoffError):
        fresh.load_state("not a state")  # type: ignore[arg-type]


def test_load_state_checks_dpm_history() -> None:
    good = _state("dpmpp_2m")
    s = make_sampler("dpmpp_2m", SD15)
    s.set_timesteps(6)
    newer, older = good.tensors["model_outputs.1"], good.tensors["model_outputs.0"]
    nan = newer.copy()
    nan[0, 0, 0, 0] = np.nan
    bad_states = [
        SamplerState(3, {"model_outputs.1": newer}, {**good.scalars}),  # lon 2 but one entry
        SamplerState(3, {"model_outputs.0": older, "model_outputs.1": newer}, {**good.scalars, "lower_order_nums": 1}),
        SamplerState(3, {}, {**good.scalars, "lower_order_nums": 1}),
        SamplerState(1, {"model_outputs.0": older, "model_outputs.1": newer}, {**good.scalars}),  # lon > step_index
        SamplerState(3, {"model_outputs.0": older, "model_outputs.1": nan}, {**good.scalars}),
        SamplerState(3, {"model_outputs.0": older.astype(np.float64), "model_outputs.1": newer}, {**good.scalars}),
        SamplerState(3, {"model_outputs.0": older[:1], "model_outputs.1": newer}, {**good.scalars}),
        SamplerState(3, {"model_outputs.0": older, "model_outputs.1": newer}, {"num_inference_steps": 6}),
        SamplerState(3, {"model_outputs.0": older, "model_outputs.1": newer}, {**good.scalars, "lower_order_nums": 1.5}),
    ]
    for bad in bad_states:
        with pytest.raises(HandoffError):
            s.load_state(bad)
    s.load_state(good)
    x = np.zeros((1, *SHAPE[1:]), np.float32)  # the history is for batch 2
    with pytest.raises(HandoffError, match="shape"):
        s.step(x, s.timesteps[3], x)
