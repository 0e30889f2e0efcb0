"""Prompts of the demo family: vocabulary, templates with paraphrases, and an exact parser.

Every prompt describes one :class:`~lab.demo_family.data.Scene`, item by item, in one
of two styles, each with paraphrases of categories, colours, positions and the opening::

    a red sneaker in the top left, a pair of blue jeans on the right and a white tee in the middle
    three things: a turquoise handbag at the bottom, an orange gown in the upper left and ...
    top left: a red trainer; center: a violet jumper

The grammar is unambiguous, so :func:`prompt_to_scene` recovers the exact scene that
:func:`scene_to_prompt` rendered (the scorer needs the target of a prompt): a clause is a
noun phrase and a position, clauses are separated by ", ", " and " (noun phrase first) or
"; " (position first), and no category, colour or position phrase contains a separator.

Pure Python (no torch): the device and the harness can parse prompts too.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.demo_grammar.scene import CATEGORIES, COLOUR_NAMES, N_CELLS, Item, Scene, random_scene
from shared.errors import RiseError

#: Paraphrases of each category. The first is the canonical name. Plural nouns take
#: "a pair of" / "some" instead of "a"/"an".
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "top"),
    "trousers": ("trousers", "pants", "jeans"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress", "gown"),
    "sandal": ("sandal", "strappy sandal"),
    "sneaker": ("sneaker", "trainer", "running shoe"),
    "bag": ("bag", "handbag", "purse"),
    "ankle boot": ("ankle boot", "boot", "bootie"),
}
_PLURAL = {"trousers", "pants", "jeans"}

#: Paraphrases of each colour; the first is the canonical name.
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "cyan": ("cyan", "turquoise"),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "white": ("white",),
}

#: Position phrases per cell (row-major), each with the prepositions that read naturally
#: before it ("on the left", "at the top", "in the top left corner").
POSITION_WORDS: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (("top left", ("in", "at")), ("upper left", ("in", "at")), ("top left corner", ("in", "at")),
     ("upper left corner", ("in", "at"))),
    (("top", ("at",)), ("top middle", ("in", "at")), ("top center", ("in", "at"))),
    (("top right", ("in", "at")), ("upper right", ("in", "at")), ("top right corner", ("in", "at")),
     ("upper right corner", ("in", "at"))),
    (("left", ("on",)), ("middle left", ("in", "on")), ("center left", ("in", "on"))),
    (("center", ("in", "at")), ("middle", ("in",))),
    (("right", ("on",)), ("middle right", ("in", "on")), ("center right", ("in", "on"))),
    (("bottom left", ("in", "at")), ("lower left", ("in", "at")), ("bottom left corner", ("in", "at")),
     ("lower left corner", ("in", "at"))),
    (("bottom", ("at",)), ("bottom middle", ("in", "at")), ("bottom center", ("in", "at"))),
    (("bottom right", ("in", "at")), ("lower right", ("in", "at")), ("bottom right corner", ("in", "at")),
     ("lower right corner", ("in", "at"))),
)

COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Openings of the noun-phrase-first style; ``{n}`` is a count word, ``{s}`` a plural "s".
OPENINGS = ("", "{n} thing{s}: ", "{n} item{s}: ", "{n} object{s}: ", "a picture of ", "a grid with ")
#: Fraction of prompts in the position-first ("top left: a red bag; ...") style.
POSITION_FIRST_P = 0.25

#: Longest prompt in words (see :func:`words`) the grammar can produce: a 3-word opening, nine
#: 10-word clauses ("a pair of crimson trousers in the top left corner"), eight separators and
#: the "and" of a final ", and". A text encoder for the family needs this many positions plus
#: two (start and end tokens).
MAX_WORDS = 3 + N_CELLS * 10 + (N_CELLS - 1) + 1

DEFAULT_PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
EVAL_SEED = 2026
EVAL_PER_LEVEL = 25


class PromptError(RiseError, ValueError):
    """A prompt does not follow the demo family's grammar (says which part does not)."""


def _check_tables() -> None:
    # Separators inside a phrase would make the parse ambiguous.
    for phrases in (*CATEGORY_WORDS.values(), *COLOUR_WORDS.values(), *[[p for p, _ in c] for c in POSITION_WORDS]):
        for phrase in phrases:
            assert not re.search(r"[,;:]| and ", f" {phrase} "), phrase
    assert tuple(CATEGORY_WORDS) == CATEGORIES and tuple(COLOUR_WORDS) == COLOUR_NAMES
    assert len(POSITION_WORDS) == N_CELLS


_check_tables()

_CATEGORY_OF = {w: c for c, ws in CATEGORY_WORDS.items() for w in ws}
_COLOUR_OF = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
_CELL_OF = {p: cell for cell, ps in enumerate(POSITION_WORDS) for p, _ in ps}
_PREPS_OF = {p: preps for ps in POSITION_WORDS for p, preps in ps}


def _alternation(phrases: Sequence[str]) -> str:
    # Longest first, so "top left corner" wins over "top left" and "ankle boot" over "boot".
    return "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))


_NP = re.compile(
    rf"(?:a pair of|some|an|a) (?P<colour>{_alternation(list(_COLOUR_OF))}) "
    rf"(?P<category>{_alternation(list(_CATEGORY_OF))})"
)
_POS = _alternation(list(_CELL_OF))
_NP_FIRST = re.compile(rf"(?P<np>.+) (?:in|at|on) the (?P<pos>{_POS})")
_POS_FIRST = re.compile(rf"(?P<pos>{_POS}): (?P<np>.+)")
_OPENING = re.compile(
    rf"^(?:(?P<count>{'|'.join(COUNT_WORDS)}) (?:thing|item|object)s?: |a picture of |a grid with )"
)


def _noun_phrase(item: Item, rng: np.random.Generator) -> str:
    colour = _choice(COLOUR_WORDS[item.colour], rng)
    noun = _choice(CATEGORY_WORDS[item.category], rng)
    if noun in _PLURAL:
        det = _choice(("a pair of", "some"), rng)
    else:
        det = "an" if colour[0] in "aeiou" else "a"
    return f"{det} {colour} {noun}"


def _choice(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def scene_to_prompt(scene: Scene, rng: np.random.Generator) -> str:
    """A random paraphrase describing ``scene``; items come in random order."""
    items = scene.items()
    order = rng.permutation(len(items))
    if rng.random() < POSITION_FIRST_P:
        clauses = []
        for j in order:
            cell, item = items[j]
            pos, _ = POSITION_WORDS[cell][int(rng.integers(len(POSITION_WORDS[cell])))]
            clauses.append(f"{pos}: {_noun_phrase(item, rng)}")
        return "; ".join(clauses)
    clauses = []
    for j in order:
        cell, item = items[j]
        pos, preps = POSITION_WORDS[cell][int(rng.integers(len(POSITION_WORDS[cell])))]
        clauses.append(f"{_noun_phrase(item, rng)} {_choice(preps, rng)} the {pos}")
    if len(clauses) == 1:
        body = clauses[0]
    else:
        last_sep = _choice((" and ", ", and ", ", "), rng)
        body = ", ".join(clauses[:-1]) + last_sep + clauses[-1]
    n = len(items)
    opening = _choice(OPENINGS, rng).format(n=COUNT_WORDS[n - 1], s="" if n == 1 else "s")
    return opening + body


def prompt_to_scene(prompt: str) -> Scene:
    """Parse a prompt of this grammar back into its scene; :class:`PromptError` if it is not one.

    Case and surrounding whitespace are ignored, as is a final full stop.
    """
    text = " ".join(prompt.lower().split()).rstrip(".")
    count: int | None = None
    opening = _OPENING.match(text)
    if opening:
        if opening.group("count"):
            count = COUNT_WORDS.index(opening.group("count")) + 1
        text = text[opening.end() :]
    if not text:
        raise PromptError(f"no items in prompt {prompt!r}")
    position_first = re.match(rf"(?:{_POS}): ", text) is not None
    raw = text.split("; ") if position_first else re.split(r", and |, | and ", text)
    cells: list[Item | None] = [None] * N_CELLS
    for clause in raw:
        m = (_POS_FIRST if position_first else _NP_FIRST).fullmatch(clause)
        if m is None:
            raise PromptError(f"cannot read {clause!r} (in {prompt!r}) as an item and a position")
        np_match = _NP.fullmatch(m.group("np"))
        if np_match is None:
            raise PromptError(
                f"cannot read {m.group('np')!r} (in {prompt!r}) as 'a <colour> <category>'; "
                f"colours: {', '.join(_COLOUR_OF)}; categories: {', '.join(_CATEGORY_OF)}"
            )
        cell = _CELL_OF[m.group("pos")]
        if cells[cell] is not None:
            raise PromptError(f"two items at the {m.group('pos')} in {prompt!r}")
        cells[cell] = Item(_CATEGORY_OF[np_match.group("category")], _COLOUR_OF[np_match.group("colour")])
    if count is not None and count != len(raw):
        raise PromptError(f"{prompt!r} announces {count} items but describes {len(raw)}")
    return Scene(tuple(cells))


def words(prompt: str) -> list[str]:
    """The prompt as words and punctuation marks (the unit a word-level tokenizer needs)."""
    return re.findall(r"[a-z][a-z\-]*|[,;:]", prompt.lower())


def vocabulary() -> list[str]:
    """Every word and punctuation mark the grammar can produce, sorted."""
    phrases = [
        *_CATEGORY_OF, *_COLOUR_OF, *_CELL_OF, *COUNT_WORDS, *OPENINGS,
        "a an a pair of some in at on the and , ; :",
        "things items objects",
    ]
    return sorted({w for p in phrases for w in words(p.replace("{n}", "").replace("{s}", ""))})


def heldout_prompts(seed: int = EVAL_SEED, per_level: int = EVAL_PER_LEVEL) -> list[str]:
    """The evaluation prompt set: ``per_level`` distinct scenes for each item count 1..9.

    Levels are interleaved (1, 2, ..., 9, 1, 2, ...) so any prefix of the list covers every
    complexity level about evenly.
    """
    rng = np.random.default_rng(seed)
    by_level: list[list[str]] = []
    for level in range(1, N_CELLS + 1):
        seen: set[Scene] = set()
        prompts: list[str] = []
        while len(prompts) < per_level:
            scene = random_scene(rng, level)
            if scene not in seen:
                seen.add(scene)
                prompts.append(scene_to_prompt(scene, rng))
        by_level.append(prompts)
    return [by_level[level][i] for i in range(per_level) for level in range(N_CELLS)]


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Prompts of a prompt file (one a line; blank lines and ``#`` comments skipped)."""
    lines = Path(path or DEFAULT_PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def eval_scenes(path: str | Path | None = None) -> set[Scene]:
    """The scenes of the evaluation prompts (training can leave them out)."""
    return {prompt_to_scene(p) for p in load_prompts(path)}


def write_prompts_file(
    path: str | Path = DEFAULT_PROMPTS_FILE, seed: int = EVAL_SEED, per_level: int = EVAL_PER_LEVEL
) -> Path:
    """Write :func:`heldout_prompts` to ``path`` with a header saying how it was made."""
    prompts = heldout_prompts(seed, per_level)
    header = (
        f"# RISE demo family evaluation prompts: {per_level} distinct scenes per item count 1..{N_CELLS}, "
        f"levels interleaved.\n"
        f"# Generated by `python -m shared.demo_grammar.prompts --write --seed {seed} "
        f"--per-level {per_level}`; do not edit by hand.\n"
    )
    Path(path).write_text(header + "\n".join(prompts) + "\n", encoding="utf-8")
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shared.demo_grammar.prompts [--write] [--sample N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"(re)write {DEFAULT_PROMPTS_FILE.name}")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--per-level", type=int, default=EVAL_PER_LEVEL)
    parser.add_argument("--sample", type=int, default=0, help="print N random prompts")
    args = parser.parse_args(argv)
    if args.write:
        print(f"wrote {write_prompts_file(DEFAULT_PROMPTS_FILE, args.seed, args.per_level)}")
    rng = np.random.default_rng(args.seed)
    for _ in range(args.sample):
        print(scene_to_prompt(random_scene(rng), rng))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
