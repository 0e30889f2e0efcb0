"""The bandit planner behind the daemon's Planner interface (on a SYNTHETIC profile made up in the tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from shared.bandit import ContextBuilder, EpsilonGreedy, LinUCB, StateError, arm_label
from shared.bandit.planner import BanditPlanner
from shared.planning import PlanContext, Planner
from shared.protocol import Generate, Plan, Report
from shared.relay_plan import RelayPlan
from tests.helpers import synthetic_profile

CONTEXT = PlanContext(queue_depth=2, active=3, device_load=0.4, rtt_s=0.04, bandwidth_bps=12e6)
PROMPT = "a red sneaker in the top left and a blue bag in the middle"


def generate(rid: str = "r1", **kw) -> Generate:
    return Generate(request_id=rid, prompt=kw.pop("prompt", PROMPT), **kw)


def report(rid: str = "r1", latency: float = 2.0, **kw) -> Report:
    return Report(request_id=rid, device_compute_s=latency / 2, transfer_s=0.1, total_latency_s=latency, **kw)


def planner(tmp_path=None, policy: str = "linucb", **kw) -> BanditPlanner:
    state = None if tmp_path is None else tmp_path / "bandit.json"
    return BanditPlanner.from_profile(synthetic_profile(), policy, state, **kw)


def test_is_a_planner_and_explains_its_choice():
    p: Planner = planner()  # the daemon's interface (a typing Protocol)
    assert all(callable(getattr(p, m)) for m in ("choose", "feedback", "save")) and p.name == "linucb"
    plan, why = p.choose(generate(preference=0.8), CONTEXT)
    assert plan in p.arms
    assert why.startswith(f"linucb: {arm_label(plan)} (edge {plan.split}/{plan.num_inference_steps} steps")
    assert f"best of {len(p.arms)} arms" in why and "preference 0.80, rtt 40 ms" in why and "ucb" in why
    # what the daemon sends must be a valid plan message (scheduler identifier, why length)
    Plan(request_id="r1", plan=plan, seed=1, height=512, width=512, scheduler=p.name, why=why)


def test_honours_a_pin_and_learns_from_it_when_it_is_an_arm():
    p = planner()
    pinned = RelayPlan(20, 12)
    request = generate(pinned=pinned)
    plan, why = p.choose(request, CONTEXT)
    assert plan == pinned and why.startswith("pinned by the client (N20k12)")
    p.feedback(plan, request, report())
    assert p.policy.counts[p.arms.index(pinned)] == 1
    # a pin outside the arms is served, not learned from
    odd = RelayPlan(17, 3)
    request = generate("r2", pinned=odd)
    plan, why = p.choose(request, CONTEXT)
    assert plan == odd and "not one of the scheduler's arms" in why
    p.feedback(plan, request, report("r2"))
    assert p.policy.updates == 1


def test_feedback_updates_with_the_documented_reward():
    p = planner()
    request = generate(preference=0.7)
    plan, _ = p.choose(request, CONTEXT)
    arm = p.arms.index(plan)
    x = p._pending[id(request)][2].copy()
    p.feedback(plan, request, report(latency=3.0, rating=1))
    assert p.policy.counts[arm] == 1 and p.learned == 1
    q = 0.5 * p.profile.quality(plan, 2) + 0.5 * 1.0  # two items, rating +1 halfway
    r = 0.7 * q + 0.3 * (1 - 3.0 / p.latency_ref_s)
    prior_b = planner().policy.b[arm]
    np.testing.assert_allclose(p.policy.b[arm] - prior_b, r * x)
    assert id(request) not in p._pending


def test_requested_steps_restrict_the_arms():
    p = planner()
    plan, _ = p.choose(generate(steps=10), CONTEXT)
    assert plan.num_inference_steps == 10 and plan in p.arms
    request = generate("r2", steps=25)  # no arm has 25 steps: the chosen split fraction, scaled
    plan, why = p.choose(request, CONTEXT)
    assert plan.num_inference_steps == 25 and "not learned from" in why
    p.feedback(plan, request, report("r2"))
    assert p.policy.updates == 0


def test_reports_after_a_restart_are_learned_from():
    p = planner()
    request = generate()
    plan = p.arms[3]
    p.feedback(plan, request, report(rtt_s=0.05, bandwidth_bps=5e6, device_load=0.2))  # never chosen here
    assert p.policy.counts[3] == 1


def test_learns_to_prefer_the_faster_arm():
    """Feedback from a made-up world where only N10k10e is fast: the planner ends up choosing it."""
    p = planner(policy="linucb", prior=False, alpha=1.0)
    fast = next(i for i, a in enumerate(p.arms) if arm_label(a) == "N10k10e")
    for i in range(600):
        request = generate(f"r{i}", preference=0.1)
        plan, _ = p.choose(request, CONTEXT)
        latency = 0.5 if p.arms.index(plan) == fast else 6.0
        p.feedback(plan, request, report(f"r{i}", latency=latency))
    picks = [p.arms.index(p.choose(generate(f"t{i}", preference=0.1), CONTEXT)[0]) for i in range(50)]
    assert np.mean(np.asarray(picks) == fast) > 0.9


def test_persists_and_reloads(tmp_path):
    p = planner(tmp_path, save_every=1000)
    for i in range(20):
        request = generate(f"r{i}", preference=i / 20)
        plan, _ = p.choose(request, CONTEXT)
        p.feedback(plan, request, report(f"r{i}", latency=1.0 + i / 10))
    assert not (tmp_path / "bandit.json").exists()  # not yet: save_every
    p.save()
    again = planner(tmp_path)
    np.testing.assert_allclose(again.policy.theta, p.policy.theta, rtol=1e-9, atol=1e-12)
    assert again.policy.updates == 20 and again.learned == 20
    assert again.choose(generate("x"), CONTEXT)[0] == p.choose(generate("x"), CONTEXT)[0]


def test_saves_every_n_updates(tmp_path):
    p = planner(tmp_path)
    p.save_every = 5
    for i in range(5):
        request = generate(f"r{i}")
        plan, _ = p.choose(request, CONTEXT)
        p.feedback(plan, request, report(f"r{i}"))
    doc = json.loads((tmp_path / "bandit.json").read_text())
    assert doc["meta"]["learned"] == 5 and doc["policy"]["updates"] == 5


def test_refuses_a_state_for_other_arms(tmp_path):
    p = planner(tmp_path)
    p.save()
    profile = synthetic_profile(steps=(10, 20))
    with pytest.raises(StateError, match="other arms"):
        BanditPlanner.from_profile(profile, "linucb", tmp_path / "bandit.json")


def test_baseline_planners_and_names():
    assert planner(policy="edge_only").choose(generate(), CONTEXT)[0] == RelayPlan(30, 30, decode_on="edge")
    assert planner(policy="device_only").choose(generate(), CONTEXT)[0] == RelayPlan(30, 0)
    fixed = planner(policy="N20k12")
    assert fixed.choose(generate(), CONTEXT)[0] == RelayPlan(20, 12) and fixed.name == "fixed-N20k12"
    greedy = planner(policy="epsilon_greedy")
    assert isinstance(greedy.policy, EpsilonGreedy) and greedy.name == "epsilon-greedy"
    plan, why = greedy.choose(generate(), CONTEXT)
    Plan(request_id="r1", plan=plan, seed=1, height=512, width=512, scheduler=greedy.name, why=why)
    with pytest.raises(Exception, match="no arm"):
        planner(policy="N20k13")


def test_without_a_profile_quality_comes_from_ratings():
    arms = [RelayPlan(10, 0), RelayPlan(10, 10)]
    b = ContextBuilder(latency_ref_s=10.0, handoff_bytes=10_000, device_step_ref_s=0.2)
    p = BanditPlanner(arms, LinUCB(2, b.dim), 10.0, context_builder=b)
    request = generate()
    plan, _ = p.choose(request, CONTEXT)
    p.feedback(plan, request, report(latency=1.0))
    assert p.quality(plan, 3) == 0.5 and p.policy.updates == 1


@dataclass(frozen=True)
class ContextWithDevice(PlanContext):
    device_step_s: float | None = None


def test_uses_the_device_speed_when_the_context_has_it():
    p = planner()
    slow = ContextWithDevice(0, 0, 0.1, 0.02, 50e6, device_step_s=4 * p.profile.timing.device_step_s)
    request = generate()
    p.choose(request, slow)
    x = p._pending[id(request)][2]
    assert x[list(p.builder.names).index("(1-w)*dev")] == pytest.approx(0.5 * 4)
