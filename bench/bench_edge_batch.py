"""Edge step-level batching, measured on the engine's own step: one batched call for b requests.

Prints, for b = 1, 2, 4, 8 guided requests (2 UNet rows each) at different denoising steps,
the time of one ``edge_server.batching.batched_step`` call (UNet + guidance + each request's
scheduler step) and the per-request cost against b = 1, all measured in one run. With
``--json OUT`` it writes ``{"edge_step_s": ..., "edge_batch_step_s": {"1": ..., "2": ...}}``,
the timing keys a scheduler profile takes from a benchmark
(``python -m shared.bandit.profile ... --bench OUT``).
Family: the trained demo family (models/demo/family) when present, else --family.
Usage: python bench/bench_edge_batch.py [--family DIR] [--threads 1] [--repeats 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, default=REPO / "models/demo/family")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,2,4,8", help="requests per call to measure")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from edge_server.batching import DenoiseJob, batched_step
    from edge_server.family import load_family
    from edge_server.relay import prepare
    from shared.relay_plan import RelayPlan

    family = load_family(args.family)
    plan = RelayPlan(num_inference_steps=args.steps, split=args.steps, sampler="dpmpp_2m", guidance_scale=7.5)
    sizes = [int(b) for b in args.batches.split(",")]
    params = sum(p.numel() for p in family.large_unet.parameters())  # type: ignore[attr-defined]  # diffusers placeholder
    print(f"family {args.family}: large UNet {params / 1e6:.1f} M params, "
          f"torch threads {args.threads}, dpmpp_2m with guidance (2 UNet rows per request)")

    def fresh(b: int) -> list[DenoiseJob]:
        jobs = [prepare(family, f"a red sneaker in the middle {i}", plan, seed=i) for i in range(b)]
        for i, job in enumerate(jobs):  # requests at different steps, as in the service
            job.next_step = (3 * i) % (args.steps // 2)
        return jobs

    times: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(3):  # warm-up
        for b in sizes:
            batched_step(family.large_unet, fresh(b))
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every size alike
        for b in sizes:
            jobs = fresh(b)
            t0 = time.perf_counter()
            batched_step(family.large_unet, jobs)
            times[b].append(time.perf_counter() - t0)
    median = {b: statistics.median(ts) for b, ts in times.items()}
    base = median[sizes[0]] / sizes[0]
    print(f"{'requests':>8} {'rows':>5} {'ms/call':>9} {'ms/request':>11} {'speed-up/request':>17}")
    for b in sizes:
        print(f"{b:>8} {2 * b:>5} {median[b] * 1e3:>9.1f} {median[b] / b * 1e3:>11.2f} "
              f"{base / (median[b] / b):>16.2f}x")
    if args.json:
        out: dict[str, float | dict[str, float]] = {"edge_batch_step_s": {str(b): round(median[b], 6) for b in sizes}}
        if 1 in median:
            out["edge_step_s"] = round(median[1], 6)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
