"""The reward the scheduler maximizes: the user's preference-weighted mix of quality and speed.

For a request with preference ``w`` in [0, 1] (0 = fastest, 1 = best quality), an image of
quality ``q`` in [0, 1] (the profile's measured adherence for the arm and the prompt's
complexity level, or what users' ratings taught) delivered after ``L`` seconds (the device's
measured end-to-end latency)::

    utility = w * q + (1 - w) * (1 - L / L_s)        L_s = LATENCY_SCALE_S = 10 s

``L_s`` is a fixed scale in user terms, the same on every machine: 10 s is the limit for
keeping a person's attention on a task (Nielsen, *Usability Engineering*, 1993, ch. 5:
0.1 s feels instant, 1 s keeps the flow, 10 s is the most a user waits without turning to
something else). An image at once keeps all of its speed value, one after 10 s none, and
each second costs ``(1 - w) / 10``: half a second is worth 0.05 of quality to a user who
weighs both halves equally. It used to be the profile's slowest arm, which let the hardware
set the exchange rate between quality and seconds and threw the learned state away with
every re-profiling. The ``(1 - w)`` term does not depend on the arm: it changes no decision
and no regret, and every figure ``rise-sim`` reports is a difference of utilities, never a
ratio to one (near zero such ratios explode). It is not clipped: a slower-than-``L_s``
answer scores below 0, linearly, which keeps the reward linear in latency.

A user's rating (-1/0/+1, if the report carries one) replaces part of the profile's
quality, which is an average over prompts: ``q = (1 - rho) * q_profile + rho * (rating + 1) / 2``
with ``rho = 0.5`` by default (:func:`rated_quality`). The factored scheduler
(:class:`~shared.bandit.factored.FactoredLinUCB`) learns quality from the ratings themselves.

The formula itself is :func:`utility`, the one place it is written. Its two entries check
their inputs and call it: :func:`reward` for one outcome (what the edge's planner learns from a
report, and the utility a simulated request realized) and :func:`rewards` for every arm at once
(the simulator's oracle and regret: each arm's expected quality and latency).
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np
from numpy.typing import NDArray

from .errors import BanditError

DEFAULT_RATING_WEIGHT = 0.5
#: Seconds after which an image has lost all of its speed value (see the module doc).
LATENCY_SCALE_S = 10.0

FloatArray = NDArray[np.float64]


@overload
def utility(preference: float, quality: float, latency_s: float, latency_scale_s: float = ...) -> float: ...


@overload
def utility(preference: float | FloatArray, quality: FloatArray, latency_s: float | FloatArray,
            latency_scale_s: float = ...) -> FloatArray: ...


def utility(preference: float | FloatArray, quality: float | FloatArray, latency_s: float | FloatArray,
            latency_scale_s: float = LATENCY_SCALE_S) -> float | FloatArray:
    """``w * q + (1 - w) * (1 - L / L_s)``, unchecked; elementwise on arrays (one value per arm)."""
    return preference * quality + (1.0 - preference) * (1.0 - latency_s / latency_scale_s)


def _check(preference: float, latency_scale_s: float) -> None:
    if not 0.0 <= preference <= 1.0:
        raise BanditError(f"preference must be in [0, 1], got {preference!r}")
    if not (latency_scale_s > 0 and math.isfinite(latency_scale_s)):
        raise BanditError(f"latency_scale_s must be positive, got {latency_scale_s!r}")


def reward(preference: float, quality: float, latency_s: float, latency_scale_s: float = LATENCY_SCALE_S) -> float:
    """:func:`utility` of one report, after checking its inputs (see the module doc)."""
    _check(preference, latency_scale_s)
    if not (latency_s >= 0 and math.isfinite(latency_s)):
        raise BanditError(f"latency_s must be a non-negative number, got {latency_s!r}")
    return float(utility(preference, quality, latency_s, latency_scale_s))


def rewards(preference: float, quality: FloatArray, latency_s: FloatArray,
            latency_scale_s: float = LATENCY_SCALE_S) -> FloatArray:
    """:func:`utility` of every arm at once (``quality`` and ``latency_s``: one entry per arm) for one
    request of preference ``preference``. The scalars are checked; the arrays are the caller's own
    figures (the simulator's expectations), so they are not checked on every call."""
    _check(preference, latency_scale_s)
    return utility(preference, quality, latency_s, latency_scale_s)


def rating_quality(rating: int) -> float:
    """A rating as a quality observation: -1 -> 0, 0 -> 0.5, +1 -> 1."""
    if rating not in (-1, 0, 1):
        raise BanditError(f"rating must be -1, 0 or +1, got {rating!r}")
    return (rating + 1) / 2.0


def rated_quality(profile_quality: float, rating: int | None, weight: float = DEFAULT_RATING_WEIGHT) -> float:
    """The profile's quality, moved towards the user's rating (-1 -> 0, 0 -> 0.5, +1 -> 1) by ``weight``."""
    if rating is None:
        return profile_quality
    if not 0.0 <= weight <= 1.0:
        raise BanditError(f"rating weight must be in [0, 1], got {weight!r}")
    return (1.0 - weight) * profile_quality + weight * rating_quality(rating)
