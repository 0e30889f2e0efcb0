"""rise-sim in a realistic world: a GPU edge and phones (lab/hardware_profiles), a congestion price,
ratings around a quality the prior does not know, figures over seeds.

The runs are small (a few thousand requests on the demo family's measured profile); the closing
figures come from bench/sim_suite.py at 20,000 requests x 500 devices x 5 seeds.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lab.simulator import (
    DEMO_PROFILE,
    SimConfig,
    Simulation,
    aggregate,
    main,
    sustained_load,
)
from shared.bandit import load_profile


@pytest.fixture(scope="module")
def profile():
    return load_profile(DEMO_PROFILE)


def middle(sim: Simulation) -> list[str]:
    return [name for name in sim.baselines() if "_n" not in name]  # the fixed arms at the middle N


def test_a_hardware_profile_replaces_the_times_and_keeps_the_quality(profile):
    sim = Simulation(profile, SimConfig(requests=300, devices=50, warmup=50, hardware="gpu-edge-phones"))
    assert sim.max_batch == 16 and sim.T[1] == pytest.approx(0.046168)
    steps = {t.step_s.value for t in sim.hardware.tiers}
    assert set(np.unique(sim.world.step)) <= steps
    np.testing.assert_array_equal(sim.Q, profile.quality_table(sim.arms))
    demo = Simulation(profile, SimConfig(requests=300, devices=50, warmup=50))
    assert demo.T[1] == pytest.approx(profile.timing.edge_step_s)  # without --hardware: the profile's own


def test_under_load_the_priced_oracle_beats_the_myopic_one(profile):
    """The world has the externality the price is for: at rho 1.3 a myopic optimum per request
    overloads the GPU edge, and charging each edge step its delay to the others pays."""
    sim = Simulation(profile, SimConfig(requests=3000, devices=200, warmup=500, hardware="gpu-edge-phones",
                                        edge_load=1.3))
    results = sim.run_all(["oracle", "oracle_priced"])
    myopic, priced = (results[n].summary(500)["utility"] for n in ("oracle", "oracle_priced"))
    assert priced > myopic + 0.03
    assert results["oracle_priced"].price is not None and results["oracle_priced"].price.max() > 0


def test_linucb_takes_most_of_the_headroom_under_load(profile):
    sim = Simulation(profile, SimConfig(requests=5000, devices=300, warmup=1000, hardware="gpu-edge-phones",
                                        edge_load=1.0))
    results = sim.run_all(["linucb", "oracle_priced", *middle(sim)])
    u = {name: r.summary(1000)["utility"] for name, r in results.items()}
    best_fixed = max(middle(sim), key=u.__getitem__)
    headroom = u["oracle_priced"] - u[best_fixed]
    assert headroom > 0.03
    assert u["linucb"] - u[best_fixed] > 0.7 * headroom


def test_without_the_price_linucb_overloads_the_edge(profile):
    base = SimConfig(requests=4000, devices=300, warmup=1000, hardware="gpu-edge-phones", edge_load=1.3)
    priced = Simulation(profile, base).run_all(["linucb"])["linucb"].summary(1000)
    unpriced = Simulation(profile, SimConfig(**{**vars(base), "congestion": False})).run_all(["linucb"])
    free = unpriced["linucb"].summary(1000)
    assert priced["utility"] > free["utility"] + 0.02
    assert "price_mean" in priced and "price_mean" not in free


def test_ratings_teach_a_quality_the_profile_does_not_know(profile):
    """The small model is worse than the profile says (true quality - 0.3 x device share); half the
    users rate. Learning quality from ratings moves steps back to the edge; the profile alone cannot."""
    sim = Simulation(profile, SimConfig(requests=5000, devices=300, warmup=1000, quality_shift=0.3, rating_rate=0.5))
    results = sim.run_all(["linucb", "linucb_no_ratings"])
    learned, fixed = results["linucb"], results["linucb_no_ratings"]
    assert learned.summary(1000)["utility"] > fixed.summary(1000)["utility"] + 0.01
    assert learned.summary(1000)["quality"] > fixed.summary(1000)["quality"] + 0.03
    later = slice(3000, None)
    assert sim.k[learned.arm[later]].mean() > sim.k[fixed.arm[later]].mean()


def test_a_cold_start_on_another_machines_timing_still_beats_the_best_fixed_arm(profile):
    config = SimConfig(requests=2000, devices=300, warmup=0, hardware="gpu-edge-phones", prior_hardware="profile",
                       edge_load=1.0)
    sim = Simulation(profile, config)
    assert sim.planner_profile.timing.edge_step_s == profile.timing.edge_step_s != sim.profile.timing.edge_step_s
    results = sim.run_all(["linucb", *middle(sim)])
    u = {name: r.summary(0)["utility"] for name, r in results.items()}
    assert u["linucb"] > max(u[n] for n in middle(sim))


def test_aggregate_gives_intervals_headroom_and_shares():
    per_seed = [
        {"fixed_k2": {"utility": 0.50}, "fixed_k4": {"utility": 0.55}, "oracle_priced": {"utility": 0.65},
         "linucb": {"utility": 0.62}},
        {"fixed_k2": {"utility": 0.52}, "fixed_k4": {"utility": 0.57}, "oracle_priced": {"utility": 0.69},
         "linucb": {"utility": 0.66}},
    ]
    figures = aggregate(per_seed)
    assert figures["best_fixed"] == "fixed_k4" and figures["reference"] == "oracle_priced"
    assert figures["headroom"]["mean"] == pytest.approx(0.11)
    lin = figures["policies"]["linucb"]
    assert lin["utility"] == pytest.approx(0.64)
    assert lin["utility_ci95"] == pytest.approx(12.706 * np.std([0.62, 0.66], ddof=1) / math.sqrt(2))
    assert lin["vs_best_fixed"] == pytest.approx(0.08)
    assert lin["vs_best_fixed_ci95"] == pytest.approx(12.706 * np.std([0.07, 0.09], ddof=1) / math.sqrt(2))
    assert lin["headroom_share"] == pytest.approx(0.08 / 0.11)
    assert figures["headroom"]["percent_of_best_fixed"] == pytest.approx(100 * 0.11 / 0.56)


def test_sustained_load_is_the_highest_load_within_the_p95_target(profile):
    config = SimConfig(requests=1500, devices=200, warmup=300, hardware="gpu-edge-phones")
    got = sustained_load(profile, config, ["edge_only_n10", "device_only"], [0.3, 3.0], seeds=1)
    # 3 x the edge's capacity: it turns requests away and the phones run them, slowly
    assert got["edge_only_n10"] == 0.3
    assert got["device_only"] is None  # a phone alone takes more than 5 s at the 95th percentile


def test_the_command_reports_seeds_intervals_sources_and_adaptation(tmp_path, capsys):
    out = tmp_path / "sim.json"
    code = main(["--requests", "900", "--devices", "100", "--warmup", "150", "--seeds", "2",
                 "--hardware", "gpu-edge-phones", "--scenario", "network-drop", "--edge-load", "0.8",
                 "--policies", "linucb,oracle_priced,edge_only,fixed_k10", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "gpu-edge-phones: 3 published" in text and "+-" in text and "network drop" in text
    doc = json.loads(out.read_text())
    assert len(doc["per_seed"]) == 2 and doc["hardware"] == "gpu-edge-phones"
    assert any("[published]" in line for line in doc["hardware_sources"])
    figures = doc["figures"]
    assert set(figures["policies"]["linucb"]) >= {"utility", "utility_ci95", "vs_best_fixed", "latency_p95_s",
                                                  "quality", "phases"}
    assert [row["label"] for row in figures["adaptation"]] == ["network drop", "network back"]


def test_bad_settings_get_one_clear_line(capsys):
    assert main(["--requests", "500", "--warmup", "100", "--hardware", "no-such-machine"]) == 2
    assert "no-such-machine" in capsys.readouterr().err
    assert main(["--requests", "500", "--warmup", "100", "--rating-rate", "2"]) == 2
    assert "--rating-rate" in capsys.readouterr().err
    assert main(["--requests", "500", "--warmup", "100", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
