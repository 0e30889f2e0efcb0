"""Prompt complexity features: exact on the demo grammar, sensible heuristics on any English prompt."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.demo_grammar.prompts import heldout_prompts, load_prompts, prompt_to_scene
from shared.prompt_features import MAX_LEVEL, PromptFeatures, prompt_features


def test_demo_prompts_are_parsed_exactly():
    for prompt in load_prompts():
        n = prompt_to_scene(prompt).n_items
        f = prompt_features(prompt)
        assert f.parsed
        assert (f.items, f.attributes, f.relations, f.level) == (n, 2 * n, n, n)
        assert f.complexity == pytest.approx(n / 9)
        assert f.tokens >= 4 * n  # "a red bag in the top left": at least det, colour, noun, position


def test_heuristics_agree_with_the_grammar_on_demo_prompts():
    """The fallback gives the same counts as the exact parse on 2,000 demo prompts of both styles."""
    for prompt in heldout_prompts(seed=7, per_level=220):
        exact = prompt_features(prompt)
        guess = prompt_features(prompt, grammar=False)
        assert not guess.parsed
        assert (guess.items, guess.attributes, guess.relations) == (exact.items, exact.attributes, exact.relations), prompt


@pytest.mark.parametrize(
    ("prompt", "items", "attributes", "relations"),
    [
        ("a cat sitting on a red sofa next to a wooden table", 3, 5, 2),  # cat, sofa, table + red, wooden
        ("two dogs and a cat", 3, 3, 0),  # "two" counts twice
        ("cat and dog", 2, 2, 0),  # bare nouns after a separator
        ("red car", 1, 2, 0),
        ("an oil painting of a lighthouse", 1, 1, 0),  # the medium is not an item
        ("a photo of an astronaut riding a horse on the moon", 3, 3, 1),
        ("a cat on the left and a dog at the top", 2, 2, 2),  # places are relations, not items
        ("a green top and a pair of blue jeans", 2, 4, 0),  # "a top" is an item, "a pair of" one item
        ("portrait of an old man with a long white beard, highly detailed, 8k", 2, 5, 0),
        ("A bowl of fruit: three apples, a banana and some grapes on a marble table", 7, 8, 1),
    ],
)
def test_free_prompts(prompt, items, attributes, relations):
    f = prompt_features(prompt)
    assert not f.parsed
    assert (f.items, f.attributes, f.relations) == (items, attributes, relations)


def test_empty_and_odd_prompts():
    empty = prompt_features("")
    assert (empty.tokens, empty.items, empty.attributes, empty.relations) == (0, 0, 0, 0)
    assert empty.level == 1 and empty.complexity == 0.0
    assert prompt_features("!!! ??? ...").items == 0
    assert prompt_features("sunset").items == 1  # content without a determiner: one subject
    long = prompt_features(", ".join(["a red cat on a blue mat"] * 40))
    assert long.level == MAX_LEVEL and long.complexity == 1.0


def test_complexity_grows_with_the_scene():
    one = prompt_features("a red cat")
    two = prompt_features("a red cat next to a blue dog")
    three = prompt_features("a red cat next to a blue dog under a big green tree")
    assert one.complexity < two.complexity < three.complexity
    assert one.level < two.level < three.level


def test_to_dict_and_type_check():
    d = prompt_features("a red bag in the top left").to_dict()
    assert d == {"tokens": 7, "items": 1, "attributes": 2, "relations": 1, "parsed": True, "level": 1,
                 "complexity": pytest.approx(1 / 9)}
    with pytest.raises(TypeError):
        prompt_features(None)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_gives_bounded_features(text):
    f = prompt_features(text)
    assert isinstance(f, PromptFeatures)
    assert 0 <= f.items <= 4 * MAX_LEVEL and 0 <= f.relations and f.attributes >= f.items or f.parsed
    assert 1 <= f.level <= MAX_LEVEL and 0.0 <= f.complexity <= 1.0


def test_fast():
    prompts = [f"{p} {i}" for i, p in enumerate(load_prompts() * 4)]  # defeat the cache
    started = time.perf_counter()
    for p in prompts:
        prompt_features(p, grammar=False)
    per_prompt = (time.perf_counter() - started) / len(prompts)
    print(f"\nprompt_features (heuristics): {per_prompt * 1e6:.0f} us per demo prompt")
    assert per_prompt < 0.05  # a sanity bound (~100x the figure above); the figure is what matters
