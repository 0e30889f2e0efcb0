"""The real-family table: family x sampler x k -> max-abs error of the two-sided relay, and each export.

For every hub family of ``lab/hub_families.py`` (published architectures, channels shrunk, random
weights): build it, ``rise-export`` it (wall time, bundle size), then for every sampler it runs and
k in {0, N/2, N}: the edge's handoff (PyTorch) through the wire codec, finished on the bundle
(onnxruntime + numpy sampler), against the family's own diffusers pipeline with the UNet swapped
for the small one after step k. Prints a markdown table and writes JSON.

    python bench/family_table.py --out bench/family_table.json [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from device_app.finish import finish_latents
from device_app.runtime import DeviceBundle
from edge_server.family import load_family
from edge_server.relay import EdgeRelay
from export.onnx_export import ExportOptions, export_bundle
from lab.hub_families import BUILDERS, pipeline_latent
from shared.handoff import decode_handoff, encode_handoff
from shared.relay_plan import RelayPlan

PROMPT, SEED, GUIDANCE = "a red fox in the snow", 7, 5.0


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads (default 1)")
    parser.add_argument("--family", action="append", default=None, choices=sorted(BUILDERS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, exports = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.family or list(BUILDERS):
            hub = BUILDERS[name](Path(tmp) / name.replace("+", "_"), 0)
            family = load_family(hub.folder, hub.small)
            started = time.perf_counter()
            bundle_dir = Path(tmp) / f"{name.replace('+', '_')}-bundle"
            export_bundle(ExportOptions(family=hub.folder, out=bundle_dir, small=hub.small), family=family)
            export_s = time.perf_counter() - started
            exports.append({"family": name, "export_s": round(export_s, 2), "bundle_bytes": _du(bundle_dir),
                            "family_bytes": _du(hub.folder)})
            bundle = DeviceBundle(bundle_dir, threads=args.threads)
            relay = EdgeRelay(family)
            for sampler in family.samplers:
                steps = 4 if sampler == "lcm" else 8
                for split in (0, steps // 2, steps):
                    plan = RelayPlan(steps, split, sampler, GUIDANCE)
                    handoff = decode_handoff(encode_handoff(relay.start(PROMPT, plan, SEED)))
                    ours = finish_latents(bundle, handoff)
                    reference = pipeline_latent(family, PROMPT, sampler, steps, split, GUIDANCE, SEED).numpy()
                    error = float(np.abs(ours - reference).max())
                    rows.append({"family": name, "sampler": sampler, "steps": steps, "k": split,
                                 "max_abs_error": error})
                    print(f"{name:24} {sampler:9} N={steps} k={split}: {error:.2e}", flush=True)
    print("\n| family | sampler | N | k=0 | k=N/2 | k=N |\n| --- | --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(r["family"] for r in rows):
        for sampler in dict.fromkeys(r["sampler"] for r in rows if r["family"] == name):
            cells = [r for r in rows if r["family"] == name and r["sampler"] == sampler]
            errors = " | ".join(f"{r['max_abs_error']:.1e}" for r in cells)
            print(f"| {name} | {sampler} | {cells[0]['steps']} | {errors} |")
    print("\n| family | export (s) | bundle (MB) | family folder (MB) |\n| --- | --- | --- | --- |")
    for e in exports:
        sizes = f"{e['bundle_bytes'] / 1e6:.1f} | {e['family_bytes'] / 1e6:.1f}"
        print(f"| {e['family']} | {e['export_s']:.1f} | {sizes} |")
    if args.out:
        machine = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
        Path(args.out).write_text(json.dumps({"machine": machine, "threads": args.threads, "prompt": PROMPT,
                                              "seed": SEED, "guidance": GUIDANCE, "relay": rows,
                                              "exports": exports}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
