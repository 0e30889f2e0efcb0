"""Adaptive handoff on the edge: x0 after every step, and the handoff where it settled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from device_app.errors import EdgeMismatch
from device_app.expected import check_handoff
from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.batching import DenoiseJob, batched_step, pick_batch
from edge_server.engine import BatchingEngine, EdgeRequest
from edge_server.relay import EdgeRelay, prepare, run_alone, run_torch_relay
from edge_server.scheduler_bridge import diffusers_scheduler
from shared.handoff import decode_handoff
from shared.protocol import Plan
from shared.relay_modes import HandoffRule
from shared.relay_plan import RelayPlan
from shared.samplers import make_sampler

PROMPT = "a red sneaker top left and a blue bag bottom right"
SEED = 5
N, K_MAX = 10, 8


def trajectory(family, prompt: str, plan: RelayPlan, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A fixed-split run's x0 and latents after each step (index s - 1 after step s)."""
    job = prepare(family, prompt, plan, seed)
    x0s, latents = [], []
    while not job.done:
        batched_step(family.large_unet, [job])
        assert job.x0 is not None and job.x0.dtype == torch.float32 and job.x0.shape == job.latents.shape
        x0s.append(job.x0.double().numpy().copy())
        latents.append(job.latents.numpy().copy())
    return x0s, latents


def changes_of(x0s: list[np.ndarray]) -> list[float]:
    """||x0_s - x0_{s-1}|| / ||x0_s|| in float64, for s = 2.. (index s - 2)."""
    return [float(np.linalg.norm(b - a) / np.linalg.norm(b)) for a, b in zip(x0s, x0s[1:], strict=False)]


def expected_step(changes: list[float], tau: float, first: int, last: int) -> int:
    """The rule written out again: the first step in [first, last] whose change is below tau, else last."""
    for s in range(max(first, 2), last + 1):
        if changes[s - 2] < tau:
            return s
    return last


def taus_between(changes: list[float]) -> list[float]:
    """Thresholds between consecutive distinct changes, one below all and one above all: every outcome."""
    values = sorted(set(changes))
    mids = [(a + b) / 2 for a, b in zip(values, values[1:], strict=False)]
    return [min(values) / 2, *mids, min(1.0, max(values) * 2)]


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim", "euler"])
def test_an_adaptive_job_hands_off_at_the_first_settled_step_of_its_window(tiny_family, sampler):
    fixed = RelayPlan(N, K_MAX, sampler, 5.0)
    x0s, latents = trajectory(tiny_family, PROMPT, fixed, SEED)
    changes = changes_of(x0s)
    seen: set[int] = set()
    for min_split in (1, 3):
        for tau in taus_between(changes):
            plan = RelayPlan(N, K_MAX, sampler, 5.0, handoff_tau=tau, min_split=min_split)
            want = expected_step(changes, tau, min_split, K_MAX)
            handoff = EdgeRelay(tiny_family).start(PROMPT, plan, SEED)
            assert handoff.split == want, (tau, min_split, changes)
            assert min_split <= handoff.split <= K_MAX
            # The same trajectory as the fixed run, only cut at the settled step.
            np.testing.assert_allclose(handoff.latents, latents[want - 1], rtol=0, atol=1e-6)
            seen.add(want)
    # The thresholds reached the earliest step the window allows, the end of the window, and between.
    assert {2, K_MAX} <= seen and len(seen) >= 3


def test_min_split_holds_the_handoff_back_even_when_x0_settled_earlier(tiny_family):
    x0s, _ = trajectory(tiny_family, PROMPT, RelayPlan(N, K_MAX, "dpmpp_2m", 5.0), SEED)
    tau = 1.0  # every change is below it (the relative change of a real prediction is under 1)
    assert max(changes_of(x0s)) < tau
    job = prepare(tiny_family, PROMPT, RelayPlan(N, K_MAX, "dpmpp_2m", 5.0, handoff_tau=tau, min_split=4), SEED)
    run_alone(tiny_family.large_unet, job)
    assert job.next_step == job.settled_at == 4 and job.x0_change is not None and job.x0_change < tau


def test_batched_adaptive_jobs_equal_one_at_a_time(tiny_family):
    specs = []
    for i, sampler in enumerate(["dpmpp_2m", "dpmpp_2m", "ddim", "euler", "dpmpp_2m"]):
        prompt, seed = f"a blue bag number {i}", 30 + i
        changes = changes_of(trajectory(tiny_family, prompt, RelayPlan(N, K_MAX, sampler, 5.0), seed)[0])
        tau = taus_between(changes)[1 + i]  # thresholds that settle at different steps of the window
        specs.append((prompt, RelayPlan(N, K_MAX, sampler, 5.0, handoff_tau=tau, min_split=2), seed))
    specs.append(("a fixed one", RelayPlan(N, 6, "dpmpp_2m", 5.0), 99))
    jobs = [prepare(tiny_family, prompt, plan, seed) for prompt, plan, seed in specs]
    while batch := pick_batch(jobs, max_rows=16):
        batched_step(tiny_family.large_unet, batch)
    splits = set()
    for job, (prompt, plan, seed) in zip(jobs, specs, strict=True):
        alone = EdgeRelay(tiny_family).start(prompt, plan, seed)
        batched = job.to_handoff(tiny_family.family_id, plan, seed)
        assert batched.split == alone.split
        scale = max(1.0, float(np.abs(alone.latents).max()))
        assert float(np.abs(batched.latents - alone.latents).max()) <= 1e-5 * scale
        for name, tensor in alone.sampler_state.tensors.items():
            assert np.abs(batched.sampler_state.tensors[name] - tensor).max() <= 1e-5 * scale
        splits.add(alone.split)
    assert len(splits) >= 2  # the jobs left the shared batch at different steps


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_is_the_schedulers_own_prediction(tiny_family, sampler, prediction_type):
    config = {**tiny_family.scheduler_config, "prediction_type": prediction_type}
    job = prepare(tiny_family, PROMPT, RelayPlan(6, 5, sampler, 5.0), SEED)
    job.scheduler = diffusers_scheduler(sampler, config, 6)
    twin = diffusers_scheduler(sampler, config, 6)  # fed the same inputs, asked for its full output
    for noise, t, sample in _step_watching([job], family=tiny_family):
        expected = twin.step(noise, t, sample, return_dict=True).pred_original_sample
        assert job.x0 is not None
        torch.testing.assert_close(job.x0, expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_of_dpm_solver_is_its_data_prediction_also_in_a_shared_sampler_step(tiny_family, prediction_type):
    config = {**tiny_family.scheduler_config, "prediction_type": prediction_type}
    jobs = [prepare(tiny_family, f"prompt {i}", RelayPlan(6, 5, "dpmpp_2m", 5.0), SEED + i) for i in range(3)]
    for job in jobs:
        job.scheduler = diffusers_scheduler("dpmpp_2m", config, 6)
    assert len({job.step_group() for job in jobs}) == 1  # one stacked scheduler call per step
    port = make_sampler("dpmpp_2m", config)  # the device's numpy DPM-Solver++, an independent reference
    port.set_timesteps(6)
    for noise, t, sample in _step_watching(jobs, family=tiny_family):
        port.step(noise[:1].numpy(), float(t), sample[:1].numpy())  # job 0's row of the stacked call
        assert jobs[0].x0 is not None and port.last_x0 is not None
        np.testing.assert_allclose(jobs[0].x0.numpy(), port.last_x0, rtol=1e-4, atol=1e-5)
        for job in jobs[1:]:
            assert job.x0 is not None and job.x0.shape == jobs[0].x0.shape
            assert not torch.equal(job.x0, jobs[0].x0)  # its own rows, not the leader's


def _step_watching(jobs: list[DenoiseJob], *, family):
    """Step ``jobs`` together; yield each scheduler call's (model output, timestep, sample) after the step."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = jobs[0].scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        seen.append((model_output.clone(), timestep, sample.clone()))
        return real(model_output, timestep, sample, *args, **kwargs)

    jobs[0].scheduler.step = spy  # the leader's scheduler takes the (stacked) step
    while not jobs[0].done:
        batched_step(family.large_unet, jobs)
        yield seen[-1]
    assert len(seen) == 5


def test_the_engine_says_where_an_adaptive_request_handed_off(tiny_family):
    changes = changes_of(trajectory(tiny_family, "prompt r1", RelayPlan(N, K_MAX, "dpmpp_2m", 5.0), 1)[0])
    tau = taus_between(changes)[len(changes) // 2]
    plan = RelayPlan(N, K_MAX, "dpmpp_2m", 5.0, handoff_tau=tau, min_split=2)
    want = expected_step(changes, tau, 2, K_MAX)
    assert 2 <= want < K_MAX
    progress: list[tuple[int, int]] = []
    engine = BatchingEngine(tiny_family, max_batch_rows=8)
    try:
        outcome = engine.submit(EdgeRequest("r1", "r1", "prompt r1", plan, 1,
                                            on_progress=lambda s, t: progress.append((s, t)))).result(timeout=120)
    finally:
        engine.close()
    assert outcome.handoff is not None and decode_handoff(outcome.handoff).split == want == outcome.edge_steps
    assert progress[-1] == (want, want) and [s for s, _ in progress] == list(range(1, want + 1))


def test_the_shared_rule_replays_recorded_changes():
    rule = HandoffRule(0.1, 3, 6)
    assert rule.handoff_step([None, 0.05, 0.2, 0.08, 0.01, 0.0]) == 4  # step 2 is before the window
    assert rule.handoff_step([None, 0.5, 0.5, 0.5, 0.5, 0.5, 0.01]) == 6  # never settled in it: its end
    assert HandoffRule.of(RelayPlan(20, 12)) is None
    assert HandoffRule.of(RelayPlan(20, 12, handoff_tau=0.05)) == HandoffRule(0.05, 1, 12)


@pytest.fixture(scope="module")
def bundle(fp32_bundle_dir: Path) -> DeviceBundle:
    return DeviceBundle(fp32_bundle_dir, threads=1)


def test_two_sided_adaptive_relay_equals_the_torch_relay_at_its_split(tiny_family, bundle):
    changes = changes_of(trajectory(tiny_family, PROMPT, RelayPlan(N, K_MAX, "dpmpp_2m", 5.0), SEED)[0])
    tau = taus_between(changes)[len(changes) // 2]
    plan = RelayPlan(N, K_MAX, "dpmpp_2m", 5.0, handoff_tau=tau, min_split=2)
    handoff = EdgeRelay(tiny_family).start(PROMPT, plan, SEED)
    assert 2 <= handoff.split < K_MAX
    message = Plan("r1", plan, seed=SEED, height=32, width=32, scheduler="fixed", why="")
    check_handoff(bundle, handoff, message)  # the device accepts a handoff anywhere in the window
    device = finish_latents(bundle, handoff)
    at_split = run_torch_relay(tiny_family, PROMPT, RelayPlan(N, handoff.split, "dpmpp_2m", 5.0), SEED)
    assert float(np.abs(device - at_split.numpy()).max()) <= 1e-4
    # The in-process relay of the adaptive plan itself switches models where the edge settled.
    same = run_torch_relay(tiny_family, PROMPT, plan, SEED)
    assert float(np.abs(same - at_split).max()) <= 1e-6
    fixed = Plan("r1", RelayPlan(N, K_MAX, "dpmpp_2m", 5.0), seed=SEED, height=32, width=32, scheduler="s", why="")
    with pytest.raises(EdgeMismatch, match=f"split {handoff.split}, the plan {K_MAX}"):
        check_handoff(bundle, handoff, fixed)
