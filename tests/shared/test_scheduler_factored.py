"""The served scheduler's parts: latency features, the congestion price and the factored LinUCB.

They are pure numpy: these tests drive them with hand-built contexts and check what a user of the
scheduler relies on (it predicts latency from the arithmetic it is told, learns it for every arm
from any arm's reports, learns quality only from ratings, forgets, charges for congestion and
restores exactly), not how it is written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.bandit import BanditError, Context, Observation, Outcome, StateError, Timing
from shared.bandit.congestion import CongestionPrice
from shared.bandit.factored import FactoredLinUCB, quality_features
from shared.bandit.latency import LATENCY_FEATURES, LATENCY_PRIOR, LatencyFeatures, batch_step_times, edge_schedule
from shared.bandit.planner import BanditPlanner
from shared.bandit.reward import LATENCY_SCALE_S
from shared.planning import PlanContext
from shared.protocol import Generate, Report
from shared.relay_plan import RelayPlan
from tests.helpers import synthetic_profile

TIMING = Timing(edge_step_s=0.05, device_step_s=0.25, edge_decode_s=0.04, device_decode_s=0.3,
                handoff_bytes=300_000, image_bytes=400_000, text_encode_s=0.01,
                edge_batch_step_s={1: 0.05, 4: 0.09, 8: 0.17})
ARMS = [RelayPlan(20, 0), RelayPlan(20, 10), RelayPlan(20, 20), RelayPlan(20, 20, decode_on="edge")]
COL = {name: i for i, name in enumerate(LATENCY_FEATURES)}


def features(**obs: object) -> np.ndarray:
    o = Observation(complexity=0.5, preference=0.5, **obs)  # type: ignore[arg-type]
    return LatencyFeatures(ARMS, TIMING, capacity=8).build(o)


# ---------------------------------------------------------------------- latency features


def test_batch_step_times_interpolate_extrapolate_or_take_the_unmeasured_model():
    t = batch_step_times(0.05, {1: 0.05, 4: 0.09, 8: 0.17}, 10)
    assert t[0] == 0.0 and t[1] == 0.05 and t[4] == 0.09 and t[8] == 0.17
    assert t[2] == pytest.approx(0.05 + 0.04 / 3)
    assert t[10] == pytest.approx(0.17 + 2 * 0.08 / 4)  # the last segment's slope, on
    assert batch_step_times(0.05, None, 3, beta=0.5) == pytest.approx([0.0, 0.05, 0.075, 0.1])
    with pytest.raises(BanditError, match="max_batch"):
        batch_step_times(0.05, None, 0)


def test_the_prior_predicts_the_arithmetic_of_an_idle_edge():
    """beta_0 . phi is the latency the profile's arithmetic gives: nothing learned yet."""
    phi = features(rtt_s=0.04, bandwidth_bps=10e6, device_load=0.0, device_step_s=0.5)
    predicted = phi @ np.asarray(LATENCY_PRIOR)
    for arm, got in zip(ARMS, predicted, strict=True):
        payload = TIMING.image_bytes if arm.decode_on == "edge" else TIMING.handoff_bytes
        edge = TIMING.text_encode_s + arm.split * 0.05 + (TIMING.edge_decode_s if arm.decode_on == "edge" else 0.0)
        # the device is twice the reference's step: its decode scales with it
        device = 2 * (arm.device_steps * TIMING.device_step_s + (TIMING.device_decode_s if arm.decode_on == "device"
                                                                  else 0.0))
        assert got == pytest.approx(edge + 0.04 + 8 * payload / 10e6 + device)


def test_a_busy_edge_shows_in_the_edge_arms_only():
    idle, busy = features(), features(active=8, queue_depth=12)
    assert (idle[:, COL["edge_wait"]] == 0).all()
    assert busy[0, COL["edge_wait"]] == 0 and (busy[1:, COL["edge_wait"]] > 0).all()
    # a fuller batch: every edge step is the batched step of 8 requests, not of 1
    assert busy[1, COL["edge_steps"]] == pytest.approx(10 * 0.17)
    assert idle[1, COL["edge_steps"]] == pytest.approx(10 * 0.05)


def test_with_the_engines_batch_and_queue_the_edge_time_is_its_projected_schedule():
    """Two requests in the batch with 3 and 12 steps left, one queued with 10: a request planned now
    waits for a slot (capacity 2 here) and shares batches; its k-th step ends when edge_schedule says."""
    lf = LatencyFeatures(ARMS, TIMING, capacity=2)
    obs = Observation(complexity=0.5, preference=0.5, queue_depth=1, active=2, edge_running=(3, 12), edge_queued=(10,))
    phi = lf.build(obs)
    finish = edge_schedule(lf.T, (3, 12), (10,), 20)
    assert phi[1, COL["edge_steps"]] == pytest.approx(finish[10])
    assert phi[2, COL["edge_steps"]] == pytest.approx(finish[20])
    assert (phi[:, COL["edge_wait"]] == 0).all() and phi[0, COL["edge_steps"]] == 0.0
    # it waits its turn: the first free slot (after 3 steps) goes to the queued one, the next when the
    # 12-step request ends; then it shares the batch: its first step ends after 13 batched steps
    assert finish[1] == pytest.approx(13 * lf.T[2])
    assert edge_schedule(lf.T, (), (), 3) == pytest.approx([0.0, lf.T[1], 2 * lf.T[1], 3 * lf.T[1]])  # alone


def test_more_requests_running_than_one_call_holds_take_several_calls_per_step():
    """The engine admits requests up to its rows, two rows each under guidance: the planner's capacity in
    requests can be below what runs. That once raised IndexError in the served path; now each step of
    the over-full batch costs a full call per capacity's worth, and the planned request waits for a slot."""
    lf = LatencyFeatures(ARMS, TIMING, capacity=2)
    finish = edge_schedule(lf.T, (5, 5, 5, 5), (), 3)  # four running, capacity two: two calls a step
    assert finish[1] == pytest.approx(5 * 2 * lf.T[2] + lf.T[1])  # it joins when they are done
    phi = lf.build(Observation(complexity=0.5, preference=0.5, queue_depth=0, active=4, edge_running=(5, 5, 5, 5)))
    assert np.isfinite(phi).all()


def test_a_link_that_drops_is_priced_through_the_transfer_not_clipped_away():
    fine, dropped = features(bandwidth_bps=20e6), features(bandwidth_bps=50e3)
    assert dropped[1, COL["transfer"]] == pytest.approx(8 * 300_000 / 50e3)  # 48 s: still linear
    assert dropped[1, COL["transfer"]] == pytest.approx(400 * fine[1, COL["transfer"]])
    absurd = features(bandwidth_bps=0.0)  # one bit per second at worst; then the clip
    assert np.isfinite(absurd).all() and absurd.max() <= 3600.0


# ---------------------------------------------------------------------- congestion price


def test_the_price_is_zero_on_an_idle_edge_and_rises_as_the_batch_fills():
    price = CongestionPrice(batch_step_times(0.05, {1: 0.05, 4: 0.09, 8: 0.17}, 8))
    for _ in range(200):
        price.observe(queue_depth=0, active=0, preference=0.0)
    assert price.price == 0.0
    # 6 in the batch: each of their steps gets T[7] - T[6] longer per extra request-step
    delay = price.delay_s(queue_depth=0, active=6)
    assert delay == pytest.approx(6 * 0.02)
    for _ in range(400):
        price.observe(queue_depth=0, active=6, preference=0.0)
    assert price.price == pytest.approx(1.0 * delay / LATENCY_SCALE_S, rel=1e-2)  # users who all want speed
    queued = price.delay_s(queue_depth=16, active=8)
    assert queued == pytest.approx(16 * 0.17 / 8)  # a full batch: the queue waits for slots
    for _ in range(400):
        price.observe(queue_depth=0, active=0, preference=0.0)
    assert price.price < 1e-6  # and it decays once the edge is idle again


def test_quality_lovers_pay_less_in_utility_terms():
    T = batch_step_times(0.05, {1: 0.05, 8: 0.4}, 8)
    speed, quality = CongestionPrice(T), CongestionPrice(T)
    for _ in range(500):
        speed.observe(0, 6, preference=0.0)
        quality.observe(0, 6, preference=1.0)
    assert quality.price < 0.01 * speed.price


def test_bad_congestion_settings_are_refused():
    with pytest.raises(BanditError):
        CongestionPrice([0.0])
    with pytest.raises(BanditError):
        CongestionPrice([0.0, 0.1], smoothing=2.0)


# ---------------------------------------------------------------------- the factored LinUCB


def context(phi: np.ndarray, *, w: float = 0.0, c: float = 0.5, base: np.ndarray | None = None,
            penalty: np.ndarray | None = None) -> Context:
    n = phi.shape[0]
    return Context(np.zeros(1), w, quality_features(c), np.full(n, 0.8) if base is None else base, phi, penalty)


def test_untrained_it_ranks_arms_as_the_profile_and_arithmetic_do():
    policy = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES), alpha=0.0)
    phi = features(device_step_s=1.0)  # a slow device: the edge is much faster
    fastest = int(np.argmin(phi @ np.asarray(LATENCY_PRIOR)))
    assert policy.select(context(phi, w=0.0)) == fastest
    base = np.asarray([0.70, 0.90, 0.95, 0.95])
    best = policy.select(context(phi, w=1.0, base=base))
    assert base[best] == base.max()


def test_one_arms_reports_teach_every_arm_its_latency():
    """Devices are 3x slower than their hello says; only device-only requests are reported.
    The shared model still moves the prediction of the relay arm, never played."""
    policy = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES), alpha=0.0)
    rng = np.random.default_rng(0)
    truth_beta = np.asarray(LATENCY_PRIOR)
    truth_beta[COL["device"]] = 3.0
    for _ in range(300):
        phi = features(device_step_s=float(rng.uniform(0.1, 0.5)), rtt_s=float(rng.uniform(0.01, 0.1)),
                       bandwidth_bps=float(rng.uniform(5e6, 50e6)), device_load=0.0)
        latency = float(phi[0] @ truth_beta)
        policy.update(0, context(phi), Outcome(0.5, latency, 0.8))
    phi = features(device_step_s=0.3, device_load=0.0)
    _, _, predicted, _ = policy.predict(context(phi))
    truth = phi @ truth_beta
    prior = phi @ np.asarray(LATENCY_PRIOR)
    assert abs(predicted[1] - truth[1]) < 0.2 * abs(prior[1] - truth[1])  # the relay arm, k = 10


def test_quality_moves_with_ratings_only():
    policy = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES), alpha=0.0, quality_strength=10.0)
    phi = features()
    ctx = context(phi, w=1.0)
    for _ in range(100):
        policy.update(1, ctx, Outcome(0.5, 3.0, 0.8))  # unrated: nothing new about quality
    assert policy.predict(ctx)[0][1] == pytest.approx(0.8)
    for _ in range(200):
        policy.update(1, ctx, Outcome(0.5, 3.0, 0.8, rated_quality=0.0))  # users dislike arm 1
    q = policy.predict(ctx)[0]
    assert q[1] < 0.2 and q[0] == pytest.approx(0.8)  # the other arms keep the profile's
    assert policy.ratings[1] == 200


def test_it_forgets_an_old_world():
    """A device that got 2x slower: the discounted model follows within a few windows, the
    undiscounted one keeps averaging the old evidence in."""
    phi = features(device_step_s=0.25, device_load=0.0)
    prior = np.asarray(LATENCY_PRIOR)

    def trained(discount: float) -> float:
        policy = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES), alpha=0.0, latency_discount=discount)
        for _ in range(3000):
            policy.update(0, context(phi), Outcome(0.5, float(phi[0] @ prior), 0.8))
        slower = prior.copy()
        slower[COL["device"]] = 2.0
        for _ in range(2500):  # five windows of 1 / (1 - 0.998): 0.998^2500 = 0.7% of the old left
            policy.update(0, context(phi), Outcome(0.5, float(phi[0] @ slower), 0.8))
        return float(policy.predict(context(phi))[2][0] / (phi[0] @ slower))

    assert trained(0.998) == pytest.approx(1.0, abs=0.02)
    assert trained(1.0) < 0.9


def test_the_congestion_penalty_moves_the_choice_to_the_device():
    policy = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES), alpha=0.0)
    phi = features(device_step_s=0.3)
    free = policy.select(context(phi, w=0.0))
    assert ARMS[free].split > 0
    k = np.asarray([a.split for a in ARMS], dtype=float)
    assert policy.select(context(phi, w=0.0, penalty=0.05 * k)) == 0


def test_state_round_trip_and_corrupt_state():
    policy = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES), seed=3)
    rng = np.random.default_rng(1)
    for i in range(50):
        phi = features(device_step_s=float(rng.uniform(0.1, 0.5)))
        policy.update(i % 4, context(phi), Outcome(0.5, float(rng.uniform(1, 5)), 0.8,
                                                   rated_quality=float(rng.integers(2))))
    state = json.loads(json.dumps(policy.state_dict()))
    restored = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES), seed=9)
    restored.load_state_dict(state)
    probe = context(features(device_step_s=0.3), w=0.4)
    np.testing.assert_allclose(restored.scores(probe), policy.scores(probe), rtol=1e-9)
    bad = dict(state, A_lat=[[0.0] * len(LATENCY_FEATURES)] * len(LATENCY_FEATURES))
    with pytest.raises(StateError, match="singular"):
        FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES)).load_state_dict(bad)
    with pytest.raises(StateError, match="A_q"):
        FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES)).load_state_dict(dict(state, A_q=[1, 2]))


def test_a_context_without_its_parts_is_refused():
    policy = FactoredLinUCB(len(ARMS), len(LATENCY_FEATURES))
    with pytest.raises(BanditError, match="latency and quality"):
        policy.select(Context.of(np.zeros(3)))
    with pytest.raises(BanditError, match="shape"):
        policy.select(context(features()[:2]))


# ---------------------------------------------------------------------- in the planner


def test_the_planner_charges_a_busy_edge_and_keeps_the_price_across_a_restart(tmp_path):
    state = tmp_path / "bandit.json"
    planner = BanditPlanner.from_profile(synthetic_profile(), "linucb", state, edge_capacity=4)
    assert planner.congestion is not None and planner.congestion.price == 0.0
    request = Generate(request_id="r1", prompt="a red circle", preference=0.2)
    for _ in range(100):
        planner.choose(request, PlanContext(queue_depth=6, active=4, rtt_s=0.03, bandwidth_bps=20e6))
    plan, why = planner.choose(request, PlanContext(queue_depth=6, active=4, rtt_s=0.03, bandwidth_bps=20e6))
    assert planner.congestion.price > 0
    if plan.split:
        assert "congestion" in why
    planner.feedback(plan, request, Report(request_id="r1", device_compute_s=1.0, transfer_s=0.1, total_latency_s=2.0))
    planner.save()
    price = planner.congestion.price
    again = BanditPlanner.from_profile(synthetic_profile(), "linucb", state, edge_capacity=4)
    assert again.congestion is not None and again.congestion.price == pytest.approx(price)
    assert again.policy.updates == planner.policy.updates == 1


def test_the_baselines_pay_no_price_and_the_price_can_be_turned_off():
    profile = synthetic_profile()
    assert BanditPlanner.from_profile(profile, "random").congestion is None
    assert BanditPlanner.from_profile(profile, "N20k8").congestion is None
    assert BanditPlanner.from_profile(profile, "linucb", congestion=False).congestion is None
    assert BanditPlanner.from_profile(profile, "linucb_disjoint").congestion is not None
