"""A tolerant reader of prompts for the demo family: what it can draw of any text, and what it leaves out.

The demo family draws only scenes of its grammar (:mod:`shared.demo_grammar.prompts`): up to nine
tinted Fashion-MNIST items on a 3x3 grid, each named with a colour and a cell. Text outside the
grammar would be drawn as an empty canvas, so every tool that encodes a prompt for the family
first reads it here (:func:`read_prompt`) and gives the family the canonical prompt of what was
understood, telling the user the rest in one line (:attr:`PromptReading.message`):

- an item is a category (or a paraphrase: "trainer", "purse", "jeans"...), optionally after a
  colour; an item without a colour is **white** (white is no tint: the item's own grey shades);
- an item without a position goes to a free cell chosen from the seed (the same seed, the same
  cell); several of the same item without positions go to distinct free cells;
- an item whose cell is already taken moves to a free cell; items past the ninth are dropped;
- a count before an item repeats it ("three red bags"); "things", "items", "objects" after a
  count are the grammar's opening, not items;
- every other word is reported as not understood; the grammar's own small words (a, the, in,
  at, on, and, some, pair, of...) are understood and pass silently;
- the family reads at most :data:`~shared.demo_grammar.prompts.MAX_WORDS` words (its text
  encoder's limit less the start and end tokens); words past that are cut and reported.

A prompt of the grammar itself is read exactly (:func:`~shared.demo_grammar.prompts.prompt_to_scene`)
and passed on unchanged, with no message. Pure Python (no torch): the edge, the device and the
lab read prompts alike.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.demo_grammar.prompts import (
    CATEGORY_WORDS,
    COLOUR_WORDS,
    COUNT_WORDS,
    MAX_WORDS,
    POSITION_WORDS,
    PromptError,
    prompt_to_scene,
    scene_to_prompt,
)
from shared.demo_grammar.scene import N_CELLS, Item, Scene, SceneError, random_scene

__all__ = [
    "DEFAULT_COLOUR",
    "GRAMMAR_NAME",
    "PromptReading",
    "canonical_prompt",
    "example_prompts",
    "read_prompt",
    "read_prompt_as",
    "vocabulary_line",
    "vocabulary_markdown",
]

#: The ``prompt_grammar`` a bundle manifest or a family names when it speaks this grammar.
GRAMMAR_NAME = "demo"
#: What an item without a colour becomes: white, the untinted item.
DEFAULT_COLOUR = "white"

#: Cell names for notes and canonical prompts: the first phrase of each cell, with its preposition.
_CELL_NAME = tuple(phrases[0][0] for phrases in POSITION_WORDS)
_CELL_PREP = tuple(phrases[0][1][0] for phrases in POSITION_WORDS)
_PLURAL_NOUNS = ("trousers", "pants", "jeans")
#: Words of the grammar that carry no item, colour or position of their own.
_FILLER = frozenset({
    "a", "an", "the", "some", "pair", "pairs", "of", "in", "at", "on", "and", "with", "picture", "grid",
    "corner", "thing", "things", "item", "items", "object", "objects",
})
_OPENING_NOUNS = frozenset({"thing", "things", "item", "items", "object", "objects"})
_DETERMINERS = frozenset({"a", "an", "some", "the", "with"})
_COUNTS = {**{word: n for n, word in enumerate(COUNT_WORDS, 1)}, **{str(n): n for n in range(1, N_CELLS + 1)}}
_SEPARATORS = frozenset({",", ";", "and", "."})
_LISTED_CELLS = 3  # notes name the cells of at most this many placed items
#: A message fits a plan frame's notice (512 characters) with room to spare.
MAX_MESSAGE_CHARS = 500
_TOKEN = re.compile(r"[a-z0-9][a-z0-9'\-]*|[,;:.]")


def _plural(noun: str) -> str:
    if noun in _PLURAL_NOUNS:
        return noun
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def _phrase_table() -> list[tuple[tuple[str, ...], str, object]]:
    """Every phrase the reader knows, as word tuples, longest first: (words, kind, value)."""
    rows: list[tuple[tuple[str, ...], str, object]] = []
    for category, nouns in CATEGORY_WORDS.items():
        for noun in nouns:
            rows.append((tuple(noun.split()), "category", (category, 1)))
            plural = noun.split()
            plural[-1] = _plural(plural[-1])
            if tuple(plural) != tuple(noun.split()):
                rows.append((tuple(plural), "category", (category, 2)))  # 2: plural, the count says how many
    for colour, names in COLOUR_WORDS.items():
        for name in names:
            rows.append(((name,), "colour", colour))
    for cell, phrases in enumerate(POSITION_WORDS):
        for phrase, _ in phrases:
            rows.append((tuple(phrase.split()), "position", cell))
    rows.append((("t", "shirt"), "category", ("t-shirt", 1)))
    rows.append((("t", "shirts"), "category", ("t-shirt", 2)))
    rows.append((("tshirt",), "category", ("t-shirt", 1)))
    rows.append((("tshirts",), "category", ("t-shirt", 2)))
    rows.sort(key=lambda row: len(row[0]), reverse=True)
    return rows


_PHRASES = _phrase_table()


@dataclass(frozen=True)
class PromptReading:
    """How the demo family reads a text (see the module docstring).

    ``text`` is what the user typed; ``prompt`` what the family is given (a prompt of the grammar:
    the text itself when it is one, else the canonical prompt of ``scene``; ``""`` when nothing was
    understood); ``scene`` the scene drawn (``None``: nothing understood); ``unknown_words`` the
    words not understood, in order, once each; ``notes`` plain-language notes on what was filled
    in, moved, dropped or cut; ``truncated``: the text was longer than the family reads.
    """

    text: str
    prompt: str
    scene: Scene | None
    unknown_words: tuple[str, ...]
    notes: tuple[str, ...]
    truncated: bool

    @property
    def exact(self) -> bool:
        """The text is a prompt of the grammar, read as written."""
        return self.scene is not None and not self.unknown_words and not self.notes and not self.truncated

    @property
    def message(self) -> str | None:
        """One line for the user; ``None`` when the text was understood exactly as typed."""
        if self.exact:
            return None
        parts: list[str] = []
        shown = 8 if self.scene is not None else 4
        if self.scene is None:
            parts.append(f"The demo family understood no item in {_quote(self.text, 40)}.")
        if self.unknown_words:
            words = ", ".join(f'"{_clip(w, 20)}"' for w in self.unknown_words[:shown])
            more = f" and {len(self.unknown_words) - shown} more" if len(self.unknown_words) > shown else ""
            parts.append(f"Not understood: {words}{more}.")
        if self.scene is not None:
            parts.extend(_sentence(note) for note in self.notes)
            parts.append(f'Drawing "{self.prompt}".')
        else:  # what it can draw instead; the notes (a colour without an item...) would only be noise
            parts.append(vocabulary_line())
        message = " ".join(parts)
        return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 4] + '..."'



def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(text: str, limit: int = 60) -> str:
    return f'"{_clip(" ".join(text.split()), limit)}"'


def _sentence(note: str) -> str:
    note = note[:1].upper() + note[1:]
    return note if note.endswith(".") else note + "."


@dataclass
class _Mention:
    """An item as the text names it, before it has a cell."""

    category: str
    colour: str | None
    cell: int | None = None
    clause: int = 0


def _article(colour: str, category: str) -> str:
    if category == "trousers":
        return "a pair of"
    return "an" if colour[0] in "aeiou" else "a"


def _describe(item: Item) -> str:
    """'the red bag', 'the white trousers': an item in a note."""
    return f"the {item.colour} {item.category}"


def canonical_prompt(scene: Scene) -> str:
    """The one fixed way this reader writes ``scene`` as a prompt of the grammar (cells in reading order)."""
    clauses = [
        f"{_article(item.colour, item.category)} {item.colour} {item.category} {_cell_words(cell)}"
        for cell, item in scene.items()
    ]
    if len(clauses) == 1:
        return clauses[0]
    return ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _cell_words(cell: int) -> str:
    return f"{_CELL_PREP[cell]} the {_CELL_NAME[cell]}"


def _scan(tokens: Sequence[str]) -> tuple[list[_Mention], list[str], list[str]]:
    """Items with the positions their clauses give them, the words not understood, and notes."""
    mentions: list[_Mention] = []
    unknown: list[str] = []
    notes: list[str] = []
    # Per clause: the mentions and positions in order, paired once the clause ends.
    clause_events: list[tuple[str, int]] = []  # ("item", mention index) | ("position", cell)
    clause = 0
    colour: str | None = None  # a colour waiting for its item
    colour_word = ""
    count: int | None = None  # a count word waiting for its item ("three red bags")

    def end_clause() -> None:
        nonlocal colour, count, clause
        if colour is not None:
            notes.append(f'"{colour_word}" names no item, so it was left out')
        colour, count = None, None
        _pair(clause_events, mentions, notes)
        clause_events.clear()
        clause += 1

    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in _SEPARATORS:
            end_clause()
            i += 1
            continue
        if token == ":":
            i += 1
            continue
        match = next(((words, kind, value) for words, kind, value in _PHRASES
                      if tuple(tokens[i : i + len(words)]) == words), None)
        if token == "top" and match is not None and len(match[0]) == 1:
            # "top" is a t-shirt ("a red top") and a cell ("at the top", "top: a red bag")
            previous = tokens[i - 1] if i else ""
            following = tokens[i + 1] if i + 1 < len(tokens) else ""
            if previous == "the" or following == ":":
                match = (("top",), "position", 1)
        if match is not None:
            words, kind, value = match
            i += len(words)
            if kind == "colour":
                assert isinstance(value, str)
                colour, colour_word = value, words[0]
            elif kind == "position":
                assert isinstance(value, int)
                clause_events.append(("position", value))
            else:
                assert isinstance(value, tuple)
                category, number = value
                n = count if count is not None else 1
                if number == 2 and count is None:
                    n = 1  # "bags" alone: one (a count says how many)
                for _ in range(n):
                    clause_events.append(("item", len(mentions)))
                    mentions.append(_Mention(category, colour, clause=clause))
                colour, count = None, None
            continue
        if token in _COUNTS:
            following = tokens[i + 1] if i + 1 < len(tokens) else ""
            if following not in _OPENING_NOUNS:  # "three things:" opens the grammar's list: no count
                count = _COUNTS[token]
            i += 1
            continue
        if token in _DETERMINERS and colour is not None:  # "a red sofa with a bag": red is not the bag's
            notes.append(f'"{colour_word}" names no item, so it was left out')
            colour = None
        if token not in _FILLER:
            unknown.append(token)
        i += 1
    end_clause()
    return mentions, list(dict.fromkeys(unknown)), notes


def _pair(events: list[tuple[str, int]], mentions: list[_Mention], notes: list[str]) -> None:
    """Give each position of a clause to the item before it (the grammar's order), else to the one after."""
    for j, (kind, cell) in enumerate(events):
        if kind != "position":
            continue
        before = [m for k, m in reversed(events[:j]) if k == "item" and mentions[m].cell is None]
        after = [m for k, m in events[j + 1 :] if k == "item" and mentions[m].cell is None]
        # "top left: a red bag" (position first) pairs forward; "a bag in the top left" backward.
        target = before[0] if before else (after[0] if after else None)
        if target is None:
            notes.append(f'"{_CELL_NAME[cell]}" names no item, so it was left out')
        else:
            mentions[target].cell = cell


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _items(items: Sequence[Item]) -> str:
    """'the red bag', 'the 3 white bags and the blue sneaker': items in a note, alike ones counted."""
    counts = {item: sum(other == item for other in items) for item in items}
    names = []
    for item, n in counts.items():
        names.append(_describe(item) if n == 1 else f"the {n} {item.colour} {_plural(item.category)}")
    return _and(names)


def _place(mentions: list[_Mention], seed: int, notes: list[str]) -> list[Item | None]:
    """Cells for the mentions: stated ones first, then free cells in an order drawn from ``seed``."""
    cells: list[Item | None] = [None] * N_CELLS
    order = [int(c) for c in np.random.default_rng(seed).permutation(N_CELLS)]
    moved: list[tuple[_Mention, Item]] = []
    unplaced: list[tuple[_Mention, Item]] = []
    for mention in mentions:
        item = Item(mention.category, mention.colour or DEFAULT_COLOUR)
        if mention.cell is not None and cells[mention.cell] is None:
            cells[mention.cell] = item
        elif mention.cell is not None:
            moved.append((mention, item))
        else:
            unplaced.append((mention, item))
    dropped: list[Item] = []
    went: dict[bool, list[tuple[Item, int, int | None]]] = {True: [], False: []}  # moved?: (item, to, from)
    for mention, item in moved + unplaced:
        free = next((c for c in order if cells[c] is None), None)
        if free is None:
            dropped.append(item)
            continue
        cells[free] = item
        went[mention.cell is not None].append((item, free, mention.cell))
    for was_moved, placed in went.items():
        if not placed:
            continue
        groups: dict[Item, list[int]] = {}
        for item, to, _ in placed:
            groups.setdefault(item, []).append(to)
        if len(placed) > _LISTED_CELLS:  # the prompt drawn says where each went; a note listing all would be long
            where = f"{_items([item for item, _, _ in placed])} in free cells chosen from the seed"
        else:
            cell_names = (lambda c: f"the {_CELL_NAME[c]}") if was_moved else _cell_words
            where = "; ".join(f"{_items([item] * len(to))} {'to ' if was_moved else ''}"
                              f"{_and([cell_names(c) for c in to])}" for item, to in groups.items())
            where += f" ({'a free cell' if len(placed) == 1 else 'free cells'}, chosen from the seed)"
        if was_moved:
            taken = list(dict.fromkeys(f"the {_CELL_NAME[c]}" for _, _, c in placed if c is not None))
            notes.append(f"{_and(taken)} {'was' if len(taken) == 1 else 'were'} already taken, so the family "
                         f"moved {where.replace(' in free cells', ' to free cells')}")
        else:
            notes.append(f"placed {where}")
    if dropped:
        notes.append(f"the family draws at most {N_CELLS} items, so {_items(dropped)} "
                     f"{'was' if len(dropped) == 1 else 'were'} left out")
    return cells


def _colour_notes(mentions: list[_Mention]) -> list[str]:
    missing = [m for m in mentions if m.colour is None]
    if not missing:
        return []
    names = sorted({m.category for m in missing}, key=[m.category for m in missing].index)
    what = " and ".join(f"the {name}" for name in names)
    return [f"no colour given for {what}: drawn {DEFAULT_COLOUR}"]


def read_prompt(text: str, seed: int, *, max_words: int | None = None) -> PromptReading:
    """Read ``text`` as the demo family would draw it; ``seed`` places items the text left unplaced.

    ``max_words`` is how many words the family's text encoder reads (default
    :data:`~shared.demo_grammar.prompts.MAX_WORDS`); words past it are cut and reported. The
    same text and seed always give the same reading. Never raises for any text.
    """
    limit = MAX_WORDS if max_words is None else max_words
    if limit < 1:
        raise ValueError(f"max_words must be >= 1, got {limit}")
    tokens = _TOKEN.findall(text.lower())
    truncated = len(tokens) > limit
    if not truncated:
        try:
            scene = prompt_to_scene(text)
        except (PromptError, SceneError):
            pass
        else:
            return PromptReading(text, text, scene, (), (), False)
    notes: list[str] = []
    if truncated:
        cut = re.sub(r" (?=[,;:.])", "", " ".join(tokens[limit:]))
        notes.append(f"the family reads the first {limit} words; the rest was cut: {_quote(cut, 40)}")
        tokens = tokens[:limit]
    mentions, unknown, scan_notes = _scan(tokens)
    notes.extend(scan_notes)
    if not mentions:
        return PromptReading(text, "", None, tuple(unknown), tuple(notes), truncated)
    notes.extend(_colour_notes(mentions))
    cells = _place(mentions, seed, notes)
    scene = Scene(tuple(cells))
    return PromptReading(text, canonical_prompt(scene), scene, tuple(unknown), tuple(notes), truncated)


def read_prompt_as(grammar: str | None, text: str, seed: int, *, max_words: int | None = None) -> PromptReading | None:
    """:func:`read_prompt` for a family or bundle that names its ``prompt_grammar``; None for free text.

    ``max_words`` is capped at the grammar's own :data:`~shared.demo_grammar.prompts.MAX_WORDS`. A
    grammar this version does not know reads as free text (a newer bundle stays usable).
    """
    if grammar != GRAMMAR_NAME:
        return None
    limit = MAX_WORDS if max_words is None else max(1, min(max_words, MAX_WORDS))
    return read_prompt(text, seed, max_words=limit)


def example_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts the demo family draws, from its grammar (1-3 items: short enough for a hint)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    return [scene_to_prompt(random_scene(rng, (1, 2, 3)), rng) for _ in range(n)]


def vocabulary_line() -> str:
    """One line: what the demo family can draw (items, colours, positions), with an example."""
    categories = ", ".join(CATEGORY_WORDS)
    colours = ", ".join(list(COLOUR_WORDS)[:-1]) + f" or {list(COLOUR_WORDS)[-1]}"
    cells = ", ".join(_CELL_NAME[:-1]) + f" or {_CELL_NAME[-1]}"
    return (f"It draws up to {N_CELLS} items on a 3x3 grid: {categories}; coloured {colours}; "
            f'at the {cells} (e.g. "a red sneaker in the top left and a blue bag on the right").')


def vocabulary_markdown() -> str:
    """A short markdown section for the README and the model card: the vocabulary and example prompts."""
    items = ", ".join(f"{name} ({', '.join(words[1:])})" if len(words) > 1 else name
                      for name, words in CATEGORY_WORDS.items())
    colours = ", ".join(f"{name} ({', '.join(words[1:])})" if len(words) > 1 else name
                        for name, words in COLOUR_WORDS.items())
    positions = ", ".join(_CELL_NAME)
    examples = "\n".join(f"- *{p}*" for p in example_prompts(4, seed=1))
    return (
        "### What the demo family can draw\n\n"
        f"Up to {N_CELLS} Fashion-MNIST items on a 3x3 grid of 16-pixel cells, each with a colour and a cell.\n\n"
        f"- **Items** (paraphrases in brackets): {items}.\n"
        f"- **Colours**: {colours}; an item without a colour is drawn {DEFAULT_COLOUR} (untinted).\n"
        f"- **Positions**: {positions} (also *upper left*, *middle*, *lower right corner*...), after "
        "*in/at/on the*, or first with a colon (*top left: a red bag*).\n"
        "- Items are separated by *,*, *and* or *;*. A count repeats an item (*three red bags*).\n\n"
        "Every tool reads a prompt the same way and says in one line what it did not understand: an item "
        "without a position goes to a free cell chosen from the seed, an item whose cell is taken moves "
        "to a free one, and a prompt with no item the family knows is refused with this list, never "
        f"drawn as an empty picture. The family reads at most {MAX_WORDS} words. Examples:\n\n"
        f"{examples}\n\n"
        "More examples: `python -m shared.demo_grammar.prompts --sample 5`; how a text is read: "
        "`python -m shared.demo_grammar.understanding \"a green bag\" --seed 0`.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shared.demo_grammar.understanding [TEXT] [--seed S] [--vocabulary]``: how the family reads TEXT."""
    parser = argparse.ArgumentParser(description="How the demo family reads a prompt: what it draws and the note.")
    parser.add_argument("text", nargs="?", default=None, help="a prompt to read")
    parser.add_argument("--seed", type=int, default=0, help="the seed that places unplaced items (default 0)")
    parser.add_argument("--vocabulary", action="store_true", help="print what the family draws (markdown)")
    args = parser.parse_args(argv)
    if args.vocabulary or args.text is None:
        print(vocabulary_markdown())
    if args.text is not None:
        reading = read_prompt(args.text, args.seed)
        print(f"drawn: {reading.prompt or '(nothing)'}")
        print(f"note: {reading.message or 'read exactly as written'}")
    return 0 if args.text is None or reading.scene is not None else 2


if __name__ == "__main__":
    raise SystemExit(main())
