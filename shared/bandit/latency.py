"""Every arm's latency features: latency is mostly arithmetic, so the scheduler need not learn it per arm.

An arm's end-to-end latency is, up to noise and what the edge cannot see::

    L_a = text encoding + edge decode_a        # the edge's fixed work ("edge_fixed")
        + rtt                                  # one round trip
        + 8 * payload_a / bandwidth            # the handoff (or the PNG of an edge-decoded image)
        + edge_a                               # its k_a edge steps, behind the queue, in batches
                                               # (and k_a * T[B], the full batch's, for batches that grow)
        + device_a * (1 + slowdown(load))      # (N - k_a) device steps (+ decode) on this device

:class:`LatencyFeatures` writes those terms, each in seconds, as one row per arm, plus
``device * load``, ``device * load^2`` (how load slows a device is not in any profile) and a
constant (overheads nobody listed). The factored scheduler (:mod:`.factored`) fits **one**
regression ``L = beta . phi_a`` shared by all arms, starting from :data:`LATENCY_PRIOR` (each
listed term counts once, load and constant nothing): every report teaches every arm, a link
that drops is priced at once through the transfer term, and an arm never played is still
predicted from its steps. Disjoint LinUCB had to learn each arm's latency from scratch.

``edge_a`` is the edge's own schedule projected forward (:func:`edge_schedule`: when the request,
joining behind the queue, would finish its ``k_a``-th step, nobody else arriving) when the engine
reports its batch's remaining steps and its queue (``PlanContext.edge_running``/``edge_queued``);
from counts alone it is ``k_a * T[b]`` (``b`` the batch with it) plus, in ``edge_wait``, a full
batch of mean edge steps for every ``B`` queued. A family the edge has still to load
(``PlanContext.edge_cold_start_s``, the pool's estimate of the load left) adds its seconds to
every arm's ``edge_wait``: the regression learns from that request's report without mistaking
the load for slow steps, and the speculative rule sees the handoff coming late.

``k_a`` of an adaptive arm (hand off once x0 settles, :mod:`shared.relay_modes`) is the edge steps
it is expected to run: the profile's measured mean at the prompt's level when the features are
given the profile, else its window's midpoint (:func:`expected_edge_steps`).

The features come from what the edge knows when it plans: the device's reported RTT,
bandwidth and load and its step time from its hello, the edge's own queue and batch, and the
profile's timing (edge step by batch size, decode and text-encoding times, payload sizes).
Each is clipped to ``[0, MAX_FEATURE_S]``: an absurd report cannot blow the regression up,
and nothing short of it saturates (an SD-sized handoff over 50 kbit/s is 48 s, still linear).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from shared.prompt_features import MAX_LEVEL
from shared.relay_plan import RelayPlan

from .context import DEFAULT_BANDWIDTH_BPS, DEFAULT_DEVICE_LOAD, DEFAULT_RTT_S, Observation
from .errors import BanditError
from .profile import Profile, Timing

FloatArray = NDArray[np.float64]

LATENCY_FEATURES: tuple[str, ...] = (
    "edge_fixed", "rtt", "transfer", "edge_steps", "edge_steps_full", "edge_wait", "device", "device*load",
    "device*load^2", "constant",
)
#: The prior of the shared latency regression: the arithmetic above, nothing known of load or overheads.
LATENCY_PRIOR: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0)
MAX_FEATURE_S = 3600.0
#: An unmeasured batched step of b requests costs 1 + beta (b - 1) single steps (rise-sim's --batch-beta).
DEFAULT_BATCH_BETA = 0.5


def batch_step_times(edge_step_s: float, measured: Mapping[int, float] | None, max_batch: int,
                     beta: float = DEFAULT_BATCH_BETA) -> list[float]:
    """``T[b]``, the seconds of one batched step of ``b`` requests for b = 0..max_batch (``T[0] = 0``):
    the ``measured`` table (by requests) interpolated, extrapolated beyond its last size along its
    last segment (one size only: proportionally), or, unmeasured, ``edge_step_s * (1 + beta (b - 1))``."""
    if max_batch < 1:
        raise BanditError(f"max_batch must be at least 1, got {max_batch}")
    out = [0.0]
    if not measured:
        return out + [edge_step_s * (1.0 + beta * (b - 1)) for b in range(1, max_batch + 1)]
    sizes = np.asarray(sorted(measured), dtype=float)
    times = np.asarray([measured[int(s)] for s in sizes])
    for b in range(1, max_batch + 1):
        if b > sizes[-1]:
            slope = ((times[-1] - times[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) >= 2
                     else times[-1] / sizes[-1])
            out.append(float(times[-1] + slope * (b - sizes[-1])))
        else:
            out.append(float(np.interp(b, sizes, times)))
    return out


def expected_edge_steps(arms: Sequence[RelayPlan],
                        profile: Profile | None = None) -> tuple[tuple[int, ...], FloatArray]:
    """``(levels, table)``: ``table[l, a]`` the edge steps arm ``a`` is expected to run at ``levels[l]``.

    A fixed arm runs its split; an adaptive one the profile's measured mean at that level, or its
    window's midpoint where the profile has none (or there is no profile: one level, ``(1,)``)."""
    levels = tuple(profile.levels) if profile is not None else (1,)
    table = np.empty((len(levels), len(arms)))
    for a, arm in enumerate(arms):
        for i, level in enumerate(levels):
            if profile is not None:
                table[i, a] = profile.expected_edge_steps(arm, level)
            elif arm.handoff_tau is None:
                table[i, a] = arm.split
            else:
                table[i, a] = (arm.first_split + arm.split) / 2.0
    return levels, table


_JOINING = -1  # the request being planned, in the projected queue


def _step_time(step_times: Sequence[float], requests: int) -> float:
    """One step of ``requests`` requests: the batched time, and one more full batch per ``B`` past the first.

    An engine admits more requests than fit one UNet call (it batches rows, not requests): those
    steps take several calls.
    """
    batch = len(step_times) - 1
    if requests <= batch:
        return float(step_times[requests])
    calls, rest = divmod(requests, batch)
    return calls * float(step_times[batch]) + float(step_times[rest])


def edge_schedule(step_times: Sequence[float], running: Sequence[int], queued: Sequence[int], kmax: int, *,
                  start: float = 0.0, arrivals: Sequence[float] = (), arrival_steps: int = 0) -> list[float]:
    """``f[j]``: when a request planned at ``start`` would finish its ``j``-th edge step (``f[0] = start``).

    The edge runs step-level batches of up to ``B = len(step_times) - 1`` requests, a batch of
    ``b`` taking ``step_times[b]``; ``running`` are the remaining steps of the requests in the
    batch, ``queued`` the steps of those waiting (FIFO), and the planned request joins behind
    them. Requests arriving at the times ``arrivals`` each bring ``arrival_steps`` steps (none by
    default: the edge's own schedule as it stands). The planner projects its edge this way
    (what the engine reports of its batch and queue); the simulator's oracle adds arrivals.
    """
    T, B = step_times, len(step_times) - 1
    t = float(start)
    f = [t] * (kmax + 1)
    if kmax <= 0:
        return f
    rem = [int(r) for r in running if r > 0]
    waiting: deque[int] = deque(int(q) for q in queued)
    joined = len(rem) < B and not waiting
    if not joined:
        waiting.append(_JOINING)
    coming = list(arrivals) if arrival_steps > 0 else []
    ai, done = 0, 0
    while done < kmax:
        while ai < len(coming) and coming[ai] <= t:  # they join at this step boundary
            if len(rem) + joined < B and not waiting:
                rem.append(arrival_steps)
            else:
                waiting.append(arrival_steps)
            ai += 1
        while len(rem) + joined < B and waiting:  # free slots: the queue moves up
            nxt = waiting.popleft()
            if nxt == _JOINING:
                joined = True
            else:
                rem.append(nxt)
        dt = _step_time(T, len(rem) + joined)
        m = min(rem) if rem else kmax
        if joined:
            m = min(m, kmax - done)
        if ai < len(coming) and dt > 0:
            m = min(m, max(1, math.ceil((coming[ai] - t) / dt)))
        if joined:
            for i in range(1, m + 1):
                f[done + i] = t + i * dt
            done += m
        t += m * dt
        rem = [r - m for r in rem if r > m]
    return f


def edge_drain_s(step_times: Sequence[float], running: Sequence[int], queued: Sequence[int]) -> float:
    """Seconds until the requests running and queued on an engine have all finished, nobody joining:
    :func:`edge_schedule`'s projection without a planned request (the batch runs its fewest steps left at a
    time, the queue moving up into free slots, oldest first; more running than one UNet call holds take
    several calls a step). The cluster's router counts the work of a replica's other families by it."""
    batch = len(step_times) - 1
    rem = [int(r) for r in running if r > 0]
    waiting: deque[int] = deque(int(q) for q in queued if q > 0)
    t = 0.0
    while rem or waiting:
        while len(rem) < batch and waiting:
            rem.append(waiting.popleft())
        m = min(rem)
        t += m * _step_time(step_times, len(rem))
        rem = [r - m for r in rem if r > m]
    return t


class LatencyFeatures:
    """Builds the ``(arms, len(LATENCY_FEATURES))`` latency features of a request (see the module doc).

    ``timing`` is a :class:`~shared.bandit.profile.Timing`; ``capacity`` the edge's batch in
    requests (``max_batch_rows // 2`` with guidance); ``profile`` (optional) gives adaptive arms
    their measured edge steps per level (without it: the middle of their window)."""

    names = LATENCY_FEATURES

    def __init__(self, arms: Sequence[RelayPlan], timing: Timing, capacity: int, *,
                 batch_beta: float = DEFAULT_BATCH_BETA, profile: Profile | None = None) -> None:
        if capacity < 1:
            raise BanditError(f"the edge's capacity must be at least 1 request, got {capacity}")
        self.timing, self.capacity = timing, int(capacity)
        self.T = batch_step_times(timing.edge_step_s, timing.edge_batch_step_s, self.capacity, batch_beta)
        self.levels, self.k_by_level = expected_edge_steps(arms, profile)
        self.k = self.k_by_level.mean(axis=0)  # expected edge steps per arm, over the levels
        self.kmax = int(np.ceil(self.k_by_level.max())) if len(arms) else 0
        self.uses_edge = (self.k > 0).astype(np.float64)
        self.n_steps = np.asarray([a.num_inference_steps for a in arms], dtype=np.float64)
        edge_decode = np.asarray([a.decode_on == "edge" for a in arms], dtype=np.float64)
        # the device's decode in reference device steps
        self.decode_ref_steps = (1.0 - edge_decode) * timing.device_decode_s / timing.device_step_s
        self.edge_fixed = timing.text_encode_s + edge_decode * timing.edge_decode_s
        self.bits = 8.0 * np.where(edge_decode > 0, timing.image_bytes, timing.handoff_bytes)
        edge_ks = self.k[self.k > 0]
        self.mean_edge_steps = float(edge_ks.mean()) if len(edge_ks) else 0.0
        self._out = np.empty((len(arms), len(LATENCY_FEATURES)))
        self._out[:, 9] = 1.0

    def edge_steps(self, complexity: float) -> FloatArray:
        """Every arm's expected edge steps for a prompt of this complexity (the nearest profiled level)."""
        level = complexity * MAX_LEVEL
        distance = np.abs(np.asarray(self.levels, dtype=np.float64) - level)
        row = int(np.flatnonzero(distance == distance.min())[-1])  # ties go to the harder level, as the profile's
        steps: FloatArray = self.k_by_level[row]
        return steps

    @property
    def dim(self) -> int:
        return len(LATENCY_FEATURES)

    def spec(self) -> list[str]:
        return [f"latency:{name}" for name in LATENCY_FEATURES]

    def build(self, obs: Observation) -> FloatArray:
        """The latency features of every arm for ``obs`` (a new array)."""
        rtt = DEFAULT_RTT_S if obs.rtt_s is None else max(float(obs.rtt_s), 0.0)
        bandwidth = DEFAULT_BANDWIDTH_BPS if obs.bandwidth_bps is None else max(float(obs.bandwidth_bps), 1.0)
        load = DEFAULT_DEVICE_LOAD if obs.device_load is None else min(max(float(obs.device_load), 0.0), 1.0)
        step = self.timing.device_step_s if obs.device_step_s is None else max(float(obs.device_step_s), 0.0)
        cap = self.capacity
        k = self.edge_steps(obs.complexity) if len(self.levels) > 1 else self.k_by_level[0]
        device = (self.n_steps - k + self.decode_ref_steps) * step  # its steps + decode, at this device's step
        out = self._out.copy()
        out[:, 0] = self.edge_fixed
        out[:, 1] = rtt
        out[:, 2] = self.bits / bandwidth
        out[:, 4] = k * self.T[cap]
        if obs.edge_running is not None:  # the engine's own batch and queue: project its schedule
            finish = np.asarray(edge_schedule(self.T, obs.edge_running, obs.edge_queued or (), self.kmax))
            # an adaptive arm's expected steps fall between two step boundaries: interpolate
            out[:, 3] = np.interp(k, np.arange(len(finish), dtype=np.float64), finish)
            out[:, 5] = 0.0
        else:  # only counts: each `cap` queued requests are one full batch of mean edge steps ahead
            batch = min(max(int(obs.active), 0) + 1, cap)
            ahead = max(int(obs.queue_depth), 0) + (1 if obs.active >= cap else 0)
            wait = (ahead / cap) * self.mean_edge_steps * self.T[cap] if ahead else 0.0
            out[:, 3] = k * self.T[batch]
            out[:, 5] = self.uses_edge * wait
        # a family still to load holds every arm (a device-only plan too: the edge encodes its prompt and noise)
        out[:, 5] += max(float(obs.edge_cold_start_s), 0.0)
        out[:, 6] = device
        out[:, 7] = device * load
        out[:, 8] = device * load * load
        if not np.isfinite(out).all():
            raise BanditError(f"latency features of {obs} are not finite")
        np.minimum(out, MAX_FEATURE_S, out=out)
        return out
