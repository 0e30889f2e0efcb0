"""Step-level batching changes nothing but float round-off, and picks batches fairly."""

from __future__ import annotations

import numpy as np
import pytest

from edge_server.batching import batched_step, pick_batch
from edge_server.relay import EdgeRelay, prepare
from shared.relay_plan import RelayPlan

REQUESTS = [  # mixed samplers, step counts, splits, guidance on and off, different seeds
    ("a red sneaker", RelayPlan(6, 6, "dpmpp_2m", 5.0), 1),
    ("a blue bag", RelayPlan(8, 3, "euler", 7.5), 2),
    ("two things: a shirt and a boot", RelayPlan(5, 4, "ddim", 1.0), 3),
    ("a green dress", RelayPlan(6, 2, "dpmpp_2m", 3.0), 4),
    ("", RelayPlan(4, 0, "ddim", 5.0), 5),
]


def test_batched_requests_match_one_at_a_time(tiny_family):
    jobs = [prepare(tiny_family, p, plan, seed, request_id=f"r{i}") for i, (p, plan, seed) in enumerate(REQUESTS)]
    calls = 0
    while batch := pick_batch(jobs, max_rows=16):
        batched_step(tiny_family.large_unet, batch)
        calls += 1
    # 6 + 3 + 4 + 2 + 0 = 15 job-steps took max(k) = 6 UNet calls.
    assert calls == 6
    for job, (prompt, plan, seed) in zip(jobs, REQUESTS, strict=False):
        batched = job.to_handoff(tiny_family.family_id, plan, seed)
        alone = EdgeRelay(tiny_family).start(prompt, plan, seed)
        assert batched.split == plan.split
        # Float round-off only: a batch of other size sums the matmuls in another order.
        scale = max(1.0, float(np.abs(alone.latents).max()))
        err = float(np.abs(batched.latents - alone.latents).max())
        assert err <= 1e-5 * scale, (plan, err, scale)
        for name, tensor in alone.sampler_state.tensors.items():
            assert np.abs(batched.sampler_state.tensors[name] - tensor).max() <= 1e-5 * scale
        assert batched.sampler_state.scalars == alone.sampler_state.scalars


def test_pick_batch_is_oldest_first_within_the_row_budget(tiny_family):
    guided = [prepare(tiny_family, "x", RelayPlan(4, 4, "ddim", 5.0), s) for s in range(3)]
    plain = prepare(tiny_family, "x", RelayPlan(4, 4, "ddim", 1.0), 9)
    jobs = [*guided, plain]
    assert pick_batch(jobs, max_rows=5) == [guided[0], guided[1], plain]  # 2 + 2 + 1 rows
    guided[0].next_step = 4  # finished jobs are skipped
    assert pick_batch(jobs, max_rows=4) == [guided[1], guided[2]]
    assert pick_batch(jobs, max_rows=1) == [guided[1]]  # one job always fits, even over budget


def test_jobs_of_other_shapes_wait_for_their_own_call(tiny_family):
    small = prepare(tiny_family, "x", RelayPlan(4, 4, "ddim", 5.0), 1, height=16, width=16)
    big = prepare(tiny_family, "x", RelayPlan(4, 4, "ddim", 5.0), 2)
    assert pick_batch([small, big], max_rows=8) == [small]
    with pytest.raises(ValueError, match="one latent and embedding shape"):
        batched_step(tiny_family.large_unet, [small, big])


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_jobs_in_lockstep_share_one_sampler_step_and_keep_their_own_state(tiny_family, sampler):
    plans = [RelayPlan(6, 5, sampler, 5.0)] * 3 + [RelayPlan(6, 5, sampler, 1.0)]  # guidance differs: still one group
    prompts = ["a red sneaker", "a blue bag", "a hat", "a white shirt"]
    jobs = [prepare(tiny_family, p, plan, 10 + i) for i, (p, plan) in enumerate(zip(prompts, plans, strict=True))]
    assert len({job.step_group() for job in jobs}) == 1
    late = prepare(tiny_family, "a coat", RelayPlan(6, 5, sampler, 5.0), 20)
    batched_step(tiny_family.large_unet, [late])  # one step ahead: its own group from now on
    everyone = [*jobs, late]
    while batch := pick_batch(everyone, max_rows=16):
        batched_step(tiny_family.large_unet, batch)
    for job, prompt, plan, seed in zip(everyone, [*prompts, "a coat"], [*plans, plans[0]], [10, 11, 12, 13, 20],
                                       strict=True):
        batched = job.to_handoff(tiny_family.family_id, plan, seed)
        alone = EdgeRelay(tiny_family).start(prompt, plan, seed)
        scale = max(1.0, float(np.abs(alone.latents).max()))
        assert float(np.abs(batched.latents - alone.latents).max()) <= 1e-5 * scale
        assert batched.sampler_state.scalars == alone.sampler_state.scalars
        assert sorted(batched.sampler_state.tensors) == sorted(alone.sampler_state.tensors)
        for name, tensor in alone.sampler_state.tensors.items():
            assert batched.sampler_state.tensors[name].shape == tensor.shape  # its own rows of the history
            assert np.abs(batched.sampler_state.tensors[name] - tensor).max() <= 1e-5 * scale


def test_lcm_jobs_step_alone_since_each_draws_its_own_noise(tmp_path):
    from edge_server.family import load_family
    from lab.hub_families import build_lcm_dreamshaper

    family = load_family(build_lcm_dreamshaper(tmp_path / "lcm").folder)
    jobs = [prepare(family, "x", RelayPlan(4, 4, "lcm", 5.0), seed) for seed in (1, 2)]
    assert jobs[0].step_group() is None
