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
    calls: dict[str, list[tuple]] = {"context_vector": [], "select": [], "learn": []}
    for method in calls:
        original = getattr(BanditPlanner, method)

        def spy(self, *args, _original=original, _calls=calls[method], **kwargs):
            out = _original(self, *args, **kwargs)
            _calls.append((self, args, out))
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
        assert len(calls["context_vector"]) == len(calls["select"]) == N, name
        assert all(c[0] is planner for cs in calls.values() for c in cs)
        chosen = np.asarray([c[2] for c in calls["select"]])
        served = ~result.busy
        np.testing.assert_array_equal(chosen[served], result.arm[served])
        # what the edge would have seen: the request's reported link and load and its device's speed
        complexity, preference, seen = calls["context_vector"][0][1]
        assert isinstance(seen, PlanContext)
        assert (complexity, preference) == (sim.world.complexity[0], sim.world.w[0])
        assert seen.rtt_s == sim.world.rtt_seen[0] and seen.device_step_s == sim.world.step_seen[0]
        # every report that arrived was learned from, with the measured latency, through the planner
        learned = calls["learn"]
        assert 0.8 * N < len(learned) <= N and planner.learned == planner.policy.updates == len(learned)
        for _, (arm, _x, level, w, latency), _ in learned[:50]:
            i = next(j for j in range(N) if sim.world.level[j] == level and sim.world.w[j] == w)
            assert (arm, latency) == (result.arm[i], result.latency[i])


def test_the_reward_formula_is_the_shared_one(monkeypatch):
    """Replace the one formula (quality only, latency ignored): the realized utility, the oracle's
    expected utility and what the policies learn all change with it, in the simulator and in
    the daemon's feedback alike."""
    calls = []
    original = reward_module.utility

    def quality_only(preference, quality, latency_s, latency_ref_s):
        calls.append(1)
        return quality + 0.0 * original(preference, quality, latency_s, latency_ref_s)

    monkeypatch.setattr(reward_module, "utility", quality_only)
    sim = small_sim(edge_load=0.2)
    policies = sim.make_policies(["linucb", "oracle", "fixed_k8"])
    taught: list[tuple[int, float]] = []
    lin = policies["linucb"]
    assert lin is not None
    update = lin.policy.update
    lin.policy.update = lambda arm, x, r: (taught.append((arm, r)), update(arm, x, r))[1]  # type: ignore[method-assign]
    results = {name: sim.run(name, p) for name, p in policies.items()}
    assert len(calls) >= 2 * 3 * N  # realized and expected utility, per policy and request, at least
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
    planner.policy.update = lambda arm, x, r: (served.append(r), update2(arm, x, r))[1]  # type: ignore[method-assign]
    planner.feedback(plan, request, Report(request_id="r1", device_compute_s=1.0, transfer_s=0.1,
                                           total_latency_s=30.0))
    assert served == [planner.quality(plan, prompt_features(request.prompt).level)]


def test_the_simulated_planner_is_the_one_the_daemon_builds():
    sim = small_sim()
    simulated = sim.planner("linucb")
    served = BanditPlanner.from_profile(synthetic_profile(), "linucb", edge_capacity=sim.config.max_batch)
    assert simulated.arms == served.arms and simulated.builder == served.builder
    assert simulated.latency_ref_s == served.latency_ref_s == sim.latency_ref
    assert type(simulated.policy) is type(served.policy) and simulated.policy.alpha == served.policy.alpha
    np.testing.assert_array_equal(simulated.policy.theta, served.policy.theta)  # the same profile prior
    # the same request in the same context: choose() and the simulator's steps pick the same arm
    prompt = "a red sneaker in the top left and a blue bag in the middle"
    context = PlanContext(queue_depth=1, active=2, device_load=0.4, rtt_s=0.04, bandwidth_bps=12e6)
    plan, _ = served.choose(Generate(request_id="r1", prompt=prompt, preference=0.6), context)
    _, x = simulated.context_vector(prompt_features(prompt).complexity, 0.6, context)
    assert simulated.arms[simulated.select(x)] == plan


@pytest.mark.parametrize("policy", ["random", "epsilon_greedy", "fixed_k8", "device_only", "edge_only"])
def test_baselines_are_planners_too(policy):
    sim = small_sim()
    planner = sim.make_policies([policy])[policy]
    assert isinstance(planner, BanditPlanner) and planner.arms == sim.arms
