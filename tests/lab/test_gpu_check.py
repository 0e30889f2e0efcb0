"""bench/gpu_check.py (the one-shot GPU check): its CPU smoke mode end to end, and its report -> --bench conversion.

The smoke run (``--device cpu --smoke``: tiny sizes everywhere, ~30-40 s on 2 cores) runs every part in a
subprocess, as on the GPU machine, and the JSON it writes must hold each part with its figures, or a
recorded reason where a measurement is CUDA-only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SAMPLERS = ("ddim", "euler", "dpmpp_2m")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(out / "not-this-one")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else {}
    return out, report, proc


def test_smoke_run_succeeds_and_writes_every_file(smoke_run):
    out, report, proc = smoke_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    names = {p.name for p in out.iterdir()}
    assert {"gpu_check.json", "gpu_check.log"} <= names, names
    assert any(n.startswith("gpu_profile_cpu") and n.endswith("-smoke.json") for n in names), names
    assert any(n.startswith("gpu_bench_cpu") and n.endswith("-smoke.json") for n in names), names
    assert not (out / "not-this-one").exists()  # --out wins over $OUT
    assert report["format"] == "rise-gpu-check" and report["sizes"]["exact_steps"] <= 6
    assert set(report["parts"]) == {"env", "exactness", "unet", "daemon", "profile"}
    for name, part in report["parts"].items():
        assert part["ok"] is True, (name, part.get("error"), part.get("traceback"))
        assert part["wall_s"] >= 0
    log = (out / "gpu_check.log").read_text()
    assert "== daemon: ok" in log and "part       status" in log  # the log copy has the summary table


def test_smoke_exactness_has_figures_or_a_reason(smoke_run):
    _, report, _ = smoke_run
    part = report["parts"]["exactness"]
    tiny = part["tiny"]
    for sampler in SAMPLERS:
        fp32 = tiny["fp32"][sampler]
        assert fp32["pass"] is True and fp32["rel"] == 0.0  # the "device" is the CPU here: the reference itself
        for dtype in ("fp16", "bf16"):
            got = tiny[dtype][sampler]
            assert got["finite"] and 0 < got["max_abs"] < 5 and 20 < got["psnr_db"] < 200, (dtype, got)
        assert 20 < part["sdxl_ssd_1b"]["fp16"][sampler]["psnr_db"] < 200
    assert "CUDA only" in tiny["fp32_no_tf32"]["skipped"]
    assert part["initial_noise"]["pass"] is True
    summary = part["summary"]
    assert summary["fp32"]["pass"] is True and summary["initial_noise_identical"] is True
    assert summary["fp16"]["worst_psnr_db"] > 20 and summary["bf16"]["samplers"] == 3


def test_smoke_unet_and_daemon_figures(smoke_run):
    _, report, _ = smoke_run
    unet = report["parts"]["unet"]
    assert "perf_counter" in unet["timer"]  # CUDA events only on CUDA: the reason is recorded
    for name in ("sd15", "bk_sdm_tiny"):
        assert unet[name]["params_m"] > 0
        for rows in ("2", "4"):
            entry = unet[name]["rows"][rows]
            assert entry["ms_median"] > 0 and entry["ms_per_row"] == pytest.approx(entry["ms_median"] / int(rows))
    daemon = report["parts"]["daemon"]
    assert daemon["family"]["mode"] == "disk" and daemon["family"]["load_s"] >= 0
    assert set(daemon["engine"]["batched_step_s"]) == {"1", "2"}
    assert daemon["engine"]["handoff_bytes"] > 0 and daemon["engine"]["text_encode_s"] > 0
    runs = daemon["runs"]
    assert {(r["batching"], r["clients"]) for r in runs} == {(b, c) for b in (True, False) for c in (1, 2)}
    for run in runs:
        assert run["errors"] == 0, run
        # every request asked for was served, unless the configuration hit its (recorded) time cap
        assert run["ok"] == run["asked"] or (run["capped"] and run["ok"] >= 1), run
        assert run["rps"] > 0 and run["latency_s"]["p95"] >= run["latency_s"]["p50"] > 0
        assert run["payload_bytes"] > 0  # the client received (and the protocol checked) each handoff
    assert set(daemon["ratio_batched_over_one_at_a_time"]) == {"1", "2"}


def test_smoke_profile_is_in_the_profile_bench_format(smoke_run):
    from shared.bandit.profile import Timing

    out, report, _ = smoke_run
    profile_path = Path(report["parts"]["profile"]["profile_file"])
    profile = json.loads(profile_path.read_text())
    assert profile["format"] == "rise-gpu-profile" and profile["smoke"] is True
    assert set(profile["edge_unet_step_ms_by_rows"]) == {"sd15", "bk_sdm_tiny"}
    assert profile["bench_timing_validation"].startswith("ok")
    assert "shared.bandit.profile" in profile["note"]
    bench = json.loads(Path(report["parts"]["profile"]["bench_file"]).read_text())
    assert set(bench) == {"edge_step_s", "edge_batch_step_s", "text_encode_s", "edge_decode_s", "handoff_bytes"}
    timing = Timing(device_step_s=0.4, device_decode_s=0.3, image_bytes=1000, **bench)
    assert set(timing.edge_batch_step_s or {}) == {1, 2} and timing.edge_step_s == bench["edge_step_s"]


def test_bench_timing_falls_back_to_the_unet_forward(tmp_path):
    gc = _script()
    unet_only = {"parts": {"unet": {"sd15": {"rows": {"2": {"ms_median": 20.0}, "4": {"ms_median": 30.0},
                                                      "8": {"oom": True}}}},
                           "daemon": {"ok": False, "error": "boom"}}}
    timing = gc.bench_timing_from_report(unet_only)
    assert timing["edge_batch_step_s"] == {"1": 0.02, "2": 0.03} and timing["edge_step_s"] == 0.02
    assert "unet.sd15" in timing["_source"]
    engine = {"batched_step_s": {"1": {"median_s": 0.025}, "2": {"median_s": 0.04}, "4": {"error": "x"}},
              "text_encode_s": 0.004, "edge_decode_s": 0.03, "handoff_bytes": 250_000}
    both = {"parts": {**unet_only["parts"], "daemon": {"engine": engine}}}
    timing = gc.bench_timing_from_report(both)
    assert timing["edge_batch_step_s"] == {"1": 0.025, "2": 0.04} and timing["handoff_bytes"] == 250_000
    assert gc.validate_bench_timing(timing).startswith("ok")
    report = tmp_path / "gpu_check.json"
    report.write_text(json.dumps(both))
    assert gc.main(["--to-bench", str(report), "--out-file", str(tmp_path / "bench.json")]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["edge_step_s"] == 0.025
    assert gc.main(["--to-bench", str(tmp_path / "bench.json"), "--out-file", str(tmp_path / "none.json")]) == 1


def test_json_and_percentiles():
    gc = _script()
    assert gc.jsonable({"a": (1, float("inf")), "b": Path("x")}) == {"a": [1, "inf"], "b": "x"}
    assert gc.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and gc.percentile([5.0], 0.95) == 5.0
    assert gc.slug("NVIDIA H200") == "nvidia-h200"
