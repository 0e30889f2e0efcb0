"""Relay-engine benchmark: prints figures, all ratios measured side by side in one run.

On a tiny family whose large:small per-step cost ratio is >= 4 (lab.tiny_family's
BENCH sizes, random weights; cost does not depend on the weights' values):
  1. large vs small UNet per step in PyTorch (batch 2 = one classifier-free-guided step);
  2. the small UNet per step: PyTorch vs onnxruntime fp32, fp16, int8;
  3. handoff encode + decode time and bytes;
  4. end-to-end relay time for k in {0, N/4, N/2, 3N/4, N} against large-only (k = N).
Usage: python bench/bench_relay.py [--steps 20] [--repeats 30] [--threads 2] [--workdir bench_out]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="bench_out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from device_app.runtime import DeviceBundle
    from edge_server.family import is_family_folder, load_family
    from edge_server.relay import EdgeRelay
    from edge_server.torch_types import as_unet
    from export.cli import main as export_main
    from lab.local_relay import relay_once
    from lab.tiny_family import BENCH_LARGE, BENCH_SMALL, build_tiny_family
    from shared.handoff import decode_handoff, encode_handoff
    from shared.relay_plan import RelayPlan

    work = Path(args.workdir)
    family_dir = work / "bench-family"
    if not is_family_folder(family_dir):
        build_tiny_family(family_dir, large=BENCH_LARGE, small=BENCH_SMALL)
    bundles: dict[str, DeviceBundle] = {}
    for label, flags in (("fp32", []), ("fp16", ["--dtype", "fp16"]), ("int8", ["--quantize", "int8"])):
        bundle_dir = work / f"bundle-{label}"
        if not (bundle_dir / "manifest.json").is_file():
            assert export_main(["--family", str(family_dir), "--out", str(bundle_dir), "--force", *flags]) == 0
        bundles[label] = DeviceBundle(bundle_dir, threads=args.threads)
    family = load_family(family_dir)
    large_unet, small_unet = as_unet(family.large_unet), as_unet(family.small_unet)
    n_large = sum(p.numel() for p in large_unet.parameters())
    n_small = sum(p.numel() for p in small_unet.parameters())
    print(f"machine: {torch.get_num_threads()} torch threads, ORT intra-op threads {args.threads}, "
          f"median of {args.repeats}")
    print(f"family: large UNet {n_large / 1e6:.2f} M params, small UNet {n_small / 1e6:.2f} M params")

    # 1 + 2: per-step UNet cost at batch 2 (one guided step)
    side = family.default_latent_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, family.latent_channels, side, side), dtype=np.float32)
    emb = rng.standard_normal((2, 32, family.cross_attention_dim), dtype=np.float32)
    xt, et = torch.from_numpy(x), torch.from_numpy(emb)
    with torch.no_grad():
        t_large = median_time(lambda: large_unet(xt, 500, encoder_hidden_states=et), args.repeats)
        t_small = median_time(lambda: small_unet(xt, 500, encoder_hidden_states=et), args.repeats)
    print(f"\n== UNet per step, batch 2, latent {side}x{side} ==")
    print(f"  large, PyTorch            {t_large * 1000:8.2f} ms")
    print(f"  small, PyTorch            {t_small * 1000:8.2f} ms   large:small = {t_large / t_small:.2f}x")
    for label, bundle in bundles.items():
        def ort_step(b: DeviceBundle = bundle) -> object:  # bound now, not at the loop's end
            return b.unet(x, 500, emb)

        t_ort = median_time(ort_step, args.repeats)
        print(f"  small, onnxruntime {label:<6} {t_ort * 1000:8.2f} ms   PyTorch/ORT = {t_small / t_ort:.2f}x")

    # 3: handoff codec
    n = args.steps
    plan = RelayPlan(n, n // 2, "dpmpp_2m", 7.5)
    handoff = EdgeRelay(family).start("a red sneaker top left", plan, seed=0)
    payload = encode_handoff(handoff)
    t_enc = median_time(lambda: encode_handoff(handoff), args.repeats * 10)
    t_dec = median_time(lambda: decode_handoff(payload), args.repeats * 10)
    print("\n== handoff (dpmpp_2m at k=N/2, with history) ==")
    print(f"  {len(payload)} bytes (latent alone {handoff.latents.nbytes} B); "
          f"encode {t_enc * 1e6:.0f} us, decode+validate {t_dec * 1e6:.0f} us")

    # 4: end-to-end relay, fp32 bundle
    print(f"\n== end-to-end relay, N={n}, dpmpp_2m, fp32 bundle (edge PyTorch + device ORT) ==")
    splits = sorted({0, n // 4, n // 2, 3 * n // 4, n})
    totals: dict[int, tuple[float, float, float]] = {}  # k -> median (total, edge, device) seconds
    for k in splits:
        runs = [relay_once(family, bundles["fp32"], "a red sneaker top left", RelayPlan(n, k, "dpmpp_2m", 7.5), 0)
                for _ in range(max(3, args.repeats // 10))]
        total = statistics.median(r.timings["total_s"] for r in runs)
        edge = statistics.median(r.timings["edge_s"] for r in runs)
        device = statistics.median(r.timings["device_s"] for r in runs)
        totals[k] = (total, edge, device)
    large_only = totals[n][0]
    for k, (total, edge, device) in totals.items():
        print(f"  k={k:>3}: total {total * 1000:8.1f} ms (edge {edge * 1000:7.1f}, device {device * 1000:7.1f})"
              f"   speed-up vs large-only {large_only / total:.2f}x")


if __name__ == "__main__":
    main()
