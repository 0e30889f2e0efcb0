"""The adaptive-handoff rule: when the edge's predicted clean latent has settled, hand off.

After each edge step ``s`` the sampler predicts the clean latent ``x0_s``. Its relative change

    change_s = ||x0_s - x0_{s-1}|| / ||x0_s||        (Frobenius norms over the whole latent)

says how much the large model is still moving the picture. An adaptive plan
(:attr:`shared.relay_plan.RelayPlan.handoff_tau`) hands off at the first step ``s`` in
``[first_split, split]`` with ``change_s < tau``, else at ``split``. Step 1 has no previous
prediction, so it never settles on its own (``first_split = 1`` still allows the fixed end).

Pure floats: the edge computes the two norms in torch and asks :meth:`HandoffRule.settled`; the
simulator, the benchmark and the docs replay recorded changes through :meth:`HandoffRule.handoff_step`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import ConfigError
from shared.relay_plan import RelayPlan
from shared.validation import is_int, is_number


def relative_change(diff_norm: float, norm: float) -> float:
    """``||x0_s - x0_{s-1}|| / ||x0_s||``; ``inf`` for a zero prediction that still moves (never settled)."""
    if not (math.isfinite(diff_norm) and math.isfinite(norm)):
        return math.inf  # a diverging step is not a settled one
    if norm <= 0.0:
        return 0.0 if diff_norm <= 0.0 else math.inf
    return diff_norm / norm


@dataclass(frozen=True)
class HandoffRule:
    """Hand off at the first step in ``[first_split, last_split]`` whose x0 change is below ``tau``."""

    tau: float
    first_split: int
    last_split: int

    def __post_init__(self) -> None:
        if not is_number(self.tau) or not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"tau must be a number in (0, 1], got {self.tau!r}")
        if not (is_int(self.first_split) and is_int(self.last_split) and 1 <= self.first_split <= self.last_split):
            raise ConfigError(f"need 1 <= first_split <= last_split, got [{self.first_split}, {self.last_split}]")

    @classmethod
    def of(cls, plan: RelayPlan) -> HandoffRule | None:
        """The plan's rule, ``None`` for a fixed split."""
        if plan.handoff_tau is None:
            return None
        return cls(float(plan.handoff_tau), plan.first_split, plan.split)

    def settled(self, step: int, change: float | None) -> bool:
        """Whether the edge hands off after ``step`` (1-based: steps done) given that step's x0 change."""
        return change is not None and self.first_split <= step <= self.last_split and change < self.tau

    def handoff_step(self, changes: Sequence[float | None]) -> int:
        """Where a trajectory hands off, from its changes by step (``changes[s - 1]`` after step ``s``,
        ``None`` where there is none, as at step 1); ``last_split`` if it never settles in the window."""
        for step in range(self.first_split, self.last_split + 1):
            if step <= len(changes) and self.settled(step, changes[step - 1]):
                return step
        return self.last_split

    @property
    def midpoint(self) -> float:
        """The edge steps to expect when nothing was measured: the window's middle."""
        return (self.first_split + self.last_split) / 2.0
