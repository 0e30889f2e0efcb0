"""Progress of the lab's long runs: bars on a terminal's stderr, nothing when stderr is a file or a pipe,
stdout as it was (rise-eval, training, rise-sim; rise-export: tests/export/test_progress.py)."""

from __future__ import annotations

import io
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lab.progress import bar, counting, echo, progress_enabled


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _drawn(text: str) -> bool:
    """Whether tqdm drew a bar in ``text`` (its "n/total [" counter)."""
    return re.search(r"\d+/\d+ \[", text) is not None


def test_bars_follow_the_terminal_unless_told() -> None:
    assert progress_enabled(None, Terminal()) and not progress_enabled(None, io.StringIO())
    assert progress_enabled(True, io.StringIO()) and not progress_enabled(False, Terminal())
    closed = io.StringIO()
    closed.close()
    assert not progress_enabled(None, closed)


def test_a_bar_is_drawn_on_a_terminal_stderr_and_echo_keeps_stdout_lines_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    err, out = Terminal(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    with bar(desc="work", total=3) as pbar:
        for i in range(3):
            pbar.update(1)
            echo(f"line {i}")
    assert "work" in err.getvalue() and "3/3" in err.getvalue()
    assert out.getvalue() == "line 0\nline 1\nline 2\n"  # exactly what print would have written

    quiet_err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet_err)
    assert list(bar(range(3), desc="work")) == [0, 1, 2]
    assert quiet_err.getvalue() == ""


def test_counting_steps_the_bar_and_keeps_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with bar(desc="seeds", total=2) as pbar:
        report = counting(pbar)
        report("  seed 0: 1.0 s")
        report("  seed 1: 1.0 s")
        assert pbar.n == 2
    assert "  seed 0: 1.0 s\n" in err.getvalue() and "2/2" in err.getvalue()


# --------------------------------------------------------------------------- rise-eval


@pytest.fixture
def family(fashion_mnist: None, untrained_family: Path) -> Path:
    return untrained_family  # (tests/lab/conftest.py) rise-eval needs the data as well


def _eval(family: Path, cache: Path, *extra: str) -> int:
    from lab.demo_family.evaluate import main

    return main(["--family", str(family), "--limit", "2", "--steps", "2", "--splits", "0", "--ceiling-scenes", "8",
                 "--timing-prompts", "1", "--intensity-prompts", "2", "--cache-dir", str(cache), *extra])


def _table(stdout: str) -> list[str]:
    """rise-eval's stdout less what varies run to run (times, where the ceilings came from)."""
    return [re.sub(r"\d+(\.\d+)?", "#", line) for line in stdout.splitlines() if not line.startswith("ceilings (")]


def test_rise_eval_is_quiet_on_a_pipe_and_draws_bars_on_a_terminal(
        family: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert _eval(family, tmp_path / "a") == 0
    piped = capsys.readouterr()
    assert piped.err == ""  # stderr is captured, not a terminal: no bar
    assert "speedup" in piped.out

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert _eval(family, tmp_path / "b") == 0
    drawn = capsys.readouterr()
    assert "ceilings: VAE round trip" in terminal.getvalue() and "10/10" in terminal.getvalue()  # 8 + 2 prompts
    assert "split k=2" in terminal.getvalue() and "6/6" in terminal.getvalue()  # (2 + 1 timed) x 2 splits
    assert "\r" not in drawn.out and _table(drawn.out) == _table(piped.out)  # stdout as without bars

    before = terminal.getvalue()
    assert _eval(family, tmp_path / "c", "--no-progress") == 0
    assert terminal.getvalue() == before  # nothing more drawn
    forced = io.StringIO()
    monkeypatch.setattr(sys, "stderr", forced)
    assert _eval(family, tmp_path / "d", "--progress") == 0  # forced, on a non-terminal too
    assert _drawn(forced.getvalue())
    capsys.readouterr()


# --------------------------------------------------------------------------- training


def _stage(steps: int, progress: bool | None) -> object:
    from lab.demo_family.train import Stage, TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    stream = SimpleNamespace(rng=np.random.default_rng(1))

    def loss() -> torch.Tensor:
        x = torch.from_numpy(stream.rng.standard_normal((4, 3)).astype(np.float32))
        return model(x).pow(2).mean()

    cfg = replace(TrainConfig(), log_every=2, checkpoint_every_s=1e9)
    return Stage("large", {"m": model}, [{"params": list(model.parameters()), "lr": 0.1, "name": "m"}],
                 steps, 4, loss, stream, cfg, progress=progress)  # type: ignore[arg-type]  # a stand-in stream


def test_a_training_stage_draws_its_bar_with_the_loss_on_a_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _stage(4, None)
    stage.run(tmp_path / "a.pt")  # type: ignore[attr-defined]
    piped = capsys.readouterr()
    assert piped.err == "" and "[large] step 4/4 loss" in piped.out

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _stage(4, None).run(tmp_path / "b.pt")  # type: ignore[attr-defined]
    drawn = capsys.readouterr()
    assert re.search(r"large: 100%.*4/4 .*loss \d\.\d{4}", terminal.getvalue())
    assert [re.sub(r"\(.*\)", "", s) for s in drawn.out.splitlines()] == \
        [re.sub(r"\(.*\)", "", s) for s in piped.out.splitlines()]  # the log lines, times aside
    before = terminal.getvalue()
    _stage(4, False).run(tmp_path / "c.pt")  # type: ignore[attr-defined]
    assert terminal.getvalue() == before  # --no-progress: nothing drawn
    capsys.readouterr()


# --------------------------------------------------------------------------- rise-sim


def test_rise_sim_counts_its_seeds_on_a_terminal_and_keeps_its_lines_elsewhere(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.simulator import main

    argv = ["--requests", "120", "--devices", "10", "--warmup", "20", "--policies", "oracle", "--seeds", "2"]
    assert main(argv) == 0
    piped = capsys.readouterr()
    assert not _drawn(piped.err)
    assert re.findall(r"seed \d+:", piped.err) == ["seed 0:", "seed 1:"]  # the per-seed lines, as before

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    drawn = capsys.readouterr()
    assert "rise-sim seeds" in terminal.getvalue() and "2/2" in terminal.getvalue()
    assert re.findall(r"seed \d+:", terminal.getvalue()) == ["seed 0:", "seed 1:"]
    assert "\r" not in drawn.out
