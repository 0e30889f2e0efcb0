"""The embedded demo family: a tiny text-to-image family trained here on Fashion-MNIST scenes.

- :mod:`.data`: the Fashion-MNIST items (Debian's ``dataset-fashion-mnist``) and 3x3 scenes.
- :mod:`.prompts`: the prompt grammar (paraphrases, an exact parser) and the evaluation prompts.
- :mod:`.scorer`: the per-cell scorer, prompt adherence and a Fréchet distance on its features.
- :mod:`.train`: trains the family from a seed (resumable), writes its model card.
- :mod:`.evaluate`: ``rise-eval``, quality and compute of every relay split, with plots.

``data`` and ``prompts`` need numpy only; the others need torch (edge side).
"""
