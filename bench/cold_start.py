"""A family's cold start on a cluster replica against one request's edge time there once it is loaded.

What the router weighs (``edge_server.cluster``: a replica without the request's family is ranked as if it had to
load it first, for the load seconds the replicas measure). Measured on the machine it runs on, with the replica's
own code (an :class:`~edge_server.cluster.EdgeReplica` driven in this process: its
:class:`~edge_server.family_pool.FamilyPool` loads a family exactly as in a Ray Serve replica; Ray's own start-up
of the replica process is not counted, it is paid once per replica, not per family), ``--threads`` torch threads:

* *load*: the seconds the pool measures for a family's load (load_family + its engine started), as the replica
  reports them (``FamilyLoad.load_s``); each family is loaded ``2 x --repeats`` times: as a replica's family at
  start, and on demand on a replica holding the other;
* *cold request*: a request for the family sent to a replica holding only the other one (wall, submit -> outcome:
  the load plus the request);
* *warm request*: the same request on the replica once it holds the family (wall and the engine's edge compute),
  ``--requests`` of them after one warm-up;
* the bytes per second of the loads (the family's ``weight_bytes()`` over its load seconds), what the router's
  estimate of a family not yet loaded anywhere uses (``LoadBoard.cold_start_s``);
* *estimate*: what the replica's pool told the planner (and the device, as the plan's ``loading_s``) the cold
  request would wait for, just before it (``FamilyPool.cold_start_s``: the family is not loaded there yet, so its
  weight bytes at the rate of the home family's load), beside that request's measured load.

Families: the demo family (models/demo/family) and a tiny SD1.5-shaped one (``lab.hub_families``
``build_sd15_bk_sdm_tiny``, built in a temp dir). Plan: the edge's defaults, ``--steps`` (20) at ``--split`` (10)
edge steps, dpmpp_2m, the family's default size. Writes ``--json`` (default bench/results/cold_start.json).
Usage: python bench/cold_start.py [--threads 1] [--repeats 2] [--requests 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _wall(replica: Any, wire: Any) -> tuple[float, float]:
    """(wall seconds, edge compute seconds) of one request on ``replica``."""

    async def run() -> Any:
        return [event async for event in replica.run(wire)]

    t0 = time.perf_counter()
    events = asyncio.run(run())
    wall = time.perf_counter() - t0
    last = events[-1]
    if last.kind != "outcome" or last.outcome is None:
        raise RuntimeError(f"the request failed: {last.error} {last.message}")
    return wall, float(last.outcome.edge_compute_s)


def measure(specs: list[Any], threads: int, repeats: int, requests: int, steps: int, split: int) -> dict[str, Any]:
    from edge_server.cluster import EdgeReplica, WireRequest
    from edge_server.family import describe_family
    from shared.relay_plan import RelayPlan

    plan = RelayPlan(steps, split, "dpmpp_2m", 7.5)
    infos = [describe_family(s.folder, s.small) for s in specs]
    out: dict[str, dict[str, Any]] = {
        s.name: {"family_id": i.family_id, "folder": s.folder, "weight_bytes": i.weight_bytes(),
                 "default_size": i.default_size, "load_s": [], "cold_request_wall_s": [], "warm_request_wall_s": [],
                 "warm_edge_compute_s": [], "cold_start_estimate_s": [], "cold_start_actual_s": []}
           for s, i in zip(specs, infos, strict=True)}
    n = 0
    for _ in range(repeats):
        for home in range(len(specs)):
            replica = EdgeReplica(specs, device="cpu", dtype="fp32", threads=threads, max_batch_rows=4, home=home)
            try:
                for index, (spec, info) in enumerate(zip(specs, infos, strict=True)):
                    if index == home:
                        continue
                    fid = info.family_id

                    def wire(tag: str, fid: str = fid) -> Any:
                        nonlocal n
                        n += 1
                        return WireRequest(f"bench:{tag}{n}", f"{tag}{n}", "a red sneaker on a wooden table", plan,
                                           n, None, None, family=fid)

                    out[spec.name]["cold_start_estimate_s"].append(round(replica.pool.cold_start_s(fid), 4))
                    out[spec.name]["cold_request_wall_s"].append(round(_wall(replica, wire("cold"))[0], 4))
                    out[spec.name]["cold_start_actual_s"].append(round(replica.pool.counters(fid)[2][-1], 4))
                    _wall(replica, wire("warmup"))
                    for _ in range(requests):
                        wall, edge = _wall(replica, wire("warm"))
                        out[spec.name]["warm_request_wall_s"].append(round(wall, 4))
                        out[spec.name]["warm_edge_compute_s"].append(round(edge, 4))
                for spec, info in zip(specs, infos, strict=True):
                    out[spec.name]["load_s"] += [round(s, 4) for s in replica.pool.counters(info.family_id)[2]]
            finally:
                replica.pool.close(drain=False, timeout=10)
    for entry in out.values():
        load = statistics.median(entry["load_s"])
        warm = statistics.median(entry["warm_request_wall_s"])
        entry["load_s_median"] = round(load, 4)
        entry["load_bytes_per_s"] = round(entry["weight_bytes"] / load)
        entry["cold_request_wall_s_median"] = round(statistics.median(entry["cold_request_wall_s"]), 4)
        entry["warm_request_wall_s_median"] = round(warm, 4)
        entry["warm_edge_compute_s_median"] = round(statistics.median(entry["warm_edge_compute_s"]), 4)
        entry["load_over_warm_request"] = round(load / warm, 2)
        entry["estimate_over_actual"] = [round(e / a, 2) for e, a in
                                         zip(entry["cold_start_estimate_s"], entry["cold_start_actual_s"], strict=True)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=REPO / "models/demo/family", help="the demo family")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3, help="warm requests per family per replica")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--split", type=int, default=10)
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/cold_start.json")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from edge_server.config import FamilySpec
    from edge_server.logs import silence_library_noise
    from lab.hub_families import build_sd15_bk_sdm_tiny

    silence_library_noise()
    with tempfile.TemporaryDirectory() as tmp:
        sd15 = build_sd15_bk_sdm_tiny(Path(tmp) / "sd15-tiny").folder
        specs = [FamilySpec("demo", str(args.family)), FamilySpec("sd15-tiny", str(sd15))]
        families = measure(specs, args.threads, args.repeats, args.requests, args.steps, args.split)
    for entry in families.values():
        entry["folder"] = os.path.relpath(entry["folder"], REPO) if entry["folder"].startswith(str(REPO)) else "(temp)"
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                          "python": platform.python_version()},
              "plan": {"steps": args.steps, "split": args.split, "sampler": "dpmpp_2m"},
              "repeats": args.repeats, "families": families}
    print(f"{'family':<10} {'MB':>6} {'load s':>8} {'MB/s':>7} {'cold req s':>11} {'warm req s':>11} "
          f"{'edge s':>8} {'load/warm':>9}")
    for name, e in families.items():
        print(f"{name:<10} {e['weight_bytes'] / 1e6:>6.1f} {e['load_s_median']:>8.3f} "
              f"{e['load_bytes_per_s'] / 1e6:>7.1f} {e['cold_request_wall_s_median']:>11.3f} "
              f"{e['warm_request_wall_s_median']:>11.3f} {e['warm_edge_compute_s_median']:>8.3f} "
              f"{e['load_over_warm_request']:>9.2f}")
        print(f"  loads {e['load_s']}  cold requests {e['cold_request_wall_s']}  warm {e['warm_request_wall_s']}")
        print(f"  cold start told {e['cold_start_estimate_s']} s, took {e['cold_start_actual_s']} s "
              f"(estimate / actual {e['estimate_over_actual']})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
