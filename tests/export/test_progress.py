"""rise-export's progress: a bar on a terminal's stderr, nothing when stderr is a file or pipe, stdout unchanged."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from export.cli import main
from export.progress import enabled


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _lines(stdout: str) -> list[str]:
    """stdout without what varies run to run (times, errors, the --out folder)."""
    return [re.sub(r"\d+(\.\d+)?(e[-+]\d+)?", "#", line) for line in stdout.splitlines() if "written to" not in line]


def test_the_bar_follows_the_terminal_unless_told() -> None:
    assert enabled(None, Terminal()) and not enabled(None, io.StringIO())
    assert enabled(True, io.StringIO()) and not enabled(False, Terminal())
    closed = io.StringIO()
    closed.close()
    assert not enabled(None, closed)


def test_export_draws_a_bar_on_a_terminal_only(optimum_small_dir: Path, tiny_family_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--family", str(tiny_family_dir), "--from-onnx", str(optimum_small_dir)]
    assert main([*argv, "--out", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == ""  # stderr is not a terminal: no bar
    assert "rise-export: validating unet" in quiet.out

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*argv, "--out", str(tmp_path / "drawn")]) == 0
    drawn = capsys.readouterr()
    bar = terminal.getvalue()
    assert "validating text_encoder" in bar and "8/8" in bar  # 2 + 2 per graph, all done
    assert "\r" not in drawn.out and _lines(drawn.out) == _lines(quiet.out)  # stdout as without a bar

    assert main([*argv, "--out", str(tmp_path / "forced-off"), "--no-progress"]) == 0
    assert terminal.getvalue() == bar  # nothing more drawn
    capsys.readouterr()


def test_progress_can_be_forced_onto_a_file(optimum_small_dir: Path, tiny_family_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--family", str(tiny_family_dir), "--from-onnx", str(optimum_small_dir), "--out",
                 str(tmp_path / "b"), "--progress"]) == 0
    assert "8/8" in capsys.readouterr().err
