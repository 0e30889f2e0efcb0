"""Speculative relay: p95 latency and adherence against device-only and the plain relay, measured and simulated.

1. **Over the network, on this machine**: the real edge daemon (batching engine, protocol) serves the demo
   family on 127.0.0.1 with the bandit planner fixed on one relay arm (N20k10); ``--clients`` device
   clients (one connection each, closed loop) emulate a phone tier of the hardware profile
   (``--tier``, :class:`device_app.speculative.EmulatedDevice`: each ORT step padded to the tier's step
   time scaled by this edge's step over the profile's edge step, so the edge/device speed ratio is the
   profile's). Modes: ``device_only`` (every step on the device, no edge), ``relay`` (plain),
   ``speculative`` (the planner marks plans speculative by its rule, ``speculative_ratio`` 0.5). Each at
   heavy load (``--clients``) and light load (one client). Adherence: the demo scorer on every image.
2. **Simulated** (``lab.speculative_sim``): the same modes at rho 0.8, 1.0, 1.3 on gpu-edge-phones.

Writes bench/results/speculative_relay.json. Usage:
  python bench/speculative_relay.py [--clients 12] [--requests 3] [--tier iphone-12-pro-max] [--workdir bench_out]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from device_app.app.offline import device_only_handoff  # noqa: E402
from device_app.client import EdgeClient  # noqa: E402
from device_app.finish import finish_handoff  # noqa: E402
from device_app.runtime import DeviceBundle  # noqa: E402
from device_app.speculative import EmulatedDevice  # noqa: E402
from edge_server.daemon import EdgeConfig, EdgeServer  # noqa: E402
from edge_server.family import load_family  # noqa: E402
from lab.demo_family.scorer import adherence, default_scorer  # noqa: E402
from lab.hardware import load_hardware  # noqa: E402
from lab.simulator import DEMO_PROFILE, SimConfig, Simulation  # noqa: E402
from lab.speculative_sim import compare, format_comparison  # noqa: E402
from shared.bandit.planner import BanditPlanner  # noqa: E402
from shared.bandit.profile import load_profile  # noqa: E402
from shared.demo_grammar.prompts import scene_to_prompt  # noqa: E402
from shared.demo_grammar.scene import random_scene  # noqa: E402
from shared.planning import DEFAULT_SPECULATIVE_RATIO  # noqa: E402
from shared.relay_plan import RelayPlan  # noqa: E402

FAMILY = REPO / "models" / "demo" / "family"
ARM = "N20k10"
LIMITS = {"requests_per_minute": 100000.0, "burst": 1000, "max_in_flight": 8}


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [scene_to_prompt(random_scene(rng, int(rng.integers(1, 10))), rng) for _ in range(n)]


def p95(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values), 95))


async def network_mode(mode: str, clients: int, requests: int, family: Any, bundle_dir: Path, workdir: Path,
                       emulate: tuple[float, float], ratio: float) -> dict[str, Any]:
    # Every emulated device blocks a worker thread while it "computes": one thread each, not the loop's default few.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2 * clients + 8))
    texts = prompts(clients * requests, seed=clients)
    speculative_plans = [0]
    rows: list[dict[str, Any]] = []
    latencies: list[float] = []
    images: list[np.ndarray] = []
    used: list[str] = []
    paths: list[str] = []
    bundles = [DeviceBundle(bundle_dir, threads=1) for _ in range(clients)]
    for bundle in bundles:  # ORT sessions are made before the clock starts (a phone keeps its app warm)
        for graph in ("text_encoder", "unet", "vae_decoder"):
            bundle.graph(graph)

    def device(i: int) -> EmulatedDevice:
        return EmulatedDevice(step_s=emulate[0], decode_s=emulate[1])

    if mode == "device_only":
        async def alone(c: int) -> None:
            emu = device(c)
            for r in range(requests):
                text = texts[c * requests + r]
                started = time.perf_counter()

                def work(text: str = text, seed: int = c * 100 + r) -> np.ndarray:
                    handoff = device_only_handoff(bundles[c], text, RelayPlan(20, 0), seed=seed)
                    emu.start()
                    finished = finish_handoff(bundles[c], handoff, on_step=emu.step)
                    emu.decode(finished.decode_s)
                    assert finished.image is not None
                    return finished.image

                image = await asyncio.to_thread(work)
                latencies.append(time.perf_counter() - started)
                images.append(image)
                used.append(text)
                paths.append("device")

        await asyncio.gather(*(alone(c) for c in range(clients)))
    else:
        token = secrets.token_urlsafe(16)
        (workdir / "token").write_text(token)
        config = EdgeConfig(host="127.0.0.1", port=0, token_file=str(workdir / "token"), max_queue=256,
                            max_batch_rows=16, limits=dict(LIMITS))
        profile = load_profile(FAMILY / "profile.json")
        # Capacity in requests: the engine admits up to max_batch_rows requests (see the report on edge_schedule).
        planner = BanditPlanner.from_profile(profile, ARM, speculative_ratio=ratio if mode == "speculative" else None,
                                             edge_capacity=16)
        server = EdgeServer.with_batching_engine(family, config, planner=planner)
        port = await server.start()
        try:
            async def one(c: int) -> None:
                async with EdgeClient.connect(f"ws://127.0.0.1:{port}", bundles[c], token=token,
                                              emulate=device(c), timeout=600, deadline=None) as client:
                    for r in range(requests):
                        text = texts[c * requests + r]
                        result = await client.generate_with_retry(text, seed=c * 100 + r, attempts=5)
                        latencies.append(result.total_s)
                        images.append(result.image)
                        used.append(text)
                        paths.append(result.path)
                        rows.append({"client": c, "path": result.path, "latency_s": result.total_s,
                                     "plan_s": result.timings.plan_s, "speculative": bool(
                                         result.timings.speculative_steps or result.plan.plan.speculative)})
                        speculative_plans[0] += result.timings.speculative_steps > 0 or result.plan.plan.speculative

            await asyncio.gather(*(one(c) for c in range(clients)))
        finally:
            await server.stop()
    scores = adherence(np.stack(images), used, default_scorer())
    return {"mode": mode, "clients": clients, "requests": len(latencies), "latency_p95_s": p95(latencies),
            "latency_mean_s": float(np.mean(latencies)), "adherence": float(scores.mean()),
            "paths": {p: paths.count(p) for p in sorted(set(paths))}, "speculative_plans": speculative_plans[0],
            "plan_s_mean": float(np.mean([r["plan_s"] for r in rows if r["plan_s"] is not None]))
            if any(r["plan_s"] is not None for r in rows) else None, "per_request": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--requests", type=int, default=3, help="per client")
    parser.add_argument("--light-requests", type=int, default=6, help="requests of the one client at light load")
    parser.add_argument("--ratio", type=float, default=DEFAULT_SPECULATIVE_RATIO,
                        help="the planner's speculative_ratio (shared.planning.speculative_wanted)")
    parser.add_argument("--tier", default="iphone-12-pro-max")
    parser.add_argument("--workdir", default="bench_out")
    parser.add_argument("--sim-requests", type=int, default=20_000)
    parser.add_argument("--skip-network", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out: dict[str, Any] = {"machine": "this CPU machine (edge and devices share its cores)"}

    hardware = load_hardware("gpu-edge-phones")
    out["simulation"] = []
    for rho in (0.8, 1.0, 1.3):
        sim = Simulation(load_profile(DEMO_PROFILE), SimConfig(requests=args.sim_requests, warmup=2000,
                                                                hardware="gpu-edge-phones", edge_load=rho))
        doc = compare(sim)
        print(format_comparison(doc))
        out["simulation"].append(doc)

    if not args.skip_network:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        bundle_dir = workdir / "demo-bundle"
        if not (bundle_dir / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "export.cli", "--family", str(FAMILY), "--out", str(bundle_dir)],
                           cwd=REPO, check=True)
        tier = next(t for t in hardware.tiers if t.name == args.tier)
        edge_here = load_profile(FAMILY / "profile.json").timing.edge_step_s
        scale = edge_here / hardware.batch_step_s[1].value  # this edge's step over the profile's edge step
        emulate = (tier.step_s.value * scale, tier.decode_s.value * scale)
        out["network"] = {"tier": tier.name, "emulated_step_s": emulate[0], "emulated_decode_s": emulate[1],
                          "arm": ARM, "runs": []}
        print(f"network: tier {tier.name} emulated at {emulate[0] * 1e3:.0f} ms/step, {emulate[1] * 1e3:.0f} ms "
              f"decode (scale {scale:.3f}); arm {ARM}")
        family = load_family(FAMILY)
        out["network"]["ratio"] = args.ratio
        for clients, requests in ((args.clients, args.requests), (1, args.light_requests)):
            for mode in ("device_only", "relay", "speculative"):
                row = asyncio.run(network_mode(mode, clients, requests, family, bundle_dir, workdir, emulate,
                                               args.ratio))
                print(f"  {clients:>2} clients {mode:<12} p95 {row['latency_p95_s']:6.2f} s  mean "
                      f"{row['latency_mean_s']:6.2f} s  adherence {row['adherence']:.3f}  paths {row['paths']}  "
                      f"speculative plans {row['speculative_plans']}",
                      flush=True)
                out["network"]["runs"].append(row)
    target = REPO / "bench" / "results" / "speculative_relay.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
