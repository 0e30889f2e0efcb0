"""The speculative relay in ``rise-sim``'s world: device-only, plain relay and speculative relay on one stream.

``rise-sim --speculative`` (or :func:`compare`) replays a :class:`lab.simulator.Simulation`'s request
stream (arrivals, devices and their tiers, links, prompts, noise) four ways, on one relay arm
(default: the arm at the middle N with the split nearest half, the VAE decode on the device):

* ``device_only``: every request on its device (the arm's N, ``k = 0``);
* ``relay``: the plain relay (the edge queue, its ``k`` batched steps, the handoff, the device's rest);
* ``speculative``: every request speculative: the device starts its own device-only run at once
  (after its text encoding); when the handoff arrives the device switches by
  :func:`shared.planning.speculative_switch` (own steps done vs the handoff's remaining steps), else
  finishes alone; a device that finishes before the handoff cancels the edge request, which leaves
  the edge's queue or batch when the cancel reaches it (half a round trip later), freeing its slot;
* ``speculative_planned``: speculative only when the edge's rule says so
  (:func:`shared.planning.speculative_wanted` on the edge's projection of its own schedule, one
  round trip and the transfer; the device's step time from its hello), a plain relay otherwise.

As in :mod:`lab.simulator`: an edge holding ``max_queue`` requests answers ``busy`` and the device
runs device-only one round trip later; latencies carry the same noise; quality is the arm's true
quality (or device-only's, when the device's own run made the image) plus the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from shared.bandit import reward
from shared.planning import DEFAULT_SPECULATIVE_RATIO, speculative_switch, speculative_wanted
from shared.relay_plan import RelayPlan

MODES = ("device_only", "relay", "speculative", "speculative_planned")


class SimEdge(Protocol):
    """What is used here of :class:`lab.simulator.Edge` (rise-sim's batching edge)."""

    B: int
    active: list[list[Any]]
    queue: Any  # a deque of [remaining steps, request]

    def advance(self, now: float, on_done: Callable[[int, float], None]) -> None: ...
    def submit(self, steps: int, index: int) -> None: ...
    def predict(self, now: float, kmax: int) -> list[float]: ...


class Simulation(Protocol):
    """What is used here of :class:`lab.simulator.Simulation` (not imported: rise-sim imports this module)."""

    world: Any
    config: Any
    profile: Any
    hardware: Any
    arms: list[RelayPlan]
    labels: list[str]
    middle_steps: int
    fallback: np.ndarray
    bits: np.ndarray
    device_work: np.ndarray
    Q_true: np.ndarray

    def new_edge(self) -> SimEdge: ...


def relay_arm(sim: Simulation) -> int:
    """The default relay arm: the middle N, split nearest N/2, device decode (an arm with a device-only twin)."""
    candidates = [i for i, a in enumerate(sim.arms)
                  if a.num_inference_steps == sim.middle_steps and 0 < a.split < a.num_inference_steps
                  and a.decode_on == "device" and sim.fallback[i] >= 0]
    if not candidates:
        raise ValueError("no relay arm (0 < k < N, device decode) at the middle N")
    half = sim.middle_steps / 2
    return min(candidates, key=lambda i: (abs(sim.arms[i].split - half), sim.arms[i].split))


def run_mode(sim: Simulation, mode: str, arm: int, *, ratio: float = DEFAULT_SPECULATIVE_RATIO) -> dict[str, Any]:
    """Replay the stream in ``mode`` (one of :data:`MODES`) on ``arm``; the means after the warm-up."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    wd, n, tm = sim.world, sim.config.requests, sim.profile.timing
    plan = sim.arms[arm]
    alone = int(sim.fallback[arm])
    big_n, k = plan.num_inference_steps, plan.split
    enc = tm.text_encode_s
    edge = sim.new_edge()
    latency, quality, utility = np.zeros(n), np.zeros(n), np.zeros(n)
    won = np.zeros(n, dtype=bool)  # the device's own run made the image
    speculated = np.zeros(n, dtype=bool)
    busy = np.zeros(n, dtype=bool)
    own_finish = np.full(n, math.inf)
    cancels: list[tuple[float, int]] = []  # (when the cancel reaches the edge, request), time order
    saved = [0]  # edge steps the cancels spared

    def device_times(i: int) -> tuple[float, float, float]:
        """Request i's own run: (its start, one step, its finish) on the device's slowed tier."""
        nz = wd.noise[i]
        step = float(wd.step[i] * wd.slow[i] * nz[3])
        start = wd.t[i] + enc + (wd.rtt[i] * nz[0] if busy[i] else 0.0)
        return start, step, start + big_n * step + float(wd.decode[i] * wd.slow[i] * nz[3])

    def settle(i: int, a: int, lat: float) -> None:
        latency[i] = lat
        q = min(max(sim.Q_true[a, wd.level_idx[i]] + wd.quality_noise[i], 0.0), 1.0)
        quality[i] = q
        utility[i] = reward(wd.w[i], q, lat)

    def on_done(i: int, edge_done: float) -> None:
        nz = wd.noise[i]
        handoff_at = edge_done + wd.rtt[i] * nz[0] + sim.bits[arm] / wd.bandwidth[i] * nz[2]
        if not speculated[i]:
            settle(i, arm, handoff_at - wd.t[i] + enc + sim.device_work[i, arm] * nz[3])
            return
        start, step, finish = device_times(i)
        done = int(min(max((handoff_at - start) // step, 0), big_n)) if handoff_at < finish else big_n
        if handoff_at < finish and speculative_switch(big_n, done, big_n, k):
            settle(i, arm, handoff_at - wd.t[i] + sim.device_work[i, arm] * nz[3])
        else:
            won[i] = True  # already settled when its run finished (or it finishes alone now)
            if latency[i] == 0.0:
                settle(i, alone, finish - wd.t[i])

    def cancel(i: int) -> None:
        for entry in edge.active:
            if entry[1] == i:
                saved[0] += entry[0]
                edge.active.remove(entry)
                while len(edge.active) < edge.B and edge.queue:
                    edge.active.append(edge.queue.popleft())
                return
        for entry in edge.queue:
            if entry[1] == i:
                saved[0] += entry[0]
                edge.queue.remove(entry)
                return

    def catch_up(now: float) -> None:
        """Every cancel that reaches the edge before ``now``, in time order, with the edge's steps between."""
        while cancels and cancels[0][0] <= now:
            at, j = cancels.pop(0)
            edge.advance(at, on_done)
            if latency[j] == 0.0:  # its handoff has not come: the device's own run made the image
                won[j] = True
                settle(j, alone, own_finish[j] - wd.t[j])
                cancel(j)

    for i in range(n):
        now = wd.t[i]
        catch_up(now)
        edge.advance(now, on_done)
        full = len(edge.active) + len(edge.queue) >= sim.config.max_queue
        if mode == "device_only" or full:
            busy[i] = full and mode != "device_only"
            _, _, finish = device_times(i)
            settle(i, alone, finish - now)
            continue
        spec = mode == "speculative"
        if mode == "speculative_planned":
            f = edge.predict(now, k)
            forecast = (f[k] - now) + enc + wd.rtt_seen[i] + sim.bits[arm] / wd.bandwidth_seen[i]
            spec = speculative_wanted(plan, forecast, float(wd.step[i]), ratio=ratio)
        speculated[i] = spec
        if spec:
            _, _, finish = device_times(i)
            own_finish[i] = finish
            at = finish + wd.rtt[i] * wd.noise[i][0] / 2
            pos = next((p for p, (t, _) in enumerate(cancels) if t > at), len(cancels))
            cancels.insert(pos, (at, i))
        edge.submit(k, i)
    catch_up(math.inf)
    edge.advance(math.inf, on_done)
    s = slice(min(sim.config.warmup, n - 1), None)
    return {
        "latency_p95_s": float(np.percentile(latency[s], 95)),
        "latency_mean_s": float(latency[s].mean()),
        "quality": float(quality[s].mean()),
        "utility": float(utility[s].mean()),
        "speculative_share": float(speculated[s].mean()),
        "device_won_share": float(won[s].mean()),
        "busy_share": float(busy[s].mean()),
        "edge_steps_saved_per_request": saved[0] / n,
    }


def compare(sim: Simulation, arm: int | None = None, *, ratio: float = DEFAULT_SPECULATIVE_RATIO,
            modes: Sequence[str] = MODES) -> dict[str, Any]:
    """Every mode of :data:`MODES` on ``sim``'s stream (``arm``: :func:`relay_arm` by default)."""
    arm = relay_arm(sim) if arm is None else arm
    return {"arm": sim.labels[arm], "edge_load": sim.config.edge_load, "hardware": sim.hardware.name,
            "modes": {mode: run_mode(sim, mode, arm, ratio=ratio) for mode in modes}}


def format_comparison(doc: dict[str, Any]) -> str:
    lines = [f"speculative relay on {doc['arm']}, rho {doc['edge_load']:g}, hardware {doc['hardware']}:",
             f"  {'mode':<20} {'p95 s':>7} {'mean s':>7} {'quality':>8} {'utility':>8} {'spec':>5} "
             f"{'dev won':>7} {'busy':>5}"]
    for mode, m in doc["modes"].items():
        lines.append(f"  {mode:<20} {m['latency_p95_s']:7.2f} {m['latency_mean_s']:7.2f} {m['quality']:8.3f} "
                     f"{m['utility']:8.3f} {m['speculative_share']:5.2f} {m['device_won_share']:7.2f} "
                     f"{m['busy_share']:5.2f}")
    return "\n".join(lines)
