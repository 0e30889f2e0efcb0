"""What the device measures about itself and its link, for the edge's scheduler.

* :class:`DeviceLoad`: the machine's CPU load as a fraction in [0, 1], from ``psutil``'s
  cumulative CPU times, without blocking (the fraction busy since the previous sample).
* :class:`LinkEstimator`: exponentially weighted moving averages (EWMA) of the link's
  round-trip time (from websocket ping/pong timings) and throughput (handoff bytes over
  their transfer time).

The maths (:func:`busy_fraction`, :class:`Ewma`) is pure and tested without sockets or clocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from shared.errors import ConfigError

__all__ = ["DeviceLoad", "Ewma", "LinkEstimator", "LinkSnapshot", "busy_fraction"]

# Report/Generate accept at most these (shared.protocol.messages); estimates are clipped to them.
MAX_RTT_S = 600.0
MAX_BANDWIDTH_BPS = 1e13
# A transfer faster than this is below the clock's useful resolution (same-host loopback):
# it says nothing about the link's throughput, so it is not averaged in.
MIN_TRANSFER_S = 1e-5


# --------------------------------------------------------------------------- device load


def _idle_of(times: Any) -> float:
    # iowait is time the CPU had nothing to run: idle, not load (Linux reports it apart).
    return float(getattr(times, "idle", 0.0)) + float(getattr(times, "iowait", 0.0))


def _total_of(times: Any) -> float:
    # guest/guest_nice are already counted in user/nice on Linux: summing them would count twice.
    skip = {"guest", "guest_nice"}
    return float(sum(getattr(times, name) for name in times._fields if name not in skip))


def busy_fraction(before: Any, after: Any) -> float | None:
    """The fraction of CPU time spent busy between two ``psutil.cpu_times()`` snapshots.

    ``None`` when no CPU time elapsed between them (the load is then unknown, not zero).
    """
    total = _total_of(after) - _total_of(before)
    if total <= 0.0:
        return None
    busy = total - (_idle_of(after) - _idle_of(before))
    return min(1.0, max(0.0, busy / total))


class DeviceLoad:
    """The device's CPU load in [0, 1], sampled without blocking.

    Each :meth:`sample` returns the busy fraction since the previous sample (the first
    since construction). Samples closer than ``min_interval_s`` return the previous
    value: a few milliseconds of CPU time are too coarse to mean anything. Keeps its own
    snapshot, so other users of ``psutil.cpu_percent`` do not disturb it.
    """

    def __init__(self, min_interval_s: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(min_interval_s) and min_interval_s >= 0):
            raise ConfigError(f"min_interval_s must be a finite number >= 0, got {min_interval_s!r}")
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._snapshot = psutil.cpu_times()
        self._at = clock()
        self._last: float | None = None

    def sample(self) -> float | None:
        """The busy fraction since the previous sample, or ``None`` if not measurable yet."""
        now = self._clock()
        if self._last is not None and now - self._at < self.min_interval_s:
            return self._last
        snapshot = psutil.cpu_times()
        value = busy_fraction(self._snapshot, snapshot)
        if value is not None:
            self._snapshot, self._at, self._last = snapshot, now, value
        return self._last


# --------------------------------------------------------------------------- link


@dataclass
class Ewma:
    """An exponentially weighted moving average: ``value += alpha * (x - value)``; the first sample sets it."""

    alpha: float = 0.3
    value: float | None = None
    count: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha <= 1.0):
            raise ConfigError(f"alpha must be a number in (0, 1], got {self.alpha!r}")

    def update(self, sample: float) -> float:
        """Fold in one sample (finite, >= 0) and return the new average."""
        if not (isinstance(sample, (int, float)) and math.isfinite(sample) and sample >= 0):
            raise ValueError(f"an EWMA sample must be a finite number >= 0, got {sample!r}")
        self.value = float(sample) if self.value is None else self.value + self.alpha * (sample - self.value)
        self.count += 1
        return self.value


@dataclass(frozen=True)
class LinkSnapshot:
    """The current link estimates: ``rtt_s`` in seconds, ``bandwidth_bps`` in **bits** per second."""

    rtt_s: float | None
    bandwidth_bps: float | None
    rtt_samples: int = 0
    transfer_samples: int = 0


@dataclass
class LinkEstimator:
    """EWMA estimates of the link's round-trip time and throughput.

    Feed it ping round trips (:meth:`add_rtt`) and payload transfers (:meth:`add_transfer`:
    bytes and the seconds their frame took). Transfers shorter than ``min_transfer_s`` are
    ignored: on a fast link (or loopback) they measure the clock, not the link. Estimates
    are clipped to what the protocol accepts.
    """

    alpha_rtt: float = 0.3
    alpha_bandwidth: float = 0.3
    min_transfer_s: float = MIN_TRANSFER_S
    rtt: Ewma = field(init=False)
    bandwidth: Ewma = field(init=False)

    def __post_init__(self) -> None:
        self.rtt = Ewma(self.alpha_rtt)
        self.bandwidth = Ewma(self.alpha_bandwidth)

    def add_rtt(self, seconds: float) -> float:
        """Fold in one round trip (seconds) and return the RTT estimate."""
        return self.rtt.update(min(float(seconds), MAX_RTT_S))

    def add_transfer(self, nbytes: int, seconds: float) -> float | None:
        """Fold in one transfer of ``nbytes`` bytes in ``seconds``; return the throughput estimate (bit/s)."""
        if nbytes > 0 and math.isfinite(seconds) and seconds >= self.min_transfer_s:
            self.bandwidth.update(min(8.0 * nbytes / seconds, MAX_BANDWIDTH_BPS))
        return self.bandwidth_bps

    @property
    def rtt_s(self) -> float | None:
        return self.rtt.value

    @property
    def bandwidth_bps(self) -> float | None:
        value = self.bandwidth.value
        return None if value is None or value <= 0 else value  # the protocol wants > 0

    def snapshot(self) -> LinkSnapshot:
        return LinkSnapshot(self.rtt_s, self.bandwidth_bps, self.rtt.count, self.bandwidth.count)
