"""Live preview: bytes per request and cost as a share of compute, edge and device, on the demo family.

Usage: ``python bench/preview_cost.py [--threads 1] [--bundle DIR] [--out bench/results/preview_cost.json]``

1. The edge: a batch of requests runs its first ``k`` steps (batched UNet calls, as the engine
   runs them), with a preview (render from ``DenoiseJob.x0`` + PNG) on every ``every``-th step
   and the last; the previews' time over the UNet steps' time is the edge's cost share (target
   <= 3%). The demo family's UNet is tiny, so this is the hard case: a larger UNet costs more
   per step while a preview's cost stays that of its latent's size.
2. The device: the same request finishes its ``N - k`` steps on ONNX Runtime with previews
   (the projection from the bundle's manifest).
3. The bytes: the PNGs of one request's previews (and their base64 size on the wire).
4. A strip of one generation's frames, edge and device, and the final picture, written to
   ``docs/preview/strip.png`` (``--strip``).

The projection's fit (once per family) is timed on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device_app.finish import finish_latents  # noqa: E402
from device_app.preview import DevicePreviewer, decode_preview_png  # noqa: E402
from device_app.runtime import DeviceBundle  # noqa: E402
from edge_server.batching import batched_step  # noqa: E402
from edge_server.family import load_family  # noqa: E402
from edge_server.preview import PreviewRenderer  # noqa: E402
from edge_server.relay import prepare  # noqa: E402
from lab.demo import DEMO_FAMILY_DIR, _ensure_bundle  # noqa: E402
from shared.demo_grammar.prompts import load_prompts  # noqa: E402
from shared.preview import preview_due  # noqa: E402
from shared.relay_plan import RelayPlan  # noqa: E402

STEPS, SPLIT, BATCH = 20, 10, 4
EVERY = (1, 2, 5)


def edge_run(family, renderer: PreviewRenderer, prompts: list[str], every: int | None) -> dict[str, float]:
    plan = RelayPlan(STEPS, SPLIT, "dpmpp_2m", 7.5)
    jobs = [prepare(family, p, plan, seed) for seed, p in enumerate(prompts)]
    unet_s = preview_s = 0.0
    nbytes: list[int] = []
    while not jobs[0].done:
        started = time.perf_counter()
        batched_step(family.large_unet, jobs)
        unet_s += time.perf_counter() - started
        if preview_due(jobs[0].next_step, SPLIT, every):
            started = time.perf_counter()
            pngs = [renderer.png(job.x0) for job in jobs if job.x0 is not None]
            preview_s += time.perf_counter() - started
            nbytes += [len(png) for png in pngs]
    return {"unet_s": unet_s, "preview_s": preview_s, "share": preview_s / unet_s,
            "previews_per_request": len(nbytes) / len(jobs), "png_bytes_per_request": sum(nbytes) / len(jobs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads (default: 1)")
    parser.add_argument("--bundle", default="demo_out/demo-bundle", help="the demo bundle (exported if missing)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/preview_cost.json"))
    parser.add_argument("--strip", default=str(ROOT / "docs/preview/strip.png"), help="'' to skip")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    family = load_family(DEMO_FAMILY_DIR)
    renderer = PreviewRenderer(family)
    started = time.perf_counter()
    renderer.projection  # noqa: B018  # the one-off fit, timed alone
    fit_s = time.perf_counter() - started
    prompts = load_prompts()[:BATCH]
    edge_run(family, renderer, prompts, 1)  # warm-up
    edge: dict[str, dict[str, float]] = {}
    for every in EVERY:
        runs = [edge_run(family, renderer, prompts, every) for _ in range(args.repeats)]
        edge[str(every)] = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        e = edge[str(every)]
        print(f"edge, a preview every {every} step(s): {e['previews_per_request']:.0f} previews/request, "
              f"{e['png_bytes_per_request']:.0f} PNG bytes/request, preview {1000 * e['preview_s']:.1f} ms vs "
              f"UNet {1000 * e['unet_s']:.1f} ms for {BATCH} requests x {SPLIT} steps = {100 * e['share']:.2f}%")

    bundle_dir = Path(args.bundle)
    _ensure_bundle(DEMO_FAMILY_DIR, bundle_dir, family.family_id)
    bundle = DeviceBundle(bundle_dir, threads=args.threads)
    previewer = DevicePreviewer(bundle)
    shipped = bundle.manifest.preview_projection is not None
    plan = RelayPlan(STEPS, SPLIT, "dpmpp_2m", 7.5)
    prompt = "a red sneaker in the top left and a blue bag on the right"
    job = prepare(family, prompt, plan, seed=3)
    edge_frames: list[np.ndarray] = []
    while not job.done:
        batched_step(family.large_unet, [job])
        if preview_due(job.next_step, SPLIT, 2) and job.x0 is not None:
            edge_frames.append(decode_preview_png(renderer.png(job.x0)))
    handoff = job.to_handoff(family.family_id, plan, 3)
    device: dict[str, dict[str, float]] = {}
    device_frames: list[np.ndarray] = []
    for every in EVERY:
        frames: list[bytes] = []

        def keep(_stage: str, _step: int, png: bytes, frames: list[bytes] = frames) -> None:
            frames.append(png)

        hook = previewer.step_hook(every, keep)
        timed: list[tuple[float, float]] = []
        for _ in range(args.repeats):
            frames.clear()
            started = time.perf_counter()
            finish_latents(bundle, handoff)
            plain = time.perf_counter() - started
            started = time.perf_counter()
            latents = finish_latents(bundle, handoff, on_x0=hook)
            timed.append((plain, time.perf_counter() - started))
        plain_s, with_s = (float(np.median([t[i] for t in timed])) for i in (0, 1))
        device[str(every)] = {"steps_s": plain_s, "with_previews_s": with_s, "share": (with_s - plain_s) / plain_s,
                              "previews": len(frames), "png_bytes": sum(len(f) for f in frames)}
        d = device[str(every)]
        print(f"device, a preview every {every} step(s): {d['previews']} previews, {d['png_bytes']} PNG bytes, "
              f"{1000 * plain_s:.1f} ms of steps, {1000 * with_s:.1f} ms with previews ({100 * d['share']:+.1f}%: "
              f"a preview's fixed ~0.5 ms against the demo's ~2 ms ORT steps; a phone's steps are 100x longer)")
        if every == 2:
            device_frames = [decode_preview_png(f) for f in frames]
    final = bundle.decode(latents)[0]
    edge_bytes = edge["2"]["png_bytes_per_request"]
    print(f"one request, a preview every 2 steps: {edge_bytes + device['2']['png_bytes']:.0f} PNG bytes in all "
          f"({edge_bytes:.0f} from the edge, {4 * -(-edge_bytes // 3):.0f} as base64 on the wire); "
          f"projection fit {1000 * fit_s:.0f} ms once per family; device projection "
          f"{'from the manifest' if shipped else 'fitted on the device (bundle without one)'}")

    if args.strip:
        side = final.shape[0]
        frames_all = edge_frames + device_frames
        tiles = [np.asarray(Image.fromarray(f).resize((side, side), Image.Resampling.NEAREST)) for f in frames_all]
        tiles.append(final)
        gap = np.full((side, 1, 3), 96, np.uint8)  # a grey line between frames (3 px once scaled)
        strip = np.concatenate([part for tile in tiles for part in (tile, gap)][:-1], axis=1)
        path = Path(args.strip)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).resize((strip.shape[1] * 3, strip.shape[0] * 3), Image.Resampling.NEAREST).save(path)
        print(f"strip ({len(edge_frames)} edge frames, {len(device_frames)} device frames, the final picture): {path}")

    result = {"machine": "2-core VM, CPU", "threads": args.threads, "family": "models/demo/family",
              "steps": STEPS, "split": SPLIT, "batch": BATCH, "fit_s": fit_s, "edge": edge, "device": device,
              "device_projection": "manifest" if shipped else "fitted on device", "prompt": prompt}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
