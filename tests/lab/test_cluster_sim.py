"""``rise-sim --edges``: the cluster world, its routers and the routing table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_server.cluster import routing_cost
from lab.cluster_sim import ROUTERS, ClusterSimConfig, main, routing_table, run_cluster
from lab.simulator import DEMO_PROFILE, Simulation
from shared.bandit import BanditError, load_profile
from shared.bandit.latency import batch_step_times


@pytest.fixture(scope="module")
def profile():
    return load_profile(DEMO_PROFILE)


def _sim(profile, edges: int, per_edge: int = 120, load: float = 0.9, seed: int = 0) -> Simulation:
    config = ClusterSimConfig(edges=edges, requests_per_edge=per_edge, edge_load=load, hardware="gpu-edge-phones",
                              seed=seed)
    return Simulation(profile, config.sim_config())


def test_the_world_scales_with_the_edges(profile):
    one, four = _sim(profile, 1), _sim(profile, 4)
    assert four.config.requests == 4 * one.config.requests and four.config.devices == 4 * one.config.devices
    # arrivals four times as fast: the load per edge is the same
    assert np.median(np.diff(four.world.t)) < 0.5 * np.median(np.diff(one.world.t))


def test_on_one_edge_every_router_is_the_same(profile):
    sim = _sim(profile, 1, per_edge=200)
    rows = [run_cluster(sim, 1, router) for router in ROUTERS]
    assert all(row == rows[0] for row in rows)


def test_routing_by_load_beats_random_routing_at_high_load(profile):
    sim = _sim(profile, 8, per_edge=150)
    random_row = run_cluster(sim, 8, "random")
    for router in ("least_loaded", "planner_aware"):
        row = run_cluster(sim, 8, router)
        assert row["latency_p95_s"] < random_row["latency_p95_s"], router
        assert row["utility"] > random_row["utility"], router


def test_routing_cost_prefers_the_edge_that_finishes_sooner_and_counts_the_harm_of_joining():
    table = batch_step_times(0.1, None, 4, beta=0.5)
    assert routing_cost(table, [], [], 5) == pytest.approx(0.5)  # idle: its own five steps
    assert routing_cost(table, [1], [], 5) < routing_cost(table, [9, 9, 9], [], 5)
    # joining a request with five steps left: both take five steps of T[2], and its five steps cost that one
    # T[2] - T[1] each
    assert routing_cost(table, [5], [], 5) == pytest.approx(5 * table[2] + 5 * (table[2] - table[1]))
    assert routing_cost(table, [9, 9, 9, 9], [3], 2) > routing_cost(table, [9, 9, 9, 9], [], 2)  # a queue waits


def test_the_table_and_its_json(tmp_path, capsys):
    out = tmp_path / "cluster_sim.json"
    assert main(["--edges", "2,4", "--requests-per-edge", "60", "--hardware", "gpu-edge-phones",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["routing"]) == {"2", "4"}
    for rows in data["routing"].values():
        assert set(rows) == set(ROUTERS)
        for row in rows.values():
            assert row["latency_p95_s"] >= row["latency_mean_s"] > 0 and 0 <= row["utility"] <= 1
    assert "planner_aware" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["--edges", "2", "--routers", "fastest"]) == 2
    assert "unknown router 'fastest'" in capsys.readouterr().err
    with pytest.raises(BanditError):
        routing_table(DEMO_PROFILE, ClusterSimConfig(), [0])


def test_rise_sim_with_edges_runs_the_cluster_world(tmp_path):
    from lab.cluster_sim import rise_sim  # the rise-sim entry point

    out = tmp_path / "table.json"
    assert rise_sim(["--edges", "2", "--routers", "power_of_two,planner_aware", "--requests-per-edge", "40",
                     "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["routing"]["2"]) == {"power_of_two", "planner_aware"}
    with pytest.raises(SystemExit):  # without --edges it is the one-edge rise-sim
        rise_sim(["--help"])
