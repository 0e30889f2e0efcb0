"""rise-sim drives the edge's own planner and reward (on a SYNTHETIC profile made up in the tests).

These tests fail if the simulator grows its own copy of the context, the policy's steps or the
reward formula again: they change or watch the shared code and expect every simulated request
to follow.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from lab.simulator import SimConfig, Simulation
from shared.bandit.planner import BanditPlanner
from shared.planning import PlanContext
from shared.prompt_features import prompt_features
from shared.protocol import Generate, Report
from tests.helpers import synthetic_profile

# the module, not the function of the same name that shared.bandit exports
reward_module = importlib.import_module("shared.bandit.reward")

N = 400


def small_sim(**kw: object) -> Simulation:
    return Simulation(synthetic_profile(), SimConfig(requests=N, devices=20, warmup=50, **kw))  # type: ignore[arg-type]


def test_every_request_goes_through_the_planners_steps(monkeypatch):
    calls: dict[str, list[tuple]] = {"context": [], "select": [], "learn": []}
    for method in calls:
        original = getattr(BanditPlanner, method)

        def spy(self, *args, _original=original, _calls=calls[method], **kwargs):
            out = _original(self, *args, **kwargs)
            _calls.append((self, args, out, kwargs))
            return out

        monkeypatch.setattr(BanditPlanner, method, spy)
    sim = small_sim()
    policies = sim.make_policies(["linucb", "epsilon_greedy", "random", "fixed_k8", "oracle"])
    assert policies["oracle"] is None
    for name, planner in policies.items():
        for c in calls.values():
            c.clear()
        result = sim.run(name, planner)
        if planner is None:
            assert not any(calls.values())  # the oracle is the simulation's own
            continue
        assert isinstance(planner, BanditPlanner)
        assert all(c[0] is planner for cs in calls.values() for c in cs)
        assert len(calls["select"]) == N, name
        chosen = np.asarray([c[2] for c in calls["select"]])
        served = ~result.busy
        np.testing.assert_array_equal(chosen[served], result.arm[served])
        if name == "fixed_k8":  # a fixed arm looks at nothing: no context is built, nothing is learned
            assert not calls["context"] and not calls["learn"], name
            assert (chosen == sim.baselines()["fixed_k8"]).all()
            continue
        assert len(calls["context"]) == N, name
        # each select is given the context built for its request
        assert all(sel[1][0] is ctx[2][1] for sel, ctx in zip(calls["select"], calls["context"], strict=True)), name
        # what the edge would have seen: the request's reported link and load, its device's speed (from its
        # hello), the edge's queue and batch, and the prompt's complexity and level
        for i in (0, 1, N // 2):
            (complexity, preference, seen), kwargs = calls["context"][i][1], calls["context"][i][3]
            assert isinstance(seen, PlanContext)
            assert (complexity, preference, kwargs.get("level")) == (sim.world.complexity[i], sim.world.w[i],
                                                                     sim.world.level[i])
            assert (seen.rtt_s, seen.bandwidth_bps, seen.device_load) == (
                sim.world.rtt_seen[i], sim.world.bandwidth_seen[i], sim.world.load_seen[i])
            assert seen.device_step_s == sim.world.step[i]
        assert calls["context"][0][1][2].queue_depth == calls["context"][0][1][2].active == 0  # the first: idle edge
        # every report that arrived was learned from, with the context it was planned in and the measured
        # latency, through the planner
        learned = calls["learn"]
        assert 0.8 * N < len(learned) <= N and planner.learned == planner.policy.updates == len(learned)
        request_of = {id(c[2][1]): i for i, c in enumerate(calls["context"])}
        assert len({request_of[id(args[1])] for _, args, _, _ in learned}) == len(learned)  # each once
        for _, (arm, context, level, w, latency, rating), _, _ in learned:
            i = request_of[id(context)]
            assert (arm, level, w, latency) == (result.arm[i], sim.world.level[i], sim.world.w[i], result.latency[i])
            assert not result.busy[i] and rating is None  # a busy answer has no report; nobody rates here


def test_the_reward_formula_is_the_shared_one(monkeypatch):
    """Replace the one formula (quality only, latency ignored): the realized utility, the oracle's
    expected utility and what the policies learn all change with it, in the simulator and in
    the daemon's feedback alike."""
    calls = []
    original = reward_module.utility

    def quality_only(preference, quality, latency_s, latency_scale_s):
        calls.append(1)
        return quality + 0.0 * original(preference, quality, latency_s, latency_scale_s)

    monkeypatch.setattr(reward_module, "utility", quality_only)
    sim = small_sim(edge_load=0.2)
    policies = sim.make_policies(["linucb", "oracle", "fixed_k8"])
    taught: list[tuple[int, float]] = []
    lin = policies["linucb"]
    assert lin is not None
    update = lin.policy.update
    lin.policy.update = lambda arm, ctx, outcome: (  # type: ignore[method-assign]
        taught.append((arm, outcome.reward)), update(arm, ctx, outcome))[1]
    results = {name: sim.run(name, p) for name, p in policies.items()}
    # realized utility per policy and request, expected utility (all arms at once) for the oracle and the
    # learning policy (its regret), and the reward of each report linucb learns from
    assert len(calls) >= 3 * N + 2 * N + len(taught)
    for name, result in results.items():
        np.testing.assert_array_equal(result.utility, result.quality, err_msg=name)
    # the oracle now maximizes expected quality alone (nothing turned busy at this load)
    oracle = results["oracle"]
    assert not oracle.busy.any()
    best = sim.expected_quality.max(axis=1)
    np.testing.assert_allclose(sim.expected_quality[np.arange(N), oracle.arm], best)
    # linucb learned the profile's quality (the reward without latency), not the real reward
    assert taught
    for arm, r in taught:
        assert any(r == sim.Q[arm, j] for j in range(sim.Q.shape[1]))
    # and the daemon's feedback goes through the same formula
    planner = BanditPlanner.from_profile(synthetic_profile(), "linucb")
    request = Generate(request_id="r1", prompt="a red sneaker in the top left", preference=0.3)
    plan, _ = planner.choose(request, PlanContext(queue_depth=0, active=0))
    served: list[float] = []
    update2 = planner.policy.update
    planner.policy.update = lambda arm, ctx, outcome: (  # type: ignore[method-assign]
        served.append(outcome.reward), update2(arm, ctx, outcome))[1]
    planner.feedback(plan, request, Report(request_id="r1", device_compute_s=1.0, transfer_s=0.1,
                                           total_latency_s=30.0))
    assert served == [planner.quality(plan, prompt_features(request.prompt).level)]


@pytest.mark.parametrize("policy", ["linucb", "linucb_disjoint"])
@pytest.mark.parametrize("prior_hardware", [None, "profile"])
def test_the_simulated_planner_is_the_one_the_daemon_builds(policy, prior_hardware):
    """The simulator's planner is BanditPlanner.from_profile's, with the daemon's defaults, over the profile
    the planner is given (the world's timing by default, the profile file's own with ``prior_hardware="profile"``)."""
    sim = small_sim(prior_hardware=prior_hardware)
    if prior_hardware == "profile":
        assert sim.planner_profile == synthetic_profile()  # what the daemon loads
    else:
        assert sim.planner_profile == sim.profile  # the world's timing, the profile's quality
    assert sim.planner_profile.arms == synthetic_profile().arms
    simulated = sim.planner(policy)
    served = BanditPlanner.from_profile(sim.planner_profile, policy, edge_capacity=sim.max_batch)
    assert sim.max_batch == 8  # the profile's own world: the hardware's batch
    assert simulated.arms == served.arms and simulated.builder == served.builder
    assert simulated.feature_spec() == served.feature_spec()
    assert simulated.latency_scale_s == served.latency_scale_s == reward_module.LATENCY_SCALE_S
    assert type(simulated.policy) is type(served.policy) and simulated.policy.alpha == served.policy.alpha
    assert simulated.policy.state_dict() == served.policy.state_dict()  # the same prior, the same seed
    assert simulated.congestion == served.congestion and served.congestion is not None  # both priced alike
    # the same request in the same context: choose() and the simulator's steps pick the same arm
    prompt = "a red sneaker in the top left and a blue bag in the middle"
    context = PlanContext(queue_depth=1, active=2, device_load=0.4, rtt_s=0.04, bandwidth_bps=12e6)
    plan, _ = served.choose(Generate(request_id="r1", prompt=prompt, preference=0.6), context)
    features = prompt_features(prompt)
    _, ctx = simulated.context(features.complexity, 0.6, context, level=features.level)
    assert simulated.arms[simulated.select(ctx)] == plan
    assert simulated.congestion == served.congestion  # and the price took in the same queue


@pytest.mark.parametrize("policy", ["random", "epsilon_greedy", "fixed_k8", "device_only", "edge_only"])
def test_baselines_are_planners_too(policy):
    sim = small_sim()
    planner = sim.make_policies([policy])[policy]
    assert isinstance(planner, BanditPlanner) and planner.arms == sim.arms
