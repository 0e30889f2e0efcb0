"""Hardware profiles (lab/hardware.py): the shipped file, the batch model, sources, refusals."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lab.hardware import (
    SHIPPED,
    SOURCE_KINDS,
    Figure,
    Hardware,
    HardwareError,
    hardware_from_profile,
    load_hardware,
    shipped_names,
)
from shared.bandit import load_profile
from shared.errors import RiseError

ROOT = Path(__file__).resolve().parents[2]
DEMO_PROFILE = ROOT / "models" / "demo" / "family" / "profile.json"
SHIPPED_FILE = SHIPPED / "gpu-edge-phones.json"


@pytest.fixture(scope="module")
def shipped() -> Hardware:
    return load_hardware("gpu-edge-phones")


def _doc() -> dict[str, Any]:
    return json.loads(SHIPPED_FILE.read_text(encoding="utf-8"))


def _write(tmp_path: Path, doc: Any, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _fig(value: float, source: str = "assumed", note: str = "test") -> dict[str, Any]:
    return {"value": value, "source": source, "note": note}


# --------------------------------------------------------------------------- the shipped file


def test_shipped_file_loads_by_name_and_by_path(shipped: Hardware) -> None:
    assert "gpu-edge-phones" in shipped_names()
    assert load_hardware(SHIPPED_FILE) == shipped
    assert load_hardware(str(SHIPPED_FILE)) == shipped
    assert shipped.name == "gpu-edge-phones"
    assert shipped.max_batch == 16
    assert list(shipped.batch_step_s) == [1, 4, 16]


def test_shipped_timing_replaces_only_the_demo_profiles_timing(shipped: Hardware) -> None:
    profile = load_profile(DEMO_PROFILE)
    applied = shipped.apply(profile)
    np.testing.assert_array_equal(applied.quality_table(applied.plans()), profile.quality_table(profile.plans()))
    assert (applied.levels, applied.arms, applied.family) == (profile.levels, profile.arms, profile.family)
    t = applied.timing
    assert t == shipped.timing()
    assert t.edge_step_s == pytest.approx(0.04617, abs=1e-5)
    assert shipped.reference_tier().name == "iphone-14"  # 0.30, tied with iphone-12-pro-max and listed first
    assert t.device_step_s == shipped.reference_tier().step_s.value
    assert t.device_decode_s == shipped.reference_tier().decode_s.value
    assert t.edge_step_s < t.device_step_s  # the GPU edge is the fast side, unlike the CPU-timed demo
    assert t.edge_batch_step_s == {1: 0.046168, 4: 0.086207, 16: 0.32895}
    assert isinstance(t.handoff_bytes, int) and isinstance(t.image_bytes, int)


def test_round_trip_through_to_dict(shipped: Hardware) -> None:
    assert Hardware.from_dict(json.loads(json.dumps(shipped.to_dict()))) == shipped


# --------------------------------------------------------------------------- batch step times


def test_batch_step_times_interpolate_and_extrapolate(shipped: Hardware) -> None:
    t = shipped.batch_step_times(20)
    assert len(t) == 21 and t[0] == 0.0
    assert t[1] == 0.046168 and t[4] == 0.086207 and t[16] == 0.32895
    assert t[2] == pytest.approx(0.046168 + (0.086207 - 0.046168) / 3)
    assert t[10] == pytest.approx(0.086207 + (0.32895 - 0.086207) * 6 / 12)
    slope = (0.32895 - 0.086207) / 12
    assert t[20] == pytest.approx(0.32895 + 4 * slope)
    assert len(shipped.batch_step_times()) == shipped.max_batch + 1


def test_batch_step_times_monotone_for_the_shipped_file(shipped: Hardware) -> None:
    t = shipped.batch_step_times(32)
    assert all(b >= a for a, b in zip(t[:-1], t[1:], strict=True))


def test_one_batch_size_takes_the_unmeasured_batching_model(shipped: Hardware) -> None:
    single = dataclasses.replace(shipped, batch_step_s={1: Figure(0.5, "assumed", "test")})
    assert single.timing().edge_batch_step_s is None  # one size says nothing about batching
    # so T[b] is the simulator's unmeasured model, 1 + beta (b - 1) single steps (beta = 0.5)
    assert single.batch_step_times(3) == pytest.approx([0.0, 0.5, 0.75, 1.0])


# --------------------------------------------------------------------------- sources


def test_every_figure_is_sourced(shipped: Hardware) -> None:
    figures = shipped.figures()
    assert len(figures) == 3 + 2 + 2 + 2 * len(shipped.tiers)
    for label, figure in figures:
        assert figure.source in SOURCE_KINDS, label
        if figure.source in ("published", "derived"):
            assert figure.note.strip(), label
    labels = [label for label, _ in figures]
    assert labels[:3] == ["edge step, 1 request", "edge step, 4 requests", "edge step, 16 requests"]
    assert "iphone-14-pro-max step" in labels
    assert shipped.source_summary() == "3 published, 9 derived, 3 assumed, 0 measured"
    lines = shipped.source_lines()
    assert len(lines) == len(figures)
    assert lines[0].startswith("edge step, 1 request: 0.046168 s [published] diffusers")


# --------------------------------------------------------------------------- refusals


def _missing_one(doc: dict[str, Any]) -> None:
    del doc["edge"]["batch_step_s"]["1"]


def _shares(doc: dict[str, Any]) -> None:
    doc["tiers"][0]["share"] = 0.2


def _negative_step(doc: dict[str, Any]) -> None:
    doc["tiers"][2]["step_s"]["value"] = -1


def _negative_share(doc: dict[str, Any]) -> None:
    doc["tiers"][2]["share"] = -1


def _unknown_source(doc: dict[str, Any]) -> None:
    doc["payload"]["image_bytes"]["source"] = "guessed"


def _unknown_top_key(doc: dict[str, Any]) -> None:
    doc["speed"] = 1


def _wrong_format(doc: dict[str, Any]) -> None:
    doc["format"] = "rise-profile"


def _bad_batch_key(doc: dict[str, Any]) -> None:
    doc["edge"]["batch_step_s"]["0"] = _fig(0.01)


def _no_note(doc: dict[str, Any]) -> None:
    doc["edge"]["batch_step_s"]["4"]["note"] = ""


def _zero_max_batch(doc: dict[str, Any]) -> None:
    doc["edge"]["max_batch"] = 0


def _not_a_number(doc: dict[str, Any]) -> None:
    doc["payload"]["handoff_bytes"]["value"] = "301000"


@pytest.mark.parametrize(("break_it", "names"), [
    (_missing_one, ["edge.batch_step_s", '"1"']),
    (_shares, ["tiers[].share", "sum"]),
    (_negative_step, ["tiers[2].step_s.value", "-1"]),
    (_negative_share, ["tiers[2].share", "(0, 1]", "-1"]),
    (_unknown_source, ["payload.image_bytes.source", "guessed"]),
    (_unknown_top_key, ["unknown key", "speed"]),
    (_wrong_format, ["format", "rise-hardware"]),
    (_bad_batch_key, ["edge.batch_step_s", "'0'"]),
    (_no_note, ["edge.batch_step_s.4.note"]),
    (_zero_max_batch, ["edge.max_batch"]),
    (_not_a_number, ["payload.handoff_bytes.value", "a number"]),
])
def test_bad_files_name_the_key(tmp_path: Path, break_it: Any, names: list[str]) -> None:
    doc = copy.deepcopy(_doc())
    break_it(doc)
    with pytest.raises(HardwareError) as info:
        load_hardware(_write(tmp_path, doc))
    message = str(info.value)
    assert message.startswith("hardware bad.json: ")
    assert "\n" not in message
    for name in names:
        assert name in message


def test_unknown_shipped_name_lists_the_shipped_ones() -> None:
    with pytest.raises(HardwareError, match="gpu-edge-phones"):
        load_hardware("no-such-hardware")
    assert issubclass(HardwareError, RiseError)


def test_unreadable_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(HardwareError, match="cannot read"):
        load_hardware(tmp_path / "absent.json")
    bad = tmp_path / "nan.json"
    bad.write_text('{"format": NaN}', encoding="utf-8")
    with pytest.raises(HardwareError, match="not valid JSON"):
        load_hardware(bad)


# --------------------------------------------------------------------------- the demo world


def test_hardware_from_profile_reproduces_the_demo_timing() -> None:
    profile = load_profile(DEMO_PROFILE)
    hw = hardware_from_profile(profile, [("fast", 1.0, 0.5), ("slow", 2.0, 0.5)])
    t = hw.timing()
    assert t.edge_step_s == profile.timing.edge_step_s
    assert t.device_step_s == profile.timing.device_step_s
    assert t == profile.timing  # the reference tier is the first of equal shares, multiplier 1
    assert hw.apply(profile) == profile
    assert hw.max_batch == 8
    assert hw.tiers[1].step_s.value == pytest.approx(2 * profile.timing.device_step_s)
    assert hw.tiers[1].step_s.note == "profile device step x 2 (assumed speed class)"
    n_here = sum(f.source == "measured-here" for _, f in hw.figures())
    batch_sizes = len(profile.timing.edge_batch_step_s or {1: None})  # make profile measures a batch table
    assert n_here == batch_sizes + 4  # the batch sizes, text encode, decode, two payloads
    assert hw.source_summary() == f"0 published, 4 derived, 0 assumed, {n_here} measured ({n_here} measured-here)"
    assert Hardware.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw


def test_hardware_from_profile_checks_its_classes() -> None:
    profile = load_profile(DEMO_PROFILE)
    with pytest.raises(HardwareError, match="share"):
        hardware_from_profile(profile, [("a", 1.0, 0.5), ("b", 2.0, 0.4)])
    with pytest.raises(HardwareError, match="multiplier"):
        hardware_from_profile(profile, [("a", 0.0, 1.0)])
    with pytest.raises(HardwareError):
        hardware_from_profile(profile, [])


# --------------------------------------------------------------------------- a GPU run's edge


def test_a_gpu_bench_replaces_the_edge_figures_and_keeps_the_phones(tmp_path: Path, shipped: Hardware) -> None:
    from lab.hardware import main, with_gpu_bench

    bench = {"edge_batch_step_s": {"1": 0.021, "4": 0.05, "32": 0.33}, "edge_step_s": 0.021,
             "text_encode_s": 0.004, "edge_decode_s": 0.03, "handoff_bytes": 434000}
    hw = with_gpu_bench(shipped, bench, name="h200", where="gpu_bench_h200.json")
    assert hw.timing().edge_batch_step_s == {1: 0.021, 4: 0.05, 32: 0.33}
    assert hw.max_batch == 32 and hw.tiers == shipped.tiers
    assert all(f.source == "measured-gpu" for label, f in hw.figures() if label.startswith("edge"))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    out = tmp_path / "hw.json"
    assert main(["from-gpu-bench", str(path), "--out", str(out), "--name", "h200"]) == 0
    assert load_hardware(out).timing() == hw.timing()
    path.write_text(json.dumps({"edge_batch_step_s": {"4": 0.05}}))
    assert main(["from-gpu-bench", str(path), "--out", str(out)]) == 2  # no batch of 1: refused, one line
