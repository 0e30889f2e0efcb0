"""``rise-relay`` on a family that speaks the demo grammar: it draws the family's reading of a prompt, says so
in one line, and refuses a prompt of which the family would draw nothing (never a silent blank picture)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lab.local_relay import main as relay_main
from shared.demo_grammar.prompts import prompt_to_scene
from shared.demo_grammar.understanding import read_prompt
from tests.device_app.test_cli_prompts import grammar_bundle_dir, grammar_family, grammar_family_dir

__all__ = ["grammar_bundle_dir", "grammar_family", "grammar_family_dir"]  # fixtures, shared with the CLI's tests
SEED = 7


def _relay(family_dir: Path, bundle_dir: Path, prompt: str, out: Path) -> int:
    return relay_main(["--family", str(family_dir), "--bundle", str(bundle_dir), "--prompt", prompt,
                       "--steps", "2", "--split", "1", "--seed", str(SEED), "--threads", "1", "--out", str(out)])


@pytest.mark.parametrize("prompt", ["a green bag", "a red sneaker on a white table", "a bag, a bag and a bag",
                                    " ".join(["a green bag in the top left"] * 20)])
def test_rise_relay_draws_the_reading_and_says_how_it_read_the_prompt(grammar_family_dir, grammar_bundle_dir,
                                                                      tmp_path, capsys, prompt):
    out = tmp_path / "img.png"
    assert _relay(grammar_family_dir, grammar_bundle_dir, prompt, out) == 0
    stdout, stderr = capsys.readouterr()
    reading = read_prompt(prompt, SEED, max_words=30)  # the tiny tokenizer's 32 tokens less start and end
    assert reading.scene is not None and reading.message is not None
    assert stderr.splitlines() == [f"rise-relay: note: {reading.message}"]
    assert f"prompt drawn: {reading.prompt}" in stdout and prompt_to_scene(reading.prompt) == reading.scene
    assert Image.open(out).size == (32, 32)


def test_rise_relay_refuses_a_prompt_the_family_draws_nothing_of(grammar_family_dir, grammar_bundle_dir, tmp_path,
                                                                 capsys):
    out = tmp_path / "img.png"
    assert _relay(grammar_family_dir, grammar_bundle_dir, "a cat on a sofa", out) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("rise-relay: error: The demo family understood no item")
    assert '"cat", "sofa"' in stderr[0] and not out.exists()


def test_rise_relay_draws_a_grammar_prompt_as_typed(grammar_family_dir, grammar_bundle_dir, tmp_path, capsys):
    prompt = "a red sneaker in the top left"
    assert _relay(grammar_family_dir, grammar_bundle_dir, prompt, tmp_path / "img.png") == 0
    stdout, stderr = capsys.readouterr()
    assert stderr == "" and "prompt drawn:" not in stdout
