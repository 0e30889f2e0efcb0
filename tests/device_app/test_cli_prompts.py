"""Prompts the demo family cannot draw as typed, through ``rise-device generate`` against the real edge daemon.

The family is the tiny test family marked as speaking the demo grammar (its ``training.json`` says
``prompt_grammar: demo``) and exported with ``rise-export``, so the bundle's manifest says so too.
Each case ends in a visible item (the family is given a prompt of the grammar that names it, the user
is told in one line what was filled in) or in a clear refusal: never a silent blank picture. The edge
here is the test edge (``fake_edge.py``), which sends no ``notice``: the device then says its own reading,
the one the edge makes (:meth:`edge_server.family.Family.read_prompt`, same reader, same seed).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from device_app.cli import (
    BENCH_PROMPTS,
    BenchRun,
    RequestOptions,
    _print_summary,
    check_edge_limits,
    chosen_by,
    main,
    summarize,
)
from shared.demo_grammar.prompts import prompt_to_scene
from shared.demo_grammar.understanding import read_prompt
from shared.errors import ConfigError
from shared.manifest import load_manifest
from shared.protocol import Plan, ProtocolLimits
from shared.relay_plan import RelayPlan
from tests.device_app.fake_edge import FakeEdge

SEED = 5


def run(coro: Coroutine[Any, Any, Any], timeout: float = 90.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def grammar_family_dir(tiny_family_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("grammar") / tiny_family_dir.name  # same name: same family id
    shutil.copytree(tiny_family_dir, folder)
    (folder / "training.json").write_text(json.dumps({"prompt_grammar": "demo"}))
    return folder


@pytest.fixture(scope="module")
def grammar_family(grammar_family_dir: Path):
    from edge_server.family import load_family

    return load_family(grammar_family_dir)


@pytest.fixture(scope="module")
def grammar_bundle_dir(grammar_family, grammar_family_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("grammar-bundle") / "fp32"
    export_bundle(ExportOptions(family=grammar_family_dir, out=out), family=grammar_family)
    return out


def test_the_family_and_its_bundle_say_they_speak_the_demo_grammar(grammar_family, grammar_bundle_dir, tiny_family,
                                                                   fp32_bundle_dir):
    assert grammar_family.prompt_grammar == "demo" and tiny_family.prompt_grammar is None
    assert load_manifest(grammar_bundle_dir).prompt_grammar == "demo"
    assert load_manifest(fp32_bundle_dir).prompt_grammar is None
    assert tiny_family.read_prompt("a green bag", 0) is None  # a free-text family encodes what it is given
    reading = grammar_family.read_prompt("a green bag", 0)
    assert reading is not None and reading == read_prompt("a green bag", 0, max_words=30)


def _generate(family, bundle_dir: Path, prompt: str, out: Path) -> tuple[int, list[str]]:
    """``rise-device generate`` against a websocket edge; returns the exit code and the prompts it was sent."""
    async def scenario() -> tuple[int, list[str]]:
        async with FakeEdge(family) as edge:
            code = await asyncio.to_thread(main, [
                "generate", "--server", edge.url, "--bundle", str(bundle_dir), "--prompt", prompt,
                "--seed", str(SEED), "--steps", "2", "--split", "1", "--out", str(out),
            ])
            return code, [served.request.prompt for served in edge.served.values()]

    result: tuple[int, list[str]] = run(scenario())
    return result


@pytest.mark.parametrize("prompt", ["a green bag", "a red sneaker on a white table", "a bag, a bag and a bag",
                                    " ".join(["a green bag in the top left"] * 20)])
def test_generate_draws_what_the_family_understood_and_says_so_in_one_line(grammar_family, grammar_bundle_dir,
                                                                           tmp_path, capsys, prompt):
    out = tmp_path / "img.png"
    code, sent = _generate(grammar_family, grammar_bundle_dir, prompt, out)
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert sent == [prompt]  # the device sends what the user typed: the edge reads it as the device does
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    notes = [line for line in stderr.splitlines() if line.startswith("rise-device: note: ")]
    assert len(notes) == 1, stderr  # one line, on stderr
    reading = read_prompt(prompt, SEED, max_words=30)
    assert reading.scene is not None and reading.message is not None
    assert reading.message in notes[0] and f'Drawing "{reading.prompt}"' in notes[0]
    # what the family is given names the items: a prompt of the grammar, never the blank of an unread text
    assert prompt_to_scene(reading.prompt) == reading.scene and reading.scene.n_items >= 1
    assert grammar_family.read_prompt(prompt, SEED) == reading  # the edge's reading is the same


CASES = ["a green bag", "a red sneaker on a white table", "a bag, a bag and a bag",
         " ".join(["a green bag in the top left"] * 20)]


def test_the_real_edge_encodes_the_familys_reading_of_each_case(grammar_family, grammar_bundle_dir, tmp_path,
                                                                 capsys):
    """Through the edge daemon itself: what its engine encodes is a prompt of the grammar naming the items."""
    from edge_server import engine as engine_module
    from edge_server.daemon import EdgeConfig, EdgeServer

    encoded: list[str] = []
    original = engine_module.prepare

    def spy(family: Any, prompt: str, *args: Any, **kwargs: Any) -> Any:
        encoded.append(prompt)
        return original(family, prompt, *args, **kwargs)

    async def scenario() -> list[int]:
        server = EdgeServer.with_batching_engine(grammar_family, EdgeConfig(port=0))
        port = await server.start()
        try:
            return [await asyncio.to_thread(main, [
                "generate", "--server", f"ws://127.0.0.1:{port}", "--bundle", str(grammar_bundle_dir),
                "--prompt", prompt, "--seed", str(SEED), "--steps", "2", "--split", "1",
                "--out", str(tmp_path / f"{i}.png")]) for i, prompt in enumerate(CASES)]
        finally:
            await server.stop()

    engine_module.prepare = spy
    try:
        codes = run(scenario(), timeout=240.0)
    finally:
        engine_module.prepare = original
    stderr = capsys.readouterr().err
    assert codes == [0] * len(CASES), stderr
    readings = [read_prompt(prompt, SEED, max_words=30) for prompt in CASES]
    assert encoded == [r.prompt for r in readings]
    assert all(r.scene is not None and prompt_to_scene(r.prompt) == r.scene for r in readings)
    notes = [line for line in stderr.splitlines() if line.startswith("rise-device: note: ")]
    assert len(notes) == len(CASES) and all(r.message is not None and r.message in note
                                            for r, note in zip(readings, notes, strict=True))


@pytest.mark.parametrize("prompt", ["a cat on a sofa", "a lighthouse on a cliff at sunset"])
def test_generate_refuses_a_prompt_of_which_the_family_draws_nothing(grammar_family, grammar_bundle_dir, tmp_path,
                                                                     capsys, prompt):
    out = tmp_path / "img.png"
    code, sent = _generate(grammar_family, grammar_bundle_dir, prompt, out)
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists() and sent == []  # refused before the edge ran a step
    assert len(stderr) == 1 and stderr[0].startswith("rise-device: error: The demo family understood no item")
    assert "sneaker" in stderr[0] and "bottom right" in stderr[0]  # what the family can draw


def test_a_grammar_prompt_is_drawn_as_typed_without_a_note(grammar_family, grammar_bundle_dir, tmp_path, capsys):
    prompt = BENCH_PROMPTS[0]  # bench's prompts come from the grammar
    code, sent = _generate(grammar_family, grammar_bundle_dir, prompt, tmp_path / "img.png")
    stdout, stderr = capsys.readouterr()
    assert code == 0 and "note:" not in stderr and sent == [prompt]
    assert "pinned by this request" in stdout  # --steps and --split pin the configuration


# --------------------------------------------------------------------------- the CLI's other messages (no edge)


def test_bench_prompts_come_from_the_grammar():
    assert len(BENCH_PROMPTS) >= 3
    for prompt in BENCH_PROMPTS:
        assert read_prompt(prompt, 0).message is None and prompt_to_scene(prompt).n_items >= 1


@pytest.mark.parametrize(("flags", "says"), [
    (["--steps", "0"], f"--steps must be at least 1 and at most the edge's limit (its max_steps, "
                       f"{ProtocolLimits().max_steps} by default), got 0"),
    (["--steps", "4", "--split", "5"], "--split must be in [0, --steps=4] (0 = device only, 4 = edge only), got 5"),
])
def test_bad_step_flags_state_the_real_limits(fp32_bundle_dir, tmp_path, capsys, flags, says):
    code = main(["generate", "--server", "ws://127.0.0.1:9", "--bundle", str(fp32_bundle_dir), "--prompt", "x",
                 "--out", str(tmp_path / "x.png"), *flags])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"rise-device: error: {says}"


def test_steps_past_the_edges_own_limit_are_refused_with_that_limit():
    options = RequestOptions(0.5, None, 150, None, None)
    with pytest.raises(ConfigError, match=r"at most 100 on this edge"):
        check_edge_limits(options, ProtocolLimits(max_steps=100))
    check_edge_limits(options, ProtocolLimits(max_steps=200))


def _plan(scheduler: str, plan: RelayPlan) -> Plan:
    return Plan("r1", plan, seed=1, height=32, width=32, scheduler=scheduler, why="because")


def test_a_pinned_request_is_said_to_be_pinned_not_chosen():
    plan = RelayPlan(4, 2, "ddim", 5.0)
    assert chosen_by(_plan("fixed", plan), pinned=True).startswith("pinned by this request")
    assert chosen_by(_plan("pinned", plan), pinned=False).startswith("pinned by this request")
    assert chosen_by(_plan("linucb", plan), pinned=False) == "chosen by the edge's linucb scheduler"


def _record(device_steps: int, overhead: float, compute: float) -> dict[str, Any]:
    return {"client": 0, "request_id": "r", "payload_bytes": 10, "plan": "p", "device_steps": device_steps,
            "total_latency_s": 1.0, "handoff_overhead_s": overhead, "device_compute_s": compute}


def test_handoff_overhead_is_not_a_share_of_device_compute_when_the_device_ran_no_steps(capsys):
    edge_only = BenchRun(records=[_record(0, 0.03, 0.031)], wall_s=1.0)
    summary = summarize(edge_only, server="ws://x", clients=1, requests=1, config={})
    assert summary["handoff_overhead_fraction"] is None
    _print_summary(summary, io.StringIO())
    mixed = BenchRun(records=[_record(0, 0.03, 0.031), _record(2, 0.01, 0.1)], wall_s=1.0)
    assert summarize(mixed, server="ws://x", clients=1, requests=2, config={})["handoff_overhead_fraction"] == \
        pytest.approx(0.1)  # only where the device computed
    text = io.StringIO()
    _print_summary(summarize(edge_only, server="ws://x", clients=1, requests=1, config={}), text)
    assert "% of device compute" not in text.getvalue()


def test_a_free_text_prompt_past_the_encoders_limit_is_reported(tiny_family, fp32_bundle_dir, tmp_path, capsys):
    long_prompt = "a red sneaker in the top left and a pair of blue jeans on the right"  # > 32 byte tokens
    code, sent = _generate(tiny_family, fp32_bundle_dir, long_prompt, tmp_path / "img.png")
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and sent == [long_prompt]  # a free-text family encodes what it is given
    assert stderr == ["rise-device: note: the prompt is longer than this family's text encoder reads (32 tokens): "
                      "the words past that are ignored"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bench(family, bundle_dir: Path, extra: list[str]) -> int:
    async def scenario() -> int:
        async with FakeEdge(family) as edge:
            code: int = await asyncio.to_thread(main, [
                "bench", "--server", edge.url, "--bundle", str(bundle_dir), "--steps", "2", "--split", "1", *extra])
            return code

    result: int = run(scenario())
    return result


def test_bench_shows_progress_on_a_terminal_and_each_prompts_note_once(grammar_family, grammar_bundle_dir,
                                                                      monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert _bench(grammar_family, grammar_bundle_dir, ["--requests", "3", "--prompt", "a green bag", "--seed", "1"]) == 0
    err = terminal.getvalue()
    assert "bench" in err and "3/3" in err  # tqdm's bar, on stderr
    assert err.count("rise-device: note: ") == 1 and "placed the green bag" in err.lower()
    assert "ok 3/3" in capsys.readouterr().out


def test_bench_is_quiet_off_a_terminal_and_refuses_a_prompt_the_family_cannot_draw(grammar_family,
                                                                                  grammar_bundle_dir, capsys):
    assert _bench(grammar_family, grammar_bundle_dir, ["--requests", "2"]) == 0  # the built-in grammar prompts
    assert capsys.readouterr().err == ""  # no bar, no note: not a terminal, and every prompt read exactly
    assert _bench(grammar_family, grammar_bundle_dir, ["--requests", "2", "--prompt", "a cat on a sofa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rise-device: error: The demo family understood no item")


def test_an_edge_only_generation_reports_no_share_of_device_compute(tiny_family, fp32_bundle_dir, tmp_path, capsys):
    async def scenario() -> int:
        async with FakeEdge(tiny_family) as edge:
            code: int = await asyncio.to_thread(main, [
                "generate", "--server", edge.url, "--bundle", str(fp32_bundle_dir), "--prompt", "a red sneaker",
                "--steps", "2", "--split", "2", "--out", str(tmp_path / "x.png")])
            return code

    assert run(scenario()) == 0
    stdout = capsys.readouterr().out
    assert "overhead (transfer + decode)" in stdout and "% of device compute" not in stdout
    assert "pinned by this request" in stdout and "chosen by" not in stdout
