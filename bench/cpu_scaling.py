"""How much two processes get out of this machine's cores: the ceiling of 2 edge replicas on it, without Ray.

Each worker process loads the demo family's large UNet (1 torch thread) and runs ``--calls`` UNet calls at
``--rows`` batch rows, as one replica's batching engine would. Measured in interleaved rounds: one worker alone,
then two at once. ``scaling`` = the work two workers did per second / what one alone did: 2.0 on two free,
independent cores; less where the cores share what a UNet call needs (memory bandwidth, cache, a host's
hyperthreads behind the VM's CPUs). ``bench/cluster_bench.py`` cannot beat it with 2 replicas x 1 thread.

Writes ``--json`` (default bench/results/cpu_scaling.json). Usage:
  python bench/cpu_scaling.py [--family models/demo/family] [--rows 8] [--calls 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _worker(family: str, rows: int, calls: int, start: Any, done: Any) -> None:
    import torch

    torch.set_num_threads(1)
    from edge_server.family import load_family

    unet: Any = load_family(family).large_unet
    cfg = unet.config
    side = int(cfg.sample_size)
    latents = torch.randn(rows, int(cfg.in_channels), side, side)
    text = torch.randn(rows, 77 if cfg.cross_attention_dim > 128 else 104, int(cfg.cross_attention_dim))
    t = torch.full((rows,), 500)
    with torch.no_grad():
        for _ in range(3):  # warm-up
            unet(latents, t, encoder_hidden_states=text)
        start.wait()
        t0 = time.perf_counter()
        for _ in range(calls):
            unet(latents, t, encoder_hidden_states=text)
        done.put(time.perf_counter() - t0)


def run(family: str, rows: int, calls: int, workers: int) -> float:
    """Seconds until ``workers`` processes have each done ``calls`` UNet calls, started together."""
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(family, rows, calls, start, done)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    time.sleep(0.5)
    start.set()
    seconds = max(done.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join(60)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=str(REPO / "models/demo/family"))
    parser.add_argument("--rows", type=int, default=8, help="batch rows per UNet call (2 per guided request)")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "bench/results/cpu_scaling.json")
    parser.add_argument("--machine-note", default="")
    args = parser.parse_args()
    alone, pair = [], []
    for rnd in range(args.rounds):
        alone.append(run(args.family, args.rows, args.calls, 1))
        pair.append(run(args.family, args.rows, args.calls, 2))
        print(f"round {rnd + 1}: one worker {alone[-1]:.2f} s, two at once {pair[-1]:.2f} s "
              f"(scaling {2 * alone[-1] / pair[-1]:.2f}x)", flush=True)
    scaling = [2 * a / p for a, p in zip(alone, pair, strict=True)]
    out = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs){', ' + args.machine_note if args.machine_note else ''}",
        "family": args.family, "rows": args.rows, "calls": args.calls, "torch_threads_per_worker": 1,
        "one_worker_s": [round(a, 3) for a in alone], "two_workers_s": [round(p, 3) for p in pair],
        "scaling_rounds": [round(s, 3) for s in scaling], "scaling": round(statistics.median(scaling), 3),
    }
    print(f"two 1-thread workers do {out['scaling']:.2f}x the UNet work of one (2.00 = two independent cores)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
