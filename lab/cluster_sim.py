"""``rise-sim --edges E``: the simulated world past one machine, a cluster of E edges behind one router.

The world is :mod:`lab.simulator`'s (same profiles, hardware, devices, links, prompts, noise, reward), built
for E edges: the devices (``--devices-per-edge``) and the arrival rate scale with E (``--edge-load`` stays the
load *per edge*).
Every edge runs step-level batching (:class:`lab.simulator.Edge`); the scheduler is the edge's served
planner (:class:`~shared.bandit.planner.BanditPlanner`, ``linucb`` by default) learning from every report,
one per cluster as in the daemon. Per request a *router* picks the edge:

* ``random``, ``round_robin``;
* ``least_loaded``: the edge with the fewest requests queued and running (join the shortest queue, with
  every edge's state known);
* ``power_of_two``: the shorter of two random edges (Ray Serve's default router);
* ``planner_aware``: the front's router (:mod:`edge_server.cluster_router`): the planner plans over the load
  of the edge that would finish a typical request soonest, and the request goes to the edge that finishes
  *its* edge steps soonest (:func:`shared.bandit.latency.edge_schedule` over each edge's batch and queue).

The load-blind routers plan before the request is routed (as a Ray Serve handle does): the planner sees the
cluster's typical edge (the one of median load), not the one the request lands on.

Output: a table per E and router (utility, mean and p95 latency, busy share) and ``--json``.
Usage: python -m lab.cluster_sim --edges 2,8,64 [--requests-per-edge 300] [--edge-load 0.9] [--json OUT]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_server.cluster import routing_cost
from lab.simulator import DEMO_PROFILE, Edge, SimConfig, Simulation
from shared.bandit import BanditError, ProfileError, load_profile, reward
from shared.bandit.planner import BanditPlanner
from shared.planning import PlanContext

ROUTERS = ("random", "round_robin", "least_loaded", "power_of_two", "planner_aware")
DEFAULT_EDGES = (2, 8, 64)


@dataclass(frozen=True)
class ClusterSimConfig:
    edges: int = 2
    requests_per_edge: int = 300
    max_requests: int = 12_000  # at most this many requests in all (64 edges: ~190 each)
    devices_per_edge: int = 100
    edge_load: float = 0.9  # arrivals as a share of the cluster's capacity (per edge, as rise-sim's --edge-load)
    policy: str = "linucb"
    hardware: str | None = None
    scenario: str = "mixed"
    seed: int = 0
    warmup_share: float = 0.1

    def sim_config(self) -> SimConfig:
        if self.edges < 1:
            raise BanditError(f"--edges must be at least 1, got {self.edges}")
        requests = min(self.requests_per_edge * self.edges, max(self.max_requests, self.edges))
        return SimConfig(requests=requests, devices=self.devices_per_edge * self.edges, scenario=self.scenario,
                         seed=self.seed, warmup=int(self.warmup_share * requests),
                         edge_load=self.edge_load * self.edges,  # one edge's capacity times E
                         hardware=self.hardware)


def _load(edge: Edge) -> int:
    return len(edge.active) + len(edge.queue)


def _view(edge: Edge) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    return len(edge.queue), len(edge.active), tuple(e[0] for e in edge.active), tuple(e[0] for e in edge.queue)


def run_cluster(sim: Simulation, edges: int, router: str, *, policy: str = "linucb",
                seed: int = 0) -> dict[str, float]:
    """Replay ``sim``'s request stream on ``edges`` edges routed by ``router``; the summary after the warm-up."""
    if router not in ROUTERS:
        raise BanditError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
    wd, n = sim.world, sim.config.requests
    enc = sim.profile.timing.text_encode_s
    k, Q_true = sim.k, sim.Q_true
    fallback, can_fall_back = sim.fallback, sim.fallback >= 0
    max_queue = sim.config.max_queue
    planner: BanditPlanner = sim.planner(policy)
    rng = np.random.default_rng(seed + 7919)
    cluster = [sim.new_edge() for _ in range(edges)]
    noise = wd.noise.tolist()
    typical_k = max(1, int(round(float(np.median(k[k > 0])))) if (k > 0).any() else 1)

    arm_of = np.zeros(n, dtype=np.int64)
    utility, latency = np.zeros(n), np.zeros(n)
    busy = np.zeros(n, dtype=bool)
    contexts: dict[int, Any] = {}
    reports: list[tuple[float, int]] = []

    def finish(i: int, edge_done: float) -> None:
        a = int(arm_of[i])
        nz = noise[i]
        lat = (wd.rtt[i] * nz[0] * (2.0 if busy[i] else 1.0) + enc + (edge_done - wd.t[i])
               + sim.edge_decode[a] * nz[1] + sim.bits[a] / wd.bandwidth[i] * nz[2] + sim.device_work[i, a] * nz[3])
        latency[i] = lat
        q = min(max(Q_true[a, wd.level_idx[i]] + wd.quality_noise[i], 0.0), 1.0)
        utility[i] = reward(wd.w[i], q, lat)
        if not busy[i]:
            heapq.heappush(reports, (wd.t[i] + lat, i))
        quality_of[i] = q

    quality_of = np.zeros(n)

    def soonest(now: float, steps: int) -> int:
        # the front's rule (edge_server.cluster.routing_cost); ties (idle edges) go to the lowest index
        best, best_f = 0, math.inf
        for j, e in enumerate(cluster):
            if not e.active and not e.queue:  # an idle edge costs steps * T[1]: no busy one costs less
                return j
            f = (routing_cost(e.T[:e.B + 1], [r[0] for r in e.active], [q[0] for q in e.queue], steps)
                 + (e.t - now if e.active else 0.0))
            if f < best_f:
                best, best_f = j, f
        return best

    for i in range(n):
        now = wd.t[i]
        for e in cluster:
            e.advance(now, finish)
        while reports and reports[0][0] <= now:
            _, j = heapq.heappop(reports)
            planner.learn(int(arm_of[j]), contexts.pop(j), wd.level[j], wd.w[j], float(latency[j]), None)
        if router == "planner_aware":
            seen_edge = cluster[soonest(now, typical_k)]
        else:  # planned before routing: the cluster's typical edge
            order = sorted(range(edges), key=lambda j: _load(cluster[j]))
            seen_edge = cluster[order[len(order) // 2]]
        queued, active, running, waiting = _view(seen_edge)
        seen = PlanContext(queue_depth=queued, active=active, device_load=wd.load_seen[i], rtt_s=wd.rtt_seen[i],
                           bandwidth_bps=wd.bandwidth_seen[i], device_step_s=float(wd.step[i]),
                           edge_running=running, edge_queued=waiting)
        _, ctx = planner.context(wd.complexity[i], wd.w[i], seen, level=wd.level[i])
        a = planner.select(ctx)
        contexts[i] = ctx
        if router == "random":
            target = int(rng.integers(edges))
        elif router == "round_robin":
            target = i % edges
        elif router == "least_loaded":
            target = min(range(edges), key=lambda j: (_load(cluster[j]), j))
        elif router == "power_of_two":
            pair = rng.choice(edges, size=min(2, edges), replace=False)
            target = int(min(pair, key=lambda j: (_load(cluster[int(j)]), int(j))))
        else:
            target = soonest(now, max(int(k[a]), 1))
        edge = cluster[target]
        if _load(edge) >= max_queue and k[a] > 0 and can_fall_back[a]:
            busy[i] = True
            a = int(fallback[a])
            contexts.pop(i, None)
        arm_of[i] = a
        if k[a] > 0:
            edge.submit(int(k[a]), i)
        else:
            finish(i, now)
    for e in cluster:
        e.advance(math.inf, finish)
    s = slice(min(sim.config.warmup, n - 1), None)
    return {"utility": round(float(utility[s].mean()), 5),
            "quality": round(float(quality_of[s].mean()), 5),
            "latency_mean_s": round(float(latency[s].mean()), 4),
            "latency_p95_s": round(float(np.percentile(latency[s], 95)), 4),
            "busy_share": round(float(busy[s].mean()), 5),
            "edge_share": round(float((k[arm_of[s]] > 0).mean()), 4)}


def routing_table(profile_path: str | Path, config: ClusterSimConfig, edges: Sequence[int],
                  routers: Sequence[str] = ROUTERS, seeds: int = 1) -> dict[str, Any]:
    """Per E and router, the summary (means over ``seeds`` seeds; every router replays the same streams)."""
    profile = load_profile(profile_path)
    table: dict[str, Any] = {}
    for e in edges:
        per_router: dict[str, list[dict[str, float]]] = {r: [] for r in routers}
        for seed in range(seeds):
            cfg = replace(config, edges=e, seed=config.seed + seed)
            sim = Simulation(profile, cfg.sim_config())
            for r in routers:
                per_router[r].append(run_cluster(sim, e, r, policy=cfg.policy, seed=cfg.seed))
        table[str(e)] = {r: {key: round(float(np.mean([row[key] for row in rows])), 5) for key in rows[0]}
                         for r, rows in per_router.items()}
    return table


def format_table(table: dict[str, Any]) -> str:
    lines = [f"{'edges':>5} {'router':<14} {'utility':>8} {'p95 s':>7} {'mean s':>7} {'busy':>6} {'edge share':>10}"]
    for e, rows in table.items():
        for r, row in rows.items():
            lines.append(f"{e:>5} {r:<14} {row['utility']:>8.4f} {row['latency_p95_s']:>7.3f} "
                         f"{row['latency_mean_s']:>7.3f} {row['busy_share']:>6.3f} {row['edge_share']:>10.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rise-sim --edges", description=__doc__.splitlines()[0])
    add_cluster_arguments(p)
    p.add_argument("--profile", default=str(DEMO_PROFILE), help="measured profile (default: the demo family's)")
    p.add_argument("--hardware", default=None, help="hardware profile (default: the profile's own timing)")
    p.add_argument("--scenario", default="mixed")
    p.add_argument("--policy", default="linucb", help="the planner's policy (default: linucb, the served one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    return p


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``rise-sim`` takes for a cluster (``--edges`` switches it to this module)."""
    p.add_argument("--edges", default=",".join(map(str, DEFAULT_EDGES)),
                   help="edge counts, comma-separated (default: 2,8,64)")
    p.add_argument("--routers", default=",".join(ROUTERS), help=f"routers (default: {','.join(ROUTERS)})")
    p.add_argument("--requests-per-edge", type=int, default=300)
    p.add_argument("--max-requests", type=int, default=12_000, help="at most this many requests in all")
    p.add_argument("--devices-per-edge", type=int, default=100)
    p.add_argument("--edge-load", type=float, default=0.9,
                   help="arrivals as a share of the cluster's capacity, as rise-sim's per edge (default 0.9)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        edges = [int(x) for x in str(args.edges).split(",") if x]
        routers = [r for r in args.routers.split(",") if r]
        config = ClusterSimConfig(requests_per_edge=args.requests_per_edge, max_requests=args.max_requests,
                                  devices_per_edge=args.devices_per_edge,
                                  edge_load=args.edge_load, policy=args.policy, hardware=args.hardware,
                                  scenario=args.scenario, seed=args.seed)
        table = routing_table(args.profile, config, edges, routers, seeds=args.seeds)
    except (BanditError, ProfileError, ValueError) as exc:
        print(f"rise-sim: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(table))
    if args.json is not None:
        out = {"config": {**config.__dict__, "edges": edges, "seeds": args.seeds, "profile": str(args.profile)},
               "routing": table}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def rise_sim(argv: Sequence[str] | None = None) -> int:
    """``rise-sim``: with ``--edges``, this cluster world; without, :func:`lab.simulator.main` (one edge)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--edges" or a.startswith("--edges=") for a in args):
        return main(args)
    from lab.simulator import main as one_edge

    return one_edge(args)


if __name__ == "__main__":
    sys.exit(main())
