"""The Ray Serve cluster against the one-process engine: throughput by replicas, routing overhead, routers.

Measured in one run, on the machine it runs on (the front is this process: requests go straight to the
engine, no websocket, so the figures are the engine's):

* *throughput*: ``--clients`` closed-loop clients (each submits its next request when its last one is back),
  ``--requests`` requests in all, on 1 replica x 1 torch thread and on 2 replicas x 1 torch thread each
  (target >= 1.7x on a 2-core machine);
* *routing overhead*: one request at a time, the wall time submit -> outcome beyond the replica's own compute
  for it (front -> replica -> front), less the same beyond compute on a :class:`~edge_server.engine.BatchingEngine`
  in this process (1 thread), as a share of the edge's compute for the request (target <= 5%);
* *routers*: at 2 replicas, the front's soonest-finish router against Ray Serve's power of two choices,
  on the same mixed-split load (mean and p95 latency per request);
* *where the CPU went*: during each closed loop, the CPU seconds of this process (the front and its client
  threads), of the replicas' processes and of everything else (Ray's own daemons, other jobs), from psutil;
  and the local engine at half the clients, the load each of 2 replicas gets: ``2 x that / the local engine at
  all the clients`` is what 2 replicas could reach if nothing but batching differed (each batches half the
  requests per UNet call), the bound the 1.7x target meets on CPU.

Family: the demo family (models/demo/family) unless ``--family``. Writes ``--json`` (default
bench/results/cluster_bench.json). Needs the cluster extra: ``pip install '.[cluster]'``.
Usage: python bench/cluster_bench.py [--clients 8] [--requests 32] [--rounds 3] [--steps 20] [--routers soonest,pow2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLITS = (2, 6, 10, 14)  # the mixed load: edge steps of the requests, in turn


def _plan(steps: int, split: int) -> Any:
    from shared.relay_plan import RelayPlan

    return RelayPlan(steps, min(split, steps), "dpmpp_2m", 7.5)


def sequential(engine: Any, steps: int, split: int, count: int, tag: str) -> tuple[list[float], list[float]]:
    """``count`` requests one after another: (wall seconds submit -> outcome, edge compute seconds)."""
    from edge_server.engine import EdgeRequest

    walls, edge = [], []
    for i in range(count):
        request = EdgeRequest(f"bench:{tag}{i}", f"{tag}{i}", f"a red sneaker on a table {i}", _plan(steps, split), i)
        t0 = time.perf_counter()
        outcome = engine.submit(request).result(600)
        walls.append(time.perf_counter() - t0)
        edge.append(outcome.edge_compute_s)
    return walls, edge


def closed_loop(engine: Any, steps: int, clients: int, total: int, splits: tuple[int, ...], tag: str) -> dict[str, Any]:
    """``clients`` threads submitting ``total`` requests in all, each waiting for its last: throughput, latency."""
    from edge_server.engine import EdgeRequest, EngineBusy

    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []

    def client(c: int) -> None:
        while True:
            with lock:
                if issued[0] >= total:
                    return
                i = issued[0]
                issued[0] += 1
            request = EdgeRequest(f"bench:{tag}{i}", f"{tag}{i}", f"prompt {i} from client {c}",
                                  _plan(steps, splits[i % len(splits)]), i)
            t0 = time.perf_counter()
            while True:
                try:
                    engine.submit(request).result(600)
                    break
                except EngineBusy as exc:
                    time.sleep(exc.retry_after_s)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"requests": total, "seconds": round(elapsed, 3), "throughput_rps": round(total / elapsed, 4),
            "latency_mean_s": round(statistics.fmean(latencies), 4),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 4)}


class CpuMeter:
    """CPU seconds of this process, of given processes and of the whole machine over a span (psutil)."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self._psutil = psutil
        self._procs = [psutil.Process(pid) for pid in pids]
        self._me = psutil.Process()

    def _sample(self) -> tuple[float, float, float]:
        def busy(t: Any) -> float:
            return float(sum(getattr(t, k, 0.0) for k in ("user", "system", "nice", "irq", "softirq", "steal")))

        mine = sum(self._me.cpu_times()[:2])
        theirs = 0.0
        for proc in self._procs:
            try:
                theirs += sum(proc.cpu_times()[:2])
            except self._psutil.Error:
                pass
        return mine, theirs, busy(self._psutil.cpu_times())

    def __enter__(self) -> CpuMeter:
        self._t0, self._start = time.perf_counter(), self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        mine, theirs, total = (b - a for a, b in zip(self._start, end, strict=True))
        wall = time.perf_counter() - self._t0
        self.result = {"wall_s": round(wall, 3), "front_cpu_s": round(mine, 3), "replicas_cpu_s": round(theirs, 3),
                       "other_cpu_s": round(max(total - mine - theirs, 0.0), 3),
                       "idle_cpu_s": round(max((os.cpu_count() or 1) * wall - total, 0.0), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=REPO / "models/demo/family")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="requests per closed-loop round")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--split", type=int, default=10, help="edge steps of the throughput and overhead requests")
    parser.add_argument("--overhead-requests", type=int, default=6, help="sequential requests per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--routers", default="soonest,pow2", help="routers compared at 2 replicas")
    parser.add_argument("--max-batch-rows", type=int, default=16)
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/cluster_bench.json")
    parser.add_argument("--machine-note", default="", help="what else ran on the machine, for the JSON")
    args = parser.parse_args()

    # Ray starts its workers at nice 15: on a machine shared with other work the replicas would lose the CPU to
    # it, and the local engine (nice 0) would not. The same priority for all, unless the caller set one.
    os.environ.setdefault("RAY_worker_niceness", "0")
    import torch

    torch.set_num_threads(1)
    from edge_server.cluster import ClusterConfig, RayEngine
    from edge_server.config import EdgeConfig
    from edge_server.engine import BatchingEngine
    from edge_server.family import load_family

    config = EdgeConfig(device="cpu", max_batch_rows=args.max_batch_rows, max_queue=64)
    uniform = (args.split,)
    routers = [r for r in args.routers.split(",") if r]
    layouts = [(1, routers[0])] + [(2, router) for router in routers]
    out: dict[str, Any] = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs{', ' + args.machine_note if args.machine_note else ''}; "
                   f"the {args.clients} clients are threads of this process, submitting to the engine directly)",
        "family": str(args.family), "steps": args.steps, "split": args.split, "clients": args.clients,
        "requests_per_round": args.requests, "rounds": args.rounds, "torch_threads_per_engine": 1,
        "method": "every engine deployed at once (idle ones cost no CPU), measured in interleaved rounds so the "
                  "machine's drifting load hits each alike; medians over the rounds",
    }
    # Every layout at once on one Ray instance: its logical CPUs are one per replica (the idle layouts sleep).
    local_cpus = sum(r for r, _ in layouts)
    engines: dict[str, Any] = {"local": BatchingEngine(lambda: load_family(args.family),
                                                       max_batch_rows=args.max_batch_rows, max_queue=64)}
    starts: dict[str, float] = {}
    try:
        for replicas, router in layouts:
            name = f"{replicas}x1_{router}"
            print(f"deploying {name} ...", flush=True)
            t0 = time.perf_counter()
            engines[name] = RayEngine.start(str(args.family), config, ClusterConfig(
                replicas=replicas, local_cpus=local_cpus, threads=1, router=router, app_name=f"bench-{name}"))
            starts[name] = round(time.perf_counter() - t0, 1)
        for name, engine in engines.items():  # warm: every replica has served
            sequential(engine, args.steps, args.split, 4, f"warm-{name}-")
        walls: dict[str, list[float]] = {name: [] for name in engines}
        edge: dict[str, list[float]] = {name: [] for name in engines}
        loops: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
        mixed: dict[str, list[dict[str, Any]]] = {name: [] for name in engines if name.startswith("2x")}
        cpu: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
        half: list[dict[str, Any]] = []
        pids = {name: sorted({view.pid for view in engine.board.replicas().values() if view.pid})
                for name, engine in engines.items() if name != "local"} | {"local": []}
        for rnd in range(args.rounds):
            print(f"round {rnd + 1} of {args.rounds} ...", flush=True)
            for name, engine in engines.items():
                w, e = sequential(engine, args.steps, args.split, args.overhead_requests, f"seq{rnd}-{name}-")
                walls[name] += w
                edge[name] += e
                with CpuMeter(pids[name]) as meter:
                    loops[name].append(closed_loop(engine, args.steps, args.clients, args.requests, uniform,
                                                   f"cl{rnd}-{name}-"))
                cpu[name].append(meter.result)
                if name == "local":
                    half.append(closed_loop(engine, args.steps, max(args.clients // 2, 1), args.requests // 2,
                                            uniform, f"half{rnd}-"))
                if name in mixed:
                    mixed[name].append(closed_loop(engine, args.steps, args.clients, args.requests, SPLITS,
                                                   f"mx{rnd}-{name}-"))
        spread = {name: sorted(st.completed for st in engine.cluster_stats().replicas.values())
                  for name, engine in engines.items() if name != "local"}
    finally:
        for name in reversed(list(engines)):  # the first cluster started Ray: it goes last
            engines[name].close()

    def med(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]} | {
            "throughput_rps_rounds": [r["throughput_rps"] for r in rows]}

    def med_cpu(rows: list[dict[str, float]]) -> dict[str, float]:
        return {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}

    local_wall, local_edge = statistics.median(walls["local"]), statistics.median(edge["local"])
    out["local"] = {"sequential_wall_s": round(local_wall, 4), "edge_compute_s": round(local_edge, 4),
                    "closed_loop": med(loops["local"]), "cpu": med_cpu(cpu["local"]),
                    f"closed_loop_{max(args.clients // 2, 1)}_clients": med(half)}
    runs: dict[str, Any] = {}
    for name in engines:
        if name == "local":
            continue
        wall, cluster_edge = statistics.median(walls[name]), statistics.median(edge[name])
        beyond = (wall - cluster_edge) - (local_wall - local_edge)
        runs[name] = {
            "start_s": starts[name], "sequential_wall_s": round(wall, 4), "edge_compute_s": round(cluster_edge, 4),
            # front -> replica -> front beyond the replica's own compute, less what the local engine spends
            # beyond its compute (admission, the hand-off from its thread): what the cluster adds
            "routing_overhead_s": round(wall - cluster_edge, 4), "routing_overhead_vs_local_s": round(beyond, 4),
            "routing_overhead_share": round(beyond / cluster_edge, 4),
            "closed_loop": med(loops[name]), "completed_per_replica": spread[name], "cpu": med_cpu(cpu[name]),
        }
        if name in mixed:
            runs[name]["mixed_closed_loop"] = med(mixed[name])
        print(f"  {name}: {json.dumps(runs[name])}", flush=True)
    out["cluster"] = runs
    one = runs[f"1x1_{routers[0]}"]["closed_loop"]["throughput_rps"]
    two = runs[f"2x1_{routers[0]}"]["closed_loop"]["throughput_rps"]
    out["speedup_2_vs_1_replicas"] = round(two / one, 3)
    # paired by round (the same few seconds of the machine's load): the median of the per-round ratios
    pairs = zip(runs[f"2x1_{routers[0]}"]["closed_loop"]["throughput_rps_rounds"],
                runs[f"1x1_{routers[0]}"]["closed_loop"]["throughput_rps_rounds"], strict=True)
    out["speedup_2_vs_1_replicas_paired"] = round(statistics.median(a / b for a, b in pairs), 3)
    out["routing_overhead_share"] = runs[f"1x1_{routers[0]}"]["routing_overhead_share"]
    # Each of 2 replicas batches half the clients: the most 2 replicas could give if nothing else differed.
    half_rps = out["local"][f"closed_loop_{max(args.clients // 2, 1)}_clients"]["throughput_rps"]
    out["batching_bound_2_vs_1"] = round(2 * half_rps / out["local"]["closed_loop"]["throughput_rps"], 3)
    print(f"throughput 2 replicas / 1 replica: {two / one:.2f}x, paired by round "
          f"{out['speedup_2_vs_1_replicas_paired']:.2f}x (target >= 1.7x); routing overhead "
          f"{100 * out['routing_overhead_share']:.1f}% of edge compute (target <= 5%); batching alone bounds 2 "
          f"replicas at {out['batching_bound_2_vs_1']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
