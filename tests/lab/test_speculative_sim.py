"""The speculative relay in rise-sim's world (the demo profile's quality, the shipped phone hardware)."""

from __future__ import annotations

import pytest

from lab.simulator import DEMO_PROFILE, SimConfig, Simulation, main
from lab.speculative_sim import compare, relay_arm, run_mode
from shared.bandit.profile import load_profile


def sim(rho: float) -> Simulation:
    return Simulation(load_profile(DEMO_PROFILE), SimConfig(requests=2500, warmup=500, hardware="gpu-edge-phones",
                                                            edge_load=rho, seed=3))


def test_under_overload_the_speculative_relay_bounds_latency_by_device_only_and_keeps_quality():
    modes = compare(sim(1.3))["modes"]
    device, relay, spec = modes["device_only"], modes["relay"], modes["speculative"]
    assert relay["latency_p95_s"] > 1.2 * device["latency_p95_s"]  # the plain relay queues (the point of it)
    assert spec["latency_p95_s"] <= 1.1 * device["latency_p95_s"]
    assert spec["quality"] >= device["quality"] and spec["device_won_share"] > 0.5
    assert modes["speculative_planned"]["speculative_share"] > 0.9  # the edge's rule sees the queue


def test_at_light_load_the_planners_rule_keeps_the_relays_quality():
    s = sim(0.2)
    relay, planned = run_mode(s, "relay", relay_arm(s)), run_mode(s, "speculative_planned", relay_arm(s))
    # It still speculates on slow links (a long transfer), where the device seldom has to win.
    assert planned["device_won_share"] < 0.05
    assert planned["quality"] == pytest.approx(relay["quality"], abs=0.01)
    assert planned["latency_p95_s"] <= relay["latency_p95_s"] + 1e-9


def test_rise_sim_speculative_flag_prints_the_comparison(capsys, tmp_path):
    out = tmp_path / "spec.json"
    assert main(["--speculative", "--hardware", "gpu-edge-phones", "--requests", "800", "--warmup", "100",
                 "--edge-load", "1.3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for mode in ("device_only", "relay", "speculative", "speculative_planned"):
        assert mode in text
    assert '"modes"' in out.read_text()
