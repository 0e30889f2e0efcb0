"""Adaptive arms (N, tau) beside fixed (N, k): labels, grids, profiles, latency features, the planner."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from shared.bandit import FEATURE_NAMES, BanditError, ContextBuilder, Observation, StateError, arm_grid, arm_label
from shared.bandit.latency import LatencyFeatures, batch_step_times
from shared.bandit.planner import BanditPlanner
from shared.bandit.prior import profile_prior
from shared.bandit.profile import ArmQuality, Profile, ProfileError, load_profile, profile_from_eval, save_profile
from shared.planning import PlanContext
from shared.protocol import Generate, Plan, Report, decode_text, encode
from shared.relay_plan import RelayPlan
from tests.helpers import synthetic_profile
from tests.shared.test_bandit import synthetic_eval

TAU_ARMS = (RelayPlan(20, 16, handoff_tau=0.05, min_split=2), RelayPlan(20, 16, handoff_tau=0.1, min_split=2))


def edge_steps_at(level: int, tau: float) -> float:
    """A SYNTHETIC measurement: more items settle later, a looser tau sooner."""
    return round(min(16.0, max(2.0, 2.0 + 1.2 * level - 20 * tau)), 3)


def with_adaptive(profile: Profile, measured: bool = True) -> Profile:
    rows = [ArmQuality(20, 16, tuple(0.9 - 0.01 * lv for lv in profile.levels), tau=arm.handoff_tau, min_split=2,
                       edge_steps=tuple(edge_steps_at(lv, arm.handoff_tau) for lv in profile.levels) if measured
                       else None)
            for arm in TAU_ARMS]
    return dataclasses.replace(profile, arms=(*profile.arms, *rows))


def test_adaptive_arms_have_their_own_labels_and_fixed_ones_keep_theirs():
    assert arm_label(RelayPlan(20, 10)) == "N20k10" and arm_label(RelayPlan(20, 20, decode_on="edge")) == "N20k20e"
    assert arm_label(RelayPlan(20, 19, handoff_tau=0.05)) == "N20t0.05"  # the widest window
    assert arm_label(RelayPlan(20, 12, handoff_tau=0.05, min_split=4)) == "N20k4-12t0.05"
    assert arm_label(RelayPlan(20, 12, handoff_tau=0.125)) == "N20k1-12t0.125"


def test_arm_grid_adds_tau_arms_per_step_count_and_leaves_the_fixed_grid_alone():
    fixed = arm_grid([10, 20])
    assert [arm_label(a) for a in fixed] == ["N10k0", "N10k2", "N10k5", "N10k8", "N10k10", "N10k10e",
                                             "N20k0", "N20k5", "N20k10", "N20k15", "N20k20", "N20k20e"]
    grid = arm_grid([10, 20], taus=(0.1, 0.05))
    labels = [arm_label(a) for a in grid]
    assert labels == [*[arm_label(a) for a in fixed[:6]], "N10t0.05", "N10t0.1",
                      *[arm_label(a) for a in fixed[6:]], "N20t0.05", "N20t0.1"]
    assert all(a.adaptive for a in grid if "t" in arm_label(a))
    windowed = arm_grid([20], (0.0, 1.0), taus=(0.05,), window=(0.1, 0.6), edge_decode=False)
    assert [arm_label(a) for a in windowed] == ["N20k0", "N20k20", "N20k2-12t0.05"]
    assert windowed[-1].first_split == 2 and windowed[-1].split == 12
    assert [arm_label(a) for a in arm_grid([1], (0.0,), taus=(0.05,), edge_decode=False)] == ["N1k0"]  # no room
    with pytest.raises(BanditError, match="taus must be in"):
        arm_grid([20], taus=(0.0,))
    with pytest.raises(BanditError, match="window"):
        arm_grid([20], taus=(0.05,), window=(0.8, 0.2))


def test_a_profile_keeps_adaptive_rows_and_writes_fixed_rows_as_before(tmp_path):
    profile = with_adaptive(synthetic_profile())
    path = tmp_path / "profile.json"
    save_profile(path, profile)
    assert load_profile(path) == profile
    doc = json.loads(path.read_text())
    assert set(doc["arms"][0]) == {"steps", "split", "quality", "frechet"}  # an older reader sees what it knew
    assert doc["arms"][-1]["tau"] == 0.1 and doc["arms"][-1]["min_split"] == 2
    plans = profile.plans()
    assert plans[-2:] == list(TAU_ARMS) and plans[:-2] == synthetic_profile().plans()
    plan = TAU_ARMS[0]
    assert profile.quality(plan, 3) == pytest.approx(0.87)
    assert profile.expected_edge_steps(plan, 9) == edge_steps_at(9, 0.05)
    assert profile.expected_edge_steps(plan) == pytest.approx(np.mean([edge_steps_at(lv, 0.05) for lv in range(1, 10)]))
    assert profile.expected_edge_steps(RelayPlan(20, 10)) == 10.0
    t = profile.timing
    k = profile.expected_edge_steps(plan)
    assert profile.nominal_latency_s(plan) == pytest.approx(
        t.text_encode_s + k * t.edge_step_s + (20 - k) * t.device_step_s + t.device_decode_s)
    unmeasured = with_adaptive(synthetic_profile(), measured=False)
    assert unmeasured.expected_edge_steps(plan, 5) == 9.0  # the middle of [2, 16]
    with pytest.raises(ProfileError, match="no adaptive N=20 k=2-16 tau=0.2"):
        profile.quality(RelayPlan(20, 16, handoff_tau=0.2, min_split=2), 1)


def test_bad_adaptive_rows_are_refused_with_where():
    base = synthetic_profile()
    bad = ArmQuality(20, 16, (0.9,) * 9, tau=0.05, min_split=2, edge_steps=(1.0,) * 9)  # below min_split
    with pytest.raises(ProfileError, match=r"arm N=20 k=2-16 tau=0.05 edge_steps"):
        dataclasses.replace(base, arms=(*base.arms, bad))
    with pytest.raises(ProfileError, match="adaptive arms"):
        dataclasses.replace(base, arms=(*base.arms, ArmQuality(20, 7, (0.9,) * 9, edge_steps=(7.0,) * 9)))
    with pytest.raises(ProfileError, match="min_split"):
        dataclasses.replace(base, arms=(*base.arms, ArmQuality(20, 16, (0.9,) * 9, tau=0.05, min_split=17)))
    doc = with_adaptive(base).to_dict()
    doc["arms"][-1]["window"] = [1, 2]
    with pytest.raises(ProfileError, match="unknown field"):
        Profile.from_dict(doc)


def test_profile_from_eval_reads_tau_rows_and_fits_time_on_the_steps_they_used():
    n20 = synthetic_eval(20)
    n20["adaptive"] = []  # rise-eval --taus writes its rows there; a row with tau among "rows" counts too
    for where, tau, mean in (("rows", 0.05, 9.0), ("adaptive", 0.2, 4.5)):
        by_steps = {str(i): mean - 2 + 0.5 * i for i in range(1, 10)}
        n20[where].append({"k": 16, "tau": tau, "min_split": 2, "adherence": 0.9,
                           "adherence_by_items": {str(i): 0.9 for i in range(1, 10)}, "frechet": 8.0,
                           "edge_steps_mean": mean, "edge_steps_by_items": by_steps,
                           "edge_s": 9.0, "device_s": 9.0})  # not in the time fit: its steps varied
    profile = profile_from_eval([(synthetic_eval(10), 10, "n10"), (n20, None, "n20")],
                                bench={"handoff_bytes": 1000, "image_bytes": 2000})
    assert profile.timing.edge_step_s == pytest.approx(0.04) and profile.timing.device_step_s == pytest.approx(0.2)
    plan = RelayPlan(20, 16, handoff_tau=0.2, min_split=2)
    assert profile.has(plan) and profile.expected_edge_steps(plan, 3) == pytest.approx(4.0)
    assert [arm_label(a) for a in profile.plans(edge_decode=False)][-2:] == ["N20k2-16t0.05", "N20k2-16t0.2"]
    n20["adaptive"][-1]["edge_steps_mean"] = 17.0  # more than the window allows
    with pytest.raises(ProfileError, match="edge_steps_mean"):
        profile_from_eval([(n20, None, "n20")], bench={"handoff_bytes": 1000, "image_bytes": 2000})


def test_latency_features_price_an_adaptive_arm_by_its_expected_edge_steps():
    profile = with_adaptive(synthetic_profile())
    arms = [RelayPlan(20, 10), *TAU_ARMS]
    t = profile.timing
    step = batch_step_times(t.edge_step_s, t.edge_batch_step_s, 4)[1]
    for features, level, k in ((LatencyFeatures(arms, t, 4, profile=profile), 2, edge_steps_at(2, 0.05)),
                               (LatencyFeatures(arms, t, 4, profile=profile), 9, edge_steps_at(9, 0.05)),
                               (LatencyFeatures(arms, t, 4), 9, 9.0)):  # no profile: the window's middle
        out = features.build(Observation(complexity=level / 9, preference=0.5, device_step_s=t.device_step_s))
        names = list(features.names)
        assert out[1, names.index("edge_steps")] == pytest.approx(k * step)
        assert out[1, names.index("device")] == pytest.approx((20 - k) * t.device_step_s + t.device_decode_s)
        assert out[0, names.index("edge_steps")] == pytest.approx(10 * step)  # the fixed arm as before
    # the engine's projected schedule: an expected 5.6 steps finish between the 5th and the 6th step
    lf = LatencyFeatures(arms, t, 4, profile=profile)
    out = lf.build(Observation(complexity=4 / 9, preference=0.5, edge_running=(3,), edge_queued=()))
    k = edge_steps_at(4, 0.05)
    two = batch_step_times(t.edge_step_s, t.edge_batch_step_s, 4)[2]
    finish = [0.0, two, 2 * two, 3 * two, 3 * two + step, 3 * two + 2 * step, 3 * two + 3 * step]
    assert out[1, 3] == pytest.approx(float(np.interp(k, range(len(finish)), finish)))


def test_the_prior_counts_an_adaptive_arms_measured_edge_steps():
    profile = with_adaptive(synthetic_profile())
    arms = profile.plans()
    builder = ContextBuilder.from_profile(profile)
    theta = profile_prior(profile, arms, builder)
    col = {name: i for i, name in enumerate(FEATURE_NAMES)}
    t = profile.timing
    for arm in TAU_ARMS:
        i, k = arms.index(arm), profile.expected_edge_steps(arm)
        assert theta[i, col["1-w"]] == pytest.approx(1.0 - (t.text_encode_s + k * t.edge_step_s) / builder.latency_scale_s)
        device = (20 - k) * t.device_step_s + t.device_decode_s
        per_s = builder.device_step_ref_s / t.device_step_s
        assert theta[i, col["(1-w)*dev"]] == pytest.approx(-device * per_s / builder.latency_scale_s)


def test_the_planner_serves_tau_arms_and_a_fixed_policy_can_name_one():
    profile = with_adaptive(synthetic_profile())
    p = BanditPlanner.from_profile(profile, "linucb")
    assert "N20k2-16t0.05" in p.labels and p.labels[: len(synthetic_profile().plans())] == [
        arm_label(a) for a in synthetic_profile().plans()]
    plan, why = p.choose(Generate("r1", "a red bag in the middle", preference=0.5),
                         PlanContext(queue_depth=0, active=0, device_load=0.1, rtt_s=0.03, bandwidth_bps=20e6))
    assert plan in p.arms and why
    pinned = BanditPlanner.from_profile(profile, "N20k2-16t0.05")
    plan, _ = pinned.choose(Generate("r2", "a red bag"), PlanContext(queue_depth=0, active=0))
    assert plan == TAU_ARMS[0]
    message = Plan("r2", plan, seed=1, height=48, width=48, scheduler=pinned.name, why="w")
    assert decode_text(encode(message)) == message  # the wire carries the adaptive arm as it is
    # the congestion price per edge step charges an adaptive arm its expected steps, not its window's end
    assert p._edge_steps[p.arms.index(TAU_ARMS[0])] == pytest.approx(profile.expected_edge_steps(TAU_ARMS[0]))


#: What the fixed arms of tests.helpers.synthetic_profile() were called before adaptive arms existed.
OLD_LABELS = ["N10k0", "N10k2", "N10k4", "N10k6", "N10k8", "N10k10", "N10k10e",
              "N20k0", "N20k4", "N20k8", "N20k12", "N20k16", "N20k20", "N20k20e",
              "N30k0", "N30k6", "N30k12", "N30k18", "N30k24", "N30k30", "N30k30e"]


def test_state_saved_with_the_old_labels_still_loads(tmp_path):
    state = tmp_path / "bandit.json"
    p = BanditPlanner.from_profile(synthetic_profile(), "linucb", state)
    request = Generate("r1", "a red bag in the middle")
    plan, _ = p.choose(request, PlanContext(queue_depth=0, active=0))
    p.save()
    doc = json.loads(state.read_text())
    assert doc["arms"] == OLD_LABELS
    again = BanditPlanner.from_profile(synthetic_profile(), "linucb", state)
    assert again.policy.state_dict() == p.policy.state_dict()
    # A profile that adds adaptive arms serves other arms: the old state is refused, saying which are new.
    with pytest.raises(StateError, match=r"only here: N20k2-16t0\.05, N20k2-16t0\.1"):
        BanditPlanner.from_profile(with_adaptive(synthetic_profile()), "linucb", state)
    # ... and served with the old arms (arms=...), the same state loads.
    old_arms = with_adaptive(synthetic_profile()).plans()[: len(OLD_LABELS)]
    restored = BanditPlanner.from_profile(with_adaptive(synthetic_profile()), "linucb", state, arms=old_arms)
    assert restored.labels == OLD_LABELS


def test_a_device_without_relay_modes_gets_an_adaptive_arms_fixed_split_and_that_arm_learns():
    profile = with_adaptive(synthetic_profile())
    first_release = PlanContext(queue_depth=0, active=0, device_load=0.1, rtt_s=0.03, bandwidth_bps=20e6,
                                relay_modes=False)
    pinned = BanditPlanner.from_profile(profile, "N20k2-16t0.05")  # a policy that wants an adaptive arm
    assert pinned.choose(Generate("r1", "a red bag"), dataclasses.replace(first_release, relay_modes=True))[0] \
        == TAU_ARMS[0]
    request = Generate("r2", "a red bag")
    plan, why = pinned.choose(request, first_release)
    assert plan == RelayPlan(20, 16) and "N20k2-16t0.05 as N20k16 (the device has no adaptive handoff)" in why
    learned = []
    pinned.learn = lambda arm, *args, **kwargs: learned.append(arm)  # type: ignore[method-assign]
    pinned.feedback(plan, request, Report(request_id="r2", device_compute_s=1.0, transfer_s=0.1,
                                          total_latency_s=2.0))
    assert learned == [pinned.arms.index(RelayPlan(20, 16))]
    plan, _ = pinned.choose(Generate("r3", "a red bag", steps=20), first_release)
    assert plan == RelayPlan(20, 16)
    # a request that pinned a mode is its own: it knows the mode it asked for
    plan, _ = pinned.choose(Generate("r4", "a red bag", pinned=TAU_ARMS[1]), first_release)
    assert plan == TAU_ARMS[1]
