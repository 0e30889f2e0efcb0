"""rise-export's bad-input paths: one stderr line ``rise-export: error: ...`` and exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from export.cli import main
from lab.tiny_family import build_tiny_family

REPO = Path(__file__).resolve().parents[2]


def _run(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("rise-export: error: "), err
    return lines[0]


def test_missing_family_folder(capsys, tmp_path: Path) -> None:
    line = _run(capsys, ["--family", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert "does not exist" in line


def test_family_without_second_denoiser(capsys, tiny_family_dir: Path, tmp_path: Path) -> None:
    family = tmp_path / "fam"
    shutil.copytree(tiny_family_dir, family, ignore=shutil.ignore_patterns("unet_small"))
    line = _run(capsys, ["--family", str(family), "--out", str(tmp_path / "b")])
    assert "no second denoiser" in line and "unet_small" in line


def test_unknown_small_model(capsys, tiny_family_dir: Path, tmp_path: Path) -> None:
    line = _run(capsys, ["--family", str(tiny_family_dir), "--small", "unet_tiny", "--out", str(tmp_path / "b")])
    assert "unet_tiny" in line


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"small_latent_channels": 8}, "in_channels=8"), ({"small_cross_attention_dim": 48}, "cross-attention width")],
)
def test_incompatible_small_model(capsys, tmp_path: Path, kwargs: dict, words: str) -> None:
    family = build_tiny_family(tmp_path / "fam", **kwargs)
    line = _run(capsys, ["--family", str(family), "--out", str(tmp_path / "b")])
    assert words in line


def test_non_empty_out_is_refused(capsys, tiny_family_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty" in _run(capsys, ["--family", str(tiny_family_dir), "--out", str(out)])
    # --force replaces a previous bundle only, never a folder that holds no manifest
    assert "refusing" in _run(capsys, ["--family", str(tiny_family_dir), "--out", str(out), "--force"])
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_flag_combinations(capsys, tiny_family_dir: Path, tmp_path: Path) -> None:
    base = ["--family", str(tiny_family_dir), "--out", str(tmp_path / "b")]
    assert "int8" in _run(capsys, [*base, "--dtype", "fp16", "--quantize", "int8"])
    assert "--dtype" in _run(capsys, [*base, "--dtype", "fp64"])
    assert "--out" in _run(capsys, ["--family", str(tiny_family_dir)])
    assert "lacks" in _run(capsys, [*base, "--from-onnx", str(tiny_family_dir)])


def test_python_dash_m_export_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--family", str(tmp_path / "missing"), "--out", str(tmp_path / "b")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    expected = f"rise-export: error: family folder {tmp_path / 'missing'} does not exist"
    assert proc.stderr.strip().splitlines() == [expected]
