"""rise-eval's adaptive arms (lab.demo_family.adaptive) on an untrained demo-architecture family (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lab.demo_family.adaptive import (
    AdaptiveEvalError,
    adaptive_plan,
    adaptive_row,
    check_adaptive,
    edge_steps_by_items,
    format_adaptive_table,
    generate_adaptive,
    parse_taus,
    parse_window,
)
from lab.demo_family.evaluate import EvalConfig, generate_torch
from shared.demo_grammar.prompts import load_prompts, prompt_to_scene
from shared.relay_plan import RelayPlan

N = 6


@pytest.fixture(scope="session")
def family_dir(untrained_family: Path) -> Path:
    return untrained_family  # tests/lab/conftest.py


@pytest.fixture(scope="module")
def family(family_dir: Path):
    from edge_server.family import load_family

    return load_family(family_dir)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return load_prompts()[:5]


def _changes(family, prompt: str, seed: int) -> list[float]:
    """The x0 changes of a fixed run, float64, after steps 2..N-1."""
    from edge_server.batching import batched_step
    from edge_server.relay import prepare

    job = prepare(family, prompt, RelayPlan(N, N - 1, "dpmpp_2m", 7.5), seed)
    x0s = []
    while not job.done:
        batched_step(family.large_unet, [job])
        x0s.append(job.x0.double().numpy().copy())
    return [float(np.linalg.norm(b - a) / np.linalg.norm(b)) for a, b in zip(x0s, x0s[1:], strict=False)]


def test_a_fixed_plan_on_the_adaptive_path_is_rise_evals_relay(family, prompts):
    fixed = generate_torch(family, prompts, N, 3, sampler="dpmpp_2m", guidance=7.5, seed=4, batch=2)
    gen = generate_adaptive(family, prompts, RelayPlan(N, 3, "dpmpp_2m", 7.5), seed=4, batch=2)
    np.testing.assert_array_equal(gen.images, fixed.images)
    assert gen.edge_steps.tolist() == [3] * len(prompts)
    assert generate_adaptive(family, prompts[:2], RelayPlan(N, 0, "dpmpp_2m", 7.5), seed=0).edge_steps.tolist() == [0, 0]


def test_each_request_hands_off_where_it_would_alone(family, prompts):
    from edge_server.relay import EdgeRelay, decode_latents, run_torch_relay

    changes = _changes(family, prompts[0], 0)
    tau = float(np.median(changes))  # some requests settle inside the window, some do not
    plan = adaptive_plan(N, tau, k_max=N - 1, min_split=2)
    gen = generate_adaptive(family, prompts, plan, seed=0, batch=2)  # batches of 2: the seeds follow the index
    alone = [EdgeRelay(family).start(p, plan, i).split for i, p in enumerate(prompts)]
    assert gen.edge_steps.tolist() == alone
    assert all(2 <= k <= N - 1 for k in alone)
    for i, prompt in enumerate(prompts):
        reference = decode_latents(family, run_torch_relay(family, prompt, plan, i))[0]
        assert np.abs(gen.images[i].astype(int) - reference.astype(int)).max() <= 1  # round-off of batching


def test_edge_steps_are_summarized_per_item_count():
    scenes = [prompt_to_scene(p) for p in ("a red bag in the middle", "a blue sneaker on the left",
                                           "a red bag in the middle and a blue sneaker on the left")]
    means, hist = edge_steps_by_items(np.asarray([4, 6, 9]), scenes)
    assert means == {"1": 5.0, "2": 9.0}
    assert hist == {"1": {"4": 1, "6": 1}, "2": {"9": 1}}


def test_an_adaptive_row_says_what_the_arm_used(family, prompts):
    from lab.demo_family.scorer import default_scorer

    scorer = default_scorer()
    scenes = [prompt_to_scene(p) for p in prompts]
    reference = scorer.features(np.zeros((8, 48, 48, 3), np.uint8))
    cfg = EvalConfig(steps=N, splits=(0,), batch=2, timing_prompts=2)
    plan = adaptive_plan(N, 0.5, min_split=2)
    row = adaptive_row(family, prompts, scenes, plan, scorer, reference, cfg, timed=prompts[:2])
    assert row["label"] == "N6k2-5t0.5" and row["k"] == 5 and row["tau"] == 0.5 and row["min_split"] == 2
    assert row["edge_steps_mean"] == pytest.approx(np.mean(row["edge_steps"]))
    counts = {n: sum(h.values()) for n, h in row["edge_steps_hist"].items()}
    assert counts == {n: sum(s.n_items == int(n) for s in scenes) for n in counts}
    assert 0.0 <= row["adherence"] <= 1.0 and row["compute_s"] == pytest.approx(row["edge_s"] + row["device_s"])
    assert 2 <= row["timed_edge_steps_mean"] <= 5
    table = format_adaptive_table([row], [{"k": 3, "adherence": 0.5}])
    assert "N6k2-5t0.5" in table and "k=3" in table


def test_a_bad_adaptive_arm_is_an_eval_error():
    with pytest.raises(AdaptiveEvalError, match="tau=2"):
        adaptive_plan(N, 2.0)
    with pytest.raises(AdaptiveEvalError, match="min_split"):
        adaptive_plan(N, 0.1, k_max=3, min_split=4)
    assert parse_taus("0.02, 0.05") == (0.02, 0.05) and parse_taus(None) == ()
    for bad in ("0.02,x", "0", "1.5", ","):
        with pytest.raises(AdaptiveEvalError, match="--taus must be"):
            parse_taus(bad)
    assert parse_window("2, 5") == (2, 5) and parse_window(None) == (None, None)
    for bad in ("2", "a,b", "2,3,4", "-1,3"):
        with pytest.raises(AdaptiveEvalError, match="--tau-window"):
            parse_window(bad)
    cfg = EvalConfig(steps=N, splits=(0,))
    assert [p.split for p in check_adaptive(cfg, (0.1, 0.2), k_max=4)] == [4, 4]
    with pytest.raises(AdaptiveEvalError, match="split"):
        check_adaptive(cfg, (0.1,), k_max=N)  # an adaptive arm leaves the device at least one step



def test_rise_eval_evaluates_tau_arms_beside_the_fixed_ones(fashion_mnist: None, family_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.demo_family.evaluate import main
    from shared.bandit.profile import profile_from_eval

    monkeypatch.setenv("RISE_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ceiling cache
    out = tmp_path / "eval.json"
    argv = ["--family", str(family_dir), "--limit", "4", "--steps", "4", "--splits", "0,2", "--ceiling-scenes", "20",
            "--timing-prompts", "2", "--intensity-prompts", "2", "--taus", "0.3,0.6", "--tau-window", "2,3",
            "--json", str(out)]
    assert main(argv) == 0
    assert "N4k2-3t0.3" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["k"] for r in report["rows"]] == [0, 2, 4]  # the fixed rows as before
    assert [r["label"] for r in report["adaptive"]] == ["N4k2-3t0.3", "N4k2-3t0.6"]
    for row in report["adaptive"]:
        assert 2 <= row["edge_steps_mean"] <= 3 and len(row["edge_steps"]) == 4
        assert sum(sum(h.values()) for h in row["edge_steps_hist"].values()) == 4
    # The scheduler's profile reads the adaptive rows as (N, tau) arms with their measured edge steps.
    profile = profile_from_eval([(report, None, "eval.json")], bench={"handoff_bytes": 1000})
    plan = RelayPlan(4, 3, "dpmpp_2m", 7.5, handoff_tau=0.3, min_split=2)
    assert profile.has(plan) and 2 <= profile.expected_edge_steps(plan) <= 3
    assert main([*argv[:-2], "--taus", "0.3,x"]) == 2
    assert "--taus must be" in capsys.readouterr().err
    assert main([*argv[:-2], "--tau-window", "2,4"]) == 2  # an adaptive arm leaves the device a step
    assert "split" in capsys.readouterr().err
