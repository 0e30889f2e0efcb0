"""The demo family's tolerant prompt reader: what it draws of any text, and what it tells the user."""

from __future__ import annotations

import numpy as np
import pytest

from shared.demo_grammar.prompts import MAX_WORDS, heldout_prompts, prompt_to_scene, scene_to_prompt
from shared.demo_grammar.scene import N_CELLS, Item, random_scene
from shared.demo_grammar.understanding import (
    DEFAULT_COLOUR,
    canonical_prompt,
    example_prompts,
    read_prompt,
    vocabulary_line,
    vocabulary_markdown,
)


def test_prompts_of_the_grammar_are_read_exactly_and_passed_on_unchanged() -> None:
    for prompt in [*example_prompts(40, seed=3), *heldout_prompts(per_level=3)]:
        reading = read_prompt(prompt, seed=11)
        assert reading.message is None, prompt
        assert reading.prompt == prompt
        assert reading.scene == prompt_to_scene(prompt)
        assert reading.unknown_words == () and reading.notes == () and not reading.truncated


def test_an_item_without_a_position_is_placed_in_a_free_cell_chosen_from_the_seed() -> None:
    cells = set()
    for seed in range(20):
        reading = read_prompt("a green bag", seed)
        assert reading.scene is not None and reading.scene.n_items == 1
        ((cell, item),) = reading.scene.items()
        assert item == Item("bag", "green")
        assert read_prompt("a green bag", seed) == reading  # same text and seed: same reading
        assert prompt_to_scene(reading.prompt) == reading.scene  # the scorer reads what the family drew
        assert reading.message is not None and "chosen from the seed" in reading.message
        cells.add(cell)
    assert len(cells) > 1  # the seed decides, not a fixed cell


def test_repeated_items_are_spread_over_distinct_cells() -> None:
    for seed in range(10):
        reading = read_prompt("a bag, a bag and a bag", seed)
        assert reading.scene is not None
        items = reading.scene.items()
        assert len(items) == 3 and all(item == Item("bag", DEFAULT_COLOUR) for _, item in items)
        assert prompt_to_scene(reading.prompt) == reading.scene
    counted = read_prompt("three red bags and two pairs of blue jeans", 0).scene
    assert counted is not None
    assert sorted((i.category, i.colour) for _, i in counted.items()) == [("bag", "red")] * 3 + [("trousers", "blue")] * 2


def test_unknown_words_are_listed_and_the_items_among_them_drawn() -> None:
    reading = read_prompt("a red sneaker on a white table", 5)
    assert reading.unknown_words == ("table",)
    assert reading.scene is not None and [i for _, i in reading.scene.items()] == [Item("sneaker", "red")]
    message = reading.message
    assert message is not None and '"table"' in message and '"white"' in message and reading.prompt in message
    leather = read_prompt("a red leather handbag, a red leather handbag at the top", 1)
    assert leather.unknown_words == ("leather",)  # once, in order


def test_nothing_understood_says_so_and_lists_what_the_family_draws() -> None:
    for text in ("a cat on a sofa", "", "   ", "!!!", "a lighthouse on a cliff at sunset, oil painting"):
        reading = read_prompt(text, 0)
        assert reading.scene is None and reading.prompt == ""
        assert reading.message is not None and "no item" in reading.message
        assert vocabulary_line() in reading.message
    assert read_prompt("a cat on a sofa", 0).unknown_words == ("cat", "sofa")


def test_an_item_whose_cell_is_taken_moves_and_more_than_nine_are_dropped() -> None:
    reading = read_prompt("a red bag in the top left and a blue boot in the top left", 4)
    assert reading.scene is not None
    assert reading.scene.cells[0] == Item("bag", "red")
    assert Item("ankle boot", "blue") in reading.scene.cells[1:]
    assert reading.message is not None and "taken" in reading.message
    many = read_prompt(", ".join(["a yellow dress"] * 12), 9)
    assert many.scene is not None and many.scene.n_items == N_CELLS
    assert any("left out" in note for note in many.notes)


def test_text_past_the_encoders_limit_is_cut_and_reported() -> None:
    text = " ".join(["a green bag in the top left"] * 20)  # 140 words
    reading = read_prompt(text, 0)
    assert reading.truncated and reading.message is not None and "first" in reading.message
    assert len(reading.prompt.split()) <= MAX_WORDS and prompt_to_scene(reading.prompt) == reading.scene
    short = read_prompt("a green bag in the top left and a red bag on the right", 0, max_words=7)
    assert short.truncated and short.scene is not None and short.scene.n_items == 1  # the second item was cut
    assert not read_prompt("a green bag in the top left", 0, max_words=7).truncated


def test_every_message_is_one_line_that_fits_a_plan_frames_notice() -> None:
    texts = [", ".join(["a tee"] * 40), "cat " * 500, "a\nred\tbag\n\nin the top left please", "x" * 5000,
             "seven purple pullovers near nine dresses and three crimson boots with a fox"]
    for text in texts:
        message = read_prompt(text, 3).message
        assert message is not None and len(message) <= 512 and "\n" not in message


def test_the_canonical_prompt_of_every_scene_parses_back() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng)
        assert prompt_to_scene(canonical_prompt(scene)) == scene
        assert len(canonical_prompt(scene).split()) <= MAX_WORDS
        # a paraphrase the grammar renders reads back exactly too
        assert read_prompt(scene_to_prompt(scene, rng), 0).scene == scene


@pytest.mark.parametrize("text", ["top: a red bag; center: a blue boot", "a red top at the top",
                                  "a picture of a crimson trainer at the upper left corner"])
def test_tolerant_paraphrases_read_as_the_grammar_means(text: str) -> None:
    reading = read_prompt(text.upper() + " please", 2)  # not exact any more: read by the tolerant reader
    assert reading.unknown_words == ("please",)
    assert reading.scene == prompt_to_scene(text)


def test_example_prompts_and_vocabulary_come_from_the_grammar() -> None:
    examples = example_prompts(5, seed=4)
    assert len(examples) == 5 and examples == example_prompts(5, seed=4)
    assert all(prompt_to_scene(p).n_items <= 3 for p in examples)
    line = vocabulary_line()
    assert "\n" not in line and all(word in line for word in ("sneaker", "red", "top left"))
    markdown = vocabulary_markdown()
    assert markdown.startswith("### ")
    quoted = [line[3:-1] for line in markdown.splitlines() if line.startswith("- *") and line.endswith("*") and not line.startswith("- **")]
    assert len(quoted) >= 3 and all(prompt_to_scene(p) for p in quoted)


def test_the_reader_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from shared.demo_grammar.understanding import main

    assert main(["a green bag", "--seed", "3"]) == 0
    drawn, note = capsys.readouterr().out.splitlines()
    assert drawn == f"drawn: {read_prompt('a green bag', 3).prompt}" and "chosen from the seed" in note
    assert main(["a cat on a sofa"]) == 2
    assert "drawn: (nothing)" in capsys.readouterr().out
