"""The context vector LinUCB sees: prompt complexity, preference, link, device and edge load.

Raw context (:class:`Observation`): the prompt's normalized complexity ``c`` (from
:mod:`shared.prompt_features`), the user's preference ``w``, the device's RTT, bandwidth
and CPU load, its speed (seconds per small-UNet step, from its hello; ``None`` = the
profile's reference device) and the edge's queue depth and running requests.

The reward is ``w * q + (1 - w) * (1 - L / L_s)`` (:mod:`.reward`). Disjoint LinUCB fits
one linear function of the context per arm, so the context is built to make that reward
(nearly) linear in it: the quality half is ``w`` times a quadratic in ``c``, the speed half
``(1 - w)`` times the drivers of latency, each scaled to about one unit::

    x = [ w, w*c, w*c^2,                      # quality: q_a(c) ~ a + b c + d c^2 per arm
          (1-w),                              # speed: 1 - L_a / L_s, with L_a ~ linear in ...
          (1-w) * rtt / L_s,                  #   round trips
          (1-w) * (8 * handoff_bytes / bandwidth) / L_s,     # transfer time of one handoff
          (1-w) * s,  (1-w) * s * load,  (1-w) * load,       # device: s = step time / reference step
          (1-w) * queue / queue_ref,  (1-w) * active / active_ref ]   # edge queue and batch

There is no separate bias feature: ``w + (1 - w) = 1`` spans it. Each entry is clipped to
``[-clip, clip]`` (100: a 2 Mbit/s link moving an SD-sized handoff is feature 0.12, a 50 kbit/s one
is 4.8 and still linear) so one absurd report cannot blow up a regression. Missing link or
load values (a device that does not report them) take the documented defaults below.
:meth:`ContextBuilder.feature_spec` names each feature with its scale; persisted state is
only reloaded for the same spec.

A policy gets a :class:`Context`: this vector, and for the factored scheduler
(:mod:`.factored`) the prompt's quality features ``[1, c, c^2]``, every arm's latency features
(:mod:`.latency`) and the congestion price each arm pays (:mod:`.congestion`). It learns from an
:class:`Outcome`: the reward and what it was made of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from shared.validation import check_float

from .errors import BanditError
from .reward import LATENCY_SCALE_S

FloatArray = NDArray[np.float64]

#: What an unreported link or load is taken to be (the feature vector and the latency features alike).
DEFAULT_RTT_S = 0.05
DEFAULT_BANDWIDTH_BPS = 20e6
DEFAULT_DEVICE_LOAD = 0.3

FEATURE_NAMES: tuple[str, ...] = (
    "w", "w*c", "w*c^2", "1-w", "(1-w)*rtt", "(1-w)*xfer", "(1-w)*dev", "(1-w)*dev*load", "(1-w)*load",
    "(1-w)*queue", "(1-w)*active",
)


@dataclass(frozen=True)
class Observation:
    """What is known about one request when it is planned (``None`` = not reported)."""

    complexity: float
    preference: float
    rtt_s: float | None = None
    bandwidth_bps: float | None = None
    device_load: float | None = None
    device_step_s: float | None = None
    queue_depth: int = 0
    active: int = 0
    edge_running: tuple[int, ...] | None = None  # the batch's remaining edge steps, if the engine says
    edge_queued: tuple[int, ...] | None = None  # the queue's edge steps
    edge_cold_start_s: float = 0.0  # the family's load still to wait for (0: loaded)


@dataclass(frozen=True, eq=False)
class Context:
    """What a policy sees of one request: the feature vector and, for the factored scheduler, its parts."""

    x: FloatArray  # ContextBuilder.build: the disjoint policies' vector
    preference: float = 0.5
    quality_x: FloatArray | None = None  # [1, c, c^2]
    quality_base: FloatArray | None = None  # per arm, the profile's quality at the prompt's level
    latency_x: FloatArray | None = None  # (arms, latency features): shared.bandit.latency
    penalty: FloatArray | None = None  # per arm, in utility: the congestion price times the arm's edge steps

    @classmethod
    def of(cls, x: Any) -> Context:
        """A context that is only a feature vector (the disjoint policies need nothing else)."""
        return cls(np.asarray(x, dtype=np.float64))


@dataclass(frozen=True)
class Outcome:
    """What one served request taught: its reward and what the reward was made of."""

    reward: float
    latency_s: float
    quality: float  # the quality the reward counted
    rated_quality: float | None = None  # the user's rating as a quality (-1 -> 0, +1 -> 1), if rated


@dataclass(frozen=True)
class ContextBuilder:
    """Turns :class:`Observation` s into context vectors (see the module doc)."""

    handoff_bytes: int
    device_step_ref_s: float
    latency_scale_s: float = LATENCY_SCALE_S
    queue_ref: float = 8.0
    active_ref: float = 8.0
    default_rtt_s: float = DEFAULT_RTT_S
    default_bandwidth_bps: float = DEFAULT_BANDWIDTH_BPS
    default_device_load: float = DEFAULT_DEVICE_LOAD
    clip: float = 100.0

    def __post_init__(self) -> None:
        for name in ("latency_scale_s", "handoff_bytes", "device_step_ref_s", "queue_ref", "active_ref",
                     "default_bandwidth_bps", "clip"):
            check_float(name, getattr(self, name), lo=0.0, lo_open=True, error=BanditError)
        check_float("default_rtt_s", self.default_rtt_s, lo=0.0, error=BanditError)
        check_float("default_device_load", self.default_device_load, lo=0.0, hi=1.0, error=BanditError)

    @classmethod
    def from_profile(cls, profile: Any, **overrides: Any) -> ContextBuilder:
        """Scales from a :class:`~shared.bandit.profile.Profile` (handoff size, device step)."""
        options: dict[str, Any] = {
            "handoff_bytes": profile.timing.handoff_bytes,
            "device_step_ref_s": profile.timing.device_step_s,
        }
        options.update(overrides)
        return cls(**options)

    @property
    def dim(self) -> int:
        return len(FEATURE_NAMES)

    @property
    def names(self) -> tuple[str, ...]:
        return FEATURE_NAMES

    def feature_spec(self) -> list[str]:
        """Feature names with their scales: a learned state is only valid for the same spec."""
        return [*FEATURE_NAMES, f"L_s={self.latency_scale_s:.6g}s", f"handoff={self.handoff_bytes}B",
                f"step_ref={self.device_step_ref_s:.6g}s", f"queue_ref={self.queue_ref:g}",
                f"active_ref={self.active_ref:g}"]

    def build(self, obs: Observation) -> np.ndarray:
        """The context vector of ``obs`` (shape ``(dim,)``)."""
        w = obs.preference
        if not 0.0 <= w <= 1.0:
            raise BanditError(f"preference must be in [0, 1], got {w!r}")
        c = min(max(float(obs.complexity), 0.0), 1.0)
        rtt = self.default_rtt_s if obs.rtt_s is None else obs.rtt_s
        bandwidth = self.default_bandwidth_bps if obs.bandwidth_bps is None else max(obs.bandwidth_bps, 1.0)
        load = self.default_device_load if obs.device_load is None else min(max(obs.device_load, 0.0), 1.0)
        step = self.device_step_ref_s if obs.device_step_s is None else obs.device_step_s
        s = step / self.device_step_ref_s
        v = 1.0 - w
        ref, clip = self.latency_scale_s, self.clip
        raw = (
            w, w * c, w * c * c, v,
            v * rtt / ref,
            v * (8.0 * self.handoff_bytes / bandwidth) / ref,
            v * s, v * s * load, v * load,
            v * obs.queue_depth / self.queue_ref,
            v * obs.active / self.active_ref,
        )
        x = np.array(raw, dtype=np.float64)
        if not np.isfinite(x).all():
            raise BanditError(f"context of {obs} is not finite")
        # np.clip's own two ufuncs, without its wrapper (this runs per request, and per policy in rise-sim)
        np.maximum(x, -clip, out=x)
        return np.minimum(x, clip, out=x)


def describe(obs: Observation) -> str:
    """``preference 0.80, rtt 40 ms, 12 Mbit/s, load 0.3, 2 queued`` (what the plan's why shows)."""
    parts = [f"preference {obs.preference:.2f}"]
    if obs.rtt_s is not None:
        parts.append(f"rtt {obs.rtt_s * 1e3:.0f} ms")
    if obs.bandwidth_bps is not None:
        parts.append(f"{obs.bandwidth_bps / 1e6:.3g} Mbit/s")
    if obs.device_load is not None:
        parts.append(f"device load {obs.device_load:.2f}")
    if obs.queue_depth:
        parts.append(f"{obs.queue_depth} queued")
    if obs.edge_cold_start_s > 0:
        parts.append(f"family loading, ~{obs.edge_cold_start_s:.1f} s")
    return ", ".join(parts)
