"""``rise-sim``: a discrete-event simulation of many devices sharing one edge, to judge the scheduler.

Usage::

    rise-sim [--profile profile.json] [--hardware gpu-edge-phones] --requests 20000 --devices 500 \\
             --scenario mixed [--edge-load 1.0] [--seeds 5] [--json OUT] [--plots DIR]

Quality per arm comes from a measured profile (:mod:`shared.bandit.profile`; default: the one the
demo family ships). Times come from the same profile (the machine it was measured on) or from a
*hardware profile* (``--hardware``, :mod:`lab.hardware`: the edge's step time by batch size and
device tiers with their step and decode times, every figure with its source; ``gpu-edge-phones``
ships, from published figures). No torch: it runs anywhere numpy does.

The model
---------
*Requests* arrive as a Poisson process; each comes from one of ``--devices`` devices and
carries a prompt drawn from the demo family's grammar (complexity levels of the profile,
uniformly; its features come from :mod:`shared.prompt_features`, as on the edge) and the
user's preference ``w`` (per user ``U(0, 1)``, jittered per request by N(0, 0.1)).

*Devices* belong to a tier of the hardware profile (by its shares: the demo profile's device
at 1x, 2x and 4x its measured step time, or the published phone tiers) and have a CPU load (per
device Beta(2, 5), jittered per request); load slows the device by ``1 / (1 - LOAD_SLOWDOWN * load)``.
*Links* have a class (:data:`LINK_CLASSES`, RTT and bandwidth) with per-request log-normal
jitter. Devices report RTT, bandwidth and load with measurement noise and their tier's step
time in their hello; the scheduler sees those, the oracle the true values.

*The edge* runs the large model's steps with step-level batching, as the engine does: up
to ``--max-batch`` requests (default: the hardware's) advance one step per batched call; a
call for ``b`` requests takes ``T[b]`` (the profile's batched step times, interpolated, or
``edge_step_s * (1 + beta (b - 1))`` unmeasured, ``--batch-beta`` 0.5). A request joins the
batch at the next step boundary, or waits in a FIFO queue. ``k = 0`` requests only need the
text encoding. With ``--max-queue`` (64) requests queued and running, the edge answers ``busy``
as the daemon does: the device then runs the same N device-only, one round trip later, and (no
plan, no report) the scheduler learns nothing from it. The arrival rate is ``--edge-load``
(``rho``) times the edge's capacity: the most edge-only requests per second it can serve (full
batches at the smallest N of the arms).

*Latency* of an arm = RTT + text encoding + edge wait and steps (simulated) + edge decode
(edge-decode arms) + payload / bandwidth + device steps and decode (the tier's, slowed by
load), each part with log-normal noise (sigma 0.1, mean 1). *Quality* = the arm's true
quality at the prompt's level plus N(0, 0.05) noise, clipped to [0, 1]; the true quality is
the profile's, less ``--quality-shift`` times the arm's device share ``(N - k) / N`` (a small
model worse than the profile says: a truth the prior does not know). With ``--rating-rate r``
a share ``r`` of users rate their image, +1 with probability equal to its quality and -1
otherwise (so a rating is a noisy, unbiased view of the true quality). *Utility* =
``w q + (1 - w)(1 - L / L_s)`` with ``L_s`` = 10 s (:mod:`shared.bandit.reward`).

*The scheduler is the edge's*: every policy but the oracles and the queue rule is a
:class:`shared.bandit.planner.BanditPlanner` built by ``BanditPlanner.from_profile``, as the
daemon builds it, and driven through the same steps its ``choose`` and ``feedback`` take
(:meth:`~shared.bandit.planner.BanditPlanner.context`: the reported link, load and device
speed and the edge's queue and batch to features, the congestion price updated from the
queue; :meth:`~shared.bandit.planner.BanditPlanner.select`; :meth:`~shared.bandit.planner.BanditPlanner.learn`:
the report to reward to policy update, with the user's rating if any). A policy learns from
each request when its report arrives. ``--prior-hardware`` builds the planner's profile on
another hardware's timing (a cold start in a new world: ``profile`` = the profile's own).

*Policies*: ``linucb`` (the served one: :class:`~shared.bandit.factored.FactoredLinUCB`, with
the congestion price), ``linucb_disjoint`` (the paper's disjoint LinUCB, priced too),
``epsilon_greedy``, ``random``, every arm as a fixed baseline (at the middle N ``edge_only``,
``device_only`` and ``fixed_k<K>``; at another N with ``_n<N>`` appended), and the references:
``oracle`` (per request, the arm of highest true expected utility given the exact present
state: true link, load and device speed, the edge's batch and queue, predicted forward with
arrivals at the true mean rate, each bringing this run's recent mean edge steps; myopic: it
does not count the delay its edge steps cause the others), ``oracle_priced`` (the same less
the congestion price, adapted from its own batch and queue as the planner's is) and
``queue_threshold`` (the best fixed arm while fewer than ``--queue-threshold`` requests wait for
the edge, its device-only twin otherwise). ``--policies`` picks a subset. Not in the default set:
``oracle_clairvoyant``, the priced oracle that predicts the edge with the stream's *actual* next
arrival times, which no scheduler can know (the oracle before this change did that), and
``linucb_no_ratings`` (``linucb`` that never learns quality from ratings).

*Figures* (``--seeds K`` runs K seeds; every policy sees the same request streams): per policy
its utility, and its utility less the best fixed arm's, as absolute differences with a 95%
confidence interval over the seeds (Student t); the *headroom* ``U_ref - U_best_fixed`` with
``U_ref`` the best reference (oracle, oracle_priced, queue_threshold, best fixed); the share of
it a policy captures, ``(U - U_best_fixed) / (U_ref - U_best_fixed)``; p95 latency and quality;
per scenario phase the utility; ``regret/req`` = the myopic oracle's expected utility minus the
chosen arm's, in the state the policy's own choices made. Means are over the requests after
``--warmup``. ``--sustain 0.5,1,1.5`` adds the highest of those loads at which a policy keeps
p95 latency <= 5 s.

Scenarios (:data:`SCENARIOS`): ``mixed`` (stationary, heterogeneous), ``network-drop``
(RTT x4 and bandwidth /20 for every link over the middle third), ``load-spike`` (every
device's load ~0.9 over the middle third), ``edge-overload`` (arrivals x3 over the middle third).
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lab.hardware import Hardware, HardwareError, hardware_from_profile, load_hardware
from lab.progress import bar, counting
from shared.bandit import (
    BanditError,
    Context,
    FixedArm,
    Profile,
    ProfileError,
    arm_label,
    load_profile,
    reward,
    rewards,
)
from shared.bandit.congestion import CongestionPrice
from shared.bandit.latency import DEFAULT_BATCH_BETA, batch_step_times, edge_schedule
from shared.bandit.planner import BanditPlanner
from shared.demo_grammar.prompts import scene_to_prompt
from shared.demo_grammar.scene import N_CELLS, random_scene
from shared.errors import RiseError
from shared.planning import PlanContext
from shared.prompt_features import prompt_features
from shared.relay_plan import RelayPlan

#: The profile the demo family ships (``make profile`` re-measures it).
DEMO_PROFILE = Path(__file__).resolve().parents[1] / "models" / "demo" / "family" / "profile.json"

#: The demo world's device speed classes: (name, multiplier of the profile's device step and decode, share).
DEVICE_CLASSES: tuple[tuple[str, float, float], ...] = (("high", 1.0, 0.3), ("mid", 2.0, 0.4), ("low", 4.0, 0.3))
#: Link classes: (name, RTT s, bandwidth bit/s, share of devices).
LINK_CLASSES: tuple[tuple[str, float, float, float], ...] = (
    ("wifi", 0.015, 100e6, 0.35), ("5g", 0.03, 150e6, 0.2), ("4g", 0.06, 20e6, 0.3), ("3g", 0.15, 2e6, 0.15),
)
LOAD_SLOWDOWN = 0.7  # a device at load l computes 1 / (1 - 0.7 l) times slower
LATENCY_NOISE = 0.1  # log-normal sigma of each latency part
QUALITY_NOISE = 0.05  # normal sigma of one image's quality around the arm's true mean
LOOKAHEAD = 64  # future arrivals the edge prediction (oracles, regret) takes into account
KMEAN_REQUESTS = 200  # the prediction's others bring this run's mean edge steps over ~this many requests
P95_TARGET_S = 5.0  # --sustain: the highest load at which a policy keeps p95 latency within this
REFERENCES = ("oracle", "oracle_priced", "queue_threshold")  # with the best fixed arm: U_ref is their best
#: Not in the default set: the priced oracle that also knows the future arrival times (see the module doc).
CLAIRVOYANT = "oracle_clairvoyant"
#: Student t quantiles (0.975) by degrees of freedom, for the 95% intervals over seeds.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}


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
    max_batch: int | None = None  # requests per batched edge step (default: the hardware's)
    max_queue: int = 64  # requests queued + running before the edge answers "busy" (EdgeConfig.max_queue)
    batch_beta: float = DEFAULT_BATCH_BETA
    alpha: float | None = None  # LinUCB exploration (default: the planner's for each LinUCB)
    prior: bool = True  # disjoint LinUCB starts from the profile's prediction (False: from zero)
    epsilon: float = 0.1
    steps: int | None = None  # the N of the fixed_k<K>/edge_only/device_only baselines (default: middle N)
    hardware: str | None = None  # a hardware profile (name or file); None: the profile's own timing
    prior_hardware: str | None = None  # the planner's timing from another hardware ("profile": the profile's)
    rating_rate: float = 0.0  # share of users who rate their image
    quality_shift: float = 0.0  # true quality = profile's - shift * (N - k) / N
    queue_threshold: int | None = None  # queue_threshold's rule (default: one batch waiting)
    congestion: bool = True  # the LinUCBs pay the congestion price


# ---------------------------------------------------------------------- the request stream


@dataclass
class World:
    """The request stream every policy replays: arrivals, users, devices, links, prompts, noise."""

    t: list[float]
    rate: np.ndarray  # (n,) the true arrival rate (1/s) when the request arrives
    w: list[float]
    level: list[int]  # the prompt's complexity level (as the edge parses it)
    level_idx: list[int]  # index of the profiled level nearest it
    complexity: list[float]
    rtt: list[float]  # true
    bandwidth: list[float]
    slow: np.ndarray  # (n,) device slowdown by its load
    step: np.ndarray  # (n,) the device tier's step time (s)
    decode: np.ndarray  # (n,) the device tier's decode time (s)
    tier: np.ndarray  # (n,) the device's tier index
    rtt_seen: list[float]  # reported
    bandwidth_seen: list[float]
    load_seen: list[float]
    noise: np.ndarray  # (n, 4) latency multipliers: rtt, edge decode, transfer, device
    quality_noise: list[float]
    rated: np.ndarray  # (n,) bool: the user rates this image
    rating_u: np.ndarray  # (n,) uniform draws: +1 if below the image's quality
    change_points: list[int] = field(default_factory=list)
    change_labels: list[str] = field(default_factory=list)


def make_world(profile: Profile, hardware: Hardware, config: SimConfig, rate: float) -> World:
    n, rng = config.requests, np.random.default_rng(config.seed)
    phases = SCENARIOS[config.scenario]
    starts = [min(int(round(p.start * n)), n) for p in phases]
    phase_of = np.searchsorted(np.asarray(starts), np.arange(n), side="right") - 1

    # devices: tier, link class, base load, user preference
    d = config.devices
    tiers = hardware.tiers
    dev_tier = rng.choice(len(tiers), size=d, p=np.asarray([t.share for t in tiers]) / sum(t.share for t in tiers))
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
    tier = dev_tier[device]
    step = np.asarray([t.step_s.value for t in tiers])[tier]
    decode = np.asarray([t.decode_s.value for t in tiers])[tier]

    # prompts: a pool of demo-grammar prompts per profile level; features as the edge computes them
    levels = list(profile.levels)
    level_idx = rng.integers(len(levels), size=n)
    complexity, pool_level = _prompt_pool(levels, rng, per_level=max(8, min(400, n // len(levels) + 1)))
    pick = rng.integers(len(pool_level[0]), size=n)
    comp = np.asarray([complexity[li][j] for li, j in zip(level_idx, pick, strict=True)])
    lev = np.asarray([pool_level[li][j] for li, j in zip(level_idx, pick, strict=True)])

    sigma = LATENCY_NOISE
    noise = rng.lognormal(-sigma**2 / 2, sigma, size=(n, 4))  # mean 1
    world = World(
        t=t.tolist(), rate=rate * rate_mult, w=w.tolist(), level=[int(x) for x in lev],
        level_idx=[profile.level_index(int(x)) for x in lev],
        complexity=comp.tolist(), rtt=rtt.tolist(), bandwidth=bandwidth.tolist(),
        slow=1.0 / (1.0 - LOAD_SLOWDOWN * load), step=step, decode=decode, tier=tier,
        rtt_seen=(rtt * rng.lognormal(0.0, 0.1, size=n)).tolist(),
        bandwidth_seen=(bandwidth * rng.lognormal(0.0, 0.15, size=n)).tolist(),
        load_seen=np.clip(load + rng.normal(0.0, 0.05, size=n), 0.0, 1.0).tolist(),
        noise=noise, quality_noise=rng.normal(0.0, QUALITY_NOISE, size=n).tolist(),
        rated=rng.random(n) < config.rating_rate, rating_u=rng.random(n),
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
        """``f[j]`` = when a request arriving ``now`` would finish its ``j``-th edge step: the
        running and queued requests go on as scheduled; requests arriving at the times ``future``
        each bring ``future_steps`` edge steps (0: nobody else comes). :func:`edge_schedule`."""
        return edge_schedule(self.T[:self.B + 1], [e[0] for e in self.active], [e[0] for e in self.queue], kmax,
                             start=self.t if self.active else now, arrivals=future, arrival_steps=future_steps)




# ---------------------------------------------------------------------- one policy's run


@dataclass
class RunResult:
    name: str
    arm: np.ndarray
    utility: np.ndarray  # realized
    quality: np.ndarray
    latency: np.ndarray
    regret: np.ndarray | None  # expected, per request, vs the myopic oracle (None: not computed, fixed arms)
    decision_s: np.ndarray | None = None
    busy: np.ndarray | None = None  # requests the full edge turned away (served device-only)
    price: np.ndarray | None = None  # the congestion price per edge step at each request (priced policies)

    def summary(self, warmup: int, phases: Sequence[tuple[int, int, str]] = ()) -> dict[str, Any]:
        s = slice(min(warmup, len(self.utility) - 1), None)
        out: dict[str, Any] = {
            "utility": float(self.utility[s].mean()),
            "quality": float(self.quality[s].mean()),
            "latency_mean_s": float(self.latency[s].mean()),
            "latency_p95_s": float(np.percentile(self.latency[s], 95)),
            "regret_per_request": None if self.regret is None else float(self.regret[s].mean()),
            "busy_share": None if self.busy is None else float(self.busy[s].mean()),
        }
        if self.price is not None:
            out["price_mean"] = float(self.price[s].mean())
        if len(phases) > 1:
            starts = [(warmup if a == 0 else a, b, label) for a, b, label in phases]  # the first after the warmup
            out["phases"] = {label: float(self.utility[a:b].mean()) for a, b, label in starts if b > a}
        return out


class Simulation:
    """One seed of one scenario: the world, the edge and every policy's replay of it."""

    def __init__(self, profile: Profile, config: SimConfig, arms: Sequence[RelayPlan] | None = None) -> None:
        if config.scenario not in SCENARIOS:
            raise BanditError(f"unknown scenario {config.scenario!r}; choose one of {', '.join(SCENARIOS)}")
        if config.requests < 1 or config.devices < 1:
            raise BanditError("--requests and --devices must be positive")
        if not 0.0 <= config.rating_rate <= 1.0:
            raise BanditError(f"--rating-rate must be in [0, 1], got {config.rating_rate}")
        if not config.edge_load > 0:
            raise BanditError(f"--edge-load must be positive, got {config.edge_load}")
        self.config = config
        self.hardware = (load_hardware(config.hardware) if config.hardware
                         else hardware_from_profile(profile, DEVICE_CLASSES))
        # the world's timing and the profile's quality (without --hardware: the profile as it is, so the
        # planner is the one the daemon builds from the same file)
        self.profile = self.hardware.apply(profile) if config.hardware else profile
        if config.prior_hardware in (None, ""):
            self.planner_profile = self.profile
        elif config.prior_hardware == "profile":
            self.planner_profile = profile
        else:
            self.planner_profile = load_hardware(config.prior_hardware).apply(profile)
        self.arms = list(arms) if arms is not None else self.profile.plans()
        self.labels = [arm_label(a) for a in self.arms]
        tm = self.profile.timing
        self.max_batch = config.max_batch or self.hardware.max_batch
        self.T = batch_step_times(tm.edge_step_s, tm.edge_batch_step_s, self.max_batch, config.batch_beta)
        steps = sorted({a.num_inference_steps for a in self.arms})
        middle = config.steps or steps[(len(steps) - 1) // 2]
        # the most edge-only requests per second the edge can serve: full batches at the smallest N
        self.capacity = self.max_batch / (self.T[self.max_batch] * steps[0])
        self.rate = config.edge_load * self.capacity
        self.queue_threshold = config.queue_threshold or self.max_batch
        self.world = make_world(self.profile, self.hardware, config, self.rate)
        # per-arm constants, for the vectorized expected utility
        self.k = np.asarray([a.split for a in self.arms])
        self.kmax = int(self.k.max())
        self.edge_decode = np.asarray([tm.edge_decode_s if a.decode_on == "edge" else 0.0 for a in self.arms])
        self.bits = np.asarray([8.0 * (tm.image_bytes if a.decode_on == "edge" else tm.handoff_bytes)
                                for a in self.arms])
        device_steps = np.asarray([a.device_steps for a in self.arms], dtype=np.float64)
        device_decode = np.asarray([a.decode_on == "device" for a in self.arms], dtype=np.float64)
        self.Q = self.profile.quality_table(self.arms)  # (arms, levels): the profile's
        share = device_steps / np.asarray([a.num_inference_steps for a in self.arms])
        self.Q_true = np.clip(self.Q - config.quality_shift * share[:, None], 0.0, 1.0)
        self.middle_steps = middle
        # the device's work (s) per request and arm, and the expected latency of every arm but for the
        # edge's wait and steps (added per request): the oracle's and the regret's expected utility
        wd = self.world
        self.device_work = (device_steps[None, :] * wd.step[:, None] + device_decode[None, :] * wd.decode[:, None]) \
            * wd.slow[:, None]
        rtt, bw = (np.asarray(v)[:, None] for v in (wd.rtt, wd.bandwidth))
        self.static_latency = rtt + tm.text_encode_s + self.edge_decode + self.bits / bw + self.device_work
        self.expected_quality = np.ascontiguousarray(self.Q_true[:, wd.level_idx].T)  # (requests, arms)
        # the arm a "busy" edge leaves: the same N, device-only (-1: none profiled, so never turned away)
        where = {(a.num_inference_steps, a.split, a.decode_on): i for i, a in enumerate(self.arms)}
        self.fallback = np.asarray([where.get((a.num_inference_steps, 0, "device"), -1) for a in self.arms])
        n = config.requests
        self.phases = [(s, e, p.label or "start") for s, e, p in zip(
            [min(int(round(p.start * n)), n) for p in SCENARIOS[config.scenario]],
            [min(int(round(p.start * n)), n) for p in SCENARIOS[config.scenario][1:]] + [n],
            SCENARIOS[config.scenario], strict=True)]

    def new_edge(self) -> Edge:
        """An idle edge of this simulation's batch and step times."""
        return Edge(self.T, self.max_batch)

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
        """The edge's planner for ``policy`` (a name ``BanditPlanner.from_profile`` knows, an arm's label,
        or ``linucb_no_ratings``: ``linucb`` that keeps the profile's quality), over this simulation's
        arms, with its ``--alpha``, ``--no-prior``, ``--epsilon``, the edge's batch and ``--seed``."""
        cfg = self.config
        options: dict[str, Any] = {}
        if policy == "linucb_disjoint":
            options["prior"] = cfg.prior
        elif policy == "epsilon_greedy":
            options["epsilon"] = cfg.epsilon
        elif policy == "linucb_no_ratings":
            policy, options["learn_quality"] = "linucb", False
        return BanditPlanner.from_profile(self.planner_profile, policy, arms=self.arms, edge_capacity=self.max_batch,
                                          alpha=cfg.alpha, seed=cfg.seed, congestion=cfg.congestion, **options)

    def policy_names(self) -> list[str]:
        return ["linucb", "linucb_disjoint", *REFERENCES, "random", "epsilon_greedy", *self.baselines()]

    def make_policies(self, names: Sequence[str] | None = None) -> dict[str, BanditPlanner | None]:
        """Planners by output name (the references are ``None``: the simulation plays them itself).
        Fixed arms come first: ``queue_threshold`` builds on the best of them."""
        known = [*self.policy_names(), "linucb_no_ratings", CLAIRVOYANT]
        if names is not None:
            unknown = [n for n in names if n not in known]
            if unknown:
                raise BanditError(f"unknown policies {', '.join(unknown)}; known: {', '.join(known)}")
        baselines = self.baselines()
        chosen = self.policy_names() if names is None else list(names)
        if "queue_threshold" in chosen:  # it needs the fixed arms' utilities
            chosen += [b for b in baselines if b not in chosen]
        chosen.sort(key=lambda name: name not in baselines)
        policies: dict[str, BanditPlanner | None] = {}
        for name in chosen:
            if name in REFERENCES or name == CLAIRVOYANT:
                policies[name] = None
            else:
                policies[name] = self.planner(self.labels[baselines[name]] if name in baselines else name)
        return policies

    def run_all(self, names: Sequence[str] | None = None) -> dict[str, RunResult]:
        """Every policy of ``names`` (default all) on this stream; fixed arms first."""
        results: dict[str, RunResult] = {}
        baselines = self.baselines()
        for name, planner in self.make_policies(names).items():
            fixed_arm = None
            if name == "queue_threshold":
                fixed = [n for n in results if n in baselines]
                best = max(fixed, key=lambda n: results[n].summary(self.config.warmup)["utility"])
                fixed_arm = baselines[best]
            results[name] = self.run(name, planner, fixed_arm=fixed_arm)
        return results

    def run(self, name: str, planner: BanditPlanner | None, *, fixed_arm: int | None = None) -> RunResult:
        """Replay the request stream with ``planner``; ``None`` = a reference policy by ``name``
        (``oracle``, ``oracle_priced``, ``oracle_clairvoyant``, ``queue_threshold`` on ``fixed_arm``)."""
        wd, n = self.world, self.config.requests
        tm = self.profile.timing
        enc = tm.text_encode_s
        k, kmax = self.k, self.kmax
        Q_true = self.Q_true
        edge_decode, bits, device_work = self.edge_decode, self.bits, self.device_work
        fallback, can_fall_back = self.fallback, self.fallback >= 0
        max_queue, B = self.config.max_queue, self.max_batch
        noise = wd.noise.tolist()
        edge = Edge(self.T, B)
        static_latency, expected_quality = self.static_latency, self.expected_quality
        k_mean = float(self.k.mean())  # this run's recent mean edge steps per request (the prediction's others)
        ahead = np.arange(1, LOOKAHEAD + 1, dtype=np.float64)
        kind = name if planner is None else ("fixed" if isinstance(planner.policy, FixedArm) else "planner")
        if kind == "queue_threshold" and fixed_arm is None:
            raise BanditError("queue_threshold needs the fixed arm it serves (Simulation.run_all finds the best)")
        priced = (CongestionPrice(self.T) if kind in ("oracle_priced", CLAIRVOYANT)
                  else (planner.congestion if planner else None))
        needs_regret = kind != "fixed"
        fixed_context = Context.of(np.zeros(1))  # what a fixed arm looks at: nothing

        arm_of = np.zeros(n, dtype=np.int64)  # the arm that served the request
        utility, quality, latency = (np.zeros(n) for _ in range(3))
        regret = np.zeros(n) if needs_regret else None
        price = np.zeros(n) if priced is not None else None
        busy = np.zeros(n, dtype=bool)
        decision = np.zeros(n)  # the planner's selection time
        contexts: dict[int, Context] = {}
        reports: list[tuple[float, int]] = []  # (report time, request)
        learns = kind == "planner"

        def finish(i: int, edge_done: float) -> None:
            """Request i's edge steps are over at ``edge_done``: its realized latency and report time."""
            a = int(arm_of[i])
            nz = noise[i]
            lat = (wd.rtt[i] * nz[0] * (2.0 if busy[i] else 1.0) + enc + (edge_done - wd.t[i])
                   + edge_decode[a] * nz[1] + bits[a] / wd.bandwidth[i] * nz[2] + device_work[i, a] * nz[3])
            latency[i] = lat
            q = min(max(Q_true[a, wd.level_idx[i]] + wd.quality_noise[i], 0.0), 1.0)
            quality[i] = q
            utility[i] = reward(wd.w[i], q, lat)
            if learns and not busy[i]:  # a busy answer carries no plan, so no report
                heapq.heappush(reports, (wd.t[i] + lat, i))

        for i in range(n):
            now = wd.t[i]
            edge.advance(now, finish)
            if learns and planner is not None:
                while reports and reports[0][0] <= now:  # a report arrives: the planner's feedback step
                    _, j = heapq.heappop(reports)
                    rating = None
                    if wd.rated[j]:
                        rating = 1 if wd.rating_u[j] < quality[j] else -1
                    planner.learn(int(arm_of[j]), contexts.pop(j), wd.level[j], wd.w[j], float(latency[j]), rating)
            w = wd.w[i]
            full = len(edge.active) + len(edge.queue) >= max_queue
            eu = None
            if needs_regret:  # true expected utility of every arm in this state (oracles, regret)
                if kind == CLAIRVOYANT:  # the actual next arrivals
                    future: Sequence[float] = wd.t[i + 1:i + 1 + LOOKAHEAD]
                else:  # arrivals at the true mean rate from now on (no one knows when the next comes)
                    future = (now + ahead / wd.rate[i]).tolist()
                f = edge.predict(now, kmax, future, round(k_mean))
                f[0] = now  # k = 0: no edge steps
                lat_i = static_latency[i] + (np.asarray(f)[k] - now)
                q_i = expected_quality[i]
                if full:  # edge arms get "busy": the device runs the same N device-only, one round trip later
                    q_i = q_i.copy()
                    q_i[can_fall_back] = q_i[fallback[can_fall_back]]
                    lat_i[can_fall_back] = lat_i[fallback[can_fall_back]] + wd.rtt[i]
                eu = rewards(w, q_i, lat_i)
            if kind == "oracle":
                assert eu is not None
                a = int(np.argmax(eu))
            elif kind in ("oracle_priced", CLAIRVOYANT):
                assert eu is not None and priced is not None
                p = priced.observe(len(edge.queue), len(edge.active), w)
                a = int(np.argmax(eu - p * k))
            elif kind == "queue_threshold":
                assert fixed_arm is not None
                a = fixed_arm
                if len(edge.queue) >= self.queue_threshold and fallback[a] >= 0:
                    a = int(fallback[a])
            elif kind == "fixed":
                assert planner is not None
                a = planner.select(fixed_context)
            else:  # what the edge knows: the device's reports and hello, its own queue and batch
                assert planner is not None
                seen = PlanContext(queue_depth=len(edge.queue), active=len(edge.active), device_load=wd.load_seen[i],
                                   rtt_s=wd.rtt_seen[i], bandwidth_bps=wd.bandwidth_seen[i],
                                   device_step_s=float(wd.step[i]),
                                   edge_running=tuple(e[0] for e in edge.active),
                                   edge_queued=tuple(e[0] for e in edge.queue))
                _, ctx = planner.context(wd.complexity[i], w, seen, level=wd.level[i])
                a = planner.select(ctx)
                decision[i] = planner.decision_s[-1]
                contexts[i] = ctx
            if price is not None and priced is not None:
                price[i] = priced.price
            if regret is not None and eu is not None:
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
        return RunResult(name, arm_of, utility, quality, latency, regret, decision if learns else None, busy, price)


# ---------------------------------------------------------------------- several seeds, and the figures


def is_fixed(name: str) -> bool:
    return name.startswith(("edge_only", "device_only", "fixed_k"))


def _interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 with one value)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), 0.0
    dof = len(x) - 1
    t = _T975.get(dof) or _T975[max(d for d in _T975 if d <= dof)]
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def aggregate(per_seed: Sequence[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Figures over seeds from each seed's ``{policy: summary}`` (see the module doc)."""
    names = list(per_seed[0])
    fixed = [n for n in names if is_fixed(n)]
    mean_u = {n: float(np.mean([s[n]["utility"] for s in per_seed])) for n in names}
    best_fixed = max(fixed, key=mean_u.__getitem__) if fixed else None
    refs = [n for n in (*REFERENCES, best_fixed) if n in names and n is not None]
    reference = max(refs, key=mean_u.__getitem__) if refs else None
    out: dict[str, Any] = {"seeds": len(per_seed), "best_fixed": best_fixed, "reference": reference, "policies": {}}
    headroom_per_seed = None
    if best_fixed is not None and reference is not None:
        headroom_per_seed = [s[reference]["utility"] - s[best_fixed]["utility"] for s in per_seed]
        out["headroom"] = dict(zip(("mean", "ci95"), _interval(headroom_per_seed), strict=True))
        bf = mean_u[best_fixed]
        out["headroom"]["percent_of_best_fixed"] = 100.0 * out["headroom"]["mean"] / abs(bf) if bf else None
    for n in names:
        row: dict[str, Any] = {}
        for key in ("utility", "quality", "latency_mean_s", "latency_p95_s", "regret_per_request", "busy_share",
                    "price_mean"):
            values = [s[n].get(key) for s in per_seed]
            if all(v is not None for v in values):
                row[key], row[key + "_ci95"] = _interval(values)  # type: ignore[arg-type]
        if best_fixed is not None:
            delta = [s[n]["utility"] - s[best_fixed]["utility"] for s in per_seed]
            row["vs_best_fixed"], row["vs_best_fixed_ci95"] = _interval(delta)
            if headroom_per_seed is not None and abs(float(np.mean(headroom_per_seed))) > 1e-12:
                row["headroom_share"] = row["vs_best_fixed"] / float(np.mean(headroom_per_seed))
        if "phases" in per_seed[0][n]:
            row["phases"] = {label: float(np.mean([s[n]["phases"][label] for s in per_seed]))
                             for label in per_seed[0][n]["phases"]}
        out["policies"][n] = row
    return out


def adaptation(result: RunResult, reference: RunResult, change_points: Sequence[int],
               window: int = 500) -> list[tuple[int, float, float, float]]:
    """Per change point: the mean utility ``reference`` gains over ``result`` on the same requests in
    the ``window`` before it, the first and the second window after (a paired regret)."""
    gap = reference.utility - result.utility
    out: list[tuple[int, float, float, float]] = []
    for c in change_points:
        before, first, second = gap[max(0, c - window):c], gap[c:c + window], gap[c + window:c + 2 * window]
        if len(before) and len(first):
            after = float(second.mean()) if len(second) else math.nan
            out.append((c, float(before.mean()), float(first.mean()), after))
    return out


def mean_adaptation(rows: Sequence[Sequence[tuple[int, float, float, float]]], labels: Sequence[str],
                    policy: str = "linucb", reference: str = "oracle_priced") -> list[dict[str, Any]]:
    """Each seed's :func:`adaptation` rows (``rows[seed][change]``), averaged over the seeds, per change."""
    if not rows or not rows[0]:
        return []
    return [{"request": int(rows[0][j][0]), "label": labels[j], "policy": policy, "reference": reference,
             "gap_before": float(np.mean([row[j][1] for row in rows])),
             "gap_first_500": float(np.mean([row[j][2] for row in rows])),
             "gap_next_500": float(np.mean([row[j][3] for row in rows]))} for j in range(len(rows[0]))]


def adaptation_over_seeds(sims: Sequence[Simulation], results: Sequence[dict[str, RunResult]],
                          policy: str = "linucb", reference: str = "oracle_priced") -> list[dict[str, Any]]:
    """:func:`adaptation` of ``policy`` against ``reference``, averaged over the seeds."""
    if not sims or len(sims[0].world.change_points) == 0 or not all(
            policy in r and reference in r for r in results):
        return []
    rows = [adaptation(r[policy], r[reference], sim.world.change_points) for sim, r in zip(sims, results, strict=True)]
    return mean_adaptation(rows, sims[0].world.change_labels, policy, reference)


def run_seeds(profile: Profile, config: SimConfig, names: Sequence[str] | None, seeds: int,
              progress: Callable[[str], None] | None = None) -> tuple[list[Simulation], list[dict[str, RunResult]]]:
    """``seeds`` simulations (seeds ``config.seed`` on) and every policy's results in each."""
    sims, results = [], []
    for s in range(seeds):
        sim = Simulation(profile, replace(config, seed=config.seed + s))
        started = time.perf_counter()
        results.append(sim.run_all(names))
        sims.append(sim)
        if progress:
            progress(f"  seed {config.seed + s}: {time.perf_counter() - started:.1f} s")
    return sims, results


def sustained_load(profile: Profile, config: SimConfig, names: Sequence[str], loads: Sequence[float],
                   seeds: int, progress: Callable[[str], None] | None = None) -> dict[str, float | None]:
    """Per policy, the highest of ``loads`` at which its mean p95 latency over ``seeds`` stays within
    ``P95_TARGET_S`` (``None``: none of them); ``progress`` as in :func:`run_seeds`."""
    best: dict[str, float | None] = dict.fromkeys(names)
    for rho in sorted(loads):
        _, results = run_seeds(profile, replace(config, edge_load=rho), names, seeds, progress)
        for name in names:
            p95 = float(np.mean([r[name].summary(config.warmup)["latency_p95_s"] for r in results]))
            if p95 <= P95_TARGET_S:
                best[name] = rho
    return best


def format_table(sim: Simulation, figures: dict[str, Any], results: dict[str, RunResult]) -> str:
    """The figures of :func:`aggregate` as text; ``sim`` and ``results`` are the first seed's."""
    cfg, hw = sim.config, sim.hardware
    pol = figures["policies"]
    tag = " [SYNTHETIC PROFILE: figures are not measurements]" if sim.profile.synthetic else ""
    lines = [f"rise-sim: scenario {cfg.scenario}, {cfg.requests} requests, {cfg.devices} devices, "
             f"{figures['seeds']} seed(s) from {cfg.seed}, {len(sim.arms)} arms{tag}",
             f"  hardware {hw.name}: {hw.source_summary()} figures"
             + (f"; the planner's timing from {cfg.prior_hardware}" if cfg.prior_hardware else ""),
             *(_source_lines(hw) if cfg.hardware else []),
             f"  edge: capacity {sim.capacity:.2f} edge-only req/s at N={min(a.num_inference_steps for a in sim.arms)} "
             f"(batch {sim.max_batch}), arrivals {sim.rate:.2f}/s (rho = --edge-load {cfg.edge_load:g}), "
             f"busy beyond {cfg.max_queue}; L_s 10 s"
             + (f"; ratings {cfg.rating_rate:g}, quality shift {cfg.quality_shift:g}"
                if cfg.rating_rate or cfg.quality_shift else ""),
             f"  means over the requests after the first {cfg.warmup}; +- = 95% interval over seeds; "
             "dU = utility - best fixed's"]
    lines.append(f"  {'policy':<20}{'utility':>16}{'dU':>18}{'share':>7}{'quality':>9}{'lat p95':>9}"
                 f"{'regret/req':>11}{'busy':>7}")
    for name in sorted(pol, key=lambda n: -pol[n]["utility"]):
        p = pol[name]
        share = f"{p['headroom_share']:.2f}" if "headroom_share" in p else "-"
        d = f"{p['vs_best_fixed']:+.4f}+-{p['vs_best_fixed_ci95']:.4f}" if "vs_best_fixed" in p else "-"
        regret = f"{p['regret_per_request']:.4f}" if "regret_per_request" in p else "-"
        busy = f"{100 * p['busy_share']:.1f}%" if "busy_share" in p else "-"
        lines.append(f"  {name:<20}{p['utility']:>9.4f}+-{p['utility_ci95']:.4f}{d:>18}{share:>7}"
                     f"{p['quality']:>9.4f}{p['latency_p95_s']:>8.2f}s{regret:>11}{busy:>7}")
    if "headroom" in figures:
        h = figures["headroom"]
        pct = f" ({h['percent_of_best_fixed']:+.1f}% of the best fixed arm's utility)" \
            if h.get("percent_of_best_fixed") is not None else ""
        lines.append(f"  best fixed: {figures['best_fixed']}; reference: {figures['reference']}; "
                     f"headroom {h['mean']:+.4f} +- {h['ci95']:.4f} utility{pct}")
    if "linucb" in pol and "headroom_share" in pol["linucb"]:
        lines.append(f"  linucb captures {pol['linucb']['headroom_share']:.2f} of the headroom; "
                     f"p95 {pol['linucb']['latency_p95_s']:.2f} s vs the best fixed arm's "
                     f"{pol[figures['best_fixed']]['latency_p95_s']:.2f} s")
    for name in ("linucb", "linucb_disjoint"):
        decisions = results[name].decision_s if name in results else None
        if decisions is not None and len(decisions):
            ms = decisions * 1e3
            lines.append(f"  {name} decision time: p50 {np.percentile(ms, 50):.3f} ms, p99 {np.percentile(ms, 99):.3f} "
                         f"ms ({len(sim.arms)} arms)")
    if len(sim.phases) > 1:
        show = [n for n in ("linucb", "oracle_priced", "oracle", "queue_threshold", figures["best_fixed"]) if n in pol]
        lines.append("  utility by phase: " + "; ".join(
            f"{label}: " + ", ".join(f"{n} {pol[n]['phases'][label]:.4f}" for n in show if label in pol[n]["phases"])
            for _, _, label in sim.phases))
    for row in figures.get("adaptation", []):
        lines.append(f"  {row['policy']} at request {row['request']} ({row['label']}): {row['reference']} gains "
                     f"{row['gap_before']:+.4f}/request over it in the 500 before, {row['gap_first_500']:+.4f} in the "
                     f"500 after, {row['gap_next_500']:+.4f} in the next 500")
    if "sustained_load" in figures:
        lines.append(f"  highest load with p95 <= {P95_TARGET_S:g} s: " + ", ".join(
            f"{n} {'none' if v is None else f'rho {v:g}'}" for n, v in figures["sustained_load"].items()))
    return "\n".join(lines)


def _source_lines(hw: Hardware, per_line: int = 4) -> list[str]:
    """Every figure of ``hw`` with its source kind, a few per line (the notes: ``--json`` 's hardware_sources)."""
    items = [f"{label} {fig.value:g} [{fig.source}]" for label, fig in hw.figures()]
    return ["    " + "; ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]


def plot(sim: Simulation, figures: dict[str, Any], results: dict[str, RunResult], out: Path) -> list[Path]:
    """Rolling regret, latency vs quality per policy and the congestion price over time (the first seed)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise BanditError("--plots needs matplotlib (pip install matplotlib)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    pol = figures["policies"]
    fixed = figures["best_fixed"]
    shown = list(dict.fromkeys(n for n in ("linucb", "linucb_disjoint", "epsilon_greedy", "queue_threshold",
                                           "oracle_priced", "oracle", "edge_only", "device_only", fixed)
                               if n is not None and n in results))
    synthetic = " (synthetic profile)" if sim.profile.synthetic else ""
    tag = f"{sim.config.scenario}, rho {sim.config.edge_load:g}, {sim.hardware.name}"
    title = f"rise-sim {tag}, {sim.config.requests} requests{synthetic}"
    stem = f"{sim.config.scenario}_{sim.hardware.name}_rho{sim.config.edge_load:g}"
    paths = []

    fig, ax = plt.subplots(figsize=(9, 5))
    window = max(50, min(500, sim.config.requests // 40))
    kernel = np.ones(window) / window
    best_u = results[fixed].utility if fixed in results else None
    for name in shown:
        if best_u is None or name == fixed:
            continue
        gain = np.convolve(results[name].utility - best_u, kernel, mode="valid")
        ax.plot(np.arange(window - 1, sim.config.requests), gain, label=name)
    ax.axhline(0.0, color="k", lw=0.8)
    for c, text in zip(sim.world.change_points, sim.world.change_labels, strict=True):
        ax.axvline(c, color="k", ls="--", lw=1)
        ax.text(c, ax.get_ylim()[1] * 0.95, f" {text}", fontsize=8, va="top")
    ax.set_ylabel(f"utility - best fixed ({fixed}), {window}-request mean")
    ax.set_xlabel("request")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / f"gain_{stem}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 6))
    for name, p in pol.items():
        if name not in shown:
            ax.scatter(p["latency_mean_s"], p["quality"], color="0.7", s=15, zorder=1)
    for name in shown:
        p = pol[name]
        marker, size = {"linucb": ("o", 90), "oracle": ("x", 90), "oracle_priced": ("+", 120)}.get(name, ("s", 35))
        label = f"{name}{' (best fixed)' if name == fixed else ''}: utility {p['utility']:.3f}"
        ax.scatter(p["latency_mean_s"], p["quality"], marker=marker, s=size, label=label, zorder=2)
    ax.scatter([], [], color="0.7", s=15, label="other fixed configurations")
    ax.set_xscale("log")
    ax.set_xlabel("mean latency (s, log scale)")
    ax.set_ylabel("mean quality")
    ax.set_title(f"latency vs quality per policy\n{title}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / f"latency_quality_{stem}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    priced = [n for n in ("linucb", "linucb_disjoint", "oracle_priced")
              if n in results and results[n].price is not None]
    if priced:
        fig, ax = plt.subplots(figsize=(9, 4))
        for name in priced:
            price = results[name].price
            assert price is not None
            ax.plot(price, label=name, lw=1)
        for c in sim.world.change_points:
            ax.axvline(c, color="k", ls="--", lw=1)
        ax.set_xlabel("request")
        ax.set_ylabel("congestion price (utility per edge step)")
        ax.set_title(f"congestion price over time\n{title}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"price_{stem}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rise-sim", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="More than one edge: rise-sim --edges 2,8,64 [...] compares request "
                                            "routers (rise-sim --edges 2 --help).")
    parser.add_argument("--profile", default=str(DEMO_PROFILE),
                        help="a RISE profile JSON: quality per arm (and times without --hardware); default: the "
                             "demo family's, models/demo/family/profile.json")
    parser.add_argument("--hardware", help="a hardware profile (a shipped name, e.g. gpu-edge-phones, or a file): "
                                           "the edge's and the devices' times, each with its source")
    parser.add_argument("--prior-hardware", help="build the planner's profile on this hardware's timing instead "
                                                 "(a cold start in a new world; 'profile' = the profile's own)")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--scenario", default="mixed", choices=sorted(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="run this many seeds (from --seed) for 95%% intervals")
    parser.add_argument("--warmup", type=int, default=2_000, help="requests left out of the means (default 2000)")
    parser.add_argument("--policies", help="comma-separated subset (default: all)")
    parser.add_argument("--alpha", type=float, help="LinUCB exploration (default 0.1)")
    parser.add_argument("--no-prior", action="store_true",
                        help="disjoint LinUCB starts from zero instead of the profile's prediction")
    parser.add_argument("--no-congestion", action="store_true", help="the LinUCBs pay no congestion price")
    parser.add_argument("--epsilon", type=float, default=SimConfig.epsilon)
    parser.add_argument("--edge-load", type=float, default=SimConfig.edge_load,
                        help="rho: arrival rate as a fraction of the edge's edge-only capacity")
    parser.add_argument("--max-batch", type=int, help="requests per batched step (default: the hardware's)")
    parser.add_argument("--max-queue", type=int, default=SimConfig.max_queue,
                        help="requests queued + running on the edge before it answers busy (default 64)")
    parser.add_argument("--batch-beta", type=float, default=SimConfig.batch_beta,
                        help="unmeasured batching cost: a step of b requests costs 1 + beta (b - 1) single steps")
    parser.add_argument("--queue-threshold", type=int, help="queue_threshold's rule: requests waiting before it "
                                                            "turns to device-only (default: the edge's batch)")
    parser.add_argument("--rating-rate", type=float, default=0.0, help="share of users who rate their image")
    parser.add_argument("--quality-shift", type=float, default=0.0,
                        help="true quality = the profile's - SHIFT * (N - k) / N (what the prior does not know)")
    parser.add_argument("--steps", type=int, help="N of the fixed baselines (default: the profile's middle N)")
    parser.add_argument("--sustain", help="comma-separated loads rho: report the highest at which each of linucb, "
                                          "the best fixed arm and the references keeps p95 <= 5 s")
    parser.add_argument("--speculative", action="store_true",
                        help="compare device-only, the plain relay and the speculative relay (always, and by the "
                             "planner's rule) on one relay arm at --edge-load (lab/speculative_sim.py)")
    parser.add_argument("--json", dest="json_out", help="write the figures (and each seed's summaries) here")
    parser.add_argument("--plots", help="folder for gain, latency-quality and price plots (matplotlib)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.profile).is_file():
        from shared.bandit import PROFILE_HINT

        print(f"rise-sim: error: no profile at {args.profile}. The simulator replays measured profiles; {PROFILE_HINT}",
              file=sys.stderr)
        return 2
    if args.requests <= args.warmup:
        print(f"rise-sim: error: --requests {args.requests} must exceed --warmup {args.warmup}: the means are "
              "taken over the requests after the warm-up", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print(f"rise-sim: error: --seeds must be at least 1, got {args.seeds}", file=sys.stderr)
        return 2
    try:
        profile = load_profile(args.profile)
        config = SimConfig(requests=args.requests, devices=args.devices, scenario=args.scenario, seed=args.seed,
                           warmup=args.warmup, edge_load=args.edge_load, max_batch=args.max_batch,
                           max_queue=args.max_queue, prior=not args.no_prior, batch_beta=args.batch_beta,
                           alpha=args.alpha, epsilon=args.epsilon, steps=args.steps, hardware=args.hardware,
                           prior_hardware=args.prior_hardware, rating_rate=args.rating_rate,
                           quality_shift=args.quality_shift, queue_threshold=args.queue_threshold,
                           congestion=not args.no_congestion)
        started = time.perf_counter()
        if args.speculative:
            from lab.speculative_sim import compare, format_comparison

            doc = compare(Simulation(profile, config))
            print(format_comparison(doc))
            print(f"  ({time.perf_counter() - started:.1f} s)")
            if args.json_out:
                Path(args.json_out).write_text(json.dumps({"config": dict(vars(config)), **doc}, indent=1) + "\n")
            return 0
        names = args.policies.split(",") if args.policies else None
        with bar(desc="rise-sim seeds", total=args.seeds, unit="seed") as seeds_bar:  # on a terminal only
            sims, results = run_seeds(profile, config, names, args.seeds, progress=counting(seeds_bar))
        per_seed = [{n: r.summary(config.warmup, sims[0].phases) for n, r in seed.items()} for seed in results]
        figures = aggregate(per_seed)
        figures["adaptation"] = adaptation_over_seeds(sims, results)
        if args.sustain:
            loads = [float(x) for x in args.sustain.split(",")]
            tracked = [n for n in ("linucb", figures["best_fixed"], *REFERENCES) if n is not None and n in per_seed[0]]
            with bar(desc="rise-sim sustained load", total=len(loads) * args.seeds, unit="seed") as load_bar:
                figures["sustained_load"] = sustained_load(profile, config, tracked, loads, args.seeds,
                                                           progress=lambda _: load_bar.update(1))
        print(format_table(sims[0], figures, results[0]))
        print(f"  ({time.perf_counter() - started:.1f} s)")
        if args.json_out:
            doc = {"config": {k: v for k, v in vars(config).items()}, "hardware": sims[0].hardware.name,
                   "hardware_sources": sims[0].hardware.source_lines(), "figures": figures, "per_seed": per_seed}
            Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")
        if args.plots:
            for path in plot(sims[0], figures, results[0], Path(args.plots)):
                print(f"  wrote {path}")
    except (ProfileError, BanditError, HardwareError, RiseError) as exc:
        print(f"rise-sim: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
