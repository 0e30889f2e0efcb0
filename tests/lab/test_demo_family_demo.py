"""The README's first command (lab/demo.py) on a demo-grammar family: pictures and a contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lab.demo import DEFAULT_PLAN, contact_sheet, demo_prompts


def test_demo_prompts_follow_the_grammar_and_span_complexity_levels() -> None:
    from shared.demo_grammar.prompts import prompt_to_scene

    levels = [prompt_to_scene(p).n_items for p in demo_prompts()]
    assert levels == [1, 2, 3, 4, 5, 6]
    assert 0 < DEFAULT_PLAN.split < DEFAULT_PLAN.num_inference_steps  # the default is a real relay


def test_contact_sheet_tiles_every_image_with_its_caption() -> None:
    images = [np.full((48, 48, 3), 40 * i, dtype=np.uint8) for i in range(5)]
    captions = [f"prompt number {i} " * (i + 1) for i in range(5)]
    sheet = contact_sheet(images, captions, tile=96, columns=3)
    assert sheet.size[0] == 3 * (96 + 8) + 8
    arr = np.asarray(sheet)
    # The fourth image (row 2, column 1) is pasted, upscaled, where the layout says.
    cap_h = (arr.shape[0] - 8) // 2 - 96 - 8
    y = 8 + 96 + cap_h + 8
    assert (arr[y : y + 96, 8 : 8 + 96] == 120).all()
    # Captions are drawn (dark pixels under the first tile).
    assert (arr[8 + 96 : 8 + 96 + cap_h, 8 : 8 + 96] < 100).any()
    with pytest.raises(ValueError):
        contact_sheet(images, captions[:2])


@pytest.mark.slow
def test_demo_on_a_demo_grammar_family_writes_pictures_and_a_contact_sheet(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from lab.demo import main
    from lab.demo_family.train import build_untrained_family

    family = build_untrained_family(tmp_path / "family")
    out = tmp_path / "out"
    assert main(["--out", str(out), "--family", str(family)]) == 0
    printed = capsys.readouterr().out
    assert "contact_sheet.png" in printed and "RANDOM" not in printed
    assert len(list(out.glob("image_*.png"))) == len(demo_prompts())
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 3 * 192 and sheet.size[1] > 2 * 192
    # A second run reuses the exported bundle.
    assert main(["--out", str(out), "--family", str(family)]) == 0
    assert "exporting" not in capsys.readouterr().out


def test_demo_refuses_a_folder_that_is_not_a_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lab.demo import main

    assert main(["--out", str(tmp_path / "out"), "--family", str(tmp_path)]) == 2
    assert "not a family folder" in capsys.readouterr().err
