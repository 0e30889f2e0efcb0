"""rise-sim on a SYNTHETIC profile (made up here, labelled ``synthetic``; not a measurement)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared.bandit import save_profile
from tests.helpers import run_without_torch, synthetic_profile

REPO = Path(__file__).resolve().parents[2]


def write_synthetic_profile(path: Path, **kw) -> Path:
    save_profile(path, synthetic_profile(**kw))
    return path


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory) -> Path:
    return write_synthetic_profile(tmp_path_factory.mktemp("profile") / "synthetic_profile.json")


@pytest.fixture(scope="module")
def mixed_run(profile_path, tmp_path_factory):
    from lab.simulator import main

    out = tmp_path_factory.mktemp("sim")
    code = main(["--profile", str(profile_path), "--requests", "2500", "--devices", "100", "--scenario", "mixed",
                 "--warmup", "500", "--json", str(out / "sim.json"), "--plots", str(out / "plots")])
    assert code == 0
    return json.loads((out / "sim.json").read_text()), out


def test_json_has_exactly_the_documented_keys(mixed_run):
    data, _ = mixed_run
    assert set(data) == {"policies"}
    names = set(data["policies"])
    assert {"linucb", "oracle", "edge_only", "device_only", "random", "epsilon_greedy"} <= names
    assert {"fixed_k4", "fixed_k8", "fixed_k12", "fixed_k16", "fixed_k20"} <= names  # middle N = 20
    for name, row in data["policies"].items():
        assert set(row) == {"utility", "quality", "latency_mean_s", "latency_p95_s", "regret"}, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
        assert name == "oracle" or row["regret"] >= 0.0


def test_oracle_has_zero_regret_and_linucb_beats_random(mixed_run):
    pol = mixed_run[0]["policies"]
    assert pol["oracle"]["regret"] == 0.0
    assert pol["linucb"]["utility"] > pol["random"]["utility"] + 0.1
    assert pol["linucb"]["regret"] < 0.2 * pol["random"]["regret"]
    assert pol["linucb"]["utility"] > pol["epsilon_greedy"]["utility"]
    assert pol["oracle"]["utility"] >= max(p["utility"] for p in pol.values()) - 0.01


def test_plots_are_written(mixed_run):
    pytest.importorskip("matplotlib")
    _, out = mixed_run
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["latency_quality_mixed.png", "regret_mixed.png"]


def test_without_a_profile_it_says_how_to_make_one(capsys, tmp_path):
    from lab.simulator import main

    assert main(["--profile", str(tmp_path / "none.json"), "--requests", "10", "--warmup", "1"]) == 2
    err = capsys.readouterr().err
    assert "python -m shared.bandit.profile" in err and "rise-eval" in err and "--json eval_nN.json" in err


def test_by_default_it_runs_on_the_demo_familys_shipped_profile(capsys):
    from lab.simulator import DEMO_PROFILE, main

    assert DEMO_PROFILE.is_file()
    assert main(["--requests", "300", "--devices", "20", "--warmup", "100", "--policies", "linucb,oracle"]) == 0
    assert "linucb" in capsys.readouterr().out


def test_fewer_requests_than_the_warmup_is_an_error_not_a_one_request_mean(capsys, profile_path):
    from lab.simulator import main

    assert main(["--profile", str(profile_path), "--requests", "2000"]) == 2  # --warmup defaults to 2000
    assert "must exceed --warmup 2000" in capsys.readouterr().err


@pytest.mark.parametrize("scenario", ["network-drop", "load-spike", "edge-overload"])
def test_scenarios_run_and_linucb_adapts(profile_path, scenario):
    from lab.simulator import SimConfig, Simulation, adaptation

    sim = Simulation(synthetic_profile(), SimConfig(requests=3000, devices=100, scenario=scenario, warmup=300))
    assert sim.world.change_points == [1000, 2000]
    policies = sim.make_policies(["linucb", "oracle", "random"])
    results = {name: sim.run(name, p) for name, p in policies.items()}
    assert results["oracle"].regret.sum() == 0.0
    for change, before, first, second in adaptation(results["linucb"], sim.world.change_points, window=500):
        assert second < 0.05, (scenario, change, before, first, second)  # settled within 500 requests
    assert results["linucb"].regret.sum() < 0.2 * results["random"].regret.sum()


def test_same_seed_same_stream(profile_path):
    from lab.simulator import SimConfig, Simulation

    a = Simulation(synthetic_profile(), SimConfig(requests=400, devices=20, seed=3))
    b = Simulation(synthetic_profile(), SimConfig(requests=400, devices=20, seed=3))
    ra = a.run("linucb", a.make_policies(["linucb"])["linucb"])
    rb = b.run("linucb", b.make_policies(["linucb"])["linucb"])
    np.testing.assert_array_equal(ra.arm, rb.arm)
    np.testing.assert_array_equal(ra.latency, rb.latency)


def test_edge_batching_model():
    from lab.simulator import Edge, batch_step_times

    profile = synthetic_profile()
    T = batch_step_times(profile, 4, beta=0.5)
    assert T[1:] == pytest.approx([0.05, 0.075, 0.1, 0.125])
    done: dict[int, float] = {}
    edge = Edge(T, max_batch=2)
    edge.advance(0.0, done.__setitem__)
    predicted = edge.predict(0.0, 3)
    assert predicted == pytest.approx([0.0, 0.05, 0.1, 0.15])  # alone: single steps
    edge.submit(3, 0)
    edge.submit(1, 1)  # batch of two
    edge.submit(2, 2)  # queued
    f = edge.predict(0.0, 2)  # a fourth request waits for a slot, then shares the batch
    edge.submit(2, 3)
    edge.advance(float("inf"), done.__setitem__)
    assert done[1] == pytest.approx(0.075)  # one step of a 2-batch
    assert done[3] == pytest.approx(f[2])  # the prediction (nobody else came) is what happened
    assert max(done.values()) == done[3] or max(done.values()) == done[2]


def test_simulator_runs_without_torch(profile_path):
    script = (
        "from lab.simulator import main\n"
        f"sys.exit(main(['--profile', {str(profile_path)!r}, '--requests', '300', '--devices', '20', '--warmup', '50',"
        " '--policies', 'linucb,oracle']))\n"
    )
    proc = run_without_torch(script, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "SYNTHETIC PROFILE" in proc.stdout and "linucb" in proc.stdout


def test_the_table_says_how_much_the_oracle_gains_over_the_best_fixed_configuration(profile_path, tmp_path, capsys):
    from lab.simulator import main

    assert main(["--profile", str(profile_path), "--requests", "600", "--devices", "30", "--warmup", "100",
                 "--policies", "linucb,oracle,fixed_k8,fixed_k12", "--json", str(tmp_path / "s.json")]) == 0
    pol = json.loads((tmp_path / "s.json").read_text())["policies"]
    best = max(pol["fixed_k8"]["utility"], pol["fixed_k12"]["utility"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "headroom" in ln)
    assert f"{100 * (pol['oracle']['utility'] - best) / best:+.1f}%" in line
