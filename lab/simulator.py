"""``rise-sim``: a discrete-event simulation of many devices sharing one edge, to judge the scheduler.

Usage::

    rise-sim --profile profile.json --requests 20000 --devices 500 --scenario mixed \\
             [--json OUT] [--plots DIR] [--seed 0] [--warmup 2000]

Everything rests on a measured profile (:mod:`shared.bandit.profile`: quality per arm and
complexity level, edge and device step times, payload sizes); without one it says which
command builds one. No torch: it runs anywhere numpy does.

The model
---------
*Requests* arrive as a Poisson process; each comes from one of ``--devices`` devices and
carries a prompt drawn from the demo family's grammar (complexity levels of the profile,
uniformly; its features come from :mod:`shared.prompt_features`, as on the edge) and the
user's preference ``w`` (per user ``U(0, 1)``, jittered per request by N(0, 0.1)).

*Devices* have a speed class (:data:`DEVICE_CLASSES`: the profile's device step times 1, 2
or 4) and a CPU load (per device Beta(2, 5), jittered per request); load slows the device
by ``1 / (1 - LOAD_SLOWDOWN * load)``. *Links* have a class (:data:`LINK_CLASSES`, RTT and
bandwidth) with per-request log-normal jitter. Devices report RTT, bandwidth and load
with measurement noise; the scheduler sees the noisy values, the oracle the true ones.

*The edge* runs the large model's steps with step-level batching, as the engine does: up
to ``--max-batch`` requests (8 = 16 UNet rows of guided requests) advance one step per
batched call; a call for ``b`` requests takes the profile's measured
``edge_batch_step_s[b]`` (interpolated) or, unmeasured, ``edge_step_s * (1 + beta (b - 1))``
(``--batch-beta``, 0.5: a batch of 8 costs 4.5 single steps). A request joins the batch at
the next step boundary, or waits in a FIFO queue. ``k = 0`` requests only need the text
encoding. With ``--max-queue`` (64) requests queued and running, the edge answers
``busy`` as the daemon does: the device then runs the same N device-only, one round trip
later, and (no plan, no report) the scheduler learns nothing from it. The arrival rate is
``--edge-load`` times the edge's capacity for edge-only requests at the middle N with full
batches.

*Latency* of an arm = RTT + text encoding + edge wait and steps (simulated) + edge decode
(edge-decode arms) + payload / bandwidth + device steps and decode (slowed by class and
load), each part with log-normal noise (sigma 0.1, mean 1). *Quality* = the profile's
value for the arm and the prompt's level, plus N(0, 0.05) noise, clipped to [0, 1].
*Utility* = ``w q + (1 - w)(1 - L / L_ref)``, the scheduler's reward: computed by
:func:`shared.bandit.reward.reward` (a request's realized utility) and
:func:`shared.bandit.reward.rewards` (every arm's expected utility, for the oracle and regret),
both the one formula :func:`shared.bandit.reward.utility`.

*The scheduler is the edge's*: every policy but the oracle is a
:class:`shared.bandit.planner.BanditPlanner` built by ``BanditPlanner.from_profile``, as the
daemon builds it, and driven through the same steps its ``choose`` and ``feedback`` take
(:meth:`~shared.bandit.planner.BanditPlanner.context_vector`: the reported link, load and
device speed and the edge's queue and batch, as a :class:`shared.planning.PlanContext`, to
features; :meth:`~shared.bandit.planner.BanditPlanner.select`: features to arm;
:meth:`~shared.bandit.planner.BanditPlanner.learn`: the report to reward to policy update).
The simulator has the prompts' features, not their text, and no wire messages: that is all
it skips. A policy learns from each request when its report arrives (its finish time), with
the reward computed as on the edge: the profile's quality and the measured latency.
``linucb`` starts from the profile's prediction (:mod:`shared.bandit.prior`; ``--no-prior``
starts from zero) with ``--alpha`` 0.1.

*Policies*: ``linucb``, ``oracle``, ``random``, ``epsilon_greedy`` (context-free, epsilon
0.1) and every arm as a fixed baseline: at the middle N (``--steps``) ``edge_only`` (VAE
decode on the edge too), ``device_only`` and ``fixed_k<K>``; at any other N the same names
with ``_n<N>`` appended (``fixed_k4_n10``). ``--policies`` picks a subset.

*Oracle*: for each request, the arm of highest true expected utility given the exact
state: true link, load and device speed, and the edge's queue and batch predicted
forward with the stream's actual next arrivals, each bringing this run's recent mean
number of edge steps. It is the per-request optimum: it does not weigh the delay a
request's edge steps cause the requests after it (so under congestion a frugal fixed
configuration can beat it).
*Regret* of a request = the oracle's expected utility minus the chosen arm's, both in
the state that policy's own past choices produced (so the oracle's is 0); ``regret`` in
the output is its sum over all requests.

Scenarios (:data:`SCENARIOS`): ``mixed`` (stationary, heterogeneous), ``network-drop``
(RTT x4 and bandwidth /20 for every link over the middle third), ``load-spike`` (every
device's load ~0.9 over the middle third), ``edge-overload`` (arrivals x3 over the middle third).

Every policy sees the same request stream (same seed), including the noise draws.
``utility``, ``quality`` and latencies are means over the requests after ``--warmup``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shared.bandit import (
    PROFILE_HINT,
    BanditError,
    ContextBuilder,
    Profile,
    ProfileError,
    arm_label,
    load_profile,
    reward,
    rewards,
)
from shared.bandit.planner import BanditPlanner
from shared.demo_grammar.prompts import scene_to_prompt
from shared.demo_grammar.scene import N_CELLS, random_scene
from shared.errors import RiseError
from shared.planning import PlanContext
from shared.prompt_features import prompt_features
from shared.relay_plan import RelayPlan

#: The profile the demo family ships (``make profile`` re-measures it).
DEMO_PROFILE = Path(__file__).resolve().parents[1] / "models" / "demo" / "family" / "profile.json"

#: Device speed classes: (name, multiplier of the profile's device step time, share of devices).
DEVICE_CLASSES: tuple[tuple[str, float, float], ...] = (("high", 1.0, 0.3), ("mid", 2.0, 0.4), ("low", 4.0, 0.3))
#: Link classes: (name, RTT s, bandwidth bit/s, share of devices).
LINK_CLASSES: tuple[tuple[str, float, float, float], ...] = (
    ("wifi", 0.015, 100e6, 0.35), ("5g", 0.03, 150e6, 0.2), ("4g", 0.06, 20e6, 0.3), ("3g", 0.15, 2e6, 0.15),
)
LOAD_SLOWDOWN = 0.7  # a device at load l computes 1 / (1 - 0.7 l) times slower
LATENCY_NOISE = 0.1  # log-normal sigma of each latency part
QUALITY_NOISE = 0.05  # normal sigma of one image's quality around the profile's mean
LOOKAHEAD = 64  # future arrivals the edge prediction (oracle, regret) takes into account
KMEAN_REQUESTS = 200  # the prediction's others bring this run's mean edge steps over ~this many requests


@dataclass(frozen=True)
class Phase:
    """From request fraction ``start`` on: link and load conditions and the arrival-rate multiplier."""

    start: float
    rtt_mult: float = 1.0
    bandwidth_mult: float = 1.0
    load: float | None = None  # every device's load around this value (a spike), or None
    rate_mult: float = 1.0
    label: str = ""


SCENARIOS: dict[str, tuple[Phase, ...]] = {
    "mixed": (Phase(0.0),),
    "network-drop": (Phase(0.0), Phase(1 / 3, rtt_mult=4.0, bandwidth_mult=0.05, label="network drop"),
                     Phase(2 / 3, label="network back")),
    "load-spike": (Phase(0.0), Phase(1 / 3, load=0.9, label="device load spike"), Phase(2 / 3, label="load back")),
    "edge-overload": (Phase(0.0), Phase(1 / 3, rate_mult=3.0, label="edge overload"), Phase(2 / 3, label="load back")),
}


@dataclass
class SimConfig:
    requests: int = 20_000
    devices: int = 500
    scenario: str = "mixed"
    seed: int = 0
    warmup: int = 2_000
    edge_load: float = 0.6
    max_batch: int = 8
    max_queue: int = 64  # requests queued + running before the edge answers "busy" (EdgeConfig.max_queue)
    batch_beta: float = 0.5
    alpha: float = 0.1  # with the prior; ~0.5 without it (see the grid in the closing note)
    prior: bool = True  # LinUCB starts from the profile's prediction (False: from zero)
    epsilon: float = 0.1
    steps: int | None = None  # the N of the fixed_k<K>/edge_only/device_only baselines (default: middle N)


# ---------------------------------------------------------------------- the request stream


@dataclass
class World:
    """The request stream every policy replays: arrivals, users, devices, links, prompts, noise."""

    t: list[float]
    w: list[float]
    level: list[int]  # the prompt's complexity level (as the edge parses it)
    level_idx: list[int]  # index of the profiled level nearest it
    complexity: list[float]
    rtt: list[float]  # true
    bandwidth: list[float]
    slow: list[float]  # device slowdown vs the profile's reference device (class x load)
    rtt_seen: list[float]  # reported
    bandwidth_seen: list[float]
    load_seen: list[float]
    step_seen: list[float]  # device seconds per step from its hello (class x reference, no load)
    noise: np.ndarray  # (n, 4) latency multipliers: rtt, edge decode, transfer, device
    quality_noise: list[float]
    change_points: list[int] = field(default_factory=list)
    change_labels: list[str] = field(default_factory=list)


def make_world(profile: Profile, config: SimConfig, rate: float) -> World:
    n, rng = config.requests, np.random.default_rng(config.seed)
    phases = SCENARIOS[config.scenario]
    starts = [min(int(round(p.start * n)), n) for p in phases]
    phase_of = np.searchsorted(np.asarray(starts), np.arange(n), side="right") - 1

    # devices: speed class, link class, base load, user preference
    d = config.devices
    cls_mult = np.asarray([c[1] for c in DEVICE_CLASSES])
    dev_class = rng.choice(len(DEVICE_CLASSES), size=d, p=[c[2] for c in DEVICE_CLASSES])
    link_class = rng.choice(len(LINK_CLASSES), size=d, p=[c[3] for c in LINK_CLASSES])
    base_load = rng.beta(2.0, 5.0, size=d)
    base_pref = rng.uniform(0.0, 1.0, size=d)

    device = rng.integers(d, size=n)
    rate_mult = np.asarray([phases[p].rate_mult for p in phase_of])
    t = np.cumsum(rng.exponential(1.0, size=n) / (rate * rate_mult))
    w = np.clip(base_pref[device] + rng.normal(0.0, 0.1, size=n), 0.0, 1.0)
    rtt = np.asarray([LINK_CLASSES[c][1] for c in link_class])[device] * rng.lognormal(0.0, 0.3, size=n)
    bandwidth = np.asarray([LINK_CLASSES[c][2] for c in link_class])[device] * rng.lognormal(0.0, 0.4, size=n)
    load = np.clip(base_load[device] + rng.normal(0.0, 0.1, size=n), 0.0, 0.98)
    for p, phase in enumerate(phases):
        sel = phase_of == p
        rtt[sel] *= phase.rtt_mult
        bandwidth[sel] *= phase.bandwidth_mult
        if phase.load is not None:
            load[sel] = np.clip(phase.load + rng.normal(0.0, 0.05, size=int(sel.sum())), 0.0, 0.98)
    step_class = cls_mult[dev_class][device]
    slow = step_class / (1.0 - LOAD_SLOWDOWN * load)

    # prompts: a pool of demo-grammar prompts per profile level; features as the edge computes them
    levels = [lv for lv in profile.levels]
    level_idx = rng.integers(len(levels), size=n)
    complexity, pool_level = _prompt_pool(levels, rng, per_level=max(8, min(400, n // len(levels) + 1)))
    pick = rng.integers(len(pool_level[0]), size=n)
    comp = np.asarray([complexity[li][j] for li, j in zip(level_idx, pick, strict=True)])
    lev = np.asarray([pool_level[li][j] for li, j in zip(level_idx, pick, strict=True)])

    sigma = LATENCY_NOISE
    noise = rng.lognormal(-sigma**2 / 2, sigma, size=(n, 4))  # mean 1
    world = World(
        t=t.tolist(), w=w.tolist(), level=[int(x) for x in lev], level_idx=[profile.level_index(int(x)) for x in lev],
        complexity=comp.tolist(),
        rtt=rtt.tolist(), bandwidth=bandwidth.tolist(), slow=slow.tolist(),
        rtt_seen=(rtt * rng.lognormal(0.0, 0.1, size=n)).tolist(),
        bandwidth_seen=(bandwidth * rng.lognormal(0.0, 0.15, size=n)).tolist(),
        load_seen=np.clip(load + rng.normal(0.0, 0.05, size=n), 0.0, 1.0).tolist(),
        step_seen=(step_class * profile.timing.device_step_s).tolist(),
        noise=noise, quality_noise=rng.normal(0.0, QUALITY_NOISE, size=n).tolist(),
    )
    world.change_points = starts[1:]
    world.change_labels = [p.label for p in phases[1:]]
    return world


def _prompt_pool(levels: Sequence[int], rng: np.random.Generator,
                 per_level: int) -> tuple[list[list[float]], list[list[int]]]:
    """Per profile level, ``per_level`` prompts: (their complexities, their parsed levels)."""
    complexity, parsed = [], []
    for level in levels:
        comps: list[float] = []
        lvls: list[int] = []
        for _ in range(per_level):
            if 1 <= level <= N_CELLS:
                features = prompt_features(scene_to_prompt(random_scene(rng, level), rng))
                comps.append(features.complexity)
                lvls.append(features.level)
            else:  # a level beyond the demo grammar: its nominal complexity
                comps.append(min(level / 9.0, 1.0))
                lvls.append(level)
        complexity.append(comps)
        parsed.append(lvls)
    return complexity, parsed


# ---------------------------------------------------------------------- the edge


class Edge:
    """Step-level batching: up to ``max_batch`` requests advance one step per batched call."""

    def __init__(self, step_time: Sequence[float], max_batch: int) -> None:
        self.T = list(step_time)  # T[b] = seconds of one batched step of b requests (T[0] unused)
        self.B = max_batch
        self.t = 0.0  # the last step boundary processed (or the time the edge went idle)
        self.active: list[list[Any]] = []  # [remaining steps, request index]
        self.queue: deque[list[Any]] = deque()

    def advance(self, now: float, on_done: Callable[[int, float], None]) -> None:
        """Run every batched step that starts before ``now``."""
        active, T = self.active, self.T
        while active and self.t < now:
            dt = T[len(active)]
            m = min(e[0] for e in active)
            if now != math.inf:
                m = min(m, max(1, math.ceil((now - self.t) / dt)))
            self.t += m * dt
            finished = []
            for e in active:
                e[0] -= m
                if e[0] == 0:
                    finished.append(e)
            if finished:
                active[:] = [e for e in active if e[0] > 0]
                for e in finished:
                    on_done(e[1], self.t)
                while len(active) < self.B and self.queue:
                    active.append(self.queue.popleft())
        if not active:
            self.t = max(self.t, now)

    def submit(self, steps: int, index: int) -> None:
        entry = [steps, index]
        if len(self.active) < self.B:
            self.active.append(entry)
        else:
            self.queue.append(entry)

    def predict(self, now: float, kmax: int, future: Sequence[float] = (), future_steps: int = 0) -> list[float]:
        """``f[j]`` = when a request arriving ``now`` would finish its ``j``-th edge step.

        The requests already running and queued go on as scheduled; requests arriving at the
        times ``future`` each bring ``future_steps`` edge steps (0: nobody else comes).
        """
        T, B = self.T, self.B
        t = self.t if self.active else now
        rem = [e[0] for e in self.active]
        queued: deque[int] = deque(e[0] for e in self.queue)
        f = [t] * (kmax + 1)
        if kmax == 0:
            return f
        joined = len(rem) < B
        if not joined:
            queued.append(_VIRTUAL)
        arrivals = list(future) if future_steps > 0 else []
        ai, done = 0, 0
        while done < kmax:
            while ai < len(arrivals) and arrivals[ai] <= t:  # they join at this step boundary
                if len(rem) + joined < B and not queued:
                    rem.append(future_steps)
                else:
                    queued.append(future_steps)
                ai += 1
            dt = T[len(rem) + joined]
            m = min(rem) if rem else kmax
            if joined:
                m = min(m, kmax - done)
            if ai < len(arrivals):
                m = min(m, max(1, math.ceil((arrivals[ai] - t) / dt)))
            if joined:
                for i in range(1, m + 1):
                    f[done + i] = t + i * dt
                done += m
            t += m * dt
            rem = [r - m for r in rem if r > m]
            while len(rem) + joined < B and queued:
                nxt = queued.popleft()
                if nxt == _VIRTUAL:
                    joined = True
                else:
                    rem.append(nxt)
        return f


_VIRTUAL = -1  # the request being predicted, in the predicted queue


def batch_step_times(profile: Profile, max_batch: int, beta: float) -> list[float]:
    """``T[b]`` for b = 0..max_batch: measured (interpolated) or ``t1 (1 + beta (b - 1))``."""
    measured = profile.timing.edge_batch_step_s
    t1 = profile.timing.edge_step_s
    out = [0.0]
    for b in range(1, max_batch + 1):
        if measured:
            sizes = np.asarray(list(measured), dtype=float)
            times = np.asarray(list(measured.values()))
            if b > sizes[-1] and len(sizes) >= 2:  # extrapolate the last segment
                slope = (times[-1] - times[-2]) / (sizes[-1] - sizes[-2])
                out.append(float(times[-1] + slope * (b - sizes[-1])))
            else:
                out.append(float(np.interp(b, sizes, times)))
        else:
            out.append(t1 * (1.0 + beta * (b - 1)))
    return out


# ---------------------------------------------------------------------- one policy's run


@dataclass
class RunResult:
    name: str
    arm: np.ndarray
    utility: np.ndarray  # realized
    quality: np.ndarray
    latency: np.ndarray
    regret: np.ndarray  # expected, per request
    decision_s: np.ndarray | None = None
    busy: np.ndarray | None = None  # requests the full edge turned away (served device-only)

    def summary(self, warmup: int) -> dict[str, float]:
        s = slice(min(warmup, len(self.utility) - 1), None)
        return {
            "utility": float(self.utility[s].mean()),
            "quality": float(self.quality[s].mean()),
            "latency_mean_s": float(self.latency[s].mean()),
            "latency_p95_s": float(np.percentile(self.latency[s], 95)),
            "regret": float(self.regret.sum()),
        }


class Simulation:
    def __init__(self, profile: Profile, config: SimConfig, arms: Sequence[RelayPlan] | None = None) -> None:
        if config.scenario not in SCENARIOS:
            raise BanditError(f"unknown scenario {config.scenario!r}; choose one of {', '.join(SCENARIOS)}")
        if config.requests < 1 or config.devices < 1:
            raise BanditError("--requests and --devices must be positive")
        self.profile, self.config = profile, config
        self.arms = list(arms) if arms is not None else profile.plans()
        self.labels = [arm_label(a) for a in self.arms]
        self.builder = ContextBuilder.from_profile(profile, active_ref=float(config.max_batch))
        self.latency_ref = profile.latency_ref_s()
        tm = profile.timing
        self.T = batch_step_times(profile, config.max_batch, config.batch_beta)
        steps = sorted({a.num_inference_steps for a in self.arms})
        middle = config.steps or steps[(len(steps) - 1) // 2]
        self.capacity = config.max_batch / (self.T[config.max_batch] * middle)  # edge-only requests / s
        self.rate = config.edge_load * self.capacity
        self.world = make_world(profile, config, self.rate)
        # per-arm constants, for the vectorized expected utility
        self.k = np.asarray([a.split for a in self.arms])
        self.kmax = int(self.k.max())
        self.edge_decode = np.asarray([tm.edge_decode_s if a.decode_on == "edge" else 0.0 for a in self.arms])
        self.bits = np.asarray([8.0 * (tm.image_bytes if a.decode_on == "edge" else tm.handoff_bytes)
                                for a in self.arms])
        self.device_work = np.asarray([a.device_steps * tm.device_step_s +
                                       (tm.device_decode_s if a.decode_on == "device" else 0.0) for a in self.arms])
        self.Q = profile.quality_table(self.arms)  # (arms, levels)
        self.middle_steps = middle
        # expected quality and latency of every arm for every request, but for the edge's wait and
        # steps (added per request): the oracle's and the regret's expected utility
        wd = self.world
        rtt, bw, slow = (np.asarray(v)[:, None] for v in (wd.rtt, wd.bandwidth, wd.slow))
        self.static_latency = rtt + tm.text_encode_s + self.edge_decode + self.bits / bw + self.device_work * slow
        self.expected_quality = np.ascontiguousarray(self.Q[:, wd.level_idx].T)  # (requests, arms)
        # the arm a "busy" edge leaves: the same N, device-only (-1: none profiled, so never turned away)
        where = {(a.num_inference_steps, a.split, a.decode_on): i for i, a in enumerate(self.arms)}
        self.fallback = np.asarray([where.get((a.num_inference_steps, 0, "device"), -1) for a in self.arms])

    # ---------------------------------------------------------------- policies

    def baselines(self) -> dict[str, int]:
        """Every arm as a fixed baseline. At the middle N (or ``--steps``): ``edge_only`` (the VAE
        decode on the edge too, if the arms have it), ``device_only`` and ``fixed_k<K>`` (device
        decode); at any other N the same names with ``_n<N>`` appended."""
        out: dict[str, int] = {}
        for i, a in enumerate(self.arms):
            n = a.num_inference_steps
            suffix = "" if n == self.middle_steps else f"_n{n}"
            has_edge_decode = f"N{n}k{n}e" in self.labels
            if a.split == 0:
                name = "device_only"
            elif a.split == n and (a.decode_on == "edge" or not has_edge_decode):
                name = "edge_only"
            else:
                name = f"fixed_k{a.split}"
            out[name + suffix] = i
        return out

    def planner(self, policy: str) -> BanditPlanner:
        """The edge's planner for ``policy`` (a name ``BanditPlanner.from_profile`` knows, or an arm's
        label), over this simulation's arms, with its ``--alpha``, ``--no-prior``, ``--epsilon``,
        ``--max-batch`` (the edge's capacity) and ``--seed``."""
        cfg = self.config
        options: dict[str, Any] = {}
        if policy == "linucb":
            options["prior"] = cfg.prior
        elif policy == "epsilon_greedy":
            options["epsilon"] = cfg.epsilon
        planner = BanditPlanner.from_profile(self.profile, policy, arms=self.arms, edge_capacity=cfg.max_batch,
                                             alpha=cfg.alpha, seed=cfg.seed, **options)
        if planner.builder != self.builder or planner.latency_ref_s != self.latency_ref:  # pragma: no cover
            raise BanditError("the planner's context scales or reference latency are not the simulation's")
        return planner

    def make_policies(self, names: Sequence[str] | None = None) -> dict[str, BanditPlanner | None]:
        """Planners by output name (``oracle`` is ``None``: the simulation plays it itself)."""
        known = ["linucb", "oracle", "random", "epsilon_greedy", *self.baselines()]
        if names is not None:
            unknown = [n for n in names if n not in known]
            if unknown:
                raise BanditError(f"unknown policies {', '.join(unknown)}; known: {', '.join(known)}")
        baselines = self.baselines()
        policies: dict[str, BanditPlanner | None] = {}
        for name in known if names is None else names:
            if name == "oracle":
                policies[name] = None
            else:
                policies[name] = self.planner(self.labels[baselines[name]] if name in baselines else name)
        return policies

    def run(self, name: str, planner: BanditPlanner | None) -> RunResult:
        """Replay the request stream with ``planner`` (``None`` = the oracle)."""
        wd, n = self.world, self.config.requests
        tm = self.profile.timing
        enc, ref = tm.text_encode_s, self.latency_ref
        k, kmax, Q = self.k, self.kmax, self.Q
        edge_decode, bits, device_work = self.edge_decode, self.bits, self.device_work
        fallback, can_fall_back = self.fallback, self.fallback >= 0
        max_queue = self.config.max_queue
        noise = wd.noise.tolist()
        edge = Edge(self.T, self.config.max_batch)
        static_latency, expected_quality = self.static_latency, self.expected_quality
        k_mean = float(self.k.mean())  # this run's recent mean edge steps per request (the prediction's others)

        arm_of = np.zeros(n, dtype=np.int64)  # the arm that served the request
        utility, quality, latency, regret = (np.zeros(n) for _ in range(4))
        busy = np.zeros(n, dtype=bool)
        decision = np.zeros(n)  # the planner's selection time
        contexts: dict[int, np.ndarray] = {}
        reports: list[tuple[float, int]] = []  # (report time, request)

        def finish(i: int, edge_done: float) -> None:
            """Request i's edge steps are over at ``edge_done``: its realized latency and report time."""
            a = int(arm_of[i])
            nz = noise[i]
            lat = (wd.rtt[i] * nz[0] * (2.0 if busy[i] else 1.0) + enc + (edge_done - wd.t[i])
                   + edge_decode[a] * nz[1] + bits[a] / wd.bandwidth[i] * nz[2] + device_work[a] * wd.slow[i] * nz[3])
            latency[i] = lat
            q = min(max(Q[a, wd.level_idx[i]] + wd.quality_noise[i], 0.0), 1.0)
            quality[i] = q
            utility[i] = reward(wd.w[i], q, lat, ref)
            if planner is not None and not busy[i]:  # a busy answer carries no plan, so no report
                heapq.heappush(reports, (wd.t[i] + lat, i))

        for i in range(n):
            now = wd.t[i]
            edge.advance(now, finish)
            if planner is not None:
                while reports and reports[0][0] <= now:  # a report arrives: the planner's feedback step
                    _, j = heapq.heappop(reports)
                    planner.learn(int(arm_of[j]), contexts.pop(j), wd.level[j], wd.w[j], float(latency[j]))
            # true expected utility of every arm in this state (oracle, regret)
            f = edge.predict(now, kmax, wd.t[i + 1:i + 1 + LOOKAHEAD], round(k_mean))
            f[0] = now  # k = 0: no edge steps
            w = wd.w[i]
            lat_i = static_latency[i] + (np.asarray(f)[k] - now)
            q_i = expected_quality[i]
            full = len(edge.active) + len(edge.queue) >= max_queue
            if full:  # edge arms get "busy": the device runs the same N device-only, one round trip later
                q_i = q_i.copy()
                q_i[can_fall_back] = q_i[fallback[can_fall_back]]
                lat_i[can_fall_back] = lat_i[fallback[can_fall_back]] + wd.rtt[i]
            eu = rewards(w, q_i, lat_i, ref)
            if planner is None:
                a = int(np.argmax(eu))
            else:  # what the edge knows: the device's reports and hello, its own queue and batch
                seen = PlanContext(queue_depth=len(edge.queue), active=len(edge.active), device_load=wd.load_seen[i],
                                   rtt_s=wd.rtt_seen[i], bandwidth_bps=wd.bandwidth_seen[i],
                                   device_step_s=wd.step_seen[i])
                _, x = planner.context_vector(wd.complexity[i], w, seen)
                a = planner.select(x)
                decision[i] = planner.decision_s[-1]
                contexts[i] = x
            regret[i] = eu.max() - eu[a]
            if full and k[a] > 0 and can_fall_back[a]:
                busy[i] = True
                a = int(fallback[a])
                contexts.pop(i, None)  # no plan went out, so no report will come
            arm_of[i] = a
            k_mean += (k[a] - k_mean) / KMEAN_REQUESTS
            if k[a] > 0:
                edge.submit(int(k[a]), i)
            else:
                finish(i, now)
        edge.advance(math.inf, finish)
        return RunResult(name, arm_of, utility, quality, latency, regret, None if planner is None else decision, busy)


# ---------------------------------------------------------------------- reporting


def summarize(results: dict[str, RunResult], warmup: int) -> dict[str, Any]:
    return {"policies": {name: r.summary(warmup) for name, r in results.items()}}


def is_fixed(name: str) -> bool:
    return name.startswith(("edge_only", "device_only", "fixed_k"))


def best_fixed(summary: dict[str, Any]) -> str | None:
    fixed = [n for n in summary["policies"] if is_fixed(n)]
    return max(fixed, key=lambda n: summary["policies"][n]["utility"]) if fixed else None


def adaptation(result: RunResult, change_points: Sequence[int],
               window: int = 500) -> list[tuple[int, float, float, float]]:
    """Per change point: mean regret per request in the window before, the first and the second window after."""
    out = []
    r = result.regret
    for c in change_points:
        before = r[max(0, c - window):c]
        first = r[c:c + window]
        second = r[c + window:c + 2 * window]
        if len(before) and len(first):
            after = float(second.mean()) if len(second) else math.nan
            out.append((c, float(before.mean()), float(first.mean()), after))
    return out


def format_table(sim: Simulation, results: dict[str, RunResult], summary: dict[str, Any]) -> str:
    cfg = sim.config
    pol = summary["policies"]
    lines = []
    tag = " [SYNTHETIC PROFILE: figures are not measurements]" if sim.profile.synthetic else ""
    lines.append(f"rise-sim: scenario {cfg.scenario}, {cfg.requests} requests, {cfg.devices} devices, seed {cfg.seed}, "
                 f"{len(sim.arms)} arms{tag}")
    lines.append(f"  edge: capacity {sim.capacity:.2f} edge-only req/s at N={sim.middle_steps}, arrivals "
                 f"{sim.rate:.2f}/s (--edge-load {cfg.edge_load}), busy beyond {cfg.max_queue}; "
                 f"L_ref {sim.latency_ref:.2f} s; linucb {'with' if cfg.prior else 'without'} the profile prior, "
                 f"alpha {cfg.alpha:g}")
    lines.append(f"  means over the requests after the first {cfg.warmup}; regret summed over all; "
                 f"busy = turned away by a full edge")
    lines.append(f"  {'policy':<18}{'utility':>9}{'quality':>9}{'lat mean':>10}{'lat p95':>9}{'regret':>10}"
                 f"{'regret/req':>11}{'busy':>7}")
    order = sorted(pol, key=lambda n: -pol[n]["utility"])
    for name in order:
        p = pol[name]
        b = results[name].busy
        busy = f"{100 * b.mean():.1f}%" if b is not None else "-"
        lines.append(f"  {name:<18}{p['utility']:>9.4f}{p['quality']:>9.4f}{p['latency_mean_s']:>9.2f}s"
                     f"{p['latency_p95_s']:>8.2f}s{p['regret']:>10.1f}{p['regret'] / cfg.requests:>11.4f}{busy:>7}")
    fixed = best_fixed(summary)
    if "linucb" in pol:
        lin = pol["linucb"]["utility"]
        if fixed:
            f = pol[fixed]["utility"]
            lines.append(f"  linucb vs best fixed ({fixed}): {100 * (lin - f) / abs(f):+.1f}% utility")
        if "oracle" in pol:
            o = pol["oracle"]["utility"]
            lines.append(f"  linucb vs oracle: {100 * (lin - o) / abs(o):+.1f}% utility")
            if fixed:  # what knowing each request's context is worth here (the oracle: the per-request optimum)
                lines.append(f"  headroom: the oracle is {100 * (o - f) / abs(f):+.1f}% "
                             "over the best fixed configuration")
        dec = results["linucb"].decision_s
        if dec is not None and len(dec):
            ms = dec * 1e3
            lines.append(f"  linucb decision time: p50 {np.percentile(ms, 50):.3f} ms, "
                         f"p99 {np.percentile(ms, 99):.3f} ms "
                         f"({len(sim.arms)} arms, {sim.builder.dim} features)")
        for c, before, first, second in adaptation(results["linucb"], sim.world.change_points):
            lines.append(f"  linucb around request {c}: regret/request {before:.4f} in the 500 before, "
                         f"{first:.4f} in the 500 after, {second:.4f} in the next 500")
    return "\n".join(lines)


def plot(sim: Simulation, results: dict[str, RunResult], summary: dict[str, Any], out: Path) -> list[Path]:
    """Cumulative and rolling regret with the scenario's changes marked; the latency-quality scatter."""
    try:
        import matplotlib
    except ImportError as exc:
        raise BanditError("--plots needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pol = summary["policies"]
    fixed = best_fixed(summary)
    shown = [n for n in ("linucb", "epsilon_greedy", "random", "edge_only", "device_only", fixed, "oracle")
             if n in results and n is not None]
    shown = list(dict.fromkeys(shown))
    synthetic = " (synthetic profile)" if sim.profile.synthetic else ""
    title = f"rise-sim {sim.config.scenario}, {sim.config.requests} requests{synthetic}"
    paths = []

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 8), sharex=True)
    window = max(50, min(500, sim.config.requests // 40))
    kernel = np.ones(window) / window
    for name in shown:
        r = results[name].regret
        label = f"{name} (best fixed)" if name == fixed else name
        ax1.plot(np.cumsum(r), label=label)
        if len(r) >= window and name != "oracle":  # the oracle's is 0: nothing on a log scale
            rolling = np.maximum(np.convolve(r, kernel, mode="valid"), 1e-5)
            ax2.plot(np.arange(window - 1, len(r)), rolling, label=label)
    for ax in (ax1, ax2):
        for c, text in zip(sim.world.change_points, sim.world.change_labels, strict=True):
            ax.axvline(c, color="k", ls="--", lw=1)
            ax.text(c, ax.get_ylim()[1] * 0.95, f" {text}", fontsize=8, va="top")
    ax1.set_ylabel("cumulative regret")
    ax1.set_title(title)
    ax1.legend(fontsize=8)
    ax2.set_ylabel(f"regret per request ({window}-request mean)")
    ax2.set_xlabel("request")
    ax2.set_yscale("log")
    fig.tight_layout()
    paths.append(out / f"regret_{sim.config.scenario}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 6))
    labelled = set(shown)
    for name, p in pol.items():
        if name not in labelled:  # the other fixed configurations: unlabelled grey dots
            ax.scatter(p["latency_mean_s"], p["quality"], color="0.7", s=15, zorder=1)
    for name in shown:
        p = pol[name]
        marker, size = {"linucb": ("o", 90), "oracle": ("x", 90)}.get(name, ("s", 35))
        label = f"{name}{' (best fixed)' if name == fixed else ''}: utility {p['utility']:.3f}"
        ax.scatter(p["latency_mean_s"], p["quality"], marker=marker, s=size, label=label, zorder=2)
    ax.scatter([], [], color="0.7", s=15, label="other fixed configurations")
    ax.set_xscale("log")
    ax.set_xlabel("mean latency (s, log scale)")
    ax.set_ylabel("mean quality")
    ax.set_title(f"latency vs quality per policy\n{title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / f"latency_quality_{sim.config.scenario}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rise-sim", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(DEMO_PROFILE),
                        help="a RISE profile JSON (python -m shared.bandit.profile builds one; "
                             "default: the demo family's, models/demo/family/profile.json)")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--scenario", default="mixed", choices=sorted(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2_000, help="requests left out of the means (default 2000)")
    parser.add_argument("--policies", help="comma-separated subset (default: all)")
    parser.add_argument("--alpha", type=float, default=SimConfig.alpha, help="LinUCB exploration")
    parser.add_argument("--no-prior", action="store_true",
                        help="LinUCB starts from zero instead of the profile's prediction")
    parser.add_argument("--epsilon", type=float, default=SimConfig.epsilon)
    parser.add_argument("--edge-load", type=float, default=SimConfig.edge_load,
                        help="arrival rate as a fraction of the edge's edge-only capacity")
    parser.add_argument("--max-batch", type=int, default=SimConfig.max_batch, help="requests per batched step")
    parser.add_argument("--max-queue", type=int, default=SimConfig.max_queue,
                        help="requests queued + running on the edge before it answers busy (default 64)")
    parser.add_argument("--batch-beta", type=float, default=SimConfig.batch_beta,
                        help="unmeasured batching cost: a step of b requests costs 1 + beta (b - 1) single steps")
    parser.add_argument("--steps", type=int, help="N of the fixed baselines (default: the profile's middle N)")
    parser.add_argument("--json", dest="json_out", help="write {\"policies\": {NAME: {...}}} here")
    parser.add_argument("--plots", help="folder for regret and latency-quality plots (matplotlib)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.profile).is_file():
        print(f"rise-sim: error: no profile at {args.profile}. The simulator replays measured profiles; {PROFILE_HINT}",
              file=sys.stderr)
        return 2
    if args.requests <= args.warmup:
        print(f"rise-sim: error: --requests {args.requests} must exceed --warmup {args.warmup}: the means are "
              "taken over the requests after the warm-up", file=sys.stderr)
        return 2
    try:
        profile = load_profile(args.profile)
        config = SimConfig(requests=args.requests, devices=args.devices, scenario=args.scenario, seed=args.seed,
                           warmup=args.warmup, edge_load=args.edge_load, max_batch=args.max_batch,
                           max_queue=args.max_queue, prior=not args.no_prior,
                           batch_beta=args.batch_beta, alpha=args.alpha, epsilon=args.epsilon, steps=args.steps)
        started = time.perf_counter()
        sim = Simulation(profile, config)
        names = args.policies.split(",") if args.policies else None
        results = {name: sim.run(name, policy) for name, policy in sim.make_policies(names).items()}
        summary = summarize(results, config.warmup)
        print(format_table(sim, results, summary))
        print(f"  ({time.perf_counter() - started:.1f} s)")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(summary, indent=1) + "\n")
        if args.plots:
            for path in plot(sim, results, summary, Path(args.plots)):
                print(f"  wrote {path}")
    except (ProfileError, BanditError, RiseError) as exc:
        print(f"rise-sim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
