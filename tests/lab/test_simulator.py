"""rise-sim on a SYNTHETIC profile (made up here, labelled ``synthetic``; not a measurement)."""

from __future__ import annotations

import dataclasses
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


FIXED = {"edge_only", "device_only", "fixed_k4", "fixed_k8", "fixed_k12", "fixed_k16", "fixed_k20"}  # middle N = 20
PRICED = {"linucb", "linucb_disjoint", "oracle_priced"}  # the policies that pay the congestion price
SUMMARY = {"utility", "quality", "latency_mean_s", "latency_p95_s", "regret_per_request", "busy_share"}


def is_fixed(name: str) -> bool:
    """Every arm as a fixed baseline: at the middle N the names of FIXED, at another N with ``_n<N>``."""
    return name.startswith(("edge_only", "device_only", "fixed_k"))


def test_json_has_exactly_the_documented_keys(mixed_run):
    from lab.simulator import SimConfig

    data, _ = mixed_run
    assert set(data) == {"config", "hardware", "hardware_sources", "figures", "per_seed"}
    # the configuration the run used, every field of it
    assert set(data["config"]) == {f.name for f in dataclasses.fields(SimConfig)}
    assert (data["config"]["requests"], data["config"]["devices"], data["config"]["warmup"]) == (2500, 100, 500)
    assert data["config"]["scenario"] == "mixed" and data["config"]["congestion"] is True
    assert isinstance(data["hardware"], str) and data["hardware"]
    assert data["hardware_sources"] and all(isinstance(line, str) and line for line in data["hardware_sources"])
    # one seed: its per-policy summaries (regret: None for the fixed arms, not computed)
    [seed] = data["per_seed"]
    names = set(seed)
    assert {"linucb", "linucb_disjoint", "oracle", "oracle_priced", "queue_threshold", "random",
            "epsilon_greedy"} | FIXED <= names
    for name, row in seed.items():
        assert set(row) == SUMMARY | ({"price_mean"} if name in PRICED else set()), name
        assert (row["regret_per_request"] is None) == is_fixed(name), name
        assert all(isinstance(v, float) and math.isfinite(v) for v in row.values() if v is not None), name
        assert is_fixed(name) or row["regret_per_request"] >= 0.0, name
    # the figures over the seeds
    figures = data["figures"]
    assert {"seeds", "best_fixed", "reference", "headroom", "policies"} <= set(figures)
    assert set(figures) - {"seeds", "best_fixed", "reference", "headroom", "policies"} <= {"adaptation"}
    assert figures.get("adaptation", []) == []  # a stationary scenario has no change point to adapt to
    assert figures["seeds"] == 1 and set(figures["policies"]) == names
    assert set(figures["headroom"]) == {"mean", "ci95", "percent_of_best_fixed"}
    share = {"headroom_share"} if abs(figures["headroom"]["mean"]) > 1e-12 else set()  # no headroom: no share
    for name, row in figures["policies"].items():
        keys = set(seed[name]) - ({"regret_per_request"} if is_fixed(name) else set())
        assert set(row) == keys | {k + "_ci95" for k in keys} | {"vs_best_fixed", "vs_best_fixed_ci95"} | share, name
        assert all(isinstance(v, float) and math.isfinite(v) for v in row.values()), name
        assert all(row[k] == seed[name][k] and row[k + "_ci95"] == 0.0 for k in keys), name  # one seed: no interval


def test_the_figures_follow_their_definitions():
    """best fixed, reference, headroom, the shares and the 95% intervals, recomputed over two seeds from
    the per-seed summaries by the documented definitions (a light load: there is headroom to share)."""
    from lab.simulator import SimConfig, aggregate, run_seeds

    config = SimConfig(requests=1200, devices=50, warmup=200, edge_load=0.3)
    sims, results = run_seeds(synthetic_profile(), config, None, 2)
    assert [sim.config.seed for sim in sims] == [0, 1]
    per_seed = [{n: r.summary(config.warmup, sims[0].phases) for n, r in seed.items()} for seed in results]
    figures = aggregate(per_seed)
    assert figures["seeds"] == 2
    u = {name: np.asarray([seed[name]["utility"] for seed in per_seed]) for name in per_seed[0]}
    best_fixed = max((n for n in u if is_fixed(n)), key=lambda n: u[n].mean())
    assert figures["best_fixed"] == best_fixed
    reference = max(("oracle", "oracle_priced", "queue_threshold", best_fixed), key=lambda n: u[n].mean())
    assert figures["reference"] == reference

    def interval(values):  # mean and half-width of the 95% interval: Student t, 1 degree of freedom
        return values.mean(), 12.706 * values.std(ddof=1) / math.sqrt(len(values))

    headroom = u[reference] - u[best_fixed]
    assert (figures["headroom"]["mean"], figures["headroom"]["ci95"]) == pytest.approx(interval(headroom))
    assert headroom.mean() > 0
    assert figures["headroom"]["percent_of_best_fixed"] == pytest.approx(
        100 * headroom.mean() / abs(u[best_fixed].mean()))
    for name, row in figures["policies"].items():
        assert (row["utility"], row["utility_ci95"]) == pytest.approx(interval(u[name])), name
        assert (row["vs_best_fixed"], row["vs_best_fixed_ci95"]) == pytest.approx(interval(u[name] - u[best_fixed]))
        assert row["headroom_share"] == pytest.approx((u[name] - u[best_fixed]).mean() / headroom.mean()), name
    assert figures["policies"][reference]["headroom_share"] == pytest.approx(1.0)
    assert figures["policies"][best_fixed]["headroom_share"] == 0.0


def run_result(n: int = 10, warmup: int = 4, **arrays):
    from lab.simulator import RunResult

    ramp = np.arange(n, dtype=np.float64)  # every per-request figure differs before and after the warmup
    return RunResult("x", np.zeros(n, dtype=np.int64), utility=ramp, quality=ramp / 10, latency=ramp + 1,
                     regret=arrays.get("regret", ramp / 100), busy=ramp >= 8, price=ramp / 1000)


def test_summary_means_are_over_the_requests_after_the_warmup():
    summary = run_result().summary(4)
    after = np.arange(4, 10, dtype=np.float64)
    assert summary["utility"] == pytest.approx(after.mean()) and summary["quality"] == pytest.approx(after.mean() / 10)
    assert summary["latency_mean_s"] == pytest.approx(after.mean() + 1)
    assert summary["latency_p95_s"] == pytest.approx(np.percentile(after + 1, 95))
    assert summary["busy_share"] == pytest.approx(2 / 6) and summary["price_mean"] == pytest.approx(after.mean() / 1000)
    assert run_result(regret=None).summary(4)["regret_per_request"] is None  # fixed arms: not computed
    # phases: each phase's own requests, the first one's after the warmup
    phased = run_result().summary(4, [(0, 6, "start"), (6, 10, "drop")])
    assert phased["phases"] == pytest.approx({"start": 4.5, "drop": 7.5})


def test_regret_per_request_is_over_the_requests_after_the_warmup():
    assert run_result().summary(4)["regret_per_request"] == pytest.approx(np.arange(4, 10).mean() / 100)


def test_oracle_has_zero_regret_and_linucb_beats_random(mixed_run):
    pol = mixed_run[0]["figures"]["policies"]
    assert pol["oracle"]["regret_per_request"] == 0.0  # regret is measured against the (myopic) oracle itself
    assert pol["linucb"]["utility"] > pol["random"]["utility"] + 0.1
    assert pol["linucb"]["regret_per_request"] < 0.2 * pol["random"]["regret_per_request"]
    assert pol["linucb"]["utility"] > pol["epsilon_greedy"]["utility"]
    # no policy does much better than the best reference (the myopic oracle is no bound under load: it
    # overloads the edge, which is what the priced references are for)
    reference = mixed_run[0]["figures"]["reference"]
    assert reference in ("oracle", "oracle_priced", "queue_threshold", mixed_run[0]["figures"]["best_fixed"])
    assert pol[reference]["utility"] >= max(p["utility"] for p in pol.values()) - 0.01


def test_plots_are_written(mixed_run):
    pytest.importorskip("matplotlib")
    data, out = mixed_run
    stem = f"mixed_{data['hardware']}_rho0.6"  # {kind}_{scenario}_{hardware}_rho{edge_load}
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        f"gain_{stem}.png", f"latency_quality_{stem}.png", f"price_{stem}.png"]  # price: linucb is priced


def test_without_a_priced_policy_there_is_no_price_plot(profile_path, tmp_path):
    pytest.importorskip("matplotlib")
    from lab.simulator import main

    assert main(["--profile", str(profile_path), "--requests", "300", "--devices", "20", "--warmup", "100",
                 "--policies", "linucb,oracle,fixed_k8", "--no-congestion", "--plots", str(tmp_path)]) == 0
    assert sorted(p.name.split("_mixed_")[0] for p in tmp_path.iterdir()) == ["gain", "latency_quality"]


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
    policies = sim.make_policies(["linucb", "oracle", "oracle_priced", "random"])
    results = {name: sim.run(name, p) for name, p in policies.items()}
    assert results["oracle"].regret.sum() == 0.0
    rows = adaptation(results["linucb"], results["oracle_priced"], sim.world.change_points, window=500)
    assert [row[0] for row in rows] == [1000, 2000]
    for change, before, first, second in rows:
        # what the priced oracle gains over linucb on the same requests: settled within 500 requests
        assert second < 0.05, (scenario, change, before, first, second)
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
    from lab.simulator import Edge, SimConfig, Simulation
    from shared.bandit.latency import batch_step_times

    profile = synthetic_profile()
    T = batch_step_times(profile.timing.edge_step_s, None, 4, beta=0.5)
    # unmeasured: edge_step_s * (1 + beta (b - 1))
    assert T == pytest.approx([0.0] + [0.05 * (1 + 0.5 * (b - 1)) for b in range(1, 5)])
    # measured: interpolated, extrapolated along the last segment; one size only: proportionally
    measured = batch_step_times(0.05, {1: 0.05, 4: 0.11}, 6)
    assert measured == pytest.approx([0.0, 0.05, 0.07, 0.09, 0.11, 0.11 + 0.02, 0.11 + 2 * 0.02])
    assert batch_step_times(0.05, {2: 0.08}, 4)[3:] == pytest.approx([0.08 * 3 / 2, 0.08 * 4 / 2])
    # the simulation's own table is that one, for its batch (the profile's world: 8 requests)
    sim = Simulation(profile, SimConfig(requests=10, devices=2, warmup=1, batch_beta=0.3))
    assert sim.max_batch == 8
    assert sim.T == pytest.approx(batch_step_times(0.05, None, 8, beta=0.3))
    assert Simulation(profile, SimConfig(requests=10, devices=2, warmup=1, max_batch=3)).T == pytest.approx(
        batch_step_times(0.05, None, 3))
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
    [seed] = json.loads((tmp_path / "s.json").read_text())["per_seed"]
    fixed = max(("fixed_k8", "fixed_k12"), key=lambda n: seed[n]["utility"])
    best = seed[fixed]["utility"]
    reference = max(("oracle", fixed), key=lambda n: seed[n]["utility"])  # the best reference ran
    headroom = seed[reference]["utility"] - best
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "headroom" in ln)
    assert f"best fixed: {fixed}; reference: {reference}; headroom {headroom:+.4f}" in line
    assert f"{100 * headroom / abs(best):+.1f}% of the best fixed arm's utility" in line
