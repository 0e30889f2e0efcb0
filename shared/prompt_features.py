"""Prompt complexity from the prompt text alone: tokens, items, attributes, relations, a level.

The scheduler needs to know, before anything is generated, how hard a prompt is: a small
denoiser keeps up with a large one on "a red bag" but not on nine items in nine places.
:func:`prompt_features` reads that off the text, with no model and no I/O:

``tokens``
    words and numbers (``[a-z0-9]+`` runs, hyphenated and apostrophe words count once): a
    proxy for the text encoder's token count.
``items``
    the objects the image must show. ``"two cats"`` is two items; pictures-of, places and
    generic words ("a picture of", "the top left", "three things:") are not items.
``attributes``
    what the image must get right about the items: each item's kind (its noun) plus each
    modifier of it (colour, size, material, pattern, state...). So ``"a red bag"`` has 2.
``relations``
    spatial relations and placements ("on top of", "next to", "behind", "in the top left").
``parsed``
    ``True`` when the prompt follows the demo family's grammar
    (:mod:`shared.demo_grammar.prompts`), whose parser is exact: ``items`` is the number
    of items of the scene, ``attributes`` = 2 per item (category and colour), ``relations``
    = 1 per item (its cell), as the demo family's scorer counts them. Any other English
    prompt goes through the heuristics below (a word lexicon and noun-phrase rules; no
    tagger), which agree with the exact parse on demo prompts.

Two derived numbers feed the scheduler:

``level``
    the profile's complexity level: ``items`` clipped to ``[1, MAX_LEVEL]`` (quality
    profiles are measured per item count, :mod:`shared.bandit.profile`).
``complexity``
    a normalized score in ``[0, 1]``: ``(items + attributes / 2 + relations) / (3 * MAX_LEVEL)``,
    clipped; calibrated so a demo prompt with ``n`` items scores exactly ``n / 9``.

Pure and fast (tens of microseconds per prompt, precompiled regular expressions).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: Highest complexity level (the demo family's 3x3 grid holds at most nine items).
MAX_LEVEL = 9
FEATURES_VERSION = 1

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")

_DETERMINERS = frozenset(
    "a an the some this that these those his her their its my our your each every another any "
    "several many few various".split()
)
_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "dozen": 12, "both": 2,
}
_COLOURS = frozenset(
    "red orange yellow green cyan turquoise blue purple violet white black grey gray brown pink "
    "magenta beige crimson scarlet maroon navy teal olive gold golden silver bronze ivory cream "
    "lavender lilac indigo amber emerald azure khaki tan charcoal peach coral mint ruby sapphire "
    "blond blonde dark light pale bright vivid pastel neon colorful colourful multicolored "
    "monochrome".split()
)
_MODIFIERS = _COLOURS | frozenset(
    # size and shape
    "big small large tiny huge giant little tall short long wide narrow thick thin fat slim "
    "round square rectangular triangular circular oval flat curved pointed massive miniature "
    # material and texture
    "wooden wood metal metallic steel iron glass plastic stone marble leather cotton woolen "
    "woollen wool silk velvet denim paper ceramic concrete brick rubber furry fluffy fuzzy "
    "shiny glossy matte rough smooth soft hard rusty dusty wet dry muddy sandy icy frozen "
    "transparent translucent striped spotted dotted checkered plaid polka floral patterned "
    "knitted embroidered sparkly glowing glittering "
    # age, state, mood, style of the item
    "old new young ancient modern vintage antique broken empty full open closed clean dirty "
    "tidy messy happy sad angry smiling sleeping flying sitting standing jumping "
    "hungry cute beautiful ugly elegant fancy cozy cosy wild fresh ripe rotten hot cold warm "
    "cool oil watercolor watercolour pencil acrylic ink".split()
)
_MODIFIER_SUFFIXES = ("ful", "ous", "ish", "less", "-haired", "-colored", "-coloured", "-shaped", "-sized")
#: Words that head a noun phrase but are not things in the picture.
_NOT_ITEMS = frozenset(
    # the medium and the frame
    "picture image photo photograph painting drawing illustration render rendering sketch "
    "grid scene view shot closeup close-up portrait artwork art poster wallpaper style "
    "version depiction composition canvas frame "
    # generic counters
    "thing things item items object objects one ones kind sort type lot bunch".split()
)
#: Places in the frame: not items after "the" or bare ("the top left"), items after "a" ("a green top").
_PLACES = frozenset(
    "top bottom left right center centre middle corner side front back background foreground "
    "edge upper lower row column half".split()
)
_DEFINITE = frozenset({"the", "this", "that", "its", "their", "his", "her", "my", "our", "your"})
#: Words that never start a bare (determiner-less) item after a separator.
_STOP = frozenset(
    "and or with without of in on at to from by for into onto over under above below near "
    "next behind beside between the a an is are was were be being it its as very highly "
    "extremely detailed realistic photorealistic hyperrealistic ultra hd 4k 8k high quality "
    "resolution trending artstation cinematic lighting sharp focus studio octane unreal "
    "engine digital concept by no not".split()
)
_RELATIONS = (
    "in front of", "on top of", "at the top of", "at the bottom of", "to the left of", "to the right of",
    "on the left of", "on the right of", "next to", "close to", "far from", "across from", "in between",
    "left of", "right of", "inside of", "out of", "on", "behind", "above", "below", "under", "underneath",
    "beneath", "beside", "besides", "between", "near", "inside", "outside", "over", "across", "around",
    "among", "amongst", "against", "along", "atop", "within", "upon", "through", "toward", "towards",
    "surrounded by", "facing",
)
#: "in/at/on the <place>" is a placement ("in the top left", "at the bottom").
_PLACEMENT = r"(?:in|at|on) the (?:upper |lower |top |bottom |middle |center |centre )?" \
             r"(?:top|bottom|left|right|center|centre|middle|corner|upper|lower|foreground|background)"
#: "top left: a red bag" (the place first, then a colon) is a placement too.
_PLACE_FIRST = r"(?:(?:upper|lower|top|bottom|middle|center|centre) )?(?:top|bottom|left|right|center|centre|middle)" \
               r"(?: corner)?(?=:)"
_RELATION_RE = re.compile(
    r"\b(?:" + _PLACEMENT + "|" + _PLACE_FIRST + "|"
    + "|".join(re.escape(r) for r in sorted(_RELATIONS, key=len, reverse=True))
    + r")\b"
)
_GROUPS = {"pair": 1, "couple": 2, "set": 1, "group": 1, "bunch": 1, "pile": 1, "stack": 1, "row": 1}
# Separators that may start a new item without a determiner ("a cat and dog", "cat, dog").
_SEPARATORS = frozenset({"and", "with", ",", ";", "&", "plus", "beside", "next", "behind", "near"})
_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[,;:&]")


@dataclass(frozen=True)
class PromptFeatures:
    """Complexity features of one prompt (see the module doc for each field)."""

    tokens: int
    items: int
    attributes: int
    relations: int
    parsed: bool = False

    @property
    def level(self) -> int:
        """The profile's complexity level: ``items`` clipped to ``[1, MAX_LEVEL]``."""
        return min(max(self.items, 1), MAX_LEVEL)

    @property
    def complexity(self) -> float:
        """Normalized complexity in [0, 1]; a demo prompt with ``n`` items scores ``n / 9``."""
        raw = (self.items + self.attributes / 2 + self.relations) / (3 * MAX_LEVEL)
        return min(max(raw, 0.0), 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens, "items": self.items, "attributes": self.attributes,
            "relations": self.relations, "parsed": self.parsed, "level": self.level,
            "complexity": self.complexity,
        }


def prompt_features(prompt: str, *, grammar: bool = True) -> PromptFeatures:
    """Complexity features of ``prompt`` (any string; the empty prompt has no items).

    ``grammar=False`` skips the demo grammar's exact parse and uses the heuristics only.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    return _cached(prompt[:4000], grammar)  # the protocol caps prompts well below this


@lru_cache(maxsize=4096)
def _cached(prompt: str, grammar: bool) -> PromptFeatures:
    text = " ".join(prompt.lower().split())
    tokens = len(_WORD.findall(text))
    scene = _demo_scene(prompt) if grammar else None
    if scene is not None:
        n = scene.n_items
        return PromptFeatures(tokens, n, 2 * n, n, parsed=True)
    items, modifiers = _items_and_modifiers(text)
    relations = len(_RELATION_RE.findall(text))
    return PromptFeatures(tokens, items, items + modifiers, relations, parsed=False)


def _demo_scene(prompt: str) -> Any:
    parse = _demo_parser()
    if parse is None:
        return None
    try:
        return parse(prompt)
    except ValueError:  # PromptError (and SceneError) are ValueErrors: not a demo prompt
        return None


@lru_cache(maxsize=1)
def _demo_parser() -> Any:
    # The demo grammar is pure Python + numpy; a device install without edge_server still works.
    try:
        from shared.demo_grammar.prompts import prompt_to_scene
    except ImportError:
        return None
    return prompt_to_scene


def _is_modifier(word: str) -> bool:
    return word in _MODIFIERS or (len(word) > 5 and word.endswith(_MODIFIER_SUFFIXES))


def _wordlike(word: str) -> bool:
    return word.replace("-", "").replace("'", "").isalpha()


def _items_and_modifiers(text: str) -> tuple[int, int]:
    """Count noun phrases (items, with their quantities) and the modifiers inside them."""
    words = _TOKEN.findall(text)
    items = modifiers = 0
    i, n = 0, len(words)
    after_separator = True  # the prompt's start may open a bare item ("cat on a sofa")
    while i < n:
        word = words[i]
        quantity, definite = 0, True
        if word in _DETERMINERS or word in _NUMBERS or word.isdigit():
            quantity = _NUMBERS.get(word, int(word) if word.isdigit() else 1)
            definite = word in _DEFINITE
            j = i + 1
            if j < n and words[j] == "of":  # "one of"
                j += 1
            if j + 1 < n and words[j] in _GROUPS and words[j + 1] == "of":  # "a pair of", "a couple of"
                quantity, j = max(quantity, _GROUPS[words[j]]), j + 2
        elif after_separator and word not in _STOP and _wordlike(word):
            quantity, j = 1, i  # a bare noun phrase after a separator ("cat and dog", "red car")
        else:
            after_separator = word in _SEPARATORS
            i += 1
            continue
        # Skip the phrase's modifiers (and further determiners) up to its head noun.
        mods = 0
        while j < n and (_is_modifier(words[j]) or words[j] in _DETERMINERS) and words[j] not in _SEPARATORS:
            mods += _is_modifier(words[j])
            j += 1
        head = words[j] if j < n else None
        place = head in _PLACES and definite
        if head is not None and _wordlike(head) and head not in _NOT_ITEMS and head not in _STOP and not place:
            items += min(max(quantity, 1), MAX_LEVEL)
            modifiers += mods
        elif head is None and mods:  # "a red" at the very end: a modifier without its noun
            modifiers += mods
        after_separator = False
        i = max(j + 1, i + 1)
    if items == 0 and any(_wordlike(w) and w not in _STOP for w in words):
        items = 1  # some content, no recognisable noun phrase: one subject
    return min(items, 4 * MAX_LEVEL), modifiers
