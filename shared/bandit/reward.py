"""The reward the scheduler maximizes: the user's preference-weighted mix of quality and speed.

For a request with preference ``w`` in [0, 1] (0 = fastest, 1 = best quality), an image of
quality ``q`` in [0, 1] (the profile's measured adherence for the arm and the prompt's
complexity level) delivered after ``L`` seconds (the device's measured end-to-end latency)::

    reward = w * q + (1 - w) * (1 - L / L_ref)

``L_ref`` is the profile's reference latency (:meth:`Profile.latency_ref_s`: the compute-only
latency of its slowest configuration, device-only at the largest N). This is the issue's
``w * q - (1 - w) * L / L_ref`` plus ``(1 - w)``, a term that does not depend on the arm:
it changes neither which arm is best nor any regret, and it puts the reward on a 0..1
scale (1 = a perfect image at once, 0 = a useless image at ``L_ref``) on which "10% more
utility" means something. It is not clipped: a slower-than-``L_ref`` answer scores below
0, linearly, which keeps the reward linear in latency for LinUCB.

A user's rating (-1/0/+1, if the report carries one) replaces part of the profile's
quality, which is an average over prompts: ``q = (1 - rho) * q_profile + rho * (rating + 1) / 2``
with ``rho = 0.5`` by default (:func:`rated_quality`).

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

FloatArray = NDArray[np.float64]


@overload
def utility(preference: float, quality: float, latency_s: float, latency_ref_s: float) -> float: ...


@overload
def utility(preference: float | FloatArray, quality: FloatArray, latency_s: float | FloatArray,
            latency_ref_s: float) -> FloatArray: ...


def utility(preference: float | FloatArray, quality: float | FloatArray, latency_s: float | FloatArray,
            latency_ref_s: float) -> float | FloatArray:
    """``w * q + (1 - w) * (1 - L / L_ref)``, unchecked; elementwise on arrays (one value per arm)."""
    return preference * quality + (1.0 - preference) * (1.0 - latency_s / latency_ref_s)


def reward(preference: float, quality: float, latency_s: float, latency_ref_s: float) -> float:
    """:func:`utility` of one report, after checking its inputs (see the module doc)."""
    if not 0.0 <= preference <= 1.0:
        raise BanditError(f"preference must be in [0, 1], got {preference!r}")
    if not (latency_ref_s > 0 and math.isfinite(latency_ref_s)):
        raise BanditError(f"latency_ref_s must be positive, got {latency_ref_s!r}")
    if not (latency_s >= 0 and math.isfinite(latency_s)):
        raise BanditError(f"latency_s must be a non-negative number, got {latency_s!r}")
    return float(utility(preference, quality, latency_s, latency_ref_s))


def rewards(preference: float, quality: FloatArray, latency_s: FloatArray, latency_ref_s: float) -> FloatArray:
    """:func:`utility` of every arm at once (``quality`` and ``latency_s``: one entry per arm) for one
    request of preference ``preference``. The scalars are checked; the arrays are the caller's own
    figures (the simulator's expectations), so they are not checked on every call."""
    if not 0.0 <= preference <= 1.0:
        raise BanditError(f"preference must be in [0, 1], got {preference!r}")
    if not (latency_ref_s > 0 and math.isfinite(latency_ref_s)):
        raise BanditError(f"latency_ref_s must be positive, got {latency_ref_s!r}")
    return utility(preference, quality, latency_s, latency_ref_s)


def rated_quality(profile_quality: float, rating: int | None, weight: float = DEFAULT_RATING_WEIGHT) -> float:
    """The profile's quality, moved towards the user's rating (-1 -> 0, 0 -> 0.5, +1 -> 1) by ``weight``."""
    if rating is None:
        return profile_quality
    if rating not in (-1, 0, 1):
        raise BanditError(f"rating must be -1, 0 or +1, got {rating!r}")
    if not 0.0 <= weight <= 1.0:
        raise BanditError(f"rating weight must be in [0, 1], got {weight!r}")
    return (1.0 - weight) * profile_quality + weight * (rating + 1) / 2.0
