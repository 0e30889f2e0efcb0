"""How the demo family's harness measures: compute clocks and picture quality.

One home for what ``rise-eval`` (:mod:`.evaluate`) and its adaptive-handoff rows (:mod:`.adaptive`)
both measure; the harness imports :mod:`.adaptive`, so neither can import the other's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .data import N_CELLS, Scene
from .scorer import Scorer, adherence, frechet_distance

#: How compute is timed, as ``rise-eval --clock`` names it.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def by_items(values: np.ndarray, scenes: Sequence[Scene]) -> dict[str, float]:
    """The mean of ``values`` per item count of their scenes (counts that occur only)."""
    levels = np.asarray([s.n_items for s in scenes])
    return {str(n): float(values[levels == n].mean()) for n in range(1, N_CELLS + 1) if (levels == n).any()}


def quality(images: np.ndarray, scenes: Sequence[Scene], scorer: Scorer, reference: np.ndarray) -> dict[str, Any]:
    """Adherence (overall, per item count) and the Fréchet distance to ``reference`` features."""
    adh = adherence(images, scenes, scorer)
    return {
        "adherence": float(adh.mean()),
        "adherence_by_items": by_items(adh, scenes),
        "frechet": frechet_distance(scorer.features(images), reference),
    }
