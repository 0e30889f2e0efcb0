"""Prompt help for the app: the hint, an example, and what the family made of a prompt.

For a bundle that speaks the demo family's grammar (``manifest.prompt_grammar == "demo"``, or on older
manifests a demo family id) the hint and the example come from the grammar
(:func:`shared.demo_grammar.understanding.example_prompts`), and every prompt is read the way the family
reads it (:func:`~shared.demo_grammar.understanding.read_prompt`): the line under the prompt box says what
was not understood or what was changed, and a device-only generation is given the prompt as read (items
placed, repeats spread, cut to the limit). Other families get a general hint and no reading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.manifest import BundleManifest

__all__ = ["GENERAL_EXAMPLE", "PromptHelp", "Reading", "prompt_help_for"]

log = logging.getLogger("rise.device.app")

GENERAL_EXAMPLE = "a lighthouse on a cliff at sunset"


@dataclass(frozen=True)
class Reading:
    """What the family will be given for a prompt, and the one line to tell the user (``None``: as typed)."""

    prompt: str
    message: str | None
    drawable: bool = True  # False: nothing in the prompt is something the family can draw


class PromptHelp:
    """The hint and readings for a family that has no grammar of its own: the prompt goes as typed."""

    grammar: str | None = None

    @property
    def example(self) -> str:
        return GENERAL_EXAMPLE

    @property
    def hint(self) -> str:
        return f"Describe an image, e.g. {self.example}"

    @property
    def vocabulary(self) -> str:
        """One line on what the family can draw ('' when it can draw anything it was trained on)."""
        return ""

    def read(self, text: str, seed: int) -> Reading:
        return Reading(text, None)


class DemoPromptHelp(PromptHelp):
    """The demo family's grammar (``shared.demo_grammar.understanding``)."""

    grammar = "demo"

    def __init__(self, max_words: int | None = None) -> None:
        from shared.demo_grammar.understanding import example_prompts

        self._max_words = max_words
        examples = example_prompts(1, seed=0)
        self._example = examples[0] if examples else GENERAL_EXAMPLE

    @property
    def example(self) -> str:
        return self._example

    @property
    def vocabulary(self) -> str:
        from shared.demo_grammar.understanding import vocabulary_line

        return vocabulary_line()

    def read(self, text: str, seed: int) -> Reading:
        from shared.demo_grammar.understanding import read_prompt

        if not text.strip():
            return Reading(text, None)
        try:
            reading = read_prompt(text, seed, max_words=self._max_words)
        except Exception as exc:  # a reader's bug must not stop a generation: the prompt goes as typed
            log.exception("reading the prompt failed")
            return Reading(text, f"could not read the prompt: {exc}")
        return Reading(reading.prompt, reading.message, drawable=reading.scene is not None)


def _speaks_demo(manifest: BundleManifest) -> bool:
    grammar = getattr(manifest, "prompt_grammar", None)  # an optional manifest field of newer bundles
    if grammar is not None:
        return bool(grammar == "demo")
    names = (manifest.family_id.lower(), manifest.family_name.lower())
    return any(name.startswith(("demo", "rise-demo")) for name in names)


def prompt_help_for(manifest: BundleManifest | None) -> PromptHelp:
    """The help for ``manifest``'s family (the general one without a bundle or without the grammar module)."""
    if manifest is None or not _speaks_demo(manifest):
        return PromptHelp()
    return DemoPromptHelp()
