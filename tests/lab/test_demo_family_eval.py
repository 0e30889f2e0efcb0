"""rise-eval, the demo family's harness: end to end on an untrained family (fast) and a trained quick one (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROW_KEYS = {"k", "adherence", "adherence_by_items", "frechet", "edge_s", "device_s", "compute_s", "speedup"}
PLOTS = ("quality_vs_split.png", "quality_latency.png", "latent_intensity.png")


@pytest.fixture(autouse=True)
def _own_ceiling_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rise-eval caches its ceilings under $RISE_CACHE_DIR: a test's own folder, never the user's."""
    monkeypatch.setenv("RISE_CACHE_DIR", str(tmp_path / "cache"))


def _check_report(report: dict, splits: list[int], n_steps: int) -> None:
    assert set(report["ceilings"]) >= {"real", "vae"}
    for ceiling in report["ceilings"].values():
        assert 0.0 <= ceiling["adherence"] <= 1.0 and np.isfinite(ceiling["frechet"])
    assert report["ceilings"]["real"]["adherence"] > 0.9  # the committed scorer on real scenes
    assert [row["k"] for row in report["rows"]] == splits
    for row in report["rows"]:
        assert ROW_KEYS <= set(row)
        assert all(0.0 <= v <= 1.0 for v in row["adherence_by_items"].values())
        assert row["edge_s"] >= 0 and row["device_s"] > 0
        assert row["compute_s"] == pytest.approx(row["edge_s"] + row["device_s"])
    assert next(r for r in report["rows"] if r["k"] == n_steps)["speedup"] == pytest.approx(1.0)
    assert report["step_cost"]["large_ms"] > 0 and report["step_cost"]["small_ms"] > 0
    assert set(report["intensity"]) == {str(k) for k in splits}
    assert all(len(v["std"]) == n_steps + 1 for v in report["intensity"].values())


def test_rise_eval_end_to_end_on_an_untrained_family(fashion_mnist: None, untrained_family: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from lab.demo_family.evaluate import main

    out = tmp_path / "eval.json"
    argv = ["--family", str(untrained_family), "--limit", "4", "--steps", "4", "--splits", "0,2",
            "--ceiling-scenes", "50", "--timing-prompts", "1", "--intensity-prompts", "4",
            "--json", str(out), "--plots", str(tmp_path / "plots")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ceilings" in printed and "speedup" in printed
    _check_report(json.loads(out.read_text()), [0, 2, 4], 4)  # N is added: the speedup's reference
    for name in PLOTS:
        assert (tmp_path / "plots" / name).stat().st_size > 10_000


def test_relay_rows_deviate_from_large_only_only_after_the_handoff(fashion_mnist: None, untrained_family: Path) -> None:
    from edge_server.family import load_family
    from lab.demo_family.evaluate import generate_torch
    from shared.demo_grammar.prompts import load_prompts

    family = load_family(untrained_family)
    prompts = load_prompts()[:3]
    large = generate_torch(family, prompts, 4, 4, sampler="dpmpp_2m", guidance=7.5, seed=0)
    relay = generate_torch(family, prompts, 4, 2, sampler="dpmpp_2m", guidance=7.5, seed=0)
    assert np.allclose(large.stats[:, :3], relay.stats[:, :3], atol=1e-5)  # same trajectory up to step k
    assert not np.allclose(large.stats[:, 3:], relay.stats[:, 3:], atol=1e-5)
    # Batched generation equals one request at a time (step-level batching changes only round-off).
    one = generate_torch(family, prompts[1:2], 4, 2, sampler="dpmpp_2m", guidance=7.5, seed=1)
    assert np.abs(one.images.astype(int) - relay.images[1:2].astype(int)).max() <= 1


def test_bad_splits_and_prompts_are_refused(untrained_family: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from lab.demo_family.evaluate import main

    assert main(["--family", str(untrained_family), "--steps", "4", "--splits", "0,5"]) == 2
    assert "splits must be in [0, 4]" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("a cat on a mat\n")
    assert main(["--family", str(untrained_family), "--prompts", str(bad), "--steps", "2", "--splits", "0"]) == 2
    assert "grammar" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [
    ("--intensity-prompts", "0"), ("--intensity-prompts", "-3"), ("--ceiling-scenes", "0"), ("--timing-prompts", "0"),
    ("--batch", "0"), ("--limit", "0"), ("--limit", "-1"), ("--threads", "0"), ("--threads", "two"),
])
def test_counts_below_one_get_one_line_before_any_work(flag: str, value: str, untrained_family: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lab.demo_family.evaluate import main

    assert main(["--family", str(untrained_family), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rise-eval: error: argument {flag}: ") and "at least 1" in err[0]


@pytest.mark.parametrize("field", ["intensity_prompts", "ceiling_scenes", "timing_prompts", "batch"])
def test_evaluate_refuses_a_zero_count_up_front(field: str, untrained_family: Path) -> None:
    from dataclasses import replace

    from edge_server.family import load_family
    from lab.demo_family.evaluate import EvalConfig, EvalError, evaluate

    cfg = replace(EvalConfig(steps=2, splits=(0,)), **{field: 0})
    with pytest.raises(EvalError, match=f"--{field.replace('_', '-')} must be an integer of at least 1, got 0"):
        evaluate(load_family(untrained_family), ["a picture of some red pants in the bottom middle"], cfg)


def test_one_intensity_prompt_is_enough(fashion_mnist: None, untrained_family: Path, tmp_path: Path) -> None:
    from lab.demo_family.evaluate import main

    out = tmp_path / "eval.json"
    assert main(["--family", str(untrained_family), "--limit", "3", "--steps", "2", "--splits", "1",
                 "--ceiling-scenes", "8", "--timing-prompts", "1", "--intensity-prompts", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["intensity_prompts"] == 1
    assert all(np.isfinite(v).all() for k in report["intensity"].values() for v in k.values())
    assert np.isfinite(report["rows"][0]["handoff_deviation"]["std_rel"])


@pytest.mark.slow
def test_rise_eval_on_a_quick_trained_family_with_its_bundle(fashion_mnist: None, tmp_path: Path) -> None:
    from export.cli import main as export_main
    from lab.demo_family.evaluate import main as eval_main
    from lab.demo_family.train import main as train_main

    assert train_main(["--out", str(tmp_path / "fam"), "--quick"]) == 0
    assert export_main(["--family", str(tmp_path / "fam"), "--out", str(tmp_path / "bundle"), "--force"]) == 0
    out = tmp_path / "eval.json"
    assert eval_main(["--family", str(tmp_path / "fam"), "--bundle", str(tmp_path / "bundle"), "--limit", "9",
                      "--steps", "6", "--splits", "0,3", "--ceiling-scenes", "100", "--json", str(out),
                      "--plots", str(tmp_path / "plots")]) == 0
    report = json.loads(out.read_text())
    _check_report(report, [0, 3, 6], 6)
    assert report["meta"]["device"].startswith("onnxruntime")
    assert all((tmp_path / "plots" / name).is_file() for name in PLOTS)
