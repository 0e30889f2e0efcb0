"""The bandit planner behind the daemon's Planner interface (on a SYNTHETIC profile made up in the tests)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest

from shared.bandit import LATENCY_SCALE_S, ContextBuilder, EpsilonGreedy, LinUCB, Observation, StateError, arm_label
from shared.bandit.factored import FactoredLinUCB
from shared.bandit.latency import LATENCY_FEATURES, LATENCY_PRIOR
from shared.bandit.planner import BanditPlanner
from shared.planning import PlanContext, Planner
from shared.prompt_features import prompt_features
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


def spy_outcomes(p: BanditPlanner) -> list:
    """Record every (arm, context, outcome) the planner teaches its policy (and still teach it)."""
    seen: list = []
    update = p.policy.update

    def record(arm, context, outcome):
        seen.append((arm, context, outcome))
        update(arm, context, outcome)

    p.policy.update = record  # type: ignore[method-assign]
    return seen


def test_is_a_planner_and_explains_its_choice():
    p: Planner = planner()  # the daemon's interface (a typing Protocol)
    assert all(callable(getattr(p, m)) for m in ("choose", "feedback", "save")) and p.name == "linucb"
    assert isinstance(p.policy, FactoredLinUCB)  # the served scheduler
    plan, why = p.choose(generate(preference=0.8), CONTEXT)
    assert plan in p.arms
    assert why.startswith(f"linucb: {arm_label(plan)} (edge {plan.split}/{plan.num_inference_steps} steps")
    assert f"best of {len(p.arms)} arms" in why and "preference 0.80, rtt 40 ms" in why
    assert re.search(r"; quality 0\.\d\d, latency \d+\.\d\d s", why)  # the policy's estimates for the arm
    # what the daemon sends must be a valid plan message (scheduler identifier, why length)
    Plan(request_id="r1", plan=plan, seed=1, height=512, width=512, scheduler=p.name, why=why)


def test_honours_a_pin_and_learns_from_it_when_it_is_an_arm():
    p = planner()
    pinned = RelayPlan(20, 12)
    request = generate(pinned=pinned)
    plan, why = p.choose(request, CONTEXT)
    assert plan == pinned and why.startswith("pinned by the client (N20k12)")
    outcomes = spy_outcomes(p)
    p.feedback(plan, request, report(rating=1))
    assert p.policy.updates == 1 and p.policy.ratings[p.arms.index(pinned)] == 1 and p.policy.ratings.sum() == 1
    assert [(arm, o.latency_s) for arm, _, o in outcomes] == [(p.arms.index(pinned), 2.0)]
    # a pin outside the arms is served, not learned from
    odd = RelayPlan(17, 3)
    request = generate("r2", pinned=odd)
    plan, why = p.choose(request, CONTEXT)
    assert plan == odd and "not one of the scheduler's arms" in why
    p.feedback(plan, request, report("r2"))
    assert p.policy.updates == 1


@pytest.mark.parametrize("policy", ["linucb", "linucb_disjoint"])
def test_feedback_updates_with_the_documented_reward(policy):
    p = planner(policy=policy)
    assert p.latency_scale_s == LATENCY_SCALE_S == 10.0  # fixed, not the profile's slowest arm
    request = generate(preference=0.7)
    plan, _ = p.choose(request, CONTEXT)
    arm = p.arms.index(plan)
    context = p._pending[id(request)][2]
    outcomes = spy_outcomes(p)
    p.feedback(plan, request, report(latency=3.0, rating=1))
    assert p.policy.updates == 1 and p.learned == 1
    q = 0.5 * p.profile.quality(plan, 2) + 0.5 * 1.0  # two items, rating +1 halfway
    r = 0.7 * q + 0.3 * (1 - 3.0 / 10.0)  # w q + (1 - w)(1 - L / L_s), L_s = 10 s
    [(learned_arm, learned_context, outcome)] = outcomes
    assert learned_arm == arm and learned_context is context  # the context it was chosen in
    assert outcome.reward == pytest.approx(r) and outcome.quality == pytest.approx(q)
    assert outcome.latency_s == 3.0 and outcome.rated_quality == 1.0
    if policy == "linucb_disjoint":  # the reward enters the arm's regression: b_a += r x
        prior_b = planner(policy=policy).policy.b[arm]
        np.testing.assert_allclose(p.policy.b[arm] - prior_b, r * context.x)
    else:  # the factored one learns the latency (shared) and the rating (the arm's quality) apart
        fresh = planner(policy=policy).policy
        g, lam = fresh.latency_discount, fresh.latency_ridge
        phi = context.latency_x[arm]
        np.testing.assert_allclose(p.policy.b_lat, g * fresh.b_lat + 3.0 * phi + (1 - g) * lam * fresh.latency_prior)
        assert p.policy.ratings[arm] == 1 and p.policy.ratings.sum() == 1
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
    outcomes = spy_outcomes(p)
    p.feedback(plan, request, report(rtt_s=0.05, bandwidth_bps=5e6, device_load=0.2, rating=-1))  # never chosen here
    assert p.policy.updates == 1 and p.policy.ratings[3] == 1 and p.policy.ratings.sum() == 1
    # the context is rebuilt from what the report says of the link and the device (the queue is not known)
    [(arm, context, outcome)] = outcomes
    assert arm == 3 and outcome.latency_s == 2.0 and outcome.rated_quality == 0.0
    features = prompt_features(PROMPT)
    seen = Observation(complexity=features.complexity, preference=0.5, rtt_s=0.05, bandwidth_bps=5e6,
                       device_load=0.2)
    np.testing.assert_allclose(context.latency_x, p.latency_features.build(seen))
    np.testing.assert_allclose(context.x, p.builder.build(seen))
    np.testing.assert_allclose(context.quality_base, [p.profile.quality(a, features.level) for a in p.arms])


@pytest.mark.parametrize("policy, no_prior", [
    ("linucb", {"latency_prior": np.zeros(len(LATENCY_PRIOR))}),  # the served one, knowing nothing of latency
    ("linucb_disjoint", {"prior": False}),
])
def test_learns_to_prefer_the_faster_arm(policy, no_prior):
    """Feedback from a made-up world where only N10k10e is fast: the planner ends up choosing it."""
    p = planner(policy=policy, alpha=1.0, **no_prior)
    fast = next(i for i, a in enumerate(p.arms) if arm_label(a) == "N10k10e")
    assert p.arms.index(p.choose(generate("first", preference=0.1), CONTEXT)[0]) != fast  # not known at first
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
        p.feedback(plan, request, report(f"r{i}", latency=1.0 + i / 10, rating=1 if i % 2 else -1))
    assert not (tmp_path / "bandit.json").exists()  # not yet: save_every
    p.save()
    again = planner(tmp_path)
    assert again.policy.state_dict() == p.policy.state_dict()  # the models and the rng, exactly
    np.testing.assert_allclose(again.policy.beta, p.policy.beta, rtol=1e-9, atol=1e-12)  # the latency learned
    np.testing.assert_allclose(again.policy.theta, p.policy.theta, rtol=1e-9, atol=1e-12)  # the ratings learned
    assert not np.allclose(again.policy.beta, LATENCY_PRIOR)  # (there was something to restore)
    assert again.policy.updates == 20 and again.learned == 20
    assert again.congestion.price == p.congestion.price > 0  # the congestion price comes back too
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
    assert doc["meta"]["price"] == p.congestion.price and doc["features"] == p.feature_spec()


def test_refuses_a_state_for_other_arms(tmp_path):
    p = planner(tmp_path)
    p.save()
    profile = synthetic_profile(steps=(10, 20))
    with pytest.raises(StateError, match="other arms"):
        BanditPlanner.from_profile(profile, "linucb", tmp_path / "bandit.json")
    # the same arms on an edge of another batch size: other feature scales (the saved spec says which)
    with pytest.raises(StateError, match="other context features"):
        planner(tmp_path, edge_capacity=4)
    with pytest.raises(StateError, match="is for 'linucb'"):  # the served scheduler's state is not the disjoint one's
        planner(tmp_path, policy="linucb_disjoint")


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
    b = ContextBuilder(handoff_bytes=10_000, device_step_ref_s=0.2)
    p = BanditPlanner(arms, LinUCB(2, b.dim), None, context_builder=b)
    outcomes = spy_outcomes(p)
    request = generate()
    plan, _ = p.choose(request, CONTEXT)
    p.feedback(plan, request, report(latency=1.0))
    assert p.quality(plan, 3) == 0.5 and p.policy.updates == 1
    request = generate("r2")
    plan, _ = p.choose(request, CONTEXT)
    p.feedback(plan, request, report("r2", latency=1.0, rating=1))
    # unrated: neutral 0.5; rated +1: halfway to 1 (w = 0.5, L = 1 s of L_s = 10 s)
    assert [o.quality for _, _, o in outcomes] == [0.5, 0.75]
    assert [o.reward for _, _, o in outcomes] == pytest.approx([0.5 * 0.5 + 0.5 * 0.9, 0.5 * 0.75 + 0.5 * 0.9])
    # the context's scales come from the builder given (the same defaults from the planner's own arguments)
    assert p.feature_spec() == b.feature_spec()
    own = BanditPlanner(arms, LinUCB(2, b.dim), None, handoff_bytes=10_000, device_step_ref_s=0.2)
    assert own.builder == b and own.congestion is None


@dataclass(frozen=True)
class ContextWithDevice(PlanContext):
    device_step_s: float | None = None


def test_uses_the_device_speed_when_the_context_has_it():
    p = planner()
    slow = ContextWithDevice(0, 0, 0.1, 0.02, 50e6, device_step_s=4 * p.profile.timing.device_step_s)
    request = generate()
    p.choose(request, slow)
    context = p._pending[id(request)][2]
    assert context.x[list(p.builder.names).index("(1-w)*dev")] == pytest.approx(0.5 * 4)
    # the served scheduler's latency features: every arm's device seconds at this device's step time
    request = generate("r2")
    p.choose(request, ContextWithDevice(0, 0, 0.1, 0.02, 50e6))  # no speed in the hello: the profile's device
    reference = p._pending[id(request)][2]
    device = LATENCY_FEATURES.index("device")
    np.testing.assert_allclose(context.latency_x[:, device], 4 * reference.latency_x[:, device])
    assert (reference.latency_x[:, device] > 0).sum() > 0


# --------------------------------------------------------------------------- speculative relay

from shared.planning import speculative_switch, speculative_wanted  # noqa: E402  (this section's rules)


@pytest.mark.parametrize(
    ("own_total", "own_done", "relay_total", "split", "slack", "switch"),
    [
        (20, 0, 20, 10, 0.0, True),  # nothing done yet: the handoff saves 10 steps
        (20, 9, 20, 10, 0.0, True),
        (20, 10, 20, 10, 0.0, True),  # a tie switches: same time, the relay's quality
        (20, 11, 20, 10, 0.0, False),  # finishing alone is one step sooner
        (20, 11, 20, 10, 1.0, True),  # ... unless a step of latency buys the relay's quality
        (20, 20, 20, 10, 0.0, False),  # done: never switch
        (10, 2, 20, 15, 0.0, True),  # different N: 5 relay steps left vs 8 own
        (10, 6, 20, 15, 0.0, False),
    ],
)
def test_the_switch_rule(own_total, own_done, relay_total, split, slack, switch):
    assert speculative_switch(own_total, own_done, relay_total, split, slack_steps=slack) is switch


@pytest.mark.parametrize(("args", "message"), [((20, 21, 20, 10), "own_done"), ((20, 0, 20, 21), "handoff_split"),
                                               ((0, 0, 20, 10), "own_total")])
def test_the_switch_rule_refuses_impossible_counts(args, message):
    with pytest.raises(ValueError, match=message):
        speculative_switch(*args)


@pytest.mark.parametrize(
    ("plan", "forecast", "step", "wanted"),
    [
        (RelayPlan(20, 10), 0.4, 0.2, False),  # handoff in 0.4 s, the device needs 2 s for those steps
        (RelayPlan(20, 10), 0.5, 0.2, True),  # a quarter of the device's time: in doubt, speculate
        (RelayPlan(20, 10), 30.0, 0.2, True),
        (RelayPlan(20, 0), 30.0, 0.2, False),  # device-only: nothing to speculate on
        (RelayPlan(20, 20, decode_on="edge"), 30.0, 0.2, False),  # the edge decodes: no device run to race
        (RelayPlan(20, 10), float("nan"), 0.2, False),  # nothing known: a plain relay
        (RelayPlan(20, 10), 30.0, 0.0, False),
    ],
)
def test_when_the_planner_wants_a_speculative_relay(plan, forecast, step, wanted):
    assert speculative_wanted(plan, forecast, step) is wanted


def test_the_planner_marks_plans_speculative_only_when_the_edge_is_slow_and_learns_the_plain_arm():
    p = planner(policy="N20k8", speculative_ratio=0.5)
    step = p.profile.timing.device_step_s
    light = PlanContext(queue_depth=0, active=0, device_step_s=step, edge_running=(), edge_queued=())
    plan, why = p.choose(generate("r1"), light)
    assert not plan.speculative and "speculative" not in why
    crowd = tuple([20] * 64)
    heavy = PlanContext(queue_depth=64, active=p.edge_capacity, device_step_s=step,
                        edge_running=tuple([20] * p.edge_capacity), edge_queued=crowd)
    request = generate("r2")
    plan, why = p.choose(request, heavy)
    assert plan.speculative and "speculative: handoff in" in why
    assert dataclasses.replace(plan, speculative=False) in p.arms
    seen = spy_outcomes(p)
    p.feedback(plan, request, report("r2", latency=3.0))
    assert [arm for arm, _, _ in seen] == [p.arms.index(dataclasses.replace(plan, speculative=False))]
    assert not planner(policy="N20k8").choose(generate("r3"), heavy)[0].speculative  # off by default
    # a device whose protocol version has no speculative relay gets the plain arm, however slow the edge
    plan, why = p.choose(generate("r4"), dataclasses.replace(heavy, relay_modes=False))
    assert not plan.speculative and plan in p.arms and "speculative" not in why


def test_a_family_still_to_load_is_priced_into_every_arm_and_makes_the_handoff_late():
    p = planner(policy="N20k8", speculative_ratio=0.5)
    step = p.profile.timing.device_step_s
    loaded = PlanContext(queue_depth=0, active=0, device_step_s=step, edge_running=(), edge_queued=())
    cold = dataclasses.replace(loaded, edge_cold_start_s=40 * step)  # the load: longer than the device's 20 steps
    obs_loaded, ctx_loaded = p.context(0.5, 0.5, loaded, level=1)
    obs_cold, ctx_cold = p.context(0.5, 0.5, cold, level=1)
    assert obs_cold.edge_cold_start_s == 40 * step
    wait = LATENCY_FEATURES.index("edge_wait")
    # every arm waits for the load, device-only ones too (the edge encodes the prompt and draws the noise)
    np.testing.assert_allclose(ctx_cold.latency_x[:, wait] - ctx_loaded.latency_x[:, wait], 40 * step)
    others = [i for i in range(len(LATENCY_FEATURES)) if i != wait]
    np.testing.assert_array_equal(ctx_cold.latency_x[:, others], ctx_loaded.latency_x[:, others])
    arm = p.arms.index(RelayPlan(20, 8, p.arms[0].sampler, p.arms[0].guidance_scale))
    assert p.predicted_handoff_s(ctx_cold, arm) == pytest.approx(p.predicted_handoff_s(ctx_loaded, arm) + 40 * step)
    plan, why = p.choose(generate("r1"), loaded)
    assert not plan.speculative
    plan, why = p.choose(generate("r2"), cold)
    assert plan.speculative and "family loading, ~" in why
    # counts alone (an engine that does not project its schedule): the load is priced the same way
    counts = PlanContext(queue_depth=0, active=0, device_step_s=step)
    _, plain = p.context(0.5, 0.5, counts, level=1)
    _, cold_counts = p.context(0.5, 0.5, dataclasses.replace(counts, edge_cold_start_s=3.0), level=1)
    np.testing.assert_allclose(cold_counts.latency_x[:, wait] - plain.latency_x[:, wait], 3.0)
